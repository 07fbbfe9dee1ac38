"""Shared handling of config sections that become settings dataclasses."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import fields
from typing import Any


def section(
    cls: type, d: Mapping[str, Any] | None, name: str, tuples: Iterable[str] = ()
) -> dict[str, Any]:
    """A copy of config section ``name`` for dataclass ``cls``; unknown keys are an error.

    Keys named in ``tuples`` become tuples (YAML gives lists; the dataclasses are frozen).
    """
    d = dict(d or {})
    known = {f.name for f in fields(cls)}
    unknown = set(d) - known
    if unknown:
        raise ValueError(f"unknown {name} keys: {sorted(unknown)}; known: {sorted(known)}")
    for key in tuples:
        if d.get(key) is not None:
            d[key] = tuple(d[key])
    return d

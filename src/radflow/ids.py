"""Stable pseudonyms and path-safe identifiers."""

from __future__ import annotations

import csv
import hashlib
import hmac
import os
import re

_SAFE = re.compile(r"[^A-Za-z0-9_-]+")

PREFIX = {"subject": "sub", "study": "stu", "series": "ser", "case": "case"}


def pseudonym(kind: str, raw: str, salt: str, length: int = 12) -> str:
    """Keyed-hash pseudonym for a raw identifier, e.g. ``sub-3f2a9c01b7de``."""
    if kind not in PREFIX:
        raise ValueError(f"unknown id kind {kind!r}; expected one of {sorted(PREFIX)}")
    if not salt:
        raise ValueError("ids.salt must be a non-empty string")
    msg = f"{kind}\x00{raw}".encode()
    digest = hmac.new(salt.encode(), msg, hashlib.sha256).hexdigest()[:length]
    return f"{PREFIX[kind]}-{digest}"


def case_id(study_uid: str, series_uid: str, salt: str) -> str:
    """Pseudonymous case id for one series of one study."""
    return pseudonym("case", f"{study_uid}/{series_uid}", salt)


def sanitize(value: str, max_len: int = 64) -> str:
    """Make any string safe as a single path component (no separators, no dots-only names)."""
    cleaned = _SAFE.sub("_", str(value)).strip("_")[:max_len]
    return cleaned or "unnamed"


def series_id_of(inventory_csv: str | os.PathLike, case_id: str) -> str:
    """The series pseudonym of a selected case, from the public inventory's CSV. Read with the
    csv module: a convert job pays no pandas import (half a second and 85 MB) for one value."""
    if not case_id:  # rejected series have an empty case_id: never match one of them
        raise ValueError(f"a case id is needed to look its series up in {inventory_csv}")
    with open(inventory_csv, newline="") as fh:
        for row in csv.DictReader(fh):
            if row["case_id"] == case_id:
                return row["series_id"]
    raise ValueError(f"case {case_id!r} is not in the inventory {inventory_csv}")


KEY_COLUMNS = (
    "case_id",
    "subject_id",
    "study_id",
    "series_id",
    "StudyInstanceUID",
    "SeriesInstanceUID",
)

OPTIONAL_KEYS = ("mask",)


def case_keys_reader(id_map: str | os.PathLike | None):  # noqa: ANN201 - a closure
    """A function case_id -> the ids a path template may use, from the private id map.

    Templates (``segment.precomputed``, ``qc.reference``, ``explain.lesion_reference``) may
    name raw UIDs; they are filled inside the job from the private id map, so neither the
    resolved path nor the UID ever reaches a Snakemake log, metadata record or report.
    """
    if id_map is None:
        raise ValueError("a path template with case placeholders needs the private id map")
    table: dict[str, dict[str, str]] | None = None

    def keys(case_id: str) -> dict[str, str]:
        nonlocal table
        if table is None:
            table = _read_keys(id_map)
        if case_id not in table:
            raise KeyError(f"{case_id} is not in the private id map")
        return table[case_id]

    return keys


def _read_keys(id_map: str | os.PathLike) -> dict[str, dict[str, str]]:
    from radflow.io import read_id_map  # raw values: the Parquet, not the neutralised CSV

    table = read_id_map(id_map)
    # a NIfTI sheet's mask column (``{mask}``: segment.precomputed's default for a sheet)
    cols = [*KEY_COLUMNS, *(c for c in OPTIONAL_KEYS if c in table.columns)]
    rows = table[cols].to_dict("records")
    return {r["case_id"]: r for r in rows if r["case_id"]}


def fill_template(template: str, keys: dict[str, str]) -> str:
    """A path template with ``{case_id}``, ``{StudyInstanceUID}``... filled in.

    A placeholder whose value is blank (a series whose UIDs an anonymiser blanked, grouped by
    fallback keys) is refused: filled with nothing it would name another case's file.
    """
    import string

    names = {f for _, f, _, _ in string.Formatter().parse(template) if f}
    unknown = sorted(names - set(keys))
    if unknown:
        raise ValueError(
            f"unknown placeholder {{{unknown[0]}}} in a path template; known: {sorted(keys)}"
        )
    blank = sorted(n for n in names if keys[n] is None or str(keys[n]).strip() in ("", "nan"))
    if blank:
        raise ValueError(
            f"the path template needs {{{blank[0]}}}, which this case does not have (blank "
            "in its DICOM: the series was grouped by fallback keys); use {case_id} instead"
        )
    return template.format(**keys)

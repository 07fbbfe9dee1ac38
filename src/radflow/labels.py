"""The labels sheet: reading, validating and joining class labels to series.

A sheet is a CSV with one row per key value (``labels.key``: PatientID, StudyInstanceUID or
AccessionNumber) and a label column (``labels.column``). radflow trains a binary classifier, so
every label must be 0 or 1 after the optional ``labels.mapping`` (sheet value -> 0/1, e.g.
``{benign: 0, malignant: 1}``). A sheet that breaks this stops the workflow when it starts, with
the offending values named, instead of training a model of another shape that dies later.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import pandas as pd

CLASSES = (0, 1)
KEYS = ("PatientID", "StudyInstanceUID", "AccessionNumber")
_NULL = {"", "null", "none", "~"}


@dataclass(frozen=True)
class LabelSpec:
    """Where labels come from and how they join to series (config key ``labels``)."""

    path: str | None = None
    key: str = "PatientID"
    column: str = "label"
    mapping: Mapping[str, int] | None = field(default=None, hash=False)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any] | None) -> LabelSpec:
        """From a config mapping; ``path`` given as the text null/none (``--config``) is None."""
        d = dict(d or {})
        unknown = set(d) - {"path", "key", "column", "mapping"}
        if unknown:
            raise ValueError(f"unknown labels keys: {sorted(unknown)}")
        path = d.get("path")
        if isinstance(path, str) and path.strip().lower() in _NULL:
            path = None
        d["path"] = path
        if d.get("key", "PatientID") not in KEYS:
            raise ValueError(f"labels.key must be one of {KEYS}, got {d['key']!r}")
        return cls(**d)


class LabelError(ValueError):
    """A labels sheet that cannot be used as it is."""


def read_labels(spec: LabelSpec) -> pd.DataFrame | None:
    """The sheet's key and label columns (label as int 0/1), or None when no sheet is set.

    Raises ``LabelError`` naming the problem: missing columns, duplicated keys, empty or
    non-numeric labels without a mapping, values outside 0/1 after the mapping.
    """
    if not spec.path:
        return None
    if not os.path.exists(spec.path):
        raise LabelError(f"labels sheet {spec.path} does not exist (labels.path)")
    df = pd.read_csv(spec.path, dtype=str, keep_default_na=False)
    for col in (spec.key, spec.column):
        if col not in df.columns:
            raise LabelError(
                f"labels sheet {spec.path} has no column {col!r}; has {list(df.columns)}"
            )
    df = df[[spec.key, spec.column]].copy()
    df[spec.key] = df[spec.key].str.strip()
    if (df[spec.key] == "").any():
        raise LabelError(
            f"labels sheet {spec.path}: {int((df[spec.key] == '').sum())} empty key(s)"
        )
    dup = df[spec.key].duplicated()
    if dup.any():
        raise LabelError(
            f"labels sheet {spec.path}: {df.loc[dup, spec.key].nunique()} duplicated "
            f"{spec.key} value(s)"
        )
    df[spec.column] = to_classes(df[spec.column], spec)
    return df


def to_classes(values: pd.Series, spec: LabelSpec) -> pd.Series:
    """Sheet values -> 0/1 through ``spec.mapping`` (or as integers); anything else is an error."""
    raw = values.astype(str).str.strip()
    if spec.mapping:
        mapping = {str(k).strip(): v for k, v in spec.mapping.items()}
        bad_targets = sorted({v for v in mapping.values() if v not in CLASSES})
        if bad_targets:
            raise LabelError(f"labels.mapping maps to {bad_targets}: classes must be 0 or 1")
        unknown = sorted(set(raw) - set(mapping))
        if unknown:
            raise LabelError(
                f"labels sheet {spec.path}: value(s) {unknown[:5]} in column {spec.column!r} "
                f"are not in labels.mapping {sorted(mapping)}"
            )
        return raw.map(mapping).astype(int)
    nums = pd.to_numeric(raw, errors="coerce")
    bad = sorted(set(raw[nums.isna() | (nums % 1 != 0)]))
    if bad:
        raise LabelError(
            f"labels sheet {spec.path}: non-integer label(s) {bad[:5]} in column "
            f"{spec.column!r}; map text labels to 0/1 with labels.mapping"
        )
    outside = sorted({int(v) for v in nums if int(v) not in CLASSES})
    if outside:
        raise LabelError(
            f"labels sheet {spec.path}: label value(s) {outside[:5]} in column {spec.column!r}: "
            "radflow trains a binary classifier (0 = negative, 1 = positive); map other values "
            "with labels.mapping, e.g. {2: 0, 3: 1}"
        )
    return nums.astype(int)


def join_labels(series: pd.DataFrame, labels: pd.DataFrame | None, spec: LabelSpec) -> pd.DataFrame:
    """Attach ``label`` (nullable int) and ``has_label`` by the configured key column.

    Without a sheet both are NA (unknown, not "unlabelled").
    """
    out = series.copy()
    if labels is None:
        out["label"] = pd.array([pd.NA] * len(out), dtype="Int64")
        out["has_label"] = pd.array([pd.NA] * len(out), dtype="boolean")
        return out
    lookup = dict(zip(labels[spec.key], labels[spec.column], strict=True))
    out["label"] = pd.array(
        [lookup.get(str(k).strip(), pd.NA) for k in out[spec.key]], dtype="Int64"
    )
    out["has_label"] = out["label"].notna()
    return out

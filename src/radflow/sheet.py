"""The NIfTI cohort sheet: reading and validating it (``input.sheet``).

A CSV with one row per volume: ``image`` (path relative to the sheet, or absolute),
``subject_id``, and optionally ``study_id``, ``label``, ``split`` (train/val/test) and ``mask``
(a precomputed label map, relative like ``image``). The rows' columns are described in
``workflow/schemas/sheet.schema.yaml``.

A sheet whose structure is wrong (a required column missing, an empty image or subject cell,
a volume listed twice, a split other than train/val/test, one subject in two splits, a label
that is not a class) stops the workflow when it starts, naming the rows -- like the labels
sheet. A volume that cannot be used (missing file, 4-D, no orientation...) is that volume's
problem: ingest records it and the cohort goes on (``radflow.nifti_input``).
"""

from __future__ import annotations

import os
from pathlib import Path

import pandas as pd

from radflow.labels import LabelError, LabelSpec, to_classes
from radflow.paths import SPLITS

REQUIRED = ("image", "subject_id")
OPTIONAL = ("study_id", "label", "split", "mask")


class SheetError(ValueError):
    """A cohort sheet that cannot be used as it is."""


def _rows(mask: pd.Series) -> str:
    """Sheet row numbers (the header is line 1) of the True entries, a few of them."""
    idx = [int(i) + 2 for i in mask[mask].index[:5]]
    more = "" if int(mask.sum()) <= 5 else f" and {int(mask.sum()) - 5} more"
    return f"line(s) {', '.join(map(str, idx))}{more}"


def read_sheet(path: str | os.PathLike, labels: LabelSpec | None = None) -> pd.DataFrame:
    """The sheet as strings (``label`` as nullable 0/1, ``split`` "" when not given) plus
    ``image_path`` and ``mask_path``: the files, resolved against the sheet's folder.

    Raises ``SheetError`` naming the problem and its lines. ``labels.mapping`` maps the label
    column's values to 0/1, as for a labels sheet; an empty label cell is an unlabelled volume.
    """
    path = Path(path)
    if not path.is_file():
        raise SheetError(f"cohort sheet {path} does not exist (input.sheet)")
    try:
        df = pd.read_csv(path, dtype=str, keep_default_na=False)
    except (ValueError, UnicodeDecodeError) as exc:
        raise SheetError(f"cohort sheet {path} is not a readable CSV: {exc}") from None
    df.columns = [str(c).strip() for c in df.columns]
    missing = [c for c in REQUIRED if c not in df.columns]
    if missing:
        raise SheetError(
            f"cohort sheet {path} has no column(s) {missing}; has {list(df.columns)} "
            f"(needs {list(REQUIRED)}, optional {list(OPTIONAL)})"
        )
    if df.empty:
        raise SheetError(f"cohort sheet {path} has no rows")
    for col in (*REQUIRED, *OPTIONAL):
        df[col] = df[col].str.strip() if col in df.columns else ""
    for col in REQUIRED:
        empty = df[col] == ""
        if empty.any():
            raise SheetError(f"cohort sheet {path}: empty {col!r} on {_rows(empty)}")
    root = path.resolve().parent
    df["image_path"] = [str(root / p) for p in df["image"]]
    df["mask_path"] = [str(root / p) if p else "" for p in df["mask"]]
    dup = df["image_path"].duplicated(keep=False)
    if dup.any():
        raise SheetError(f"cohort sheet {path}: the same image is listed on {_rows(dup)}")
    df["split"] = df["split"].str.lower()
    bad = ~df["split"].isin(["", *SPLITS])
    if bad.any():
        values = sorted(set(df.loc[bad, "split"]))[:5]
        raise SheetError(
            f"cohort sheet {path}: split value(s) {values} on {_rows(bad)}; "
            f"use {list(SPLITS)} or leave it empty"
        )
    given = df[df["split"] != ""]
    torn = given.groupby("subject_id")["split"].nunique()
    torn = torn[torn > 1]
    if len(torn):
        rows = df["subject_id"].isin(torn.index) & (df["split"] != "")
        raise SheetError(
            f"cohort sheet {path}: {len(torn)} subject(s) in more than one split ({_rows(rows)});"
            " a subject's volumes share a split"
        )
    df["label"] = _labels(df["label"], labels or LabelSpec(), path)
    return df.reset_index(drop=True)


def _labels(values: pd.Series, spec: LabelSpec, path: Path) -> pd.Series:
    """Label cells as nullable 0/1 (empty = unlabelled) through ``labels.mapping``."""
    out = pd.array([pd.NA] * len(values), dtype="Int64")
    given = values != ""
    if given.any():
        try:
            classes = to_classes(values[given], LabelSpec(path=str(path), mapping=spec.mapping))
        except LabelError as exc:
            raise SheetError(str(exc)) from None
        out[given.to_numpy()] = classes.to_numpy()
    return pd.Series(out, index=values.index)

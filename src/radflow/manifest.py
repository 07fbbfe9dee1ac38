"""manifest: the public contract downstream models read (cases, exclusions, splits, datalist).

* ``manifests/cases.csv`` / ``cases.parquet``: one row per usable case, columns documented in
  ``manifests/README.md`` and checked by a pandera schema on every write and read; a case
  without a label (no sheet, or not in it) is a row with an empty ``label``: preprocessing-only
  runs end here, and train/evaluate use the labelled rows alone (``labelled``);
* ``manifests/excluded.csv``: every series or case that did not make it, with stage and reason;
* ``manifests/datalist.json``: Medical Segmentation Decathlon form (MONAI
  ``load_decathlon_datalist`` reads it), and ``manifests/split_{train,val,test}.csv``;
* splits are grouped by subject (no subject in two splits), stratified by label, deterministic by
  seed, and stable as the cohort grows: ``manifests/split_registry.csv`` remembers every
  subject's split and fold, and only new subjects are assigned (to the splits their label
  stratum is shortest of).
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd
import pandera.pandas as pa

import radflow
from radflow import paths
from radflow.io import read_id_map, sha256_file, write_json, write_table

SPLITS = paths.SPLITS
EXCLUDED_COLUMNS = ["id", "subject_id", "stage", "reason_code", "reason"]


def _col(dtype: Any, nullable: bool = False, **checks: Any) -> pa.Column:
    cs = []
    if "ge" in checks:
        cs.append(pa.Check.ge(checks["ge"]))
    if "isin" in checks:
        cs.append(pa.Check.isin(checks["isin"]))
    if "regex" in checks:
        cs.append(pa.Check.str_matches(checks["regex"]))
    return pa.Column(dtype, checks=cs, nullable=nullable, coerce=True)


_PATH = {"regex": r"^results/[A-Za-z0-9_./-]+$"}
_SHA = {"regex": r"^[0-9a-f]{64}$"}
CASES_SCHEMA = pa.DataFrameSchema(
    {
        "case_id": _col(str, regex=r"^case-[0-9a-f]{12}$"),
        "subject_id": _col(str, regex=r"^sub-[0-9a-f]{12}$"),
        "study_id": _col(str, regex=r"^stu-[0-9a-f]{12}$"),
        "series_id": _col(str, regex=r"^ser-[0-9a-f]{12}$"),
        "label": _col("Int64", nullable=True, ge=0),
        "split": _col(str, isin=list(SPLITS)),
        "fold": _col(int, ge=-1),
        "image": _col(str, **_PATH),
        "label_map": _col(str, nullable=True, **_PATH),  # empty: segment.backend none
        "masked": _col(str, **_PATH),
        "roi": _col(str, **_PATH),
        "qc": _col(str, **_PATH),
        "image_nx": _col(int, ge=1),
        "image_ny": _col(int, ge=1),
        "image_nz": _col(int, ge=1),
        "image_sx_mm": _col(float, ge=0),
        "image_sy_mm": _col(float, ge=0),
        "image_sz_mm": _col(float, ge=0),
        "masked_nx": _col(int, ge=1),
        "masked_ny": _col(int, ge=1),
        "masked_nz": _col(int, ge=1),
        "masked_sx_mm": _col(float, ge=0),
        "masked_sy_mm": _col(float, ge=0),
        "masked_sz_mm": _col(float, ge=0),
        "roi_volume_ml": _col(float, ge=0),
        "flags": _col(str),
        "sha256_image": _col(str, **_SHA),
        "sha256_label_map": _col(str, nullable=True, **_SHA),
        "sha256_masked": _col(str, **_SHA),
        "sha256_roi": _col(str, **_SHA),
        "sha256_qc": _col(str, **_SHA),
        "slice_thickness_mm": _col(float, nullable=True),
        "kernel": _col(str, nullable=True),
        "manufacturer": _col(str, nullable=True),
        "radflow_version": _col(str),
        "config_hash": _col(str, regex=r"^[0-9a-f]{16}$"),
    },
    strict=True,
    ordered=True,
    unique=["case_id"],
    checks=[
        pa.Check(
            lambda df: ~df.groupby("subject_id")["split"].transform("nunique").gt(1),
            error="a subject appears in more than one split",
        )
    ],
)
CASE_COLUMNS = list(CASES_SCHEMA.columns)


def validate(df: pd.DataFrame) -> pd.DataFrame:
    """Check a cases manifest against the schema; a clear error names every failing column."""
    try:
        return CASES_SCHEMA.validate(df, lazy=True)
    except pa.errors.SchemaErrors as exc:
        lines: dict[str, list[str]] = {}
        for r in exc.failure_cases.itertuples():
            where = r.column if isinstance(r.column, str) else "table"
            examples = lines.setdefault(f"{where}: {r.check}", [])
            if len(examples) < 3:
                examples.append(str(r.failure_case))
        text = "\n  ".join(f"{k} (e.g. {', '.join(v)})" for k, v in sorted(lines.items()))
        raise ValueError(f"manifest does not match the schema:\n  {text}") from exc


def read(path: str | os.PathLike) -> pd.DataFrame:
    """Read ``cases.parquet`` or ``cases.csv`` and return it validated."""
    path = Path(path)
    df = pd.read_parquet(path) if path.suffix == ".parquet" else pd.read_csv(path)
    if "flags" in df.columns:  # CSV reads an empty text as missing
        df["flags"] = df["flags"].fillna("")
    return validate(df)


class NoLabelledCasesError(ValueError):
    """A stage that needs labels got a manifest without a labelled case."""


def labelled(cases: pd.DataFrame, what: str = "training") -> pd.DataFrame:
    """The rows of a manifest with a label (unlabelled cases are for preprocessing only)."""
    out = cases[cases["label"].notna()].copy()
    if out.empty:
        raise NoLabelledCasesError(
            f"no labelled case in the manifest: {what} needs labels (set labels.path to a "
            "sheet that names these cases); the manifests and masks are complete without them"
        )
    out["label"] = out["label"].astype(int)
    return out


# --------------------------------------------------------------------------- splits


@dataclass(frozen=True)
class SplitSettings:
    """Split fractions, folds and seed (config key ``manifest``)."""

    train: float = 0.6
    val: float = 0.2
    test: float = 0.2
    folds: int = 0  # 0 = no cross-validation folds
    seed: int = 0

    def fractions(self) -> dict[str, float]:
        """Normalised split fractions."""
        total = self.train + self.val + self.test
        return {"train": self.train / total, "val": self.val / total, "test": self.test / total}


def _order(subject: str, seed: int) -> str:
    return hashlib.sha256(f"{seed}:{subject}".encode()).hexdigest()


def assign_splits(
    subjects: pd.DataFrame,
    settings: SplitSettings,
    registry: pd.DataFrame | None = None,
    given: Mapping[str, str] | None = None,
) -> pd.DataFrame:
    """Split and fold per subject (columns subject_id, label -> + split, fold).

    ``given`` (subject -> split: a NIfTI sheet's split column, e.g. a challenge's official
    split) is honoured as it is, over the registry. Subjects already in ``registry`` keep
    their split and fold. The others are taken in a seed-determined order and each goes to the
    split (then fold) that its label stratum is furthest below target on, so the first run is
    exactly stratified and later runs stay close.
    """
    subjects = subjects.drop_duplicates("subject_id")[["subject_id", "label"]]
    known = (
        registry[["subject_id", "split", "fold"]]
        if registry is not None and len(registry)
        else pd.DataFrame({"subject_id": [], "split": [], "fold": []})
    )
    out = subjects.merge(known, on="subject_id", how="left").reset_index(drop=True)
    out["split"] = out["split"].astype(object)
    out["fold"] = out["fold"].astype("Int64")
    for i, subject in out["subject_id"].items():
        split = (given or {}).get(subject)
        if split and out.loc[i, "split"] != split:  # the official split; its fold anew
            out.loc[i, "split"] = split
            out.loc[i, "fold"] = pd.NA
    frac = settings.fractions()
    out["_order"] = [_order(s, settings.seed) for s in out["subject_id"]]
    # unlabelled subjects are a stratum of their own (NA groups with dropna=False)
    strata = out.sort_values("_order").groupby("label", sort=True, dropna=False)
    for _label, idx in strata.groups.items():
        stratum = out.loc[idx].sort_values("_order")
        n = len(stratum)
        for i in stratum.index[stratum["split"].isna()]:
            counts = out.loc[idx, "split"].value_counts()
            deficit = {s: frac[s] * n - counts.get(s, 0) for s in SPLITS}
            out.loc[i, "split"] = max(SPLITS, key=lambda s: (deficit[s], -SPLITS.index(s)))
        if settings.folds > 0:
            cv = out.loc[idx]
            cv = cv[cv["split"] != "test"].sort_values("_order")
            for i in cv.index[cv["fold"].isna()]:
                counts = out.loc[cv.index, "fold"].value_counts()
                out.loc[i, "fold"] = min(range(settings.folds), key=lambda f: (counts.get(f, 0), f))
    out["fold"] = out["fold"].fillna(-1).astype(int)
    return out.drop(columns="_order")


# --------------------------------------------------------------------------- building


def sha256(path: str | os.PathLike) -> str:
    """sha256 of a file's bytes."""
    return sha256_file(path)


def config_hash(config: Mapping[str, Any] | str) -> str:
    """Short stable hash of the configuration that produced a manifest."""
    if isinstance(config, str) and len(config) == 16:  # already a hash (from the workflow)
        return config
    text = json.dumps(config, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def ingest_exclusions(inventory: pd.DataFrame) -> list[dict[str, str]]:
    """excluded.csv's rows for the series ingest did not select (id = the series pseudonym)."""
    return [
        {
            "id": r.series_id,
            "subject_id": r.subject_id,
            "stage": "ingest",
            "reason_code": r.reason_code,
            "reason": r.reason,
        }
        for r in inventory[~inventory["selected"]].itertuples()
    ]


def exclusion(status: Mapping[str, Any]) -> dict[str, str] | None:
    """Why a selected case stays out of the manifest (stage, code, reason), or None.

    The stage where the case failed comes first (convert, segment, mask: its mask record
    carries an earlier stage's failure), then an unusable ROI (too small, or an implausible
    segmentation: reason code IMPLAUSIBLE). A missing label excludes nothing: the case is a row
    with an empty label.
    """
    if status.get("status", "ok") != "ok":
        return {
            "stage": status.get("stage", "mask"),
            "reason_code": status.get("reason_code", ""),
            "reason": status.get("reason", ""),
        }
    if not status.get("usable"):
        code = status.get("reason_code") or "ROI"
        return {"stage": "mask", "reason_code": code, "reason": status.get("reason", "")}
    return None


def build(
    inventory: pd.DataFrame,
    root: str | os.PathLike,
    settings: SplitSettings,
    config: Mapping[str, Any] | str,
    registry: pd.DataFrame | None = None,
) -> tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame]:
    """(cases, excluded, registry) from the inventory and each case's files under ``root``."""
    root = Path(root)
    excluded = ingest_exclusions(inventory)
    rows = []
    for r in inventory[inventory["selected"]].itertuples():
        files = paths.case_files(r.case_id)
        status = json.loads((root / paths.for_case(paths.MASK_STATUS, r.case_id)).read_text())
        if not status.get("segmented", True):  # segment.backend none: no label map
            files.pop("label_map")
        reason = exclusion(status)
        if reason is not None:
            excluded.append({"id": r.case_id, "subject_id": r.subject_id, **reason})
            continue
        missing = [c for c, f in files.items() if not (root / f).exists()]
        if missing:
            raise FileNotFoundError(
                f"{r.case_id}: {', '.join(files[c] for c in missing)} missing although its "
                f"records say the case is complete (deleted by hand?): delete "
                f"{paths.for_case(paths.MASK_STATUS, r.case_id)} and "
                f"{paths.for_case(paths.SIDECAR, r.case_id)} and rerun to remake it"
            )
        sidecar = json.loads((root / paths.for_case(paths.SIDECAR, r.case_id)).read_text())
        g = sidecar["geometry"]
        row = {
            "case_id": r.case_id,
            "subject_id": r.subject_id,
            "study_id": r.study_id,
            "series_id": r.series_id,
            "label": pd.NA if pd.isna(r.label) else int(r.label),
            "label_map": None,
            **files,
            "image_nx": g["shape"][0],
            "image_ny": g["shape"][1],
            "image_nz": g["shape"][2],
            "image_sx_mm": g["spacing_mm"][0],
            "image_sy_mm": g["spacing_mm"][1],
            "image_sz_mm": g["spacing_mm"][2],
            "masked_nx": status["shape"][0],
            "masked_ny": status["shape"][1],
            "masked_nz": status["shape"][2],
            "masked_sx_mm": status["spacing_mm"][0],
            "masked_sy_mm": status["spacing_mm"][1],
            "masked_sz_mm": status["spacing_mm"][2],
            "roi_volume_ml": status["roi_ml"],
            "flags": case_flags(getattr(r, "flags", ""), status, getattr(r, "has_label", None)),
            "sha256_label_map": None,
            **{f"sha256_{k}": sha256(root / v) for k, v in files.items()},
            "slice_thickness_mm": r.slice_thickness_mm,
            "kernel": r.kernel,
            "manufacturer": r.manufacturer,
            "radflow_version": radflow.__version__,
            "config_hash": config_hash(config),
        }
        rows.append(row)
    cases = pd.DataFrame(rows)
    if cases.empty:
        raise ValueError("no usable case: see manifests/excluded.csv")
    cases["label"] = cases["label"].astype("Int64")
    subjects = cases.groupby("subject_id", as_index=False)["label"].max()
    assigned = assign_splits(subjects, settings, registry, given_splits(inventory))
    cases = cases.merge(assigned[["subject_id", "split", "fold"]], on="subject_id")
    cases = cases[CASE_COLUMNS].sort_values(["split", "case_id"]).reset_index(drop=True)
    new_registry = assigned[["subject_id", "label", "split", "fold"]]
    if registry is not None and len(registry):  # subjects gone from the cohort keep their slot
        gone = registry[~registry["subject_id"].isin(new_registry["subject_id"])]
        new_registry = pd.concat([registry[new_registry.columns].loc[gone.index], new_registry])
    excl = pd.DataFrame(excluded, columns=EXCLUDED_COLUMNS)
    return validate(cases), excl, new_registry.sort_values("subject_id")


def given_splits(inventory: pd.DataFrame) -> dict[str, str]:
    """subject -> split where the input gives one (a NIfTI sheet's split column; the sheet
    was checked to give a subject one split), else nothing: splits are then assigned."""
    if "split" not in inventory.columns:
        return {}
    rows = inventory[inventory["selected"]]
    split = rows["split"].fillna("").astype(str)
    given = rows.loc[split != "", "subject_id"]
    return dict(zip(given, split[split != ""], strict=True))


def case_flags(ingest_flags: Any, status: Mapping[str, Any], has_label: Any = None) -> str:
    """A case's notes, semicolon-separated: the inventory's (series level, e.g. gantry_tilt),
    ``no_label`` when a sheet is set but does not name the case (no sheet: unknown, no flag),
    and the mask record's plausibility flags (e.g. liver:truncated)."""
    text = "" if ingest_flags is None or pd.isna(ingest_flags) else str(ingest_flags)
    out = [f for f in text.split(";") if f]
    if has_label is not None and not pd.isna(has_label) and not has_label:
        out.append("no_label")
    out += status.get("flags", [])
    return ";".join(dict.fromkeys(out))


def datalist(cases: pd.DataFrame, base: str = "..") -> dict[str, Any]:
    """MSD-style datalist; image paths relative to the manifests folder (an unlabelled case's
    item has no ``label``)."""
    out: dict[str, Any] = {"name": "radflow", "description": "masked CT volumes per case"}
    for split, key in (("train", "training"), ("val", "validation"), ("test", "test")):
        part = cases[cases["split"] == split]
        out[key] = [
            {
                "image": f"{base}/{r.masked}",
                "roi": f"{base}/{r.roi}",
                **({} if pd.isna(r.label) else {"label": int(r.label)}),
                "case_id": r.case_id,
                "subject_id": r.subject_id,
                "fold": int(r.fold),
            }
            for r in part.itertuples()
        ]
    return out


def write(
    cases: pd.DataFrame, excluded: pd.DataFrame, registry: pd.DataFrame, out_dir: str | os.PathLike
) -> None:
    """Write every manifest file atomically (schema checked first)."""
    out_dir = Path(out_dir)
    validate(cases)
    write_table(cases, out_dir / "cases.csv", str(out_dir / "cases.parquet"))
    write_table(excluded, out_dir / "excluded.csv")
    for split in SPLITS:
        write_table(cases[cases["split"] == split], out_dir / f"split_{split}.csv")
    write_json(out_dir / "datalist.json", datalist(cases))
    write_table(registry, out_dir / "split_registry.csv")


def manifest(
    inventory_path: str | os.PathLike,
    root: str | os.PathLike,
    out_dir: str | os.PathLike,
    settings: SplitSettings,
    config: Mapping[str, Any] | str,
    labels: Any = None,
    id_map: str | os.PathLike | None = None,
) -> pd.DataFrame:
    """Build and write the manifests from the inventory; returns the cases table.

    ``labels`` (a ``labels.LabelSpec``) with ``id_map`` (the private id map, which holds the
    raw key column) joins the labels sheet here, so a new sheet reruns the manifest onward
    and never the indexing of the raw tree. Without them the inventory's labels are used.
    """
    inventory = pd.read_parquet(inventory_path)
    if labels is not None and labels.path:
        inventory = relabel(inventory, labels, id_map)
    elif labels is not None and not _input_labelled(inventory):
        # labels.path null and no labels of the input's own: every case unlabelled (unknown)
        inventory = inventory.assign(
            label=pd.array([pd.NA] * len(inventory), dtype="Int64"),
            has_label=pd.array([pd.NA] * len(inventory), dtype="boolean"),
        )
    reg_path = Path(out_dir) / "split_registry.csv"
    registry = pd.read_csv(reg_path) if reg_path.exists() else None
    cases, excluded, registry = build(inventory, root, settings, config, registry)
    write(cases, excluded, registry, out_dir)
    return cases


def _input_labelled(inventory: pd.DataFrame) -> bool:
    """True when the input itself carries labels: a NIfTI sheet's ``label`` column (DICOM
    ingest joins none; its labels come from the labels sheet, joined here)."""
    return "label" in inventory.columns and bool(inventory["label"].notna().any())


def relabel(inventory: pd.DataFrame, spec: Any, id_map: str | os.PathLike | None) -> pd.DataFrame:
    """The inventory with ``label``/``has_label`` joined from the sheet through the id map."""
    from radflow import labels

    if id_map is None:
        raise ValueError("joining a labels sheet needs the private id map (--id-map)")
    keys = read_id_map(id_map)[["series_id", spec.key]].drop_duplicates("series_id")
    inv = inventory.drop(columns=["label", "has_label"], errors="ignore")
    inv = inv.merge(keys, on="series_id", how="left")
    inv = labels.join_labels(inv, labels.read_labels(spec), spec)
    return inv.drop(columns=[spec.key])


def summary(cases: pd.DataFrame) -> str:
    """Cases per split and label (unlabelled as "none"), as a small table."""
    shown = cases.assign(label=cases["label"].astype(object).where(cases["label"].notna(), "none"))
    table = shown.pivot_table(
        index="split", columns="label", values="case_id", aggfunc="count", fill_value=0
    ).to_string()
    if cases["label"].isna().all():
        table += "\nno labelled case: the manifests are for preprocessing only (no training)"
    return table

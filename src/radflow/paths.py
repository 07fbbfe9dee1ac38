"""The output layout: where every stage writes, in one place for the package and the rules.

Paths are relative to the project (working) directory. Per-case templates hold ``{case}``, as
the rules' wildcards do; the functions fill them. ``workflow/rules/common.smk`` imports this
module, so a path changed here changes for the rules, the CLI and the manifests alike.
"""

from __future__ import annotations

import os
from pathlib import Path

RESULTS = "results"
PRIVATE = f"{RESULTS}/private"
MANIFESTS = "manifests"

# ---------------------------------------------------------------- ingest (the checkpoint)
INVENTORY_CSV = f"{RESULTS}/inventory/series.csv"
INVENTORY_PARQUET = f"{RESULTS}/inventory/series.parquet"
REJECTED_FILES = f"{RESULTS}/inventory/rejected_files.csv"
ID_MAP = f"{PRIVATE}/id_map.csv"
ID_MAP_PARQUET = f"{PRIVATE}/id_map.parquet"
REJECTED_FILES_PRIVATE = f"{PRIVATE}/rejected_files.csv"
FILE_LIST = f"{PRIVATE}/series/{{case}}.json"

# The settings a stage's outputs were made with, by their hash (see workflow/rules/common.smk)
SETTINGS = f"{RESULTS}/settings/{{stage}}-{{digest}}.json"

# ---------------------------------------------------------------- per case
NIFTI = f"{RESULTS}/nifti/{{case}}.nii.gz"
SIDECAR = f"{RESULTS}/nifti/{{case}}.json"
SEG = f"{RESULTS}/seg/{{case}}.nii.gz"
SEG_NAMES = f"{RESULTS}/seg/{{case}}.json"
SEG_GROUP = f"{RESULTS}/seg/groups/{{group}}.json"
MASKED = f"{RESULTS}/masked/{{case}}.nii.gz"
ROI = f"{RESULTS}/masked/{{case}}_roi.nii.gz"
MASK_STATUS = f"{RESULTS}/masked/{{case}}.json"
QC_PNG = f"{RESULTS}/qc/{{case}}.png"
SEG_QC = f"{RESULTS}/qc/{{case}}_segmentation.csv"
SEG_QC_TABLE = f"{RESULTS}/qc/segmentation.csv"

# ---------------------------------------------------------------- cohort
SPLITS = ("train", "val", "test")
CASES_CSV = f"{MANIFESTS}/cases.csv"
CASES_PARQUET = f"{MANIFESTS}/cases.parquet"
EXCLUDED = f"{MANIFESTS}/excluded.csv"
DATALIST = f"{MANIFESTS}/datalist.json"
SPLIT_CSV = f"{MANIFESTS}/split_{{split}}.csv"
SPLIT_REGISTRY = f"{MANIFESTS}/split_registry.csv"
TRAIN_DIR = f"{RESULTS}/train"
CHECKPOINT = f"{TRAIN_DIR}/best.pt"
LAST_CHECKPOINT = f"{TRAIN_DIR}/last.pt"
HISTORY = f"{TRAIN_DIR}/history.csv"
CV_DIR = f"{RESULTS}/cv/fold{{fold}}"
CV_SUMMARY = f"{RESULTS}/cv/summary.json"
EVAL_DIR = f"{RESULTS}/eval"
PREDICTIONS = f"{EVAL_DIR}/predictions.csv"
METRICS = f"{EVAL_DIR}/metrics.json"
EXPLAIN_DIR = f"{RESULTS}/explain"

# ---------------------------------------------------------------- the model bundle, predict
MODEL_DIR = f"{RESULTS}/model"
BUNDLE_FILES = tuple(f"{MODEL_DIR}/{n}" for n in ("weights.pt", "model.json", "MODEL_CARD.md"))
PREDICT_DIR = f"{RESULTS}/predict"
# The predict cohort's own project folder: the workflow's per-case rules (ingest to mask) run
# there with the bundle's settings, so every template above holds under it (``under``) and the
# training cohort's files are never touched. Its results/private/ holds its raw identifiers.
PREDICT_WORK = f"{PRIVATE}/predict"  # its config holds the salt, its id map raw UIDs
PREDICT_CONFIG_NAME = "config/config.yaml"  # a project folder's config (the Snakefile's)
PREDICT_CONFIG = f"{PREDICT_WORK}/{PREDICT_CONFIG_NAME}"
PREDICTIONS_NEW = f"{PREDICT_DIR}/predictions.csv"
PREDICT_METRICS = f"{PREDICT_DIR}/metrics.json"
PREDICT_EXCLUDED = f"{PREDICT_DIR}/excluded.csv"
PREDICT_EXPLAIN = f"{PREDICT_DIR}/explain"

# ---------------------------------------------------------------- the mask ablation
# Each variant has its own mask, manifest, train, eval and explain outputs, laid out under
# results/ablation/{variant}/ as the default run lays them out under results/ and manifests/
# (``in_variant``); conversion and segmentation are shared with the default run.
ABLATION_DIR = f"{RESULTS}/ablation"
ABLATION_VARIANTS = ("masked", "unmasked", "fullfov")
ABLATION_SUMMARY = f"{ABLATION_DIR}/summary.json"
ABLATION_PNG = f"{ABLATION_DIR}/summary.png"


def in_variant(template: str, variant: str = "{variant}") -> str:
    """A path of the default layout re-rooted under ``results/ablation/{variant}/``:
    ``results/masked/{case}.nii.gz`` -> ``results/ablation/{variant}/masked/{case}.nii.gz``,
    ``manifests/cases.parquet`` -> ``results/ablation/{variant}/manifests/cases.parquet``.
    The default ``variant`` keeps the wildcard (the rules' ``{variant}``)."""
    root = f"{ABLATION_DIR}/{variant}"
    if template.startswith(f"{MANIFESTS}/"):
        return f"{root}/{template}"
    if template.startswith(f"{RESULTS}/") and not template.startswith(f"{ABLATION_DIR}/"):
        return f"{root}/{template[len(RESULTS) + 1 :]}"
    raise ValueError(f"{template!r} is not a path of the per-variant layout")


# The files of one case the manifest lists (column -> template); their sha256 go beside them.
CASE_FILES = {
    "image": NIFTI,
    "label_map": SEG,
    "masked": MASKED,
    "roi": ROI,
    "qc": QC_PNG,
}


def case_files(case_id: str) -> dict[str, str]:
    """The manifest's file columns of one case (paths relative to the project)."""
    return {k: v.format(case=case_id) for k, v in CASE_FILES.items()}


def for_case(template: str, case_id: str) -> str:
    """A per-case template filled in."""
    return template.format(case=case_id)


def stem(path: str | os.PathLike) -> str:
    """File name without ``.nii.gz`` (or its last suffix): ``results/nifti/case-x.nii.gz`` ->
    ``case-x``."""
    name = Path(path).name
    return name[: -len(".nii.gz")] if name.endswith(".nii.gz") else Path(name).stem


def sidecar_of(volume: str | os.PathLike) -> Path:
    """The JSON beside a volume: ``x.nii.gz`` -> ``x.json`` (the one way radflow spells it)."""
    p = Path(volume)
    return p.with_name(stem(p) + ".json")


def explain_file(case_id: str, kind: str) -> str:
    """A case's explain output: kind ``cam``, ``cam_raw``, ``cam_ct`` (NIfTI), ``png``, ``json``."""
    if kind in ("png", "json"):
        return f"{EXPLAIN_DIR}/{case_id}.{kind}"
    return f"{EXPLAIN_DIR}/{case_id}_{kind}.nii.gz"


def under(root: str, template: str) -> str:
    """A layout path inside another project folder (the predict cohort's ``PREDICT_WORK``)."""
    return f"{root}/{template}"

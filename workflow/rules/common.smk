# Helpers shared by the rules: config views, the inventory (read once), input functions.
import json
import os
from functools import lru_cache

import pandas as pd

CASE_PATTERN = r"case-[0-9a-f]{12}"


wildcard_constraints:
    case=CASE_PATTERN,


def as_json(obj):
    """Compact, key-sorted JSON: stable text so params only change when values do."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":"))


def without(d, *keys):
    return {k: v for k, v in d.items() if k not in keys}


def selection_rules():
    """Selection rules: ingest.selection plus the convert limits that make a series usable."""
    rules = dict(config["ingest"]["selection"])
    rules["max_missing_slices"] = config["convert"]["max_missing_slices"]
    rules["gantry_tilt"] = config["convert"]["gantry_tilt"]
    return rules


def label_args():
    lab = config["labels"]
    if not lab.get("path"):
        return ""
    return f"--labels {lab['path']!r} --label-key {lab['key']} --label-column {lab['column']}"


def label_inputs():
    path = config["labels"].get("path")
    return [path] if path else []


def validate_labels():
    """Schema check of the labels sheet (key and label columns) at parse time."""
    lab = config["labels"]
    if not lab.get("path") or not os.path.exists(lab["path"]):
        return
    df = pd.read_csv(lab["path"], dtype={lab["key"]: str})
    missing = {lab["key"], lab["column"]} - set(df.columns)
    if missing:
        raise ValueError(
            f"labels sheet {lab['path']} lacks column(s) {sorted(missing)}"
        )
    df = df[[lab["key"], lab["column"]]].rename(
        columns={lab["key"]: "key", lab["column"]: "label"}
    )
    validate(df, "../schemas/labels.schema.yaml")


validate_labels()


_INGEST = {}


def ingest_output():
    """The ingest checkpoint's output files; IncompleteCheckpointException until ingest is done,
    which is how Snakemake learns that a job waits on it. Once complete, a checkpoint stays
    complete for the rest of the run, so the answer is kept: checkpoints.ingest.get() expands
    the rule's output anew on every call, and the input functions ask once or twice per case
    (a tenth of the DAG time at 10,000 cases, bench/dag_scale.py)."""
    if "output" not in _INGEST:
        _INGEST["output"] = checkpoints.ingest.get().output
    return _INGEST["output"]


@lru_cache(maxsize=4)
def _inventory(path, mtime):
    cols = ["case_id", "selected"]
    df = pd.read_parquet(path, columns=cols)
    return df[df["selected"]].set_index("case_id")


def inventory():
    """Selected cases of the inventory (after the ingest checkpoint), read once per version."""
    path = ingest_output().parquet
    return _inventory(path, os.path.getmtime(path))


def cases():
    return sorted(inventory().index)


def case_filelist(wildcards):
    inventory()  # the file lists exist once ingest has run
    return f"results/private/series/{wildcards.case}.txt"


def converted(wildcards):
    return expand("results/nifti/{case}.{ext}", case=cases(), ext=["nii.gz", "json"])


# ---------------------------------------------------------------- segment / mask helpers


def resolve_resource(path):
    """A relative path from the working directory, else from the workflow folder."""
    if path is None or os.path.isabs(path) or os.path.exists(path):
        return path
    candidate = os.path.join(workflow.basedir, path)
    return candidate if os.path.exists(candidate) else path


def validate_rois():
    """mask.rois must be class names of the segmentation task (close matches suggested)."""
    from radflow.mask import validate_roi_names
    from radflow.segment import known_rois

    validate_roi_names(config["mask"]["rois"], known_rois(config["segment"]["task"]))


validate_rois()


def segment_settings():
    s = without(config["segment"], "threads", "precomputed", "batches")
    s["weights_dir"] = resolve_resource(s["weights_dir"])
    return s


def segment_gpus():
    seg = config["segment"]
    return 0 if seg["backend"] == "precomputed" or seg["device"] == "cpu" else 1


def segment_batches():
    """Number of segmentation batches (0 = one job per case); TotalSegmentator backend only."""
    seg = config["segment"]
    return int(seg.get("batches") or 0) if seg["backend"] == "totalsegmentator" else 0


def case_batch(wildcards):
    """The batch folder a case's label map comes from (segment.batches > 0)."""
    from radflow.segment import batch_of

    return f"results/seg/batches/{batch_of(wildcards.case, segment_batches())}"


def mask_inputs():
    """mask's inputs, decided once at parse time (config only): the image, the case's label map
    and names -- or with segment.batches its batch's folder -- and qc.reference's mask when
    configured. Fixed patterns where possible: every input function is one more call per case
    while the DAG is built (10,000 cases: bench/dag_scale.py)."""
    inputs = {"image": "results/nifti/{case}.nii.gz"}
    if segment_batches():
        inputs["seg"] = case_batch
    else:
        inputs["seg"] = "results/seg/{case}.nii.gz"
        inputs["names"] = "results/seg/{case}.json"
    if config["qc"].get("reference"):
        inputs["reference"] = reference_mask
    return inputs


def mask_params():
    """mask's params: its settings, and with qc.reference the ``--reference`` flag (a case's
    reference mask is optional: its file may not exist)."""
    params = {"settings": as_json(without(config["mask"], "threads"))}
    if config["qc"].get("reference"):
        params["reference"] = lambda wc, input: opt("--reference", input.reference)
    return params


def mask_options():
    """mask's optional command-line flags, fixed at parse time like mask_inputs()."""
    flags = "--batch-dir {input.seg:q} " if segment_batches() else ""
    if config["qc"].get("reference"):
        flags += "{params.reference} "
    return flags


def batch_seg_outputs():
    """With segment.batches, mask places the case's label map and names (out of the batch)."""
    if not segment_batches():
        return {}
    return {"seg": "results/seg/{case}.nii.gz", "names": "results/seg/{case}.json"}


def segmented(wildcards):
    """Target of segment_all: every label map, or every batch folder."""
    if not segment_batches():
        return expand("results/seg/{case}.nii.gz", case=cases())
    return expand("results/seg/batches/{batch}", batch=sorted(batch_groups()))


def batch_images(wildcards):
    """Converted images of one segmentation batch (stable: by pseudonym hash)."""
    return [
        f"results/nifti/{c}.nii.gz"
        for c in batch_groups().get(int(wildcards.batch), [])
    ]


def batch_priority(wildcards):
    """Larger segmentation batches first: longest-job-first scheduling, so the biggest batch
    does not start last and set the tail of the run. (Not on convert: a priority function is one
    more call per case while the DAG is built, and a conversion takes seconds.)"""
    return len(batch_groups().get(int(wildcards.batch), []))


def batch_groups():
    """batch -> its cases, for the current inventory (after the ingest checkpoint)."""
    path = ingest_output().parquet
    return _batches(path, os.path.getmtime(path), segment_batches())


@lru_cache(maxsize=4)
def _batches(path, mtime, n):
    """batch -> its cases, grouped once per inventory version (not once per batch job)."""
    from radflow.segment import batch_of

    groups = {}
    for c in sorted(_inventory(path, mtime).index):
        groups.setdefault(batch_of(c, n), []).append(c)
    return groups


@lru_cache(maxsize=4)
def _id_map(path, mtime):
    """case_id -> the ids a path template may use (a dict: one lookup per job, no pandas)."""
    keys = ["case_id", "subject_id", "study_id", "series_id"]
    keys += ["StudyInstanceUID", "SeriesInstanceUID"]
    df = pd.read_csv(path, dtype=str, usecols=keys).fillna("")
    return {r["case_id"]: r for r in df.to_dict("records") if r["case_id"]}


def case_ids(case):
    """Pseudonyms and raw UIDs of a case (from the private id map) for path templates."""
    path = ingest_output().id_map
    return _id_map(path, os.path.getmtime(path))[case]


def case_template(template, case):
    return resolve_resource(template.format(**case_ids(case))) if template else None


def precomputed_mask(wildcards):
    if config["segment"]["backend"] != "precomputed":
        return []
    return [case_template(config["segment"]["precomputed"], wildcards.case)]


def reference_mask(wildcards):
    path = case_template(config["qc"].get("reference"), wildcards.case)
    return [path] if path and os.path.exists(path) else []


def opt(flag, values):
    """Command-line fragment ``flag value`` for an optional single input."""
    return f"{flag} {values[0]!r}" if values else ""


def masked(wildcards):
    return expand(
        "results/masked/{case}.{ext}", case=cases(), ext=["nii.gz", "json"]
    ) + ["results/qc/segmentation.csv"]


# ---------------------------------------------------------------- manifest helpers

SPLITS = ["train", "val", "test"]
MANIFESTS = [
    "manifests/cases.csv",
    "manifests/cases.parquet",
    "manifests/excluded.csv",
    "manifests/datalist.json",
] + [f"manifests/split_{s}.csv" for s in SPLITS]


# Config sections that shape the cases a manifest describes (not train/evaluate/explain:
# changing those must not rerun the manifest and everything after it).
UPSTREAM = (
    "raw_dir",
    "labels",
    "ids",
    "ingest",
    "convert",
    "segment",
    "mask",
    "qc",
    "manifest",
)


def config_hash():
    import hashlib

    # how the work is spread (threads, segmentation batches) does not change the cases
    def what(v):
        return without(v, "threads", "batches") if isinstance(v, dict) else v

    text = as_json({k: what(config.get(k)) for k in UPSTREAM})
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def case_outputs(wildcards):
    """Every file the manifest describes, for every case."""
    return expand(
        [
            "results/nifti/{case}.nii.gz",
            "results/nifti/{case}.json",
            "results/seg/{case}.nii.gz",
            "results/masked/{case}.nii.gz",
            "results/masked/{case}_roi.nii.gz",
            "results/masked/{case}.json",
            "results/qc/{case}.png",
        ],
        case=cases(),
    )


# ---------------------------------------------------------------- explain helpers


def lesion_template():
    """explain.lesion_reference (a path template, relative to the working directory)."""
    t = config["explain"].get("lesion_reference")
    return [t] if t else []


def _explain_info(name):
    with open(f"results/explain/{name}.json") as fh:
        return json.load(fh)


def explain_subcategory(wildcards):
    """Report subcategory: the case's outcome (TP, FP, FN, TN), or the cohort pages."""
    if not wildcards.name.startswith("case-"):
        return "review and faithfulness"
    return _explain_info(wildcards.name)["group"]


def explain_labels(wildcards):
    if not wildcards.name.startswith("case-"):
        return {"figure": wildcards.name}
    info = _explain_info(wildcards.name)
    return {
        "case": wildcards.name,
        "split": info["split"],
        "probability": f"{info['probability']:.3f}",
        "label": str(info["label"]),
    }

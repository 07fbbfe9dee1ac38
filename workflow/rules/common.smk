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


@lru_cache(maxsize=4)
def _inventory(path, mtime):
    cols = ["case_id", "series_id", "selected"]
    df = pd.read_parquet(path, columns=cols)
    return df[df["selected"]].set_index("case_id")


def inventory():
    """Selected cases of the inventory (after the ingest checkpoint), read once per version."""
    path = checkpoints.ingest.get().output.parquet
    return _inventory(path, os.path.getmtime(path))


def cases():
    return sorted(inventory().index)


def case_filelist(wildcards):
    inventory()  # the file lists exist once ingest has run
    return f"results/private/series/{wildcards.case}.txt"


def case_series_id(wildcards):
    return inventory().loc[wildcards.case, "series_id"]


def converted(wildcards):
    return expand("results/nifti/{case}.{ext}", case=cases(), ext=["nii.gz", "json"])

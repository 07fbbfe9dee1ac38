# Shared views only: config views, the output layout, the labels sheet and the inventory (read
# once). Each stage's own helpers live in its .smk file.
import hashlib
import json
import os
import shlex
import sys
from functools import lru_cache

import pandas as pd

from radflow import paths
from radflow.labels import LabelError, LabelSpec, read_labels

CASE_PATTERN = r"case-[0-9a-f]{12}"


wildcard_constraints:
    case=CASE_PATTERN,


def as_json(obj):
    """Compact, key-sorted JSON: stable text so params only change when values do."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":"))


def without(d, *keys):
    return {k: v for k, v in d.items() if k not in keys}


def fingerprint(text):
    """A short one-way hash of a value that must not be recorded itself (the salt)."""
    return hashlib.sha256(f"radflow\0{text}".encode()).hexdigest()[:16]


def opt(flag, value):
    """A shell-quoted optional flag: ``--flag 'value'``, or nothing when value is empty."""
    return f"{flag} {shlex.quote(str(value))}" if value not in (None, "", []) else ""


def resolve_resource(path):
    """A relative path from the working directory, else from the workflow folder."""
    if path is None or os.path.isabs(path) or os.path.exists(path):
        return path
    candidate = os.path.join(workflow.basedir, path)
    return candidate if os.path.exists(candidate) else path


# The pseudonym key reaches the jobs through the environment, never a command line or a
# param: Snakemake records both in .snakemake/, and SLURM prints command lines in its logs.
# (On a cluster each job re-reads the config, so it sets this again.)
os.environ.update(RADFLOW_SALT=config["ids"]["salt"])


def settings_input(stage, settings):
    """``results/settings/{stage}-{hash}.json``, written now if new: an input of every job of
    the stage. A settings change makes a new file, newer than every output made before, so
    Snakemake reruns them by modification time alone -- also an output whose provenance record
    a kill lost (Snakemake's params trigger cannot see that one)."""
    text = as_json(settings)
    path = paths.SETTINGS.format(stage=stage, digest=fingerprint(text))
    if not os.path.exists(path):
        from radflow.io import write_text

        write_text(path, f"{text}\n")
    return path


# A run killed before it could release Snakemake's lock: the next real run on this host
# releases it when the killed process is provably gone (radflow/runlock.py), so a plain rerun
# recovers; a live run's lock stands.
if workflow.is_main_process and not workflow.dryrun:
    from radflow import runlock

    runlock.take_over()


# ---------------------------------------------------------------- the input


def input_spec():
    """(spec, location) of the cohort's input: a DICOM tree or a NIfTI sheet (radflow.source);
    a NIfTI sheet is checked now (radflow.sheet), so a broken one stops the run at start.
    """
    from radflow.source import from_config

    try:
        spec, location = from_config(config)
    except ValueError as exc:
        raise WorkflowError(str(exc)) from None
    if spec.format == "nifti" and os.path.exists(location):
        from radflow.sheet import SheetError, read_sheet

        try:
            sheet = read_sheet(location, label_spec())
        except SheetError as exc:
            raise WorkflowError(str(exc)) from None
        _SHEET["labelled"] = bool(sheet["label"].notna().any())
    return spec, location


_SHEET = {"labelled": False}


def has_labels():
    """Labels from a labels sheet, or a NIfTI cohort sheet's own label column."""
    return bool(label_spec().path) or _SHEET["labelled"]


# ---------------------------------------------------------------- the labels sheet


def label_spec():
    return LabelSpec.from_dict(config["labels"])


def validate_labels():
    """The labels sheet is checked when the workflow starts: columns, keys, 0/1 labels. (A
    sheet that does not exist yet is Snakemake's missing input, named when a job needs it.)
    """
    if label_spec().path and not os.path.exists(label_spec().path):
        return
    try:
        read_labels(label_spec())
    except LabelError as exc:
        raise WorkflowError(str(exc)) from None


validate_labels()
INPUT, INPUT_LOCATION = input_spec()


def label_inputs():
    path = label_spec().path
    return [path] if path else []


# ---------------------------------------------------------------- the inventory

_INGEST = {}


def ingest_output():
    """The ingest checkpoint's output files; IncompleteCheckpointException until ingest is done,
    which is how Snakemake learns that a job waits on it. Kept once complete: the checkpoint's
    get() expands its output anew on every call (a tenth of the DAG time at 10,000 cases).
    """
    if "output" not in _INGEST:
        _INGEST["output"] = checkpoints.ingest.get().output
    return _INGEST["output"]


@lru_cache(maxsize=4)
def _inventory(path, mtime):
    df = pd.read_parquet(path, columns=["case_id", "selected"])
    return df[df["selected"]].set_index("case_id")


def inventory():
    """Selected cases of the inventory (after the ingest checkpoint), read once per version."""
    path = ingest_output().parquet
    return _inventory(path, os.path.getmtime(path))


def cases():
    return sorted(inventory().index)


def per_case(*templates):
    """Every case's files of some per-case templates (aggregate rules' inputs)."""
    return lambda wildcards: [t.format(case=c) for c in cases() for t in templates]

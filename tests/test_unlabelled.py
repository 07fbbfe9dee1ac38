"""Unlabelled, preprocessing-only runs through snakemake: labels.path null (from --config as a
user types it) runs through the manifests and stops before training, saying why."""

from __future__ import annotations

import pandas as pd

from radflow import manifest

from .conftest import snakemake, workdir

NO_LABELS = ("--config", "labels={path: null}")


def test_without_labels_the_workflow_ends_at_the_manifests(demo_cohort, tmp_path):
    work = workdir(tmp_path, demo_cohort)
    proc = snakemake(work, *NO_LABELS)  # the default target, as a user runs it
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-3000:]
    assert "no labels (labels.path null, no label column in the sheet): preprocessing only" in out
    assert not (work / "results" / "train").exists()  # training never started

    cases = manifest.read(work / "manifests" / "cases.csv")
    inv = pd.read_parquet(work / "results/inventory/series.parquet")
    assert len(cases) == inv["selected"].sum()  # every case in, none excluded for its label
    assert cases["label"].isna().all()
    assert "no_label" not in ";".join(cases["flags"])  # no sheet: unknown, not "not in it"
    assert set(cases["split"]) == {"train", "val", "test"}  # split by subject all the same
    assert (cases.groupby("subject_id")["split"].nunique() == 1).all()
    excluded = pd.read_csv(work / "manifests" / "excluded.csv")
    assert "label" not in set(excluded["stage"])
    assert (work / "results/qc/segmentation.csv").exists()

    # the preprocessing-only target says there is nothing left to do
    proc = snakemake(work, "manifest_all", *NO_LABELS)
    assert proc.returncode == 0 and "Nothing to be done" in proc.stdout + proc.stderr

    # asked for a model anyway: train fails with one line naming the cause
    proc = snakemake(work, "results/train/best.pt", *NO_LABELS)
    assert proc.returncode != 0
    log = (work / "logs" / "train.log").read_text().strip().splitlines()
    assert log[-1].startswith("radflow train: error: no labelled case in the manifest"), log

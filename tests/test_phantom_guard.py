"""The wrong-model guard: the phantom weights run only on the demo cohort, unless allowed."""

from __future__ import annotations

import json
import shutil

import yaml

from radflow import segment

from .conftest import REPO, snakemake, workdir

PHANTOM = REPO / "resources" / "totalseg_phantom"


def test_the_shipped_weights_declare_themselves_the_phantom(tmp_path):
    assert segment.is_phantom(PHANTOM)
    real = tmp_path / "weights"
    shutil.copytree(PHANTOM, real)
    (real / segment.PHANTOM_MARKER).unlink()  # real weights carry no marker
    assert not segment.is_phantom(real)


def test_the_demo_is_recognised_by_its_marker_not_its_path(demo_cohort, tmp_path):
    assert segment.is_demo_cohort(demo_cohort / "raw")
    assert not segment.is_demo_cohort(demo_cohort / "ground_truth")  # the marker names raw/
    fake = tmp_path / "data" / "demo" / "raw"  # the demo's path, not the demo
    fake.mkdir(parents=True)
    assert not segment.is_demo_cohort(fake)
    (fake.parent / segment.DEMO_MARKER).write_text("{not json")
    assert not segment.is_demo_cohort(fake)
    (fake.parent / segment.DEMO_MARKER).write_text(json.dumps({"raw": "raw"}))
    assert segment.is_demo_cohort(fake)


def test_phantom_guard_decisions(demo_cohort, tmp_path):
    other = tmp_path / "raw"
    other.mkdir()
    why = segment.phantom_guard("totalsegmentator", PHANTOM, other, allow=False)
    assert "segment.weights_dir" in why and "segment.allow_phantom" in why
    assert segment.phantom_guard("totalsegmentator", PHANTOM, other, allow=True) == ""
    assert segment.phantom_guard("precomputed", PHANTOM, other, allow=False) == ""
    assert segment.phantom_guard("totalsegmentator", PHANTOM, demo_cohort / "raw", False) == ""
    assert segment.phantom_guard("totalsegmentator", tmp_path, other, allow=False) == ""
    # no raw tree yet (a fresh clone before `make demo-data`): ingest's missing input says so
    assert segment.phantom_guard("totalsegmentator", PHANTOM, tmp_path / "nope", False) == ""


def _other_cohort(demo_cohort, tmp_path):
    """A copy of the demo's DICOM without its marker: to radflow, somebody's real CT."""
    cohort = tmp_path / "cohort"
    shutil.copytree(demo_cohort / "raw", cohort / "raw")
    shutil.copy(demo_cohort / "labels.csv", cohort / "labels.csv")
    return cohort


def test_the_phantom_on_another_cohort_stops_the_workflow_at_start(demo_cohort, tmp_path):
    work = workdir(tmp_path / "wf", _other_cohort(demo_cohort, tmp_path))
    proc = snakemake(work, "-n")
    assert proc.returncode != 0
    out = proc.stdout + proc.stderr
    assert "segment.weights_dir" in out and "not a radflow demo cohort" in out, out[-2000:]
    assert not (work / "results" / "inventory").exists()  # nothing ran, not even ingest

    cfg = yaml.safe_load((work / "config" / "config.yaml").read_text())
    cfg["segment"]["allow_phantom"] = True
    (work / "config" / "config.yaml").write_text(yaml.safe_dump(cfg))
    proc = snakemake(work, "-n")
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-2000:]
    assert "ingest" in proc.stdout

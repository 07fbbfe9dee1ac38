"""Shared fixtures: a small demo cohort (generated once per session) and its inventory."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from radflow import ingest, labels
from radflow.demo import DemoSettings, make_cohort

REPO = Path(__file__).resolve().parents[1]
BIN = str(Path(sys.executable).parent)
SALT = "test-salt-0123456789"
# 10 subjects give 13 studies: every special series type of the demo appears at least once.
SMALL = DemoSettings(
    n_subjects=10,
    n_unlabeled=1,
    second_study_every=4,
    seed=7,
    matrix=32,
    z_extent_mm=120.0,
    z_center_mm=-50.0,
)


@pytest.fixture(scope="session")
def demo_cohort(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("demo") / "cohort"
    return make_cohort(out, SMALL, workers=2)


@pytest.fixture(scope="session")
def inventory(demo_cohort, tmp_path_factory):
    res = tmp_path_factory.mktemp("ingest")
    pub = ingest.ingest(
        demo_cohort / "raw",
        res / "inventory",
        res / "private",
        ingest.SelectionRules(),
        labels.LabelSpec(path=str(demo_cohort / "labels.csv")),
        SALT,
        threads=2,
    )
    return pub, res


def tree_digest(root: Path) -> dict[str, str]:
    """sha256 of every file under root (relative path -> digest)."""
    out = {}
    for dirpath, _dirs, files in os.walk(root):
        for name in files:
            p = Path(dirpath) / name
            out[str(p.relative_to(root))] = hashlib.sha256(p.read_bytes()).hexdigest()
    return out


def workdir(tmp: Path, cohort: Path, **convert) -> Path:
    """A project folder whose config runs the small cohort quickly (the tests' demo)."""
    cfg = yaml.safe_load((REPO / "config" / "config.yaml").read_text())
    cfg["raw_dir"] = str(cohort / "raw")
    cfg["labels"]["path"] = str(cohort / "labels.csv")
    cfg["ids"]["salt"] = SALT
    cfg["ingest"]["threads"] = 2
    # convert.threads as config.yaml has it: test_segmentation_batches_run_side_by_side
    cfg["convert"].update({"spacing_mm": [4.0, 4.0, 4.0], **convert})
    cfg["segment"]["weights_dir"] = str(REPO / "resources" / "totalseg_phantom")
    cfg["segment"]["device"] = "cpu"
    cfg["qc"]["reference"] = str(cohort / "ground_truth" / "{StudyInstanceUID}" / "organs.nii.gz")
    cfg["mask"]["size"] = [32, 32, 32]
    # the small cohort's 120 mm field of view ends through the middle of the liver (fast to
    # segment): every case is flagged liver:truncated, so the tests keep flagged cases
    cfg["qc"]["implausible"] = "flag"
    cfg["train"].update({"epochs": 2, "device": "cpu", "threads": 2})
    cfg["evaluate"]["bootstrap"] = 100
    # 2 steps still draw every deletion/insertion curve (3 points each, 12 forward passes a
    # case against config.yaml's 36): no workflow test reads the curves' values
    cfg["explain"]["perturbation_steps"] = 2
    cfg["explain"]["lesion_reference"] = str(
        cohort / "ground_truth" / "{StudyInstanceUID}" / "lesion.nii.gz"
    )
    (tmp / "config").mkdir(parents=True)
    (tmp / "config" / "config.yaml").write_text(yaml.safe_dump(cfg))
    return tmp


def snakemake(work: Path, *args: str, timeout: int = 900) -> subprocess.CompletedProcess:
    """``snakemake --cores 2`` on the repository's Snakefile in project folder ``work``."""
    env = {**os.environ, "PATH": BIN + os.pathsep + os.environ.get("PATH", "")}
    return subprocess.run(
        [
            f"{BIN}/snakemake",
            "-s",
            str(REPO / "Snakefile"),
            "-d",
            str(work),
            "--cores",
            "2",
            *args,
        ],
        capture_output=True,
        text=True,
        env=env,
        timeout=timeout,
    )


@pytest.fixture(scope="session")
def workflow_run(demo_cohort, tmp_path_factory):
    """The whole workflow once on the small cohort: (project folder, process, raw digest)."""
    work = workdir(tmp_path_factory.mktemp("wf"), demo_cohort)
    before = tree_digest(demo_cohort / "raw")
    proc = snakemake(work)
    return work, proc, before

"""Shared fixtures: a small demo cohort (generated once per session) and its inventory."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import pytest

from radflow import ingest, labels
from radflow.demo import DemoSettings, make_cohort

REPO = Path(__file__).resolve().parents[1]
SALT = "test-salt-0123456789"
# 10 subjects give 13 studies: every special series type of the demo appears at least once.
SMALL = DemoSettings(
    n_subjects=10, n_unlabeled=1, seed=7, matrix=32, z_extent_mm=120.0, z_center_mm=-50.0
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

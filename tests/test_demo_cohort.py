"""The demo cohort's plan (pure, no DICOM written): a task where the mask can matter."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import yaml

from radflow import ids
from radflow.demo import DemoSettings, Phantom, plan_cohort
from radflow.demo.cohort import HU, Blob
from radflow.manifest import SplitSettings, assign_splits

REPO = Path(__file__).resolve().parents[1]
DEMO = plan_cohort(DemoSettings())


def _grid_around(blob: Blob, step: float = 2.0) -> np.ndarray:
    r = blob.extent() + 2 * step
    ax = np.arange(-r, r + step, step)
    g = np.stack(np.meshgrid(ax, ax, ax, indexing="ij"), axis=-1)
    return g + np.asarray(blob.center)


def test_plan_is_deterministic_for_a_seed_and_moves_with_it():
    assert plan_cohort(DemoSettings()) == DEMO
    other = plan_cohort(DemoSettings(seed=43))
    assert [s.phantom for s in other] != [s.phantom for s in DEMO]


def test_lesions_only_in_class_1_and_varied():
    pos = [s for s in DEMO if s.label == 1]
    assert all(s.phantom.lesions for s in pos)
    assert not any(s.phantom.lesions for s in DEMO if s.label == 0)
    blobs = [b for s in pos for b in s.phantom.lesions]
    sizes = [b.extent() for b in blobs]
    contrast = [b.hu for b in blobs]
    assert max(sizes) > 2 * min(sizes)  # small and large
    assert min(contrast) < -60 and max(contrast) > -30  # conspicuous and subtle
    assert any(b.lobes for b in blobs)  # lobulated
    assert any(len(set(b.radii)) > 1 for b in blobs)  # oval
    assert any(len(s.phantom.lesions) == 2 for s in pos)


def test_dark_cysts_outside_the_liver_in_both_classes():
    """Distractors: "any dark blob" must not give the class away."""
    for label in (0, 1):
        with_cyst = [s for s in DEMO if s.label == label and s.phantom.cysts]
        assert len(with_cyst) >= 0.3 * sum(s.label == label for s in DEMO)
    for s in DEMO[:12]:
        for cyst in s.phantom.cysts:
            pts = _grid_around(cyst)
            inside = cyst.contains(pts)
            lab = s.phantom.labels(pts)
            hu = s.phantom.hu(pts)
            drawn = inside & np.isin(lab, (1, 2, 3))
            assert drawn.any() and not (inside & (lab == 5) & (hu < 30)).any()
            assert hu[drawn].mean() < 40  # water density in a 50-150 HU organ


def test_lesions_are_hypodense_and_inside_the_liver():
    for s in [s for s in DEMO if s.label == 1][:6]:
        for blob in s.phantom.lesions:
            pts = _grid_around(blob)
            les = s.phantom.lesion(pts)
            lab = s.phantom.labels(pts)
            assert les.sum() > 10 and (lab[les] == 5).all()
            hu = s.phantom.hu(pts)
            liver = (lab == 5) & ~les
            assert hu[les].mean() < hu[liver].mean() + blob.hu / 2


def test_texture_is_correlated_and_shared_by_every_series():
    ph = Phantom(texture_hu=8.0, texture_seed=3)
    line = np.stack([np.linspace(-100, -20, 81), np.zeros(81), np.zeros(81)], axis=-1)
    a, b = ph.hu(line), ph.hu(line)
    assert np.array_equal(a, b)  # the same body whatever grid samples it
    assert 4 < a.std() < 14 and abs(a.mean() - HU["liver"]) < 8
    d = a - a.mean()
    assert np.corrcoef(d[:-1], d[1:])[0, 1] > 0.8  # grain of several mm, not white noise
    assert not np.array_equal(Phantom(texture_hu=8.0, texture_seed=4).hu(line), a)  # per subject
    assert Phantom().hu(line).std() == 0  # texture off: uniform organ


def test_at_least_10_held_out_subjects_with_a_lesion():
    """With the demo config's salt and split fractions (every case assumed usable)."""
    cfg = yaml.safe_load((REPO / "config" / "config.yaml").read_text())
    salt, m = cfg["ids"]["salt"], cfg["manifest"]
    labelled = [s for s in DEMO if s.labeled]
    subjects = pd.DataFrame(
        {
            "subject_id": [ids.pseudonym("subject", s.patient_id, salt) for s in labelled],
            "label": [s.label for s in labelled],
        }
    )
    split = assign_splits(
        subjects, SplitSettings(m["train"], m["val"], m["test"], m["folds"], m["seed"])
    )
    held = split[(split["split"] != "train") & (split["label"] == 1)]
    assert len(held) >= 10
    assert (split.loc[split["split"] == "test", "label"] == 1).sum() >= 5

"""The classical baseline: ROI features on tiny arrays, and a fit that can fail."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from sklearn.metrics import roc_auc_score

from radflow.baseline import baseline, feature_names, fit_predict, roi_features
from radflow.io import save_nifti

WINDOW = (-40.0, 160.0)


def _cube(value: float = 60.0) -> tuple[np.ndarray, np.ndarray]:
    img = np.full((8, 8, 8), -1024, dtype=np.int16)
    roi = np.zeros((8, 8, 8), dtype=bool)
    roi[2:6, 2:6, 2:6] = True
    img[roi] = value
    return img, roi


def test_features_of_a_uniform_cube():
    img, roi = _cube(60.0)
    f = roi_features(img, roi, (2.0, 2.0, 2.0), WINDOW)
    assert list(f) == feature_names()
    assert f["roi_volume_ml"] == pytest.approx(64 * 8 / 1000)
    assert f["hu_mean"] == 60 and f["hu_sd"] == 0 and f["hu_p01"] == f["hu_p99"] == 60
    # 8 bins of 25 HU over [-40, 160]: edges -40, -15, 10, 35, 60, ...; 60 HU opens bin 4
    hist = [f[f"hist_{k}"] for k in range(8)]
    assert sum(hist) + f["hist_below"] + f["hist_above"] == pytest.approx(1.0)
    assert hist[4] == 1.0
    # inside a uniform ROI there is no texture: the eroded core ignores the edge to the fill
    assert f["gradient_mean"] == 0 and f["highpass_sd"] == pytest.approx(0, abs=1e-9)


def test_features_see_a_dark_spot_and_the_window_edges():
    img, roi = _cube(60.0)
    img[3, 3, 3] = -500  # a dark voxel below the window
    img[4, 4, 4] = 400  # a bright one above it
    f = roi_features(img, roi, (1.0, 1.0, 1.0), WINDOW)
    assert f["hist_below"] == pytest.approx(1 / 64) and f["hist_above"] == pytest.approx(1 / 64)
    assert f["hu_p01"] < 60 < f["hu_p99"] and f["hu_sd"] > 0
    assert f["gradient_mean"] > 0 and f["highpass_sd"] > 0


def test_features_refuse_an_empty_or_mismatched_roi():
    img, roi = _cube()
    with pytest.raises(ValueError, match="empty ROI"):
        roi_features(img, np.zeros_like(roi), (1, 1, 1), WINDOW)
    with pytest.raises(ValueError, match="shape"):
        roi_features(img, roi[:4], (1, 1, 1), WINDOW)


def _cohort(n: int, rng: np.random.Generator, informative: bool):
    """Cases of a noisy cube; class 1 has a dark spot when ``informative``."""
    feats, labels = [], []
    for i in range(n):
        label = i % 2
        img, roi = _cube(60.0)
        img = (img + rng.normal(0, 8, img.shape) * roi).astype(np.int16)
        if informative and label:
            img[3:5, 3:5, 3:5] -= 60
        feats.append(list(roi_features(img, roi, (3.0, 3.0, 3.0), WINDOW).values()))
        labels.append(label)
    return np.array(feats), np.array(labels)


def test_baseline_learns_a_dark_lesion():
    x, y = _cohort(60, np.random.default_rng(0), informative=True)
    train = np.arange(len(y)) < 30
    prob = fit_predict(x, y, train)
    assert roc_auc_score(y[~train], prob[~train]) > 0.95


def test_baseline_can_fail_when_labels_carry_no_signal():
    """Labels independent of the images: held-out AUC must stay near chance (a baseline that
    scored well here would be reading something other than the features)."""
    rng = np.random.default_rng(1)
    x, _ = _cohort(120, rng, informative=False)
    y = rng.permutation(np.arange(120) % 2)
    train = np.arange(120) < 60
    auc = roc_auc_score(y[~train], fit_predict(x, y, train)[~train])
    assert 0.3 < auc < 0.7


def test_baseline_refuses_a_single_class_train_split():
    x, y = _cohort(10, np.random.default_rng(2), informative=True)
    with pytest.raises(ValueError, match="one class"):
        fit_predict(x, np.zeros_like(y), np.ones(10, dtype=bool))


def test_baseline_on_manifest_rows(tmp_path):
    """From files, as evaluate runs it: fit on train, threshold on val, metrics on test."""
    rng = np.random.default_rng(3)
    rows = []
    aff = np.diag([3.0, 3.0, 3.0, 1.0])
    for i in range(24):
        label = i % 2
        img, roi = _cube(60.0)
        img = (img + rng.normal(0, 8, img.shape) * roi).astype(np.int16)
        if label:
            img[3:5, 3:5, 3:5] -= 60
        save_nifti(img, aff, tmp_path / f"c{i}.nii.gz")
        save_nifti(roi.astype(np.uint8), aff, tmp_path / f"c{i}_roi.nii.gz")
        split = "train" if i < 12 else ("val" if i < 18 else "test")
        rows.append(
            {
                "case_id": f"c{i}",
                "label": label,
                "split": split,
                "masked": f"c{i}.nii.gz",
                "roi": f"c{i}_roi.nii.gz",
            }
        )
    cases = pd.DataFrame(rows)
    result, prob = baseline(cases, tmp_path, WINDOW, bootstrap=50)
    assert prob.shape == (24,) and result["n_train"] == 12
    assert result["test"]["n"] == 6 and result["test"]["auc"] == 1.0
    assert result["features"] == feature_names()

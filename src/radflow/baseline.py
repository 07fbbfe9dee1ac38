"""A classical baseline beside the network: logistic regression on ROI features.

Features are computed inside the ROI of each case's masked volume (the model's own input, so
the baseline sees exactly what the network sees): ROI volume, HU moments and percentiles, a
coarse HU histogram over the model's window, and simple texture (gradient magnitude, the
high-pass residual). The model is fit on the train split only, its threshold is chosen on
validation (Youden's J) and the metrics are reported on test, as for the network, so a user
sees whether the network earns its cost.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

PERCENTILES = (1, 5, 25, 50, 75, 95, 99)
HISTOGRAM_BINS = 8


def feature_names() -> list[str]:
    """The names of ``roi_features``' values, in order."""
    names = ["roi_volume_ml", "hu_mean", "hu_sd", "hu_skewness", "hu_kurtosis"]
    names += [f"hu_p{p:02d}" for p in PERCENTILES]
    names += ["hist_below"] + [f"hist_{k}" for k in range(HISTOGRAM_BINS)] + ["hist_above"]
    names += ["gradient_mean", "gradient_p90", "highpass_sd"]
    return names


def roi_features(
    image: np.ndarray,
    roi: np.ndarray,
    spacing_mm: Sequence[float],
    window: Sequence[float],
) -> dict[str, float]:
    """Features of the HU ``image`` inside the boolean ``roi`` (same grid, voxel size
    ``spacing_mm``); the histogram has HISTOGRAM_BINS equal bins over ``window`` (HU) plus the
    fractions below and above it. Texture is read on the ROI eroded by one voxel, so the edge
    against the background fill does not count as texture. An empty ROI is refused."""
    from scipy import ndimage, stats

    roi = np.asarray(roi, dtype=bool)
    if roi.shape != image.shape:
        raise ValueError(f"ROI shape {roi.shape} differs from the image shape {image.shape}")
    if not roi.any():
        raise ValueError("empty ROI: no voxel to compute features on")
    img = np.asarray(image, dtype=np.float64)
    v = img[roi]
    spacing = np.asarray(spacing_mm, dtype=np.float64)
    lo, hi = float(window[0]), float(window[1])
    counts, _ = np.histogram(v, bins=HISTOGRAM_BINS, range=(lo, hi))  # outside: not counted
    inner = ndimage.binary_erosion(roi)
    if not inner.any():  # a ROI too thin to erode: read texture on the ROI itself
        inner = roi
    grad = np.sqrt(sum(g**2 for g in np.gradient(img, *spacing)))[inner]
    highpass = (img - ndimage.gaussian_filter(img, 1.0))[inner]
    sd = float(v.std())
    out = {
        "roi_volume_ml": float(roi.sum() * spacing.prod() / 1000.0),
        "hu_mean": float(v.mean()),
        "hu_sd": sd,
        "hu_skewness": float(stats.skew(v)) if sd > 0 else 0.0,
        "hu_kurtosis": float(stats.kurtosis(v)) if sd > 0 else 0.0,
    }
    out.update(
        {
            f"hu_p{p:02d}": float(q)
            for p, q in zip(PERCENTILES, np.percentile(v, PERCENTILES), strict=True)
        }
    )
    out["hist_below"] = float((v < lo).mean())
    out.update({f"hist_{k}": float(c) / v.size for k, c in enumerate(counts)})
    out["hist_above"] = float((v > hi).mean())
    out["gradient_mean"] = float(grad.mean())
    out["gradient_p90"] = float(np.percentile(grad, 90))
    out["highpass_sd"] = float(highpass.std())
    return out


def case_features(
    cases: pd.DataFrame, root: str | os.PathLike, window: Sequence[float]
) -> pd.DataFrame:
    """One row of ``roi_features`` per manifest row (masked volume and its ROI), by case_id."""
    import nibabel as nib

    rows = []
    for r in cases.itertuples(index=False):
        img = nib.load(Path(root) / r.masked)
        roi = np.asanyarray(nib.load(Path(root) / r.roi).dataobj) > 0
        feats = roi_features(np.asanyarray(img.dataobj), roi, img.header.get_zooms()[:3], window)
        rows.append({"case_id": r.case_id, **feats})
    return pd.DataFrame(rows, columns=["case_id", *feature_names()])


def fit_predict(
    features: np.ndarray, labels: np.ndarray, train: np.ndarray, seed: int = 0
) -> np.ndarray:
    """Fit standardised L2 logistic regression on the ``train`` rows; P(class 1) of every row."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    train = np.asarray(train, dtype=bool)
    y = np.asarray(labels, dtype=int)[train]
    if len(np.unique(y)) < 2:
        raise ValueError("the train split holds one class only: no baseline can be fit")
    model = make_pipeline(
        StandardScaler(), LogisticRegression(C=1.0, max_iter=5000, random_state=seed)
    )
    model.fit(np.asarray(features, dtype=np.float64)[train], y)
    return model.predict_proba(np.asarray(features, dtype=np.float64))[:, 1]


def baseline(
    cases: pd.DataFrame,
    root: str | os.PathLike,
    window: Sequence[float],
    bootstrap: int = 1000,
    seed: int = 0,
) -> tuple[dict[str, Any], np.ndarray]:
    """Features, fit on train, threshold on validation, metrics on test:
    (metrics as in metrics.json, P(class 1) per row of ``cases``)."""
    from radflow.evaluate import binary_metrics, youden_threshold

    feats = case_features(cases, root, window)
    x = feats[feature_names()].to_numpy()
    known = cases["label"].notna().to_numpy()  # unlabelled rows are predicted, never scored
    labels = cases["label"].fillna(-1).to_numpy(dtype=int)
    split = cases["split"].to_numpy()
    prob = fit_predict(x, labels, (split == "train") & known, seed)
    val, test = (split == "val") & known, (split == "test") & known
    thr = youden_threshold(labels[val], prob[val])
    result = {
        "model": "logistic regression (scikit-learn, L2, standardised) on ROI features",
        "features": feature_names(),
        "histogram_window_hu": [float(w) for w in window],
        "n_train": int(((split == "train") & known).sum()),
        "threshold": thr,
        "test": binary_metrics(labels[test], prob[test], thr, bootstrap),
        "validation": binary_metrics(labels[val], prob[val], thr, bootstrap),
    }
    return result, prob

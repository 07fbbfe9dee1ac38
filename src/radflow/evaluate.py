"""evaluate: predictions and honest metrics (threshold chosen on validation, applied to test)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from radflow.io import atomic_path, write_json, write_table


def youden_threshold(labels: np.ndarray, scores: np.ndarray) -> float:
    """Threshold maximising sensitivity + specificity - 1 (Youden's J) on these cases."""
    from sklearn.metrics import roc_curve

    if len(np.unique(labels)) < 2:
        return 0.5
    fpr, tpr, thr = roc_curve(labels, scores)
    j = tpr - fpr
    best = int(np.argmax(j))
    return float(min(thr[best], 1.0))


def binary_metrics(
    labels: np.ndarray, scores: np.ndarray, threshold: float, n_boot: int = 1000, seed: int = 0
) -> dict[str, Any]:
    """AUC with a bootstrap 95% CI and threshold metrics, all from scikit-learn."""
    from sklearn import metrics as skm

    labels = np.asarray(labels, dtype=int)
    scores = np.asarray(scores, dtype=float)
    pred = (scores >= threshold).astype(int)
    tn, fp, fn, tp = skm.confusion_matrix(labels, pred, labels=[0, 1]).ravel()
    both = len(np.unique(labels)) == 2
    auc = float(skm.roc_auc_score(labels, scores)) if both else float("nan")
    rng = np.random.default_rng(seed)
    boots = []
    for _ in range(n_boot if both else 0):
        idx = rng.integers(0, len(labels), len(labels))
        if len(np.unique(labels[idx])) == 2:
            boots.append(skm.roc_auc_score(labels[idx], scores[idx]))
    ci = [float(np.percentile(boots, 2.5)), float(np.percentile(boots, 97.5))] if boots else None
    div = lambda a, b: float(a / b) if b else float("nan")  # noqa: E731
    return {
        "n": int(len(labels)),
        "n_positive": int(labels.sum()),
        "auc": auc,
        "auc_95ci": ci,
        "threshold": float(threshold),
        "accuracy": float(skm.accuracy_score(labels, pred)),
        "balanced_accuracy": float(skm.balanced_accuracy_score(labels, pred))
        if both
        else float("nan"),
        "sensitivity": div(tp, tp + fn),
        "specificity": div(tn, tn + fp),
        "precision": div(tp, tp + fp),
        "f1": float(skm.f1_score(labels, pred, zero_division=0)),
        "confusion_matrix": {"tn": int(tn), "fp": int(fp), "fn": int(fn), "tp": int(tp)},
    }


def evaluate(
    checkpoint: str | os.PathLike,
    manifest_path: str | os.PathLike,
    out_dir: str | os.PathLike,
    root: str | os.PathLike = ".",
    history: str | os.PathLike | None = None,
    device: str = "auto",
    threads: int = 1,
    bootstrap: int = 1000,
) -> dict[str, Any]:
    """Predict every case, pick the threshold on val, report test; write tables and plots.

    The classical baseline (``radflow.baseline``) runs on the same splits beside the network:
    its metrics are ``metrics["baseline"]``, its probabilities ``baseline_probability``."""
    import torch

    from radflow import manifest
    from radflow.baseline import baseline
    from radflow.inputs import Cache, InputSpec
    from radflow.model import load_checkpoint, predict, resolve_device

    torch.set_num_threads(threads)
    dev = resolve_device(device)
    model, ck = load_checkpoint(checkpoint, dev)
    model.to(dev)
    cases = manifest.read(manifest_path)
    manifest.labelled(cases, "evaluation")  # stops with one line when no case has a label
    cache = Cache(cases, root, InputSpec.from_checkpoint(ck), dev)
    prob = predict(model, cache, 4, dev.type == "cuda")
    preds = cases[["case_id", "subject_id", "split", "label"]].copy()
    preds["probability"] = prob
    spec = InputSpec.from_checkpoint(ck)
    try:
        base, preds["baseline_probability"] = baseline(cases, root, spec.hu_window, bootstrap)
    except ValueError as exc:  # e.g. one class in train: the network's metrics still stand
        base, preds["baseline_probability"] = {"error": str(exc)}, np.nan
    # every case is predicted; the threshold and the metrics use the labelled ones alone
    known = preds[preds["label"].notna()].astype({"label": int})
    val = known[known["split"] == "val"]
    test = known[known["split"] == "test"]
    thr = youden_threshold(val["label"].to_numpy(), val["probability"].to_numpy())
    preds["prediction"] = (preds["probability"] >= thr).astype(int)
    result = {
        "threshold_source": "validation split (Youden's J); never tuned on test",
        "threshold": thr,
        "test": binary_metrics(test["label"], test["probability"], thr, bootstrap),
        "validation": binary_metrics(val["label"], val["probability"], thr, bootstrap),
        "checkpoint_epoch": int(ck["epoch"]),
        "arch": ck["arch"],
        "baseline": base,
    }
    out = Path(out_dir)
    write_table(preds, out / "predictions.csv")
    write_json(out / "metrics.json", result)
    plot_roc(test, val, out / "roc.png")
    plot_confusion(result["test"]["confusion_matrix"], thr, out / "confusion.png")
    if history is not None and Path(history).exists():
        plot_history(pd.read_csv(history), out / "training_curves.png")
    return result


def _figure() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig: Any, path: Path) -> None:
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=100, bbox_inches="tight")
    _figure().close(fig)


def plot_roc(test: pd.DataFrame, val: pd.DataFrame, path: Path) -> None:
    """ROC curves of the test and validation splits: the network (solid) and, where the
    table has it, the logistic-regression baseline (dashed)."""
    from sklearn.metrics import roc_auc_score, roc_curve

    plt = _figure()
    fig, ax = plt.subplots(figsize=(4.5, 4.5))
    for name, df in (("test", test), ("validation", val)):
        if df["label"].nunique() < 2:
            continue
        for col, who, style in (
            ("probability", "network", "-"),
            ("baseline_probability", "baseline", "--"),
        ):
            if col in df and df[col].notna().all():
                fpr, tpr, _ = roc_curve(df["label"], df[col])
                auc = roc_auc_score(df["label"], df[col])
                ax.plot(fpr, tpr, style, label=f"{who}, {name}: AUC {auc:.3f}")
    ax.plot([0, 1], [0, 1], "k:", lw=0.8)
    ax.set_xlabel("1 - specificity")
    ax.set_ylabel("sensitivity")
    ax.legend(loc="lower right")
    _save(fig, path)


def plot_confusion(cm: dict[str, int], threshold: float, path: Path) -> None:
    """Test confusion matrix at the validation threshold."""
    plt = _figure()
    m = np.array([[cm["tn"], cm["fp"]], [cm["fn"], cm["tp"]]])
    fig, ax = plt.subplots(figsize=(3.8, 3.4))
    ax.imshow(m, cmap="Blues")
    for (i, j), v in np.ndenumerate(m):
        ax.text(j, i, str(v), ha="center", va="center", fontsize=14)
    ax.set_xticks([0, 1], ["pred 0", "pred 1"])
    ax.set_yticks([0, 1], ["label 0", "label 1"])
    ax.set_title(f"test, threshold {threshold:.3f}")
    _save(fig, path)


def plot_history(history: pd.DataFrame, path: Path) -> None:
    """Loss and validation AUC per epoch."""
    plt = _figure()
    fig, ax = plt.subplots(1, 2, figsize=(8, 3.2))
    ax[0].plot(history["epoch"], history["loss"], label="training")
    if "val_loss" in history:
        ax[0].plot(history["epoch"], history["val_loss"], label="validation")
        ax[0].legend()
    ax[0].set_title("loss (cross-entropy)")
    ax[1].plot(history["epoch"], history["val_auc"])
    ax[1].set_title("validation AUC")
    ax[1].set_ylim(0, 1.02)
    for a in ax:
        a.set_xlabel("epoch")
    _save(fig, path)


def cv_summary(histories: list[str | os.PathLike], out: str | os.PathLike) -> dict[str, Any]:
    """Per-fold best validation AUC and their mean and sd across folds (``results/cv``)."""
    folds = []
    for path in histories:
        h = pd.read_csv(path)
        best = h.loc[h["val_auc"].idxmax()] if h["val_auc"].notna().any() else h.iloc[-1]
        folds.append(
            {
                "history": str(path),
                "best_epoch": int(best["epoch"]),
                "val_auc": float(best["val_auc"]),
            }
        )
    aucs = pd.Series([f["val_auc"] for f in folds])
    summary = {
        "folds": folds,
        "val_auc_mean": float(aucs.mean()),
        "val_auc_sd": float(aucs.std(ddof=1)) if len(aucs) > 1 else 0.0,
    }
    write_json(out, summary)
    return summary

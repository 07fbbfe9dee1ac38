"""faithfulness: does an attribution map point at what the model uses? Pure functions.

* localisation against a known lesion: the pointing game (is the map's peak in the lesion?) and
  the share of the map's mass inside a mask;
* perturbation curves (Petsiuk et al., RISE, 2018): the model's probability as the voxels are
  moved, most-attributed first, from one volume to another in ``steps`` equal steps --
  *deletion* from the input to a baseline (a faithful map makes the probability fall fast: low
  area under the curve), *insertion* from the baseline to the input (it rises fast: high area);
  each against the same curve in a random voxel order, which is what a map that knows nothing
  would get;
* the model-randomisation sanity check's correlation (Adebayo et al., 2018).

The model enters only as ``predict``: a batch of network inputs (B, C, Z, Y, X) -> the target
class's probability (B,). Nothing here imports torch.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

Predict = Callable[[np.ndarray], np.ndarray]


# --------------------------------------------------------------------------- localisation


def peak_index(cam: np.ndarray) -> tuple[int, ...]:
    """Voxel index of the map's maximum (the first one in C order on ties)."""
    return tuple(int(v) for v in np.unravel_index(int(np.argmax(cam)), cam.shape))


def pointing_game(cam: np.ndarray, lesion: np.ndarray, tolerance_vox: int = 1) -> bool:
    """True when the map's peak lies in the lesion grown by ``tolerance_vox`` voxels."""
    from scipy import ndimage

    lesion = np.asarray(lesion, dtype=bool)
    if not lesion.any():
        return False
    grown = ndimage.binary_dilation(lesion, iterations=tolerance_vox) if tolerance_vox else lesion
    return bool(grown[peak_index(cam)])


def mass_inside(cam: np.ndarray, mask: np.ndarray) -> float:
    """Fraction of the map's total mass inside ``mask`` (NaN for an all-zero map)."""
    total = float(cam.sum())
    return float(cam[np.asarray(mask, dtype=bool)].sum() / total) if total > 0 else float("nan")


def hit_rate(hits: Sequence[bool], target: float) -> dict[str, Any]:
    """Pointing-game hit rate over cases and whether it reaches ``target`` (False with none)."""
    n = len(hits)
    rate = float(np.mean(hits)) if n else None
    return {
        "hit_rate": rate,
        "hits": int(sum(bool(h) for h in hits)),
        "n": n,
        "target": target,
        "meets_target": rate is not None and rate >= target,
    }


def correlation(a: np.ndarray, b: np.ndarray) -> dict[str, float]:
    """Pearson and Spearman correlation of two maps (NaN when one is constant)."""
    from scipy import stats

    a, b = a.ravel().astype(np.float64), b.ravel().astype(np.float64)
    if a.std() == 0 or b.std() == 0:
        return {"pearson": float("nan"), "spearman": float("nan")}
    return {
        "pearson": float(np.corrcoef(a, b)[0, 1]),
        "spearman": float(stats.spearmanr(a, b).statistic),
    }


# --------------------------------------------------------------------------- perturbation


def ranking(attribution: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Flat voxel indices, most attributed first; ties (a ReLU'd map has many) in random order."""
    a = np.asarray(attribution, dtype=np.float64).ravel()
    return np.lexsort((rng.permutation(a.size), -a))


def step_counts(n_voxels: int, steps: int) -> np.ndarray:
    """How many voxels have moved at each of the ``steps + 1`` points of a curve (0 .. all)."""
    if steps < 1:
        raise ValueError(f"a perturbation curve needs at least 1 step, got {steps}")
    return np.rint(np.linspace(0, n_voxels, steps + 1)).astype(np.int64)


def perturbation_curve(
    predict: Predict,
    start: np.ndarray,
    end: np.ndarray,
    order: np.ndarray,
    steps: int,
    batch: int = 8,
) -> tuple[np.ndarray, np.ndarray]:
    """(fraction moved, probability) as the voxels of ``start`` (C, *spatial) take their values
    in ``end`` (all channels of a voxel at once), in ``order`` (flat spatial indices)."""
    if start.shape != end.shape:
        raise ValueError(f"start {start.shape} and end {end.shape} differ")
    c = start.shape[0]
    flat_start = start.reshape(c, -1)
    flat_end = end.reshape(c, -1)
    n = flat_start.shape[1]
    if order.shape != (n,):
        raise ValueError(f"order has {order.shape} entries, the volume {n} voxels")
    counts = step_counts(n, steps)
    current = flat_start.copy()
    probs: list[np.ndarray] = []
    pending: list[np.ndarray] = []
    done = 0
    for k in counts:
        idx = order[done:k]
        current[:, idx] = flat_end[:, idx]
        done = int(k)
        pending.append(current.reshape(start.shape).copy())
        if len(pending) == batch:
            probs.append(np.asarray(predict(np.stack(pending)), dtype=np.float64))
            pending = []
    if pending:
        probs.append(np.asarray(predict(np.stack(pending)), dtype=np.float64))
    return counts / n, np.concatenate(probs)


def curve_auc(fractions: np.ndarray, probs: np.ndarray) -> float:
    """Area under a perturbation curve over the fraction moved (0 .. 1): trapezoid rule."""
    f, p = np.asarray(fractions, dtype=np.float64), np.asarray(probs, dtype=np.float64)
    return float(np.sum((f[1:] - f[:-1]) * (p[1:] + p[:-1]) / 2))


def deletion_insertion(
    predict: Predict,
    x: np.ndarray,
    baseline: np.ndarray,
    attribution: np.ndarray,
    steps: int,
    seed: int = 0,
    batch: int = 8,
    with_random: bool = True,
) -> dict[str, Any]:
    """Deletion and insertion AUCs of ``attribution`` (spatial shape of ``x`` (C, *spatial)),
    and of a random voxel order (the same random order for both curves; it depends on ``seed``
    and the grid alone, so ``with_random=False`` can skip it for a second map of one case).

    Deletion moves voxels from ``x`` to ``baseline`` (lower AUC = more faithful); insertion from
    ``baseline`` to ``x`` (higher = more faithful). The curves are returned too.
    """
    if attribution.shape != x.shape[1:]:
        raise ValueError(f"attribution {attribution.shape} is not on the input's grid {x.shape}")
    rng = np.random.default_rng(seed)
    by_map = ranking(attribution, rng)
    at_random = rng.permutation(by_map.size)
    out: dict[str, Any] = {"steps": steps}
    orders = [("", by_map)] + ([("random_", at_random)] if with_random else [])
    for name, order in orders:
        f, p_del = perturbation_curve(predict, x, baseline, order, steps, batch)
        _, p_ins = perturbation_curve(predict, baseline, x, order, steps, batch)
        out[f"{name}deletion_auc"] = curve_auc(f, p_del)
        out[f"{name}insertion_auc"] = curve_auc(f, p_ins)
        out[f"{name}deletion_curve"] = [round(float(v), 5) for v in p_del]
        out[f"{name}insertion_curve"] = [round(float(v), 5) for v in p_ins]
    return out

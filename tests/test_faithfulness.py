"""faithfulness: perturbation curves, pointing game; an attribution that ignores the lesion, or
a model that ignores it, fails the target, and a correct one passes."""

from __future__ import annotations

import numpy as np
import pytest

from radflow import faithfulness as ff

SHAPE = (12, 12, 12)


def _lesion(center=(6, 6, 6), r=2):
    z, y, x = np.indices(SHAPE)
    d2 = (z - center[0]) ** 2 + (y - center[1]) ** 2 + (x - center[2]) ** 2
    return d2 <= r * r


def _blob(center, sigma=1.5):
    z, y, x = np.indices(SHAPE)
    d2 = (z - center[0]) ** 2 + (y - center[1]) ** 2 + (x - center[2]) ** 2
    blob = np.exp(-d2 / (2 * sigma**2))
    return np.where(d2 <= (3 * sigma) ** 2, blob, 0).astype(np.float32)  # 0 beyond 3 sigma


def lesion_model(lesion: np.ndarray):
    """A 'model' whose probability is how dark the lesion region is (channel 0 in [0, 1]): it
    uses the lesion and nothing else."""

    def predict(batch: np.ndarray) -> np.ndarray:
        darkness = 1.0 - batch[:, 0][:, lesion].mean(axis=1)
        return 1.0 / (1.0 + np.exp(-8.0 * (darkness - 0.75)))

    return predict


def _case():
    x = np.full((1, *SHAPE), 0.8, np.float32)  # bright organ
    les = _lesion()
    x[0][les] = 0.0  # dark lesion
    baseline = np.full_like(x, 0.5)  # "removed": neither dark nor bright
    return x, baseline, les


def test_step_counts_and_auc():
    assert ff.step_counts(10, 4).tolist() == [0, 2, 5, 8, 10]
    with pytest.raises(ValueError, match="at least 1 step"):
        ff.step_counts(10, 0)
    assert ff.curve_auc(np.array([0, 0.5, 1.0]), np.array([1.0, 1.0, 1.0])) == pytest.approx(1.0)
    assert ff.curve_auc(np.array([0, 1.0]), np.array([1.0, 0.0])) == pytest.approx(0.5)


def test_curve_moves_every_voxel_once_in_order():
    start = np.zeros((2, 2, 2, 2), np.float32)
    end = np.ones_like(start)
    seen = []

    def predict(batch):
        seen.append(batch.copy())
        return batch[:, 1].reshape(len(batch), -1).mean(1)  # fraction moved, channel 1

    order = np.arange(8)[::-1]
    f, p = ff.perturbation_curve(predict, start, end, order, steps=4, batch=3)
    np.testing.assert_allclose(f, [0, 0.25, 0.5, 0.75, 1.0])
    np.testing.assert_allclose(p, f)  # both channels of a voxel move together
    first_moved = np.concatenate(seen)[1, 0].ravel()
    assert first_moved[7] == 1 and first_moved[6] == 1 and first_moved[:6].sum() == 0
    with pytest.raises(ValueError, match="order"):
        ff.perturbation_curve(predict, start, end, np.arange(5), 2)


def test_ranking_breaks_ties_at_random_but_keeps_the_order():
    a = np.array([0.0, 2.0, 0.0, 1.0, 0.0])
    r = ff.ranking(a, np.random.default_rng(0))
    assert r[:2].tolist() == [1, 3] and sorted(r[2:].tolist()) == [0, 2, 4]


def test_correct_attribution_beats_random_order_and_one_that_ignores_the_lesion_does_not():
    x, baseline, les = _case()
    predict = lesion_model(les)
    assert predict(x[None])[0] > 0.85 and predict(baseline[None])[0] < 0.15
    on = ff.deletion_insertion(predict, x, baseline, _blob((6, 6, 6)), steps=12, seed=0)
    off = ff.deletion_insertion(predict, x, baseline, _blob((2, 2, 10)), steps=12, seed=0)
    # a map on the lesion: the probability falls at once when its voxels go, rises at once
    # when they come back; far better than a random order
    assert on["deletion_auc"] < on["random_deletion_auc"] - 0.2
    assert on["insertion_auc"] > on["random_insertion_auc"] + 0.2
    # a map away from the lesion removes the lesion last: no better than random
    assert off["deletion_auc"] >= off["random_deletion_auc"] - 0.05
    assert off["insertion_auc"] <= off["random_insertion_auc"] + 0.05
    assert len(on["deletion_curve"]) == 13
    # the random baseline does not depend on the map
    assert on["random_deletion_auc"] == off["random_deletion_auc"]


def test_pointing_game_target_fails_for_an_attribution_that_ignores_the_lesion():
    """Over a cohort of true positives, a CAM placed away from the lesion misses the target, a
    CAM on the lesion meets it."""
    rng = np.random.default_rng(1)
    good, bad = [], []
    for _ in range(10):
        c = tuple(int(v) for v in rng.integers(3, 9, 3))
        les = _lesion(c)
        good.append(ff.pointing_game(_blob(c) + rng.random(SHAPE) * 0.05, les))
        away = tuple((v + 6) % 12 for v in c)
        bad.append(ff.pointing_game(_blob(away), les))
    assert ff.hit_rate(good, 0.9)["meets_target"] is True
    r = ff.hit_rate(bad, 0.9)
    assert r["meets_target"] is False and r["hits"] == 0 and r["n"] == 10
    assert ff.hit_rate([], 0.9)["meets_target"] is False


def test_pointing_game_and_mass():
    cam = np.zeros((10, 10, 10), np.float32)
    cam[5, 5, 5] = 1.0
    cam[1, 1, 1] = 0.5
    lesion = np.zeros((10, 10, 10), bool)
    lesion[6:8, 5, 5] = True  # peak one voxel away: a hit with tolerance 1, a miss without
    assert ff.pointing_game(cam, lesion, 1)
    assert not ff.pointing_game(cam, lesion, 0)
    assert not ff.pointing_game(cam, np.zeros_like(lesion))
    lesion[5, 5, 5] = True
    assert ff.mass_inside(cam, lesion) == pytest.approx(1.0 / 1.5)
    assert np.isnan(ff.mass_inside(np.zeros_like(cam), lesion))

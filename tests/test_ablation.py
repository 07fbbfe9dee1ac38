"""The mask ablation: variant settings, the paired bootstrap, the summary's shape; and (slow)
``snakemake ablation_all`` on a tiny cohort."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest

from radflow import ablation, paths

from .conftest import snakemake, workdir


def test_variant_mask_settings_change_only_fill_and_crop():
    mask = {"rois": ["liver"], "crop": True, "fill_background": True, "enabled": True}
    assert ablation.variant_mask_settings("masked", mask) == mask
    assert ablation.variant_mask_settings("unmasked", mask) == {**mask, "fill_background": False}
    full = ablation.variant_mask_settings("fullfov", mask)
    assert full["crop"] is False and full["fill_background"] is False
    with pytest.raises(ValueError, match="unknown ablation variant"):
        ablation.variant_mask_settings("nomask", mask)
    with pytest.raises(ValueError, match="needs mask.enabled true"):
        ablation.variant_mask_settings("masked", {**mask, "enabled": False})


def test_in_variant_roots_the_default_layout():
    assert paths.in_variant(paths.MASKED, "unmasked") == (
        "results/ablation/unmasked/masked/{case}.nii.gz"
    )
    assert paths.in_variant(paths.CASES_PARQUET) == (
        "results/ablation/{variant}/manifests/cases.parquet"
    )
    with pytest.raises(ValueError):
        paths.in_variant(paths.ABLATION_SUMMARY)


def _scores(n, seed, separation):
    rng = np.random.default_rng(seed)
    y = np.r_[np.zeros(n // 2, int), np.ones(n - n // 2, int)]
    return y, y * separation + rng.normal(0, 1, n)


def test_paired_bootstrap_difference_ci_excludes_zero_for_a_clearly_better_model():
    y, good = _scores(80, 1, 4.0)  # AUC near 1
    _, chance = _scores(80, 2, 0.0)  # AUC near 0.5
    s = ablation.paired_bootstrap(y, {"masked": good, "fullfov": chance}, n_boot=300)
    d = s["fullfov"]["difference_vs_masked"]
    assert s["masked"]["auc"] > 0.95 and s["fullfov"]["auc"] < 0.75
    assert d["auc_difference"] < 0
    assert d["ci95"][1] < 0 and d["ci_excludes_zero"]
    assert d["p_bootstrap"] < 0.05
    assert "difference_vs_masked" not in s["masked"]
    lo, hi = s["masked"]["auc_95ci"]
    assert lo <= s["masked"]["auc"] <= hi


def test_paired_bootstrap_difference_ci_spans_zero_for_equal_models():
    y, a = _scores(40, 3, 1.0)
    rng = np.random.default_rng(4)
    b = a + rng.normal(0, 0.3, len(a))  # the same model with a little noise
    s = ablation.paired_bootstrap(y, {"masked": a, "unmasked": b}, n_boot=300)
    d = s["unmasked"]["difference_vs_masked"]
    assert d["ci95"][0] < 0 < d["ci95"][1]
    assert not d["ci_excludes_zero"]


def test_paired_bootstrap_is_paired():
    """Identical scores: every resampled difference is exactly 0 (unpaired draws would not be)."""
    y, a = _scores(30, 5, 1.0)
    s = ablation.paired_bootstrap(y, {"masked": a, "unmasked": a.copy()}, n_boot=200)
    assert s["unmasked"]["difference_vs_masked"]["ci95"] == [0.0, 0.0]


def test_paired_bootstrap_refuses_unpaired_or_one_class_input():
    y, a = _scores(20, 6, 1.0)
    with pytest.raises(ValueError, match="paired"):
        ablation.paired_bootstrap(y, {"masked": a, "unmasked": a[:-1]})
    with pytest.raises(ValueError, match="one class"):
        ablation.paired_bootstrap(np.ones(20, int), {"masked": a})


def _predictions(seed, separation, cases=None):
    y, p = _scores(40, seed, separation)
    ids = cases or [f"case-{i:012x}" for i in range(40)]
    split = ["test" if i % 2 else "val" for i in range(40)]
    return pd.DataFrame({"case_id": ids, "split": split, "label": y, "probability": p})


def _faith(hits, n, mass, chance, over=None):
    f = {
        "pointing_game": {"hit_rate": hits / n, "hits": hits, "n": n},
        "cam_mass_in_lesion": {"mean": mass},
        "lesion_fraction_of_roi": {"mean": chance},
    }
    if over is not None:  # explain's per-case mean of mass / chance (absent in older files)
        f["cam_mass_over_chance"] = {"mean": over}
    return f


def test_summary_shape_and_numbers(tmp_path):
    preds = {v: _predictions(i, 2.0) for i, v in enumerate(paths.ABLATION_VARIANTS)}
    infos = [{"group": "TP", "mass_in_roi": 0.8}, {"group": "TN", "mass_in_roi": 0.1}]
    explained = {
        # explain's mean of the per-case ratios (5.5), not the ratio of the means (6.0): the
        # ablation reports the same figure as faithfulness.json; older files have no ratio
        "masked": (_faith(9, 10, 0.3, 0.05, over=5.5), infos),
        "unmasked": (_faith(5, 10, 0.1, 0.05), infos),
        "fullfov": (None, []),  # no lesion reference known
    }
    s = ablation.summarise(preds, explained, n_boot=100)
    assert s["splits_identical"] and s["reference"] == "masked"
    assert s["n_test"] == 20 and s["bootstrap"] == {"n": 100, "seed": 0, "paired": True}
    assert list(s["variants"]) == list(paths.ABLATION_VARIANTS)
    m, u, f = (s["variants"][v] for v in paths.ABLATION_VARIANTS)
    assert m["pointing_game"] == {"hit_rate": 0.9, "hits": 9, "n": 10}
    assert m["cam_mass_in_lesion_vs_chance"] == pytest.approx(5.5)
    assert u["cam_mass_in_lesion_vs_chance"] == pytest.approx(2.0)  # older file: 0.1 / 0.05
    assert m["cam_mass_in_roi_tp"] == pytest.approx(0.8)
    assert f["pointing_game"] is None and f["cam_mass_in_roi_tp"] is None
    assert set(u["difference_vs_masked"]) >= {"auc_difference", "ci95", "ci_excludes_zero"}
    assert u["mask"] == {"fill_background": False}
    json.dumps(s)  # plain JSON
    ablation.summary_png(s, tmp_path / "s.png")
    assert (tmp_path / "s.png").read_bytes()[:4] == b"\x89PNG"


def test_summary_flags_other_splits_and_refuses_other_labels():
    preds = {v: _predictions(i, 2.0) for i, v in enumerate(paths.ABLATION_VARIANTS)}
    moved = preds["fullfov"].copy()
    moved.loc[0, "split"] = "train"  # a val case moved: splits differ, test cases still pair
    s = ablation.summarise({**preds, "fullfov": moved}, dict.fromkeys(preds, (None, [])), 50)
    assert not s["splits_identical"]
    flipped = preds["fullfov"].copy()
    flipped.loc[1, "label"] = 1 - flipped.loc[1, "label"]
    with pytest.raises(ValueError, match="other labels"):
        ablation.summarise({**preds, "fullfov": flipped}, dict.fromkeys(preds, (None, [])), 50)


# --------------------------------------------------------------------------- workflow


def test_ablation_all_on_a_tiny_cohort(workflow_run, tmp_path):
    import shutil

    import yaml

    ref, ref_proc, _ = workflow_run
    assert ref_proc.returncode == 0, ref_proc.stderr[-3000:]
    # the variants start from the default run's conversions, label maps and manifest (the
    # session's workflow run, copied: the ablation then runs only its own jobs); its model
    # checkpoints (~0.8 GB) are no input of the ablation
    work = tmp_path / "w"
    shutil.copytree(ref, work, ignore=shutil.ignore_patterns("*.pt"))
    cfg = work / "config" / "config.yaml"
    c = yaml.safe_load(cfg.read_text())
    # one epoch, few resamples, the test split's CAMs without deletion/insertion curves (the
    # summary reads the lesion numbers only)
    c["train"]["epochs"] = 1
    c["evaluate"]["bootstrap"] = 50
    c["explain"]["splits"] = ["test"]
    c["explain"]["perturbation_steps"] = 0
    cfg.write_text(yaml.safe_dump(c))
    dry = snakemake(work, "ablation_all", "-n")
    assert dry.returncode == 0, dry.stderr[-3000:]
    planned = _planned(dry)
    assert planned["ablation_train"] == 3, planned
    assert not {"ingest", "convert", "segment", "mask", "manifest"} & set(planned), planned
    proc = snakemake(work, "ablation_all", timeout=1800)
    assert proc.returncode == 0, proc.stderr[-4000:]
    s = json.loads((work / paths.ABLATION_SUMMARY).read_text())
    assert s["splits_identical"] is True
    assert set(s["variants"]) == set(paths.ABLATION_VARIANTS)
    for v in s["variants"].values():
        assert 0 <= v["auc"] <= 1 and len(v["auc_95ci"]) == 2
        assert "pointing_game" in v and "cam_mass_in_lesion" in v
    assert "difference_vs_masked" in s["variants"]["fullfov"]
    assert (work / paths.ABLATION_PNG).exists()
    split = {}
    for v in paths.ABLATION_VARIANTS:
        m = pd.read_parquet(work / paths.in_variant(paths.CASES_PARQUET, v))
        split[v] = dict(zip(m["case_id"], m["split"], strict=True))
        assert all(p.startswith(f"results/ablation/{v}/masked/") for p in m["masked"])
    default = pd.read_parquet(work / paths.CASES_PARQUET)
    assert split["masked"] == split["unmasked"] == split["fullfov"]
    assert split["masked"] == dict(zip(default["case_id"], default["split"], strict=True))
    # the variants' inputs really differ: unmasked keeps the CT the mask fills
    import nibabel as nib

    case = default["case_id"].iloc[0]
    vol = {
        v: np.asanyarray(
            nib.load(work / paths.in_variant(paths.MASKED, v).format(case=case)).dataobj
        )
        for v in paths.ABLATION_VARIANTS
    }
    assert vol["masked"].shape == vol["unmasked"].shape == vol["fullfov"].shape
    assert (vol["masked"] == -1024).sum() > (vol["unmasked"] == -1024).sum()
    assert not np.array_equal(vol["unmasked"], vol["fullfov"])
    # the default target does not plan the ablation
    plan = snakemake(work, "-n", "--forceall")
    assert plan.returncode == 0, plan.stderr[-3000:]
    jobs = _planned(plan)
    assert jobs.get("train") == 1 and not [j for j in jobs if j.startswith("ablation")]


def _planned(proc) -> dict[str, int]:
    """Job name -> count from a dry run's job stats table."""
    out, table = {}, proc.stdout.split("Job stats:", 1)[-1].splitlines()
    for line in table[3:]:
        parts = line.split()
        if len(parts) != 2 or not parts[1].isdigit():
            break
        out[parts[0]] = int(parts[1])
    return out


def test_no_segmentation_whole_volume_plans_no_segment_job(demo_cohort, tmp_path):
    import yaml

    work = workdir(tmp_path / "w", demo_cohort)
    cfg = work / "config" / "config.yaml"
    ingest = snakemake(work, paths.INVENTORY_PARQUET)  # the checkpoint: then cases are known
    assert ingest.returncode == 0, ingest.stderr[-3000:]
    default = _planned(snakemake(work, "-n"))
    assert default.get("segment", 0) > 0 and default.get("mask", 0) > 0  # the test can fail

    c = yaml.safe_load(cfg.read_text())
    c["segment"]["backend"] = "none"
    c["mask"]["enabled"] = False
    c["train"]["channels"] = ["image"]
    cfg.write_text(yaml.safe_dump(c))
    proc = snakemake(work, "-n")
    assert proc.returncode == 0, proc.stderr[-3000:]
    plan = _planned(proc)
    assert "segment" not in plan and plan["mask"] == default["mask"]
    assert plan["train"] == 1

    c["mask"]["enabled"] = True  # no ROI to mask with: refused at start, clearly
    cfg.write_text(yaml.safe_dump(c))
    bad = snakemake(work, "-n")
    assert bad.returncode != 0 and "segment.backend none gives no ROI" in bad.stdout + bad.stderr

    c["mask"]["enabled"] = False
    c["train"]["channels"] = ["image", "roi"]
    cfg.write_text(yaml.safe_dump(c))
    bad = snakemake(work, "-n")
    assert bad.returncode != 0 and "train.channels holds roi" in bad.stdout + bad.stderr

"""explain: Grad-CAM volumes on the right grids, Grad-CAM++ on 5D input, faithfulness numbers."""

from __future__ import annotations

import json

import nibabel as nib
import numpy as np
import pandas as pd
import pytest
import torch

from radflow import explain, faithfulness
from radflow.inputs import InputSpec
from radflow.io import save_nifti
from radflow.model import build_model, save_checkpoint


def _checkpoint(path, channels=("image",)):
    torch.manual_seed(0)
    model = build_model("r3d_18", len(channels), 2)
    spec = InputSpec(channels=tuple(channels), hu_window=(-40.0, 160.0))
    save_checkpoint(path, model, "r3d_18", spec, 2, 0, 0.5)
    return path


def _case(tmp_path, ct_shape=(40, 36, 30)):
    """A converted CT, and a masked crop of it on a coarser grid (as mask.mask writes them)."""
    rng = np.random.default_rng(0)
    ct_aff = np.diag([2.0, 2.0, 3.0, 1.0])
    ct_aff[:3, 3] = [-40.0, -30.0, -50.0]
    ct = rng.normal(60, 10, ct_shape).astype(np.int16)
    save_nifti(ct, ct_aff, tmp_path / "ct.nii.gz")
    m_aff = np.diag([2.5, 2.5, 2.5, 1.0])
    m_aff[:3, 3] = [-30.0, -20.0, -35.0]  # inside the CT's field of view
    masked = rng.normal(60, 10, (16, 16, 16)).astype(np.int16)
    roi = np.zeros((16, 16, 16), np.uint8)
    roi[3:13, 3:13, 3:13] = 1
    masked[roi == 0] = -1024
    save_nifti(masked, m_aff, tmp_path / "masked.nii.gz")
    save_nifti(roi, m_aff, tmp_path / "roi.nii.gz")
    return ct_aff, m_aff


def test_every_cam_method_runs_on_5d_input_and_they_differ():
    torch.manual_seed(0)
    model = build_model("r3d_18", 1, 2).eval()
    x = torch.rand(1, 1, 16, 20, 24)
    assert set(explain.METHODS) >= {"gradcam", "gradcam++", "hirescam", "layercam"}
    cams = {}
    for method in explain.METHODS:
        norm, raw = explain.compute_cam(model, x, method, "layer2", 1)
        assert norm.shape == raw.shape == (16, 20, 24)
        assert np.isfinite(norm).all() and np.isfinite(raw).all()
        assert norm.min() >= -1e-3 and norm.max() <= 1 + 1e-3
        assert raw.min() >= 0
        cams[method] = norm
    # the per-cell methods are not Grad-CAM under another name
    assert np.abs(cams["hirescam"] - cams["gradcam"]).max() > 1e-2
    assert np.abs(cams["layercam"] - cams["gradcam"]).max() > 1e-2
    with pytest.raises(ValueError, match="unknown CAM method"):
        explain.compute_cam(model, x, "scorecam", "layer2", 1)


def test_hirescam_is_gradient_times_activation_per_cell():
    """HiResCAM's raw map at the layer's own grid: sum over channels of grad * activation."""
    torch.manual_seed(0)
    model = build_model("r3d_18", 1, 2).eval()
    x = torch.rand(1, 1, 16, 16, 16)
    acts = {}
    h = model.layer3.register_forward_hook(lambda m, i, o: acts.update(a=o))
    out = model(x)
    h.remove()
    a = acts["a"]
    (g,) = torch.autograd.grad(explain.LogOdds(1)(out).sum(), a)
    expected = np.maximum((g * a).sum(1)[0].detach().numpy(), 0)
    _, raw = explain.compute_cam(model, x, "hirescam", "layer3", 1)
    # layer3 is 4x4x4 at a 16^3 input; raw is its linear upsampling: compare at cell centres
    np.testing.assert_allclose(raw[1::4, 1::4, 1::4].max(), expected.max(), rtol=0.3)
    assert (
        np.unravel_index(raw.argmax(), raw.shape)[0] // 4
        == np.unravel_index(expected.argmax(), expected.shape)[0]
    )


def test_settings_accept_the_methods_and_refuse_others():
    s = explain.ExplainSettings.from_dict(
        {"method": "hirescam", "compare_methods": ["gradcam", "hirescam", "layercam"]}
    )
    assert s.methods == ("hirescam", "gradcam", "layercam")
    with pytest.raises(ValueError, match="scorecam"):
        explain.ExplainSettings.from_dict({"compare_methods": ["scorecam"]})
    with pytest.raises(ValueError, match="perturbation_steps"):
        explain.ExplainSettings.from_dict({"perturbation_steps": -1})


def test_log_odds_target_is_what_moves_the_softmax_probability():
    z = torch.tensor([[0.3, 1.5], [2.0, -1.0]])
    torch.testing.assert_close(explain.LogOdds(1)(z), z[:, 1] - z[:, 0])
    z3 = torch.tensor([0.2, -0.4, 1.1])
    p = z3.softmax(0)[2]
    torch.testing.assert_close(explain.LogOdds(2)(z3), torch.log(p / (1 - p)))
    # Grad-CAM weights are mean gradients, so a target whose gradient is the probability's
    # times a positive factor gives the same normalised CAM as the probability itself
    from pytorch_grad_cam import GradCAM
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputSoftmaxTarget

    torch.manual_seed(0)
    model = build_model("r3d_18", 1, 2).eval()
    x = torch.rand(1, 1, 16, 16, 16)
    ours, _ = explain.compute_cam(model, x, "gradcam", "layer3", 1, "log_odds")
    with GradCAM(model=model, target_layers=[model.layer3]) as cam:
        prob = cam(input_tensor=x, targets=[ClassifierOutputSoftmaxTarget(1)])[0]
    np.testing.assert_allclose(ours, prob, atol=1e-4)
    logit, _ = explain.compute_cam(model, x, "gradcam", "layer3", 1, "logit")
    assert np.abs(logit - ours).max() > 1e-3


def test_unknown_target_layer_is_a_clear_error():
    model = build_model("r3d_18", 1, 2)
    with pytest.raises(ValueError, match="layer9"):
        explain.target_module(model, "layer9")
    assert explain.target_module(model, "layer4.1.conv2") is model.layer4[1].conv2


def test_explain_case_writes_cams_on_the_masked_and_ct_grids(tmp_path):
    ct_aff, m_aff = _case(tmp_path)
    ck = _checkpoint(tmp_path / "best.pt", channels=("image", "roi"))
    lesion = np.zeros((16, 16, 16), np.uint8)
    lesion[6:9, 6:9, 6:9] = 1
    save_nifti(lesion, m_aff, tmp_path / "lesion.nii.gz")
    pred = {"probability": 0.8, "prediction": 1, "label": 1, "split": "test", "threshold": 0.5}
    out = tmp_path / "explain"
    settings = explain.ExplainSettings(
        method="gradcam++", compare_methods=("layercam",), device="cpu", perturbation_steps=4
    )
    info = explain.explain_case(
        explain.load_models(ck, settings),
        tmp_path / "masked.nii.gz",
        tmp_path / "roi.nii.gz",
        tmp_path / "ct.nii.gz",
        out,
        "case-0123456789ab",
        settings,
        prediction=pred,
        lesion_path=tmp_path / "lesion.nii.gz",
        fill_hu=-1024,
    )
    cam = nib.load(out / "case-0123456789ab_cam.nii.gz")
    raw = nib.load(out / "case-0123456789ab_cam_raw.nii.gz")
    on_ct = nib.load(out / "case-0123456789ab_cam_ct.nii.gz")
    for img in (cam, raw):
        assert img.shape == (16, 16, 16)
        assert np.allclose(img.affine, m_aff)
        assert img.get_data_dtype() == np.float32
    assert on_ct.shape == (40, 36, 30) and np.allclose(on_ct.affine, ct_aff)
    assert on_ct.get_data_dtype() == np.float32
    assert info["group"] == "TP" and info["lesion_voxels"] == 27
    assert isinstance(info["pointing_hit"], bool)
    assert 0.0 <= info["mass_in_lesion"] <= 1.0
    assert set(info["methods"]) == {"gradcam++", "layercam"}
    for m in info["methods"].values():
        assert len(m["deletion_curve"]) == len(m["random_insertion_curve"]) == 5
        assert 0.0 <= m["deletion_auc"] <= 1.0 and 0.0 <= m["random_insertion_auc"] <= 1.0
        assert isinstance(m["pointing_hit"], bool)
    assert info["deletion_auc"] == info["methods"]["gradcam++"]["deletion_auc"]
    # the curves start at the model's probability of the intact input and insertion ends there
    m = info["methods"]["gradcam++"]
    assert m["deletion_curve"][0] == pytest.approx(info["probability_recomputed"], abs=1e-4)
    assert m["insertion_curve"][-1] == pytest.approx(info["probability_recomputed"], abs=1e-4)
    assert m["deletion_curve"][-1] == pytest.approx(m["insertion_curve"][0], abs=1e-4)
    # the random order is the case's, not the map's: computed once, shared by the methods
    lc = info["methods"]["layercam"]
    assert lc["random_deletion_curve"] == m["random_deletion_curve"]
    assert lc["deletion_curve"] != m["deletion_curve"] or lc["peak_vox"] == m["peak_vox"]
    assert (out / "case-0123456789ab.png").stat().st_size > 5000
    saved = json.loads((out / "case-0123456789ab.json").read_text())
    assert saved["peak_vox"] == list(faithfulness.peak_index(np.asanyarray(cam.dataobj)))
    # the raw CAM keeps its own scale: normalised CAM x raw max ~ raw CAM where both are high
    r = np.asanyarray(raw.dataobj)
    assert saved["raw_max"] == pytest.approx(float(r.max()), rel=1e-5)


def test_uncropped_cam_lines_up_with_the_ct(tmp_path):
    """A CAM with a known peak on the crop grid lands on the CT voxel at the same world point."""
    ct_aff, m_aff = _case(tmp_path)
    ct = nib.load(tmp_path / "ct.nii.gz")
    cam = np.zeros((16, 16, 16), np.float32)
    peak = (11, 4, 9)
    cam[peak] = 1.0
    on_ct = explain.uncrop(cam, m_aff, ct)
    world = m_aff @ np.array([*peak, 1.0])
    expected = np.linalg.solve(ct_aff, world)[:3]  # fractional CT voxel of the peak
    got = np.array(np.unravel_index(int(np.argmax(on_ct)), on_ct.shape))
    assert np.abs(got - expected).max() <= 0.5 + 1e-6
    # centre of mass of the spread peak is at the world point (linear interpolation)
    idx = np.argwhere(on_ct > 0)
    w = on_ct[on_ct > 0]
    assert np.allclose((idx * w[:, None]).sum(0) / w.sum(), expected, atol=0.35)
    # nothing outside the crop's field of view
    corner = np.linalg.solve(m_aff, ct_aff @ np.array([0, 0, 0, 1.0]))[:3]
    assert (corner < -1).all() and on_ct[0, 0, 0] == 0


def test_randomised_model_cam_differs_from_a_trained_one():
    """Sanity of the check itself: the same weights give r = 1, fresh random weights do not."""
    torch.manual_seed(0)
    model = build_model("r3d_18", 1, 2).eval()
    x = torch.rand(1, 1, 32, 32, 32)
    a, _ = explain.compute_cam(model, x, "gradcam", "layer3", 1)
    b, _ = explain.compute_cam(model, x, "gradcam", "layer3", 1)
    assert faithfulness.correlation(a, b)["pearson"] == pytest.approx(1.0)
    ck = {"arch": "r3d_18", "channels": ["image"], "n_classes": 2}
    c, _ = explain.compute_cam(explain.random_model_like(ck, 7), x, "gradcam", "layer3", 1)
    assert faithfulness.correlation(a, c)["pearson"] < 0.9


def test_randomisation_check_within_the_roi_ignores_the_shared_support():
    """Two unrelated maps, both zero off the organ: over the whole input they correlate (the
    support they share), within the organ they do not; the same map correlates everywhere."""
    rng = np.random.default_rng(0)
    roi = np.zeros((16, 16, 16), bool)
    roi[4:12, 4:12, 4:12] = True
    a, b = (np.where(roi, 1.0 + rng.random(roi.shape), 0.0) for _ in range(2))
    r = explain.randomisation_check(a, b, roi)
    assert r["whole"]["pearson"] > 0.8 and abs(r["in_roi"]["pearson"]) < 0.2
    assert explain.randomisation_check(a, a, roi)["in_roi"]["pearson"] == pytest.approx(1.0)
    assert np.isnan(explain.randomisation_check(a, b, roi & False)["in_roi"]["pearson"])
    infos = [
        {"case_id": "c", "method": "gradcam", "group": "TN", "randomised_model": r["whole"]}
        | {"randomised_model_in_roi": r["in_roi"], "methods": {"gradcam": {}}}
    ]
    rc = explain.summarise(infos)["randomised_model_correlation"]
    assert rc["pearson"]["mean"] > 0.8 and abs(rc["pearson_in_roi"]["mean"]) < 0.2


def test_the_review_page_shows_undefined_numbers_as_na(tmp_path):
    """A case whose map is zero on the organ (mass None) and constant (r NaN) stays on the page
    with "n/a" for those numbers; it used to stop the report with a TypeError."""
    aff = np.diag([3.0, 3.0, 3.0, 1.0])
    save_nifti(np.zeros((8, 8, 8), np.int16), aff, tmp_path / "ct.nii.gz")
    save_nifti(np.ones((8, 8, 8), np.uint8), aff, tmp_path / "roi.nii.gz")
    save_nifti(np.zeros((8, 8, 8), np.float32), aff, tmp_path / "cam.nii.gz")
    nan = {"pearson": float("nan"), "spearman": float("nan")}
    info = {"case_id": "c", "group": "FN", "probability": 0.2, "prediction": 0, "label": 1}
    info |= {"split": "test", "threshold": 0.5, "raw_max": 0.0, "mass_in_roi": None}
    info |= {"randomised_model": nan, "randomised_model_in_roi": nan, "method": "gradcam"}
    paths = [tmp_path / f"{n}.nii.gz" for n in ("ct", "roi", "cam")]
    case = explain.viewer_case(info, *paths)
    assert case.numbers["CAM mass in ROI"] == "n/a" and case.numbers["r in ROI"] == "n/a"
    assert case.numbers["r(trained, random CAM)"] == "n/a" and case.numbers["raw CAM max"] == 0


def test_a_map_that_is_zero_on_the_roi_has_no_lesion_mass(monkeypatch):
    """All of the CAM outside the organ (or none at all): the share on the lesion is undefined,
    recorded as None (not NaN, which is not JSON), and the pointing game is a miss."""
    z = np.zeros((8, 8, 8), np.float32)
    outside = z.copy()
    outside[0, 0, 0] = 1.0  # the peak is off the organ
    monkeypatch.setattr(explain, "compute_cam", lambda *a, **k: (outside, outside))
    roi = np.zeros((8, 8, 8), bool)
    roi[2:6, 2:6, 2:6] = True
    lesion = np.zeros_like(roi)
    lesion[3:5, 3:5, 3:5] = True
    settings = explain.ExplainSettings(perturbation_steps=0)
    nums, _, _ = explain.method_numbers(None, None, None, "gradcam", settings, roi, lesion)
    assert nums["mass_in_lesion"] is None and nums["pointing_hit"] is False
    assert nums["pointing_hit_in_roi"] is False  # the map is flat (zero) inside the organ
    info = {"group": "TP", "lesion_fraction_of_roi": 0.125, "method": "gradcam", **nums}
    s = explain.method_summary([info], "gradcam", 0.8)
    assert s["pointing_game"]["n"] == 1 and s["pointing_game"]["hits"] == 0
    assert s["cam_mass_in_lesion"]["mean"] is None


def test_pointing_in_the_roi_is_kept_apart_from_the_strict_game(monkeypatch):
    """A peak on the background beside the organ misses; the peak within the organ, on the
    lesion, is counted only in the secondary pointing_game_in_roi."""
    cam = np.zeros((8, 8, 8), np.float32)
    cam[0, 0, 0] = 1.0  # outside the ROI
    cam[3, 3, 3] = 0.8  # on the lesion
    monkeypatch.setattr(explain, "compute_cam", lambda *a, **k: (cam, cam))
    roi = np.zeros((8, 8, 8), bool)
    roi[2:6, 2:6, 2:6] = True
    lesion = np.zeros_like(roi)
    lesion[3, 3, 3] = True
    settings = explain.ExplainSettings(perturbation_steps=0)
    nums, _, _ = explain.method_numbers(None, None, None, "gradcam", settings, roi, lesion)
    assert nums["pointing_hit"] is False and nums["pointing_hit_in_roi"] is True
    assert nums["mass_in_lesion"] == pytest.approx(1.0)
    info = {"group": "TP", "lesion_fraction_of_roi": 1 / 64, "method": "gradcam", **nums}
    s = explain.summarise([info | {"randomised_model": {"pearson": 0.1}}], 0.8)
    assert s["pointing_game"]["hits"] == 0 and s["pointing_game_in_roi"]["hits"] == 1
    assert s["per_case"][0]["pointing_hit_in_roi"] is True


def test_summary_counts_only_true_positives_with_lesions():
    def info(group, hit, mass, in_roi=0.9):
        return {
            "case_id": f"case-{group}",
            "split": "test",
            "group": group,
            "probability": 0.9,
            "pointing_hit": hit,
            "mass_in_lesion": mass,
            "lesion_fraction_of_roi": 0.05,
            "mass_in_roi": in_roi,
            "roi_fraction_of_volume": 0.3,
            "randomised_model": {"pearson": 0.1},
            "method": "gradcam",
            "methods": {
                "gradcam": {"pointing_hit": hit, "mass_in_lesion": mass, "deletion_auc": 0.2},
                # a comparison method that ignores the lesion: every true positive missed
                "layercam": {
                    "pointing_hit": None if hit is None else False,
                    "mass_in_lesion": None if mass is None else 0.01,
                    "deletion_auc": 0.6,
                },
            },
        }

    s = explain.summarise(
        [
            info("TP", True, 0.6),
            info("TP", False, 0.1, in_roi=0.006),  # a map on the crop's border, not the organ
            info("FP", None, None),
            info("TN", None, None),
        ]
    )
    assert s["pointing_game"]["n"] == 2 and s["pointing_game"]["hit_rate"] == 0.5
    assert s["cam_mass_in_lesion"]["mean"] == pytest.approx(0.35)
    assert s["pointing_game"]["meets_target"] is False
    assert len(s["per_case"]) == 4
    assert s["cam_mass_over_chance"]["mean"] == pytest.approx((0.6 / 0.05 + 0.1 / 0.05) / 2)
    assert s["methods"]["gradcam"]["pointing_game"] == s["pointing_game"]
    lc = s["methods"]["layercam"]
    assert lc["pointing_game"]["hits"] == 0 and lc["pointing_game"]["n"] == 2
    assert lc["deletion_auc"]["all_cases"]["mean"] == pytest.approx(0.6)
    assert s["deletion_auc"]["true_positives"]["mean"] == pytest.approx(0.2)
    assert s["random_deletion_auc"]["all_cases"]["mean"] is None  # no curves computed
    assert s["cam_mass_in_roi"]["true_positives"]["mean"] == pytest.approx((0.9 + 0.006) / 2)
    assert s["cam_mass_in_roi"]["all_cases"]["min"] == pytest.approx(0.006)
    assert s["cam_mass_in_roi_over_chance"]["true_positives"]["min"] == pytest.approx(0.02)


def test_read_prediction_takes_threshold_from_metrics(tmp_path):
    pd.DataFrame(
        {
            "case_id": ["case-a", "case-b"],
            "subject_id": ["s1", "s2"],
            "split": ["test", "val"],
            "label": [1, 0],
            "probability": [0.7, 0.2],
            "prediction": [1, 0],
        }
    ).to_csv(tmp_path / "p.csv", index=False)
    (tmp_path / "m.json").write_text(json.dumps({"threshold": 0.42}))
    p = explain.read_prediction(tmp_path / "p.csv", tmp_path / "m.json", "case-b")
    assert p == {"probability": 0.2, "prediction": 0, "label": 0, "split": "val", "threshold": 0.42}
    with pytest.raises(KeyError):
        explain.read_prediction(tmp_path / "p.csv", None, "case-z")


def _report_inputs(tmp_path, cid, ct_aff, m_aff):
    """A project folder with one explained case laid out as the workflow writes it."""
    import shutil

    from radflow import paths

    for src, tpl in (("ct.nii.gz", paths.NIFTI), ("roi.nii.gz", paths.ROI)):
        dst = tmp_path / paths.for_case(tpl, cid)
        dst.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(tmp_path / src, dst)
    out = tmp_path / "results/explain"
    cam = np.zeros((40, 36, 30), np.float32)
    cam[25, 10, 12] = 1.0
    save_nifti(cam, ct_aff, out / f"{cid}_cam_ct.nii.gz")
    info = {
        "case_id": cid,
        "group": "TP",
        "probability": 0.9,
        "prediction": 1,
        "label": 1,
        "split": "test",
        "threshold": 0.5,
        "method": "gradcam",
        "target_layer": "layer4",
        "raw_max": 1.0,
        "mass_in_roi": 0.7,
        "randomised_model": {"pearson": 0.1, "spearman": 0.1},
        "hu_window": [-40.0, 160.0],
        "pointing_hit": True,
        "mass_in_lesion": 0.5,
        "lesion_fraction_of_roi": 0.05,
    }
    (out / f"{cid}.json").write_text(json.dumps(info))
    return out / f"{cid}.json"


def test_report_page_shows_the_case_on_its_ct_with_roi_and_lesion(tmp_path, capsys):
    """The review page carries the converted CT's grid and voxels, the uncropped CAM, the ROI put
    on the CT grid and the lesion; a case whose CAM on the CT is missing is left off, with a
    one-line reason, and the others are shown."""
    import base64
    import gzip
    import re

    from radflow.viewer import case_file

    ct_aff, m_aff = _case(tmp_path)
    lesion = np.zeros((16, 16, 16), np.uint8)
    lesion[6:9, 6:9, 6:9] = 1
    save_nifti(lesion, m_aff, tmp_path / "lesion.nii.gz")
    good = _report_inputs(tmp_path, "case-00000000000a", ct_aff, m_aff)
    bad = _report_inputs(tmp_path, "case-00000000000b", ct_aff, m_aff)
    (bad.parent / "case-00000000000b_cam_ct.nii.gz").unlink()
    out = good.parent
    explain.report(
        [good, bad], out, root=tmp_path, lesions={"case-00000000000a": tmp_path / "lesion.nii.gz"}
    )
    assert "case-00000000000b left off: FileNotFoundError" in capsys.readouterr().err
    text = (out / "index.html").read_text()
    data = json.loads(re.search(r'id="radflow-data">(.*?)</script>', text, re.S).group(1))
    assert [c["id"] for c in data["cases"]] == ["case-00000000000a"]
    assert data["meta"]["cases left off (see the log)"] == 1
    rec = data["cases"][0]
    assert rec["shape"] == [40, 36, 30] and rec["spacing"] == [2.0, 2.0, 3.0]
    assert rec["peak"] == [25, 10, 12] and rec["lesion"] is True
    assert rec["window"] == [-40.0, 160.0]
    payload = json.loads(
        re.fullmatch(r"radflowCase\(0,(.*)\);\n", (out / case_file(0)).read_text(), re.S).group(1)
    )
    vols = {
        k: nib.Nifti1Image.from_bytes(gzip.decompress(base64.b64decode(payload[k])))
        for k in ("ct", "cam", "roi", "lesion")
    }
    ct = nib.load(tmp_path / "results/nifti/case-00000000000a.nii.gz")
    for k, img in vols.items():
        assert img.shape == ct.shape and np.allclose(img.affine, ct.affine), k
    assert np.array_equal(np.asanyarray(vols["ct"].dataobj), np.asanyarray(ct.dataobj))
    # ROI and lesion land where they are in the world: their centres agree with the crop grid's
    for k, box in (("roi", (3, 13)), ("lesion", (6, 9))):
        on_ct = np.argwhere(np.asanyarray(vols[k].dataobj) > 0)
        assert on_ct.size, k
        world = ct_aff[:3, :3] @ on_ct.mean(0) + ct_aff[:3, 3]
        centre = m_aff[:3, :3] @ np.full(3, (box[0] + box[1] - 1) / 2) + m_aff[:3, 3]
        assert np.abs(world - centre).max() < 2.0, k
    # the page names cases by pseudonym only: no folder of the project reaches it
    for f in [out / "index.html", out / case_file(0)]:
        assert str(tmp_path) not in f.read_text()


def test_a_removed_voxel_is_what_the_mask_stage_writes_outside_the_roi():
    spec = InputSpec(channels=("image", "roi"), hu_window=(-40.0, 160.0))
    base = explain.inputs.removed(spec, (3, 4, 5), -1024)
    assert base.shape == (2, 3, 4, 5) and base.dtype == np.int16
    assert (base[0] == -1024).all() and (base[1] == 0).all()
    x = spec.network_input(torch.from_numpy(base[None]))
    assert x.shape == (1, 2, 5, 4, 3) and float(x.abs().max()) == 0.0
    # the image-only model: one channel, the fill as given
    assert (explain.inputs.removed(InputSpec(), (2, 2, 2), -1000) == -1000).all()


def test_the_organ_baseline_heals_the_organ_and_leaves_the_rest(tmp_path, monkeypatch):
    """perturbation_baseline organ: the ROI's voxels of the image at the ROI's median HU (a
    lesion removed becomes liver, not a hole of fill), the fill and the ROI channel as they
    were; explain_case hands that baseline to the curves; organ is the default."""
    spec = InputSpec(channels=("image", "roi"), hu_window=(-40.0, 160.0))
    roi = np.zeros((6, 6, 6), bool)
    roi[1:5, 1:5, 1:5] = True
    img = np.where(roi, 60, -1024).astype(np.int16)
    img[2:4, 2:4, 2:4] = -20  # a lesion: 8 of the ROI's 64 voxels
    vol = np.stack([img, roi.astype(np.int16)])
    base = explain.inputs.organ_median(spec, vol, roi)
    assert (base[0][roi] == 60).all() and (base[0][~roi] == -1024).all()
    assert (base[1] == vol[1]).all() and (vol[0][2, 2, 2] == -20)  # the input is not touched
    with pytest.raises(ValueError, match="perturbation_baseline"):
        explain.ExplainSettings.from_dict({"perturbation_baseline": "zero"})

    _, m_aff = _case(tmp_path)
    ck = _checkpoint(tmp_path / "best.pt", channels=("image", "roi"))
    seen = []

    def curves(predict, x, baseline, *a, **k):
        seen.append(baseline)
        return {}

    monkeypatch.setattr(explain.faithfulness, "deletion_insertion", curves)
    masked = np.asanyarray(nib.load(tmp_path / "masked.nii.gz").dataobj)
    inside = np.asanyarray(nib.load(tmp_path / "roi.nii.gz").dataobj) > 0
    for how in ("organ", "fill"):
        s = explain.ExplainSettings(device="cpu", perturbation_steps=2, perturbation_baseline=how)
        case = (tmp_path / "masked.nii.gz", tmp_path / "roi.nii.gz", tmp_path / "ct.nii.gz")
        info = explain.explain_case(
            explain.load_models(ck, s), *case, tmp_path / how, "c", s, fill_hu=-1024
        )
        assert explain.summarise([info])["perturbation_baseline"] == how
    organ, fill = seen  # network inputs (C, Z, Y, X)
    level = spec.network_input(torch.full((1, 2, 1, 1, 1), float(np.median(masked[inside]))))
    inside = np.transpose(inside, (2, 1, 0))
    assert np.allclose(organ[0][inside], float(level[0, 0]), atol=1e-3)
    assert np.allclose(organ[0][~inside], 0.0) and np.allclose(organ[1][inside], 1.0)
    assert np.allclose(fill, 0.0)
    assert explain.ExplainSettings().perturbation_baseline == "organ"

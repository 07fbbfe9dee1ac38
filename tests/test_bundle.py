"""The bundle's segmenter identity (radflow.bundle.segmenter, checked by predict's one-study API
and predict_all) and the ONNX export (radflow.export), on small bundles with real weights."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from radflow import bundle, predict
from radflow.nnunet_patches import UntrustedWeightsError, verify_model_folder, write_sha256sums
from radflow.segment import SegmentSettings, model_digests
from tests.conftest import REPO

CONFIG = yaml.safe_load((REPO / "config" / "config.yaml").read_text())
PHANTOM = REPO / "resources" / "totalseg_phantom"
FOLDER = "Dataset297_TotalSegmentator_total_3mm_1559subj/nnUNetTrainer_4000epochs_NoMirroring__nnUNetPlans__3d_fullres"  # noqa: E501


def seg_settings(weights: Path) -> SegmentSettings:
    pre = {k: v for k, v in bundle.preprocessing(CONFIG)["segment"].items()}
    return SegmentSettings.from_dict({**pre, "device": "cpu", "weights_dir": str(weights)})


def other_weights(tmp_path: Path) -> Path:
    """A copy of the phantom weights with a changed checkpoint and a SHA256SUMS that declares
    it: other weights, consistently declared (nothing else would stop them)."""
    other = tmp_path / "other_weights"
    shutil.copytree(PHANTOM, other)
    ck = other / FOLDER / "fold_0" / "checkpoint_final.pth"
    ck.write_bytes(ck.read_bytes() + b"\0")
    write_sha256sums(other / FOLDER)
    return other


def group_record(path: Path, cases: list[str], digests: dict) -> Path:
    path.write_text(
        json.dumps({"cases": {c: {"status": "ok"} for c in cases}, "weights_sha256": digests})
    )
    return path


# --------------------------------------------------------------------------- recording


def test_the_segmenter_is_read_from_the_training_cases_group_records(tmp_path):
    mine = model_digests(seg_settings(PHANTOM))
    records = [
        group_record(tmp_path / "0.json", ["case-a", "case-b"], mine),
        # a group of no training case (e.g. of a series the manifest left out) is not used
        group_record(tmp_path / "1.json", ["case-z"], {"x": {"y": "0" * 64}}),
    ]
    pre = bundle.preprocessing(CONFIG)["segment"]
    seg = bundle.segmenter(pre, records, ["case-a", "case-b"])
    assert seg["backend"] == "totalsegmentator" and seg["weights_sha256"] == mine
    assert seg["settings"]["task"] == pre["task"]
    assert set(mine[FOLDER]) >= {"fold_0/checkpoint_final.pth", "plans.json", "dataset.json"}


def test_training_masks_from_two_sets_of_weights_are_refused(tmp_path):
    pre = bundle.preprocessing(CONFIG)["segment"]
    mine = model_digests(seg_settings(PHANTOM))
    records = [
        group_record(tmp_path / "0.json", ["case-a"], mine),
        group_record(
            tmp_path / "1.json",
            ["case-b"],
            model_digests(seg_settings(other_weights(tmp_path)), declared=True),
        ),
    ]
    with pytest.raises(bundle.BundleError, match="2 different sets of segmentation weights"):
        bundle.segmenter(pre, records, ["case-a", "case-b"])
    with pytest.raises(bundle.BundleError, match="no segmentation group record"):
        bundle.segmenter(pre, records, ["case-q"])


def test_precomputed_masks_record_no_weights_and_refuse_weights_at_predict():
    pre = {**bundle.preprocessing(CONFIG)["segment"], "backend": "precomputed"}
    seg = bundle.segmenter(pre, [], ["case-a"])
    assert seg["weights_sha256"] is None and seg["backend"] == "precomputed"
    assert bundle.segmenter_mismatch(seg, {}, "") == ""  # a precomputed group records {}
    assert bundle.segmenter_mismatch(seg, None, "") == ""
    why = bundle.segmenter_mismatch(seg, {"f": {"a": "0" * 64}}, "/w")
    assert "not made with segmentation weights" in why and "/w" in why


# --------------------------------------------------------------------------- checking


def test_declared_digests_are_the_hashed_ones_without_hashing():
    s = seg_settings(PHANTOM)
    assert model_digests(s, declared=True) == model_digests(s)


def test_other_segmentation_weights_are_refused_naming_folder_and_digest(tmp_path):
    recorded = {
        "backend": "totalsegmentator",
        "weights_sha256": model_digests(seg_settings(PHANTOM)),
    }
    assert (
        bundle.segmenter_mismatch(
            recorded, model_digests(seg_settings(PHANTOM), declared=True), "w"
        )
        == ""
    )
    other = other_weights(tmp_path)
    used = model_digests(seg_settings(other), declared=True)
    new = used[FOLDER]["fold_0/checkpoint_final.pth"]
    why = bundle.segmenter_mismatch(recorded, used, str(other))
    assert why.startswith("segmentation weights differ from the bundle's")
    assert f"{other}/{FOLDER}/fold_0/checkpoint_final.pth has sha256 {new}" in why
    assert "\n" not in why
    # weights changed without their SHA256SUMS: the declared digests still match the bundle's,
    # and the folder is refused when the model loads (verify_model_folder), so neither runs
    stale = tmp_path / "stale"
    shutil.copytree(PHANTOM, stale)
    ck = stale / FOLDER / "fold_0" / "checkpoint_final.pth"
    ck.write_bytes(ck.read_bytes() + b"\0")
    assert (
        bundle.segmenter_mismatch(recorded, model_digests(seg_settings(stale), declared=True), "s")
        == ""
    )
    with pytest.raises(UntrustedWeightsError, match="SHA256SUMS mismatch"):
        verify_model_folder(stale / FOLDER, stale)


def real_bundle(d: Path, weights_dir: Path = PHANTOM, **over) -> Path:
    """A verifiable bundle with a real (untrained) r3d_18 and the demo config's settings."""
    from radflow.model import build_model

    d.mkdir(parents=True)
    torch.manual_seed(0)
    torch.save(build_model("r3d_18", 2, 2).state_dict(), d / bundle.WEIGHTS)
    (d / bundle.MODEL_CARD).write_text("# card\n")
    pre = bundle.preprocessing(CONFIG)
    m = {
        "bundle_format": bundle.BUNDLE_FORMAT,
        "radflow_version": "test",
        "architecture": "r3d_18",
        "n_classes": 2,
        "class_names": ["negative", "positive"],
        "checkpoint_epoch": 1,
        "inputs": {
            "channels": ["image", "roi"],
            "hu_window": [-200, 300],
            "intensity_rule": "hu_window",
        },
        "input_grid": {"shape": [16, 16, 16], "shapes_seen": [[16, 16, 16]]},
        "preprocessing": pre,
        "segment_weights_dir": str(weights_dir),
        "segmenter": {
            "backend": "totalsegmentator",
            "settings": pre["segment"],
            "weights_sha256": model_digests(seg_settings(weights_dir)),
        },
        "explain": {
            k: v
            for k, v in CONFIG["explain"].items()
            if k not in ("threads", "splits", "lesion_reference", "device")
        },
        "threshold": 0.5,
        **over,
    }
    m["files"] = {n: bundle.sha256_file(d / n) for n in (bundle.WEIGHTS, bundle.MODEL_CARD)}
    m["model_json_sha256"] = bundle._self_hash(m)
    (d / bundle.MODEL_JSON).write_text(json.dumps(m))
    return d


def test_the_one_study_api_refuses_other_segmentation_weights(tmp_path):
    b = real_bundle(tmp_path / "model")
    assert predict.load_model(b, device="cpu").segment.weights_dir == str(PHANTOM)
    other = other_weights(tmp_path)
    with pytest.raises(
        bundle.BundleError, match=r"differ from the bundle's.*checkpoint_final\.pth has sha256"
    ):
        predict.load_model(b, device="cpu", weights_dir=str(other))


def test_predict_all_refuses_other_segmentation_weights_before_and_after_segmenting(tmp_path):
    meta = bundle.verify(real_bundle(tmp_path / "model"))
    seg = {**CONFIG["segment"], "weights_dir": str(PHANTOM)}
    predict.check_segment_weights(meta, seg)  # the bundle's own weights: fine
    other = other_weights(tmp_path)
    with pytest.raises(bundle.BundleError, match=f"{other}/{FOLDER}/fold_0"):
        predict.check_segment_weights(meta, {**seg, "weights_dir": str(other)})
    # the cohort's group records (what its masks were made with), for a group per case
    groups = tmp_path / "work" / "results" / "seg" / "groups"
    groups.mkdir(parents=True)
    for case, w in (("case-0a", PHANTOM), ("case-0b", other)):
        rec = {
            "settings": {"weights_dir": str(w)},
            "weights_sha256": model_digests(seg_settings(w), declared=True),
        }
        (groups / f"{case}.json").write_text(json.dumps(rec))
    predict.check_cohort_segmenter(meta, tmp_path / "work", ["case-0a"], 0)
    with pytest.raises(bundle.BundleError, match=f"{other}/{FOLDER}/fold_0.*has sha256"):
        predict.check_cohort_segmenter(meta, tmp_path / "work", ["case-0a", "case-0b"], 0)


# --------------------------------------------------------------------------- ONNX


def test_onnx_export_gives_torch_s_probability_on_a_masked_input(tmp_path):
    pytest.importorskip("onnx")
    pytest.importorskip("onnxscript")
    ort = pytest.importorskip("onnxruntime")
    from radflow import inputs, mask
    from radflow.export import export_onnx, read_metadata
    from radflow.io import save_nifti
    from radflow.mask import MaskSettings
    from radflow.plausibility import QcSettings

    b = real_bundle(tmp_path / "model")
    meta = bundle.verify(b)
    # a real masked input: a body with an organ, masked and cropped by radflow.mask
    rng = np.random.default_rng(0)
    hu = (rng.normal(40, 30, (40, 40, 40))).astype(np.int16)
    seg = np.zeros(hu.shape, np.uint8)
    seg[10:30, 12:28, 8:32] = 1
    aff = np.diag([2.0, 2.0, 2.0, 1.0])
    save_nifti(hu, aff, tmp_path / "image.nii.gz")
    save_nifti(seg, aff, tmp_path / "seg.nii.gz")
    organ = CONFIG["mask"]["rois"][0]
    (tmp_path / "seg.json").write_text(json.dumps({"labels": {"1": organ}}))
    settings = MaskSettings.from_dict({**meta["preprocessing"]["mask"], "size": [16, 16, 16]})
    t = tmp_path
    qc = QcSettings.from_dict({"implausible": "flag"})  # a synthetic organ of no real volume
    files = (t / "image.nii.gz", t / "seg.nii.gz", t / "m.nii.gz")
    rec = mask.mask(*files, settings, t / "roi.nii.gz", t / "s.json", qc=qc)
    assert rec["status"] == "ok", rec
    spec = inputs.InputSpec.from_checkpoint(meta["inputs"])
    stored = inputs.read_case(
        {"masked": tmp_path / "m.nii.gz", "roi": tmp_path / "roi.nii.gz"}, spec.channels
    )
    x = spec.network_input(torch.from_numpy(np.stack([stored, stored[:, ::-1].copy()])))

    out = tmp_path / "model.onnx"
    info = export_onnx(b, out)
    assert (
        read_metadata(out)["radflow_model_json_sha256"]
        == meta["model_json_sha256"]
        == info["radflow_model_json_sha256"]
    )
    assert float(read_metadata(out)["threshold"]) == 0.5

    net, _, _ = bundle.load(b)
    with torch.no_grad():
        logits = net(x)
    want = logits.softmax(1)[:, 1].numpy()
    sess = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    got_logits, got = sess.run(None, {"input": x.numpy()})
    assert np.abs(got - want).max() < 1e-4 and np.abs(got_logits - logits.numpy()).max() < 1e-4
    # the check can fail: another network's torch output (other weights) is far from it
    from radflow.model import build_model

    torch.manual_seed(1)
    with torch.no_grad():
        stranger = build_model("r3d_18", 2, 2).eval()(x).numpy()
    assert np.abs(got_logits - stranger).max() > 1e-2


def test_export_onnx_refuses_a_tampered_bundle(tmp_path):
    from radflow.export import export_onnx

    b = real_bundle(tmp_path / "model")
    with open(b / bundle.WEIGHTS, "r+b") as fh:
        fh.seek(-8, 2)
        fh.write(b"\0" * 8)
    with pytest.raises(bundle.BundleError, match="tampered model bundle"):
        export_onnx(b, tmp_path / "m.onnx")
    assert not (tmp_path / "m.onnx").exists()


def _without_segmenter(backend: str, **mask) -> dict:
    pre = bundle.preprocessing(CONFIG)
    pre = {
        **pre,
        "segment": {**pre["segment"], "backend": backend},
        "mask": {**pre["mask"], **mask},
    }
    seg = {"backend": backend, "settings": pre["segment"], "weights_sha256": None}
    return {"preprocessing": pre, "segmenter": seg}


def test_a_bundle_without_segmentation_loads_without_weights(tmp_path):
    b = real_bundle(tmp_path / "model", **_without_segmenter("none", enabled=False))
    assert predict.load_model(b, device="cpu").segment is None
    # a TotalSegmentator predict cohort for it is refused
    meta = bundle.verify(b)
    with pytest.raises(bundle.BundleError, match="not made with segmentation weights"):
        predict.check_segment_weights(meta, {**CONFIG["segment"], "weights_dir": str(PHANTOM)})


def test_a_precomputed_bundle_is_refused_by_the_one_study_api(tmp_path):
    b = real_bundle(tmp_path / "model", **_without_segmenter("precomputed"))
    with pytest.raises(bundle.BundleError, match="precomputed"):
        predict.load_model(b, device="cpu")

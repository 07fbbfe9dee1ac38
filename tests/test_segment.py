"""segment: the real TotalSegmentator path offline with the shipped phantom model."""

from __future__ import annotations

import json
import multiprocessing.process
import os
import socket
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import yaml

from radflow import nnunet_patches, segment
from radflow.demo import phantom_model
from radflow.io import save_nifti

REPO = Path(__file__).resolve().parents[1]
WEIGHTS = REPO / "resources" / "totalseg_phantom"


@pytest.fixture()
def no_network(monkeypatch):
    attempts = []

    def refuse(*args, **kwargs):
        attempts.append(args)
        raise OSError("network blocked by the test")

    monkeypatch.setattr(socket.socket, "connect", lambda self, addr: refuse(addr))
    monkeypatch.setattr(socket.socket, "connect_ex", lambda self, addr: refuse(addr))
    monkeypatch.setattr(socket, "getaddrinfo", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    return attempts


@pytest.fixture()
def process_starts(monkeypatch):
    starts = []
    original = multiprocessing.process.BaseProcess.start

    def counting(self):
        starts.append(type(self).__name__)
        return original(self)

    monkeypatch.setattr(multiprocessing.process.BaseProcess, "start", counting)
    return starts


def _phantom_image(tmp_path, seed=11, flip_x=True):
    hu, lab = phantom_model.render_case(np.random.default_rng(seed), lesion=True)
    aff = np.diag([3.0, 3.0, 3.0, 1.0])
    aff[:3, 3] = [-180.0, -170.0, -160.0]
    if flip_x:  # store it LAS, so TotalSegmentator's reorientation round trip is exercised
        hu, lab = hu[::-1], lab[::-1]
        aff = aff @ np.array(
            [[-1, 0, 0, hu.shape[0] - 1], [0, 1, 0, 0], [0, 0, 1, 0], [0, 0, 0, 1]]
        )
    save_nifti(hu.astype(np.int16), aff, tmp_path / "ct.nii.gz")
    return aff, lab


def test_real_totalsegmentator_offline_on_phantom_model(tmp_path, no_network, process_starts):
    aff, truth = _phantom_image(tmp_path)
    settings = segment.SegmentSettings(weights_dir=str(WEIGHTS), device="cpu")
    info = segment.segment_image(
        tmp_path / "ct.nii.gz", tmp_path / "seg.nii.gz", settings, threads=2
    )
    assert no_network == []  # not one connection attempt (usage stats are off)
    assert process_starts == []  # sequential prediction: no worker processes
    out = nib.load(tmp_path / "seg.nii.gz")
    assert out.get_data_dtype() == np.uint8
    assert out.shape == truth.shape
    np.testing.assert_allclose(out.affine, aff, atol=1e-5)
    seg = np.asanyarray(out.dataobj)
    dice = phantom_model.dice_per_class(seg, truth)
    assert dice["liver"] > 0.9, dice
    assert info["present"]["5"] == "liver"
    names = json.loads((tmp_path / "seg.json").read_text())["labels"]
    assert names["5"] == "liver" and len(names) == 117


def test_missing_weights_fail_fast_without_download(tmp_path, monkeypatch, no_network):
    import totalsegmentator.python_api as api

    monkeypatch.setattr(api, "totalsegmentator", lambda *a, **k: pytest.fail("must not run"))
    _phantom_image(tmp_path)
    settings = segment.SegmentSettings(weights_dir=str(tmp_path / "empty"))
    t0 = time.perf_counter()
    with pytest.raises(segment.WeightsMissingError) as err:
        segment.segment_image(tmp_path / "ct.nii.gz", tmp_path / "seg.nii.gz", settings)
    msg = str(err.value)
    assert "Dataset297_TotalSegmentator_total_3mm_1559subj" in msg
    assert "totalseg_download_weights -t total_fast" in msg and str(tmp_path / "empty") in msg
    assert no_network == [] and not (tmp_path / "seg.nii.gz").exists()
    assert time.perf_counter() - t0 < 60  # a guard against a hang, not a speed target


def test_roi_subset_needs_the_crop_model_too(tmp_path):
    settings = segment.SegmentSettings(weights_dir=str(WEIGHTS), roi_subset=("liver",))
    with pytest.raises(segment.WeightsMissingError, match="task id 298"):
        segment.check_weights(settings)


def test_settings_from_the_config_section_drop_only_the_workflow_keys():
    """The workflow's segment jobs and predict's weight check read the config section through
    one reader: the workflow's keys go, the call's are kept, an unknown key is an error."""
    cfg = yaml.safe_load((REPO / "config" / "config.yaml").read_text())["segment"]
    assert set(segment.WORKFLOW_KEYS) < set(cfg)
    s = segment.SegmentSettings.from_config(cfg)
    assert (s.task, s.fast, s.weights_dir) == (cfg["task"], cfg["fast"], cfg["weights_dir"])
    assert segment.workflow_free(cfg).keys() == set(cfg) - set(segment.WORKFLOW_KEYS)
    with pytest.raises(ValueError, match="typo"):
        segment.SegmentSettings.from_config({**cfg, "typo": 1})


def test_offline_environment_private_home_stats_off(tmp_path):
    before = os.environ.get("TOTALSEG_HOME_DIR")
    with segment.offline_environment(tmp_path, threads=1) as home:
        cfg = json.loads((home / "config.json").read_text())
        assert cfg["send_usage_stats"] is False
        assert os.environ["TOTALSEG_WEIGHTS_PATH"] == str(tmp_path)
        assert os.environ["TOTALSEG_HOME_DIR"] == str(home)
    assert os.environ.get("TOTALSEG_HOME_DIR") == before
    assert not home.exists()


def test_torch_threads_are_bounded():
    import torch

    before = torch.get_num_threads()
    with nnunet_patches.bounded_torch_threads(1):
        torch.set_num_threads(64)  # what TotalSegmentator does on CPU
        assert torch.get_num_threads() == 1
    assert torch.get_num_threads() == before


def test_precomputed_backend_resamples_to_image_grid(tmp_path):
    aff, truth = _phantom_image(tmp_path, flip_x=False)
    ref_aff = aff.copy()
    ref_aff[:3, :3] /= 2  # a user mask on a finer (1.5 mm) grid
    fine = truth.repeat(2, 0).repeat(2, 1).repeat(2, 2)
    save_nifti(fine, ref_aff @ np.diag([1, 1, 1, 1.0]), tmp_path / "user.nii.gz")
    (tmp_path / "user.json").write_text(json.dumps({"5": "liver", "1": "spleen"}))
    settings = segment.SegmentSettings(backend="precomputed")
    info = segment.segment_image(
        tmp_path / "ct.nii.gz",
        tmp_path / "seg.nii.gz",
        settings,
        precomputed=tmp_path / "user.nii.gz",
    )
    seg = np.asanyarray(nib.load(tmp_path / "seg.nii.gz").dataobj)
    assert seg.shape == truth.shape
    assert phantom_model.dice_per_class(seg, truth)["liver"] > 0.97
    assert info["labels"] == {"1": "spleen", "5": "liver"}


@pytest.mark.gpu
@pytest.mark.skipif(not __import__("torch").cuda.is_available(), reason="needs CUDA")
def test_totalsegmentator_on_gpu(tmp_path, no_network):
    _aff, truth = _phantom_image(tmp_path)
    settings = segment.SegmentSettings(weights_dir=str(WEIGHTS), device="cuda")
    info = segment.segment_image(
        tmp_path / "ct.nii.gz", tmp_path / "seg.nii.gz", settings, threads=2
    )
    assert info["device"] == "gpu"
    seg = np.asanyarray(nib.load(tmp_path / "seg.nii.gz").dataobj)
    assert phantom_model.dice_per_class(seg, truth)["liver"] > 0.9


def test_a_group_segments_many_cases_in_one_process_and_isolates_a_bad_one(tmp_path, no_network):
    nifti = tmp_path / "nifti"
    nifti.mkdir()
    truth = {}
    for i, seed in enumerate((11, 12)):
        aff, truth[i] = _phantom_image(tmp_path, seed=seed, flip_x=bool(i))
        (tmp_path / "ct.nii.gz").rename(nifti / f"case-00000000000{i}.nii.gz")
        (nifti / f"case-00000000000{i}.json").write_text('{"case_id": "x"}')
    (nifti / "case-00000000000f.nii.gz").write_bytes(b"not a nifti")
    (nifti / "case-00000000000f.json").write_text("{}")
    (nifti / "case-00000000000e.json").write_text(  # its conversion failed
        json.dumps({"status": "failed", "stage": "convert", "reason_code": "X", "reason": "bad"})
    )
    inputs = sorted(nifti.glob("*.json"))
    settings = segment.SegmentSettings(weights_dir=str(WEIGHTS), device="cpu")
    seg = tmp_path / "seg"
    rec = segment.segment(inputs, seg, seg / "groups" / "0.json", settings, threads=2)
    assert no_network == []
    status = {c: r["status"] for c, r in rec["cases"].items()}
    assert status == {
        "case-000000000000": "ok",
        "case-000000000001": "ok",
        "case-00000000000e": "failed",
        "case-00000000000f": "failed",
    }
    assert rec["cases"]["case-00000000000e"]["stage"] == "convert"
    assert rec["cases"]["case-00000000000f"]["stage"] == "segment"
    for i in (0, 1):
        case = f"case-00000000000{i}"
        labels = np.asanyarray(nib.load(seg / f"{case}.nii.gz").dataobj)
        assert phantom_model.dice_per_class(labels, truth[i])["liver"] > 0.9
        assert json.loads((seg / f"{case}.json").read_text())["labels"]["5"] == "liver"
    assert not (seg / "case-00000000000f.nii.gz").exists()
    assert json.loads((seg / "case-00000000000f.json").read_text())["status"] == "failed"
    assert json.loads((seg / "groups" / "0.json").read_text())["n_ok"] == 2


def test_a_killed_group_keeps_the_label_maps_it_finished(tmp_path, monkeypatch):
    """A rerun after a kill segments only what is missing, and only for the same image bytes
    and settings (a changed image or setting is segmented again)."""
    nifti = tmp_path / "nifti"
    nifti.mkdir()
    for name, seed in (("case-00000000000a", 21), ("case-00000000000b", 22)):
        _phantom_image(tmp_path, seed=seed)
        (tmp_path / "ct.nii.gz").rename(nifti / f"{name}.nii.gz")
    images = sorted(nifti.glob("*.nii.gz"))
    settings = segment.SegmentSettings(weights_dir=str(WEIGHTS), device="cpu")
    seg, record = tmp_path / "seg", tmp_path / "seg" / "groups" / "g.json"
    segment.segment(images, seg, record, settings, threads=2)
    record.unlink()  # as after a kill: label maps written, the group's record not
    calls = []
    real = segment.segment_image
    monkeypatch.setattr(segment, "segment_image", lambda *a, **k: calls.append(a) or real(*a, **k))
    rec = segment.segment(images, seg, record, settings, threads=2)
    assert calls == [] and all(c.get("resumed") for c in rec["cases"].values())
    other = segment.SegmentSettings(weights_dir=str(WEIGHTS), device="cpu", fast=True, task="total")
    assert other == settings  # same settings: kept; a changed image is segmented anew
    img = nib.load(images[0])
    save_nifti(np.asanyarray(img.dataobj).astype(np.int16) + 1, img.affine, images[0])
    segment.segment(images, seg, record, settings, threads=2)
    assert len(calls) == 1


def test_groups_depend_on_the_case_alone_and_are_balanced():
    import hashlib

    cases = [f"case-{hashlib.sha256(str(i).encode()).hexdigest()[:12]}" for i in range(400)]
    sizes = np.bincount([int(segment.group_of(c, 4)) for c in cases], minlength=4)
    assert sizes.sum() == 400 and sizes.min() >= 70, sizes  # pseudonyms are hashes: even
    assert segment.group_of("case-00000000000a", 4) == str(10 % 4)
    assert segment.group_of("case-00000000000a", 0) == "case-00000000000a"  # a group of one


def test_a_batch_loads_each_model_once_with_identical_labels(tmp_path, monkeypatch):
    """TotalSegmentator builds a new nnU-Net predictor per image; in one process the model's
    checkpoint is read and its network built once (reuse_loaded_models), and the labels of a
    case segmented with the kept model equal those of a fresh load."""
    import torch

    loads = []
    original = torch.load

    def counting(f, *args, **kwargs):
        loads.append(Path(str(f)).name)
        return original(f, *args, **kwargs)

    monkeypatch.setattr(torch, "load", counting)
    nifti = tmp_path / "nifti"
    nifti.mkdir()
    for name, seed in (("case-00000000000a", 21), ("case-00000000000b", 22)):
        _phantom_image(tmp_path, seed=seed)
        (tmp_path / "ct.nii.gz").rename(nifti / f"{name}.nii.gz")
    settings = segment.SegmentSettings(weights_dir=str(WEIGHTS), device="cpu")
    monkeypatch.setattr(nnunet_patches, "_LOADED_MODELS", {})
    images = [nifti / "case-00000000000a.nii.gz", nifti / "case-00000000000b.nii.gz"]
    rec = segment.segment(images, tmp_path / "batch", tmp_path / "g.json", settings, threads=2)
    assert rec["n_ok"] == 2
    assert loads.count("checkpoint_final.pth") == 1, loads  # one model (total, fast), once
    # case b alone, the model loaded afresh: the same labels as with the kept model
    monkeypatch.setattr(nnunet_patches, "_LOADED_MODELS", {})
    segment.segment_image(images[1], tmp_path / "alone.nii.gz", settings, threads=2)
    assert loads.count("checkpoint_final.pth") == 2
    kept = np.asanyarray(nib.load(tmp_path / "batch" / "case-00000000000b.nii.gz").dataobj)
    fresh = np.asanyarray(nib.load(tmp_path / "alone.nii.gz").dataobj)
    assert (kept == fresh).all() and (kept == 5).sum() > 1000  # liver present, voxel for voxel

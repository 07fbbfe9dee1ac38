"""nnunet_patches: untrusted segmentation weights are refused before anything in them runs."""

from __future__ import annotations

import builtins
import hashlib
import os
import pickle
import re
import shutil
import types
from collections import OrderedDict
from pathlib import Path

import numpy as np
import pytest
import torch

from radflow import nnunet_patches, segment
from radflow.demo import phantom_model
from radflow.io import save_nifti
from radflow.nnunet_patches import UntrustedWeightsError

REPO = Path(__file__).resolve().parents[1]
WEIGHTS = REPO / "resources" / "totalseg_phantom"
MODEL = (
    "Dataset297_TotalSegmentator_total_3mm_1559subj/"
    "nnUNetTrainer_4000epochs_NoMirroring__nnUNetPlans__3d_fullres"
)
CKPT = "fold_0/checkpoint_final.pth"


class ShellPayload:
    """What a crafted checkpoint holds: unpickling it runs a shell command."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (os.system, (f"touch '{self.marker}'",))


class ExecPayload(ShellPayload):
    def __reduce__(self):
        return (builtins.exec, (f"open({self.marker!r}, 'w').close()",))


class Numpy1Pickler(pickle._Pickler):
    """Pickles numpy scalars as numpy 1 did (``numpy.core.multiarray.scalar``), as in
    TotalSegmentator's released checkpoints."""

    def save_global(self, obj, name=None):
        if obj is np._core.multiarray.scalar:
            self.write(pickle.GLOBAL + b"numpy.core.multiarray\nscalar\n")
            self.memoize(obj)
            return
        super().save_global(obj, name)


NUMPY1 = types.SimpleNamespace(Pickler=Numpy1Pickler, __name__="numpy1_pickle")


def weights_copy(tmp_path, sums=True) -> Path:
    """The shipped phantom weights in a folder of the test's (``SHA256SUMS`` kept or not)."""
    root = tmp_path / "weights"
    shutil.copytree(WEIGHTS, root)
    if not sums:
        (root / MODEL / "SHA256SUMS").unlink()
    return root


def nnunet_shaped(weights) -> dict:
    """A checkpoint as nnUNetTrainer.save_checkpoint writes it (the phantom's network)."""
    net = weights["network_weights"]
    f64, f32 = np.float64, np.float32
    return {
        "network_weights": net,
        "optimizer_state": {
            "state": {
                i: {"momentum_buffer": torch.zeros_like(v)} for i, v in enumerate(net.values())
            },
            "param_groups": [
                {"lr": 0.01, "momentum": 0.99, "nesterov": True, "weight_decay": 3e-5}
                | {"dampening": 0, "maximize": False, "foreach": None, "params": [0, 1, 2]}
            ],
        },
        "grad_scaler_state": {"scale": 65536.0, "growth_factor": 2.0, "_growth_tracker": 7},
        "logging": {
            "mean_fg_dice": [f64(0.41), f64(0.83)],
            "ema_fg_dice": [f64(0.41), f64(0.45)],
            "dice_per_class_or_region": [[f64(0.5), f64(0.3)], [f64(0.9), f64(0.8)]],
            "train_losses": [f32(-0.2), f32(-0.7)],
            "val_losses": [f32(-0.1), f32(-0.6)],
            "lrs": [0.01, 0.00999],
            "epoch_start_timestamps": [1.7e9, 1.7e9 + 80],
            "epoch_end_timestamps": [1.7e9 + 79, 1.7e9 + 160],
        },
        "_best_ema": f64(0.45),
        "current_epoch": 2,
        "init_args": {
            "plans": {"dataset_name": "Dataset297", "configurations": {"3d_fullres": {}}},
            "configuration": "3d_fullres",
            "fold": 0,
            "dataset_json": {"labels": {"background": 0, "spleen": 1}, "file_ending": ".nii.gz"},
            "unpack_dataset": True,
            "device": torch.device("cuda", 0),
        },
        "trainer_name": weights["trainer_name"],
        "inference_allowed_mirroring_axes": (0, 1, 2),
    }


def _phantom_ct(tmp_path) -> Path:
    hu, _lab = phantom_model.render_case(np.random.default_rng(11), lesion=False)
    save_nifti(hu.astype(np.int16), np.diag([3.0, 3.0, 3.0, 1.0]), tmp_path / "ct.nii.gz")
    return tmp_path / "ct.nii.gz"


def _predictor():
    from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor

    nnunet_patches.reuse_loaded_models()  # what radflow.segment installs
    return nnUNetPredictor(device=torch.device("cpu"), verbose=False, allow_tqdm=False)


def test_a_pickle_payload_checkpoint_is_refused_by_radflow_segment(tmp_path, monkeypatch):
    """(a) The real segment path: refused, naming the file; the payload never runs."""
    monkeypatch.setattr(nnunet_patches, "_LOADED_MODELS", {})
    root = weights_copy(tmp_path, sums=False)  # a user's folder: no SHA256SUMS to catch it
    marker = tmp_path / "pwned"
    ck = torch.load(root / MODEL / CKPT, weights_only=True)
    ck["logging"] = ShellPayload(marker)
    torch.save(ck, root / MODEL / CKPT)
    settings = segment.SegmentSettings(weights_dir=str(root), device="cpu")
    with pytest.raises(UntrustedWeightsError) as err:
        segment.segment_image(_phantom_ct(tmp_path), tmp_path / "seg.nii.gz", settings, threads=1)
    msg = str(err.value)
    assert f"refusing segmentation checkpoint {MODEL}/{CKPT} (in {root})" in msg, msg
    assert "posix.system" in msg and "weights_only=False" not in msg, msg
    assert not marker.exists() and not (tmp_path / "seg.nii.gz").exists()
    # the payload is live: an unrestricted load (nnU-Net's own) would have run it
    torch.load(root / MODEL / CKPT, weights_only=False)
    assert marker.exists()


@pytest.mark.parametrize("payload", [ShellPayload, ExecPayload])
def test_nnunet_itself_loads_checkpoints_only_through_the_safe_loader(tmp_path, payload):
    """No check-then-load: nnU-Net's own torch.load call is the weights-only load."""
    import nnunetv2.inference.predict_from_raw_data as module

    root = weights_copy(tmp_path, sums=False)
    marker = tmp_path / "pwned"
    torch.save({"trainer_name": payload(marker)}, root / MODEL / CKPT)
    predictor = _predictor()
    assert module.torch.load is nnunet_patches._TorchWithSafeLoad.load
    with pytest.raises(UntrustedWeightsError, match=f"{CKPT}: .*(posix.system|exec)"):
        predictor.initialize_from_trained_model_folder(str(root / MODEL), (0,))
    assert not marker.exists()


@pytest.mark.parametrize("pickle_module", [pickle, NUMPY1], ids=["numpy2", "numpy1"])
def test_b_a_real_nnunet_checkpoint_loads(tmp_path, monkeypatch, pickle_module):
    """(b) What nnU-Net's trainer stores (numpy scalars, torch.device, tuples) loads, through
    the loader and through nnU-Net itself; plain weights_only=True would have refused it."""
    monkeypatch.setattr(nnunet_patches, "_LOADED_MODELS", {})
    root = weights_copy(tmp_path, sums=False)
    ck = nnunet_shaped(torch.load(root / MODEL / CKPT, weights_only=True))
    torch.save(ck, root / MODEL / CKPT, pickle_module=pickle_module)
    with pytest.raises(pickle.UnpicklingError, match="numpy.*multiarray.scalar"):
        torch.load(root / MODEL / CKPT, weights_only=True)
    back = nnunet_patches.load_checkpoint(root / MODEL / CKPT, map_location="cpu")
    assert back["logging"] == ck["logging"] and type(back["_best_ema"]) is np.float64
    assert type(back["logging"]["train_losses"][0]) is np.float32
    assert back["init_args"] == ck["init_args"] and back["current_epoch"] == 2
    assert back["optimizer_state"]["param_groups"] == ck["optimizer_state"]["param_groups"]
    assert isinstance(back["network_weights"], OrderedDict)
    for k, v in ck["network_weights"].items():
        assert torch.equal(back["network_weights"][k], v)
    predictor = _predictor()
    predictor.initialize_from_trained_model_folder(str(root / MODEL), (0,))
    assert predictor.trainer_name == ck["trainer_name"]
    assert predictor.allowed_mirroring_axes == (0, 1, 2)


def test_c_sha256sums_match_accepted_mismatch_refused(tmp_path, monkeypatch):
    """(c) A folder's SHA256SUMS is checked before nnU-Net reads anything from it."""
    root = weights_copy(tmp_path)
    folder = root / MODEL
    files = ["dataset.json", CKPT, "plans.json"]
    expected = {f: hashlib.sha256((folder / f).read_bytes()).hexdigest() for f in files}
    assert nnunet_patches.verify_model_folder(folder) == expected
    assert nnunet_patches.verify_model_folder(root / MODEL.split("/")[0]) == {
        f"{MODEL.split('/')[1]}/{f}": d for f, d in expected.items()
    }  # a Dataset folder: its model folder's files

    with open(folder / "plans.json", "a") as f:
        f.write(" ")
    with pytest.raises(
        UntrustedWeightsError,
        match=re.escape(f"SHA256SUMS mismatch, refusing {MODEL}/plans.json (in {root}): its"),
    ):
        nnunet_patches.verify_model_folder(folder, weights_dir=root)
    loads = []
    monkeypatch.setattr(torch, "load", lambda *a, **k: loads.append(a))
    with pytest.raises(
        UntrustedWeightsError, match=f"SHA256SUMS mismatch, refusing /.*{MODEL}/plans.json: "
    ):
        _predictor().initialize_from_trained_model_folder(str(folder), (0,))
    assert loads == []  # refused before any checkpoint was opened
    monkeypatch.undo()

    shutil.copy(WEIGHTS / MODEL / "plans.json", folder / "plans.json")
    assert nnunet_patches.verify_model_folder(folder) == expected
    (folder / "fold_1").mkdir()
    shutil.copy(folder / CKPT, folder / "fold_1" / "checkpoint_final.pth")
    with pytest.raises(
        UntrustedWeightsError, match="SHA256SUMS does not list: .*fold_1/checkpoint_final.pth"
    ):
        nnunet_patches.verify_model_folder(folder)
    shutil.rmtree(folder / "fold_1")
    with open(folder / "SHA256SUMS", "a") as f:
        f.write(f"{'0' * 64}  fold_0/checkpoint_best.pth\n")
    with pytest.raises(
        UntrustedWeightsError, match="listed in SHA256SUMS is missing: .*checkpoint_best.pth"
    ):
        nnunet_patches.verify_model_folder(folder)
    (folder / "SHA256SUMS").write_text(f"{'0' * 64}  ../../elsewhere.pth\n")
    with pytest.raises(UntrustedWeightsError, match="not a sha256sum line .*elsewhere.pth.*line 1"):
        nnunet_patches.verify_model_folder(folder)
    (folder / "SHA256SUMS").unlink()  # no SHA256SUMS: digests only, nothing to check against
    assert nnunet_patches.verify_model_folder(folder) == expected


def test_shipped_phantom_model_is_recorded_and_a_saved_model_records_itself(tmp_path):
    folder = WEIGHTS / MODEL
    listed = nnunet_patches.read_sums(folder / "SHA256SUMS")
    assert nnunet_patches.verify_model_folder(folder) == listed
    assert sorted(listed) == ["dataset.json", CKPT, "plans.json"]
    out = phantom_model.save(torch.nn.Linear(2, 2), tmp_path, {"seed": 0})
    assert sorted(nnunet_patches.verify_model_folder(out)) == sorted(listed)

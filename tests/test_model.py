"""model: every registered architecture builds and classifies, stems adapt, Kinetics weights are
never downloaded, checkpoints round-trip with weights_only, device names resolve."""

from __future__ import annotations

import pytest
import torch

from radflow.inputs import InputSpec
from radflow.model import (
    ARCHITECTURES,
    adapt_stem,
    build_model,
    load_checkpoint,
    resolve_device,
    save_checkpoint,
    submodule,
)


@pytest.mark.parametrize("arch", sorted(ARCHITECTURES))
@pytest.mark.parametrize("channels", [1, 2])
def test_every_architecture_builds_and_gives_two_logits(arch, channels):
    torch.manual_seed(0)
    model = build_model(arch, channels, 2).eval()
    spec = ARCHITECTURES[arch]
    assert submodule(model, spec.stem).in_channels == channels
    assert submodule(model, spec.head).out_features == 2
    with torch.no_grad():
        logits = model(torch.rand(3, channels, 8, 16, 16))
    assert logits.shape == (3, 2) and torch.isfinite(logits).all()


def test_r3d_slim_is_isotropic_and_small():
    """The demo's network: a 32^3 crop keeps its resolution into layer1 and halves evenly on
    every axis (r3d_18 halves only two at its stem), with a few percent of r3d_18's weights."""
    slim, r18 = build_model("r3d_slim", 2, 2), build_model("r3d_18", 2, 2)
    x = torch.rand(1, 2, 32, 32, 32)
    with torch.no_grad():
        f1 = slim.layer1(slim.stem(x))
        f2 = slim.layer2(f1)
        g2 = r18.layer2(r18.layer1(r18.stem(x)))
    assert f1.shape[2:] == (32, 32, 32) and f2.shape[2:] == (16, 16, 16)
    assert g2.shape[2:] == (16, 8, 8)
    n_slim = sum(p.numel() for p in slim.parameters())
    assert n_slim < 0.05 * sum(p.numel() for p in r18.parameters())
    assert ARCHITECTURES["r3d_slim"].kinetics is None


def test_stem_adaptation_keeps_the_summed_rgb_kernels():
    import torchvision.models.video as tvv

    model = tvv.r3d_18(weights=None)
    rgb = model.stem[0].weight.detach().clone()
    adapt_stem(model, 2)
    w = model.stem[0].weight.detach()
    assert w.shape[1] == 2
    torch.testing.assert_close(w[:, 0], rgb.sum(1))
    assert torch.count_nonzero(w[:, 1]) == 0


def test_missing_kinetics_weights_are_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))
    with pytest.raises(FileNotFoundError, match=r"r3d_18-.*\.pth in .*hub/checkpoints"):
        build_model("r3d_18", 1, 2, "kinetics400")


def test_unknown_architecture_is_a_clear_error():
    with pytest.raises(ValueError, match="r3d_18"):
        build_model("resnet9000", 1, 2)


def test_transfer_from_another_task_keeps_backbone_not_head(tmp_path):
    src = build_model("r3d_18", 1, 3, "none")
    torch.save({"model": src.state_dict()}, tmp_path / "other.pt")
    dst = build_model("r3d_18", 1, 2, str(tmp_path / "other.pt"))
    torch.testing.assert_close(dst.layer4[0].conv1[0].weight, src.layer4[0].conv1[0].weight)
    assert dst.fc.out_features == 2


def test_checkpoint_round_trips_with_weights_only(tmp_path):
    torch.manual_seed(0)
    model = build_model("mc3_18", 2, 2)
    spec = InputSpec(("image", "roi"), (-40.0, 160.0))
    path = tmp_path / "best.pt"
    save_checkpoint(path, model, "mc3_18", spec, 2, 3, 0.75, settings={"lr": 1e-4})
    assert [p.name for p in tmp_path.iterdir()] == ["best.pt"]  # no temporary file left
    ck = torch.load(path, weights_only=True)
    assert ck["arch"] == "mc3_18" and ck["n_classes"] == 2
    assert ck["epoch"] == 3 and ck["val_auc"] == 0.75
    assert InputSpec.from_checkpoint(ck) == spec
    loaded, meta = load_checkpoint(path)
    assert not loaded.training and meta["channels"] == ["image", "roi"]
    for k, v in model.state_dict().items():
        torch.testing.assert_close(loaded.state_dict()[k], v, rtol=0, atol=0)


def test_checkpoints_before_the_intensity_rule_key_use_the_hu_window():
    ck = {"channels": ["image"], "hu_window": [-40, 160]}
    assert InputSpec.from_checkpoint(ck) == InputSpec(("image",), (-40, 160), "hu_window")


def test_device_names_resolve(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert resolve_device("auto") == torch.device("cpu")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert resolve_device("auto") == torch.device("cuda")
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device("cuda") == torch.device("cuda")
    assert resolve_device("cuda:1") == torch.device("cuda", 1)
    assert resolve_device("gpu") == torch.device("cuda")  # TotalSegmentator's spelling
    assert resolve_device("gpu:2") == torch.device("cuda", 2)
    for bad in ("tpu", "cpu:0", "auto:1", "cuda:x", "CUDA", ""):
        with pytest.raises(ValueError, match="device must be"):
            resolve_device(bad)

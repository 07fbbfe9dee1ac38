"""model: the networks radflow trains, their checkpoints, and the device they run on.

* ``ARCHITECTURES``: name -> how to build the network (random weights) and where its stem and
  head are. A new architecture is one entry here, its name in the schema's ``train.arch`` enum,
  and a case in tests/test_model.py;
* ``build_model``: the stem takes the input channels (pretrained RGB kernels summed into channel
  0, other channels start at zero) and a new head the classes; pretrained = none, kinetics400
  (from the local torch hub cache, never downloaded) or a checkpoint path (radflow checkpoints
  transfer between tasks: a head of another shape stays new);
* checkpoints: a self-describing dict (weights, architecture, input spec, classes, epoch) that
  loads with ``torch.load(weights_only=True)``, written atomically;
* ``resolve_device``: the one reading of a device name.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from radflow.inputs import InputSpec

# --------------------------------------------------------------------------- architectures


@dataclass(frozen=True)
class Architecture:
    """A network radflow can train: its builder and where its stem and head are."""

    build: Callable[[], nn.Module]  # random weights, the original stem and head
    stem: str = "stem.0"  # dotted path of the first Conv3d (adapted to the input channels)
    head: str = "fc"  # dotted path of the final nn.Linear (replaced for the classes)
    kinetics: str | None = None  # torchvision weights enum with KINETICS400_V1, if any


def _torchvision_video(name: str) -> Callable[[], nn.Module]:
    def build() -> nn.Module:
        import torchvision.models.video as tvv

        return getattr(tvv, name)(weights=None)

    return build


def _slim_r3d(width: int = 16, blocks: tuple[int, int, int, int] = (1, 1, 1, 1)) -> nn.Module:
    """A narrow 3D ResNet for isotropic CT crops, from torchvision's video ResNet parts.

    r3d_18 is built for video: a (3, 7, 7) stem with stride (1, 2, 2) and 64-512 channels, 33 M
    weights. This one has an isotropic 3^3 stride-1 stem (a 32^3 crop keeps its resolution into
    layer1; layer2 is 16^3, layer4 4^3), ``width``..8x``width`` channels and ``blocks`` basic
    blocks per stage: at 16 and one block each, 0.9 M weights, and a training step on a 32^3
    batch takes about a quarter of r3d_18's time on a CPU -- what trains from scratch on tens
    of cases there.
    """
    from torchvision.models.video.resnet import BasicBlock, Conv3DSimple, VideoResNet

    class SlimVideoResNet(VideoResNet):
        def _make_layer(
            self, block: Any, conv_builder: Any, planes: int, n: int, stride: int = 1
        ) -> nn.Sequential:
            if planes == 64:  # layer1: starts from the slim stem
                self.inplanes = width
            return super()._make_layer(block, conv_builder, planes * width // 64, n, stride)

    def stem() -> nn.Module:
        return nn.Sequential(
            nn.Conv3d(3, width, kernel_size=3, stride=1, padding=1, bias=False),
            nn.BatchNorm3d(width),
            nn.ReLU(inplace=True),
        )

    net = SlimVideoResNet(BasicBlock, [Conv3DSimple] * 4, list(blocks), stem)
    net.fc = nn.Linear(8 * width, 400)
    return net


ARCHITECTURES: dict[str, Architecture] = {
    "r3d_18": Architecture(_torchvision_video("r3d_18"), kinetics="R3D_18_Weights"),
    "r3d_slim": Architecture(_slim_r3d),
    "mc3_18": Architecture(_torchvision_video("mc3_18"), kinetics="MC3_18_Weights"),
    "r2plus1d_18": Architecture(_torchvision_video("r2plus1d_18"), kinetics="R2Plus1D_18_Weights"),
}


def architecture(name: str) -> Architecture:
    """The registry entry of ``name``, or a ValueError naming the known ones."""
    if name not in ARCHITECTURES:
        raise ValueError(f"unknown architecture {name!r}; known: {tuple(ARCHITECTURES)}")
    return ARCHITECTURES[name]


def submodule(model: nn.Module, path: str) -> nn.Module:
    """The module at a dotted path (``stem.0``, ``layer4.1.conv2``)."""
    mod: Any = model
    for part in path.split("."):
        mod = mod[int(part)] if part.isdigit() else getattr(mod, part)
    return mod


def _replace(model: nn.Module, path: str, new: nn.Module) -> None:
    parent, _, last = path.rpartition(".")
    holder: Any = submodule(model, parent) if parent else model
    if last.isdigit():
        holder[int(last)] = new
    else:
        setattr(holder, last, new)


def kinetics_file(arch: str) -> Path:
    """Where torchvision's Kinetics-400 weights for ``arch`` live in the local torch hub cache."""
    import torchvision.models.video as tvv

    enum = architecture(arch).kinetics
    if enum is None:
        raise ValueError(f"{arch} has no Kinetics-400 weights")
    weights = getattr(tvv, enum).KINETICS400_V1
    return Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(weights.url)


def adapt_stem(model: nn.Module, in_channels: int, stem: str = "stem.0") -> nn.Module:
    """Replace the first conv so it takes ``in_channels``: RGB kernels summed into channel 0."""
    conv = submodule(model, stem)
    new = nn.Conv3d(
        in_channels,
        conv.out_channels,
        conv.kernel_size,
        conv.stride,
        conv.padding,
        bias=conv.bias is not None,
    )
    with torch.no_grad():
        new.weight.zero_()
        new.weight[:, 0] = conv.weight.sum(dim=1)
        if conv.bias is not None:
            new.bias.copy_(conv.bias)
    _replace(model, stem, new)
    return model


def build_model(arch: str, in_channels: int, n_classes: int, pretrained: str = "none") -> nn.Module:
    """Network ``arch`` adapted to ``in_channels`` and ``n_classes``.

    ``pretrained``: ``none``, ``kinetics400`` or the path of a checkpoint to transfer from.
    """
    spec = architecture(arch)
    model = spec.build()
    if pretrained == "kinetics400":
        path = kinetics_file(arch)
        if not path.exists():
            raise FileNotFoundError(
                f"train.pretrained=kinetics400 needs {path.name} in {path.parent} (radflow never "
                f'downloads). On a connected machine: python -c "import torchvision.models.video '
                f"as v; v.{arch}(weights='KINETICS400_V1')\" then copy ~/.cache/torch/hub/"
                f"checkpoints/{path.name} there (or set TORCH_HOME)."
            )
        model.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
    adapt_stem(model, in_channels, spec.stem)
    _replace(model, spec.head, nn.Linear(submodule(model, spec.head).in_features, n_classes))
    if pretrained not in ("none", "kinetics400"):
        load_transfer(model, pretrained)
    return model


def load_transfer(model: nn.Module, path: str | os.PathLike) -> list[str]:
    """Load a radflow (or plain state-dict) checkpoint; a head of another shape is left new.

    Returns the names of the tensors left as they were.
    """
    if not Path(path).exists():
        raise FileNotFoundError(f"train.pretrained: no checkpoint at {path}")
    ckpt = torch.load(path, map_location="cpu", weights_only=True)
    state = ckpt.get("model", ckpt)
    own = model.state_dict()
    skipped = [k for k, v in state.items() if k not in own or own[k].shape != v.shape]
    model.load_state_dict({k: v for k, v in state.items() if k not in skipped}, strict=False)
    return skipped


# --------------------------------------------------------------------------- checkpoints


def save_checkpoint(
    path: str | os.PathLike,
    model: nn.Module,
    arch: str,
    inputs: InputSpec,
    n_classes: int,
    epoch: int,
    val_auc: float,
    settings: Mapping[str, Any] | None = None,
) -> None:
    """A self-describing checkpoint that loads with ``torch.load(weights_only=True)``.

    Keys: ``model`` (state dict), ``arch``, the input spec (``channels``, ``hu_window``,
    ``intensity_rule``), ``n_classes``, ``epoch``, ``val_auc`` and ``settings`` (JSON text of the
    training settings). Written atomically.
    """
    save_atomic(
        path,
        {
            "model": model.state_dict(),
            "arch": arch,
            **inputs.to_checkpoint(),
            "n_classes": n_classes,
            "epoch": epoch,
            "val_auc": val_auc,
            "settings": json.dumps(dict(settings or {})),
        },
    )


def save_atomic(path: str | os.PathLike, obj: dict[str, Any]) -> None:
    """``torch.save`` to a temporary file beside ``path``, renamed onto it only on success."""
    from radflow.io import atomic_path

    with atomic_path(path) as tmp:
        torch.save(obj, tmp)


def load_checkpoint(
    path: str | os.PathLike, device: str | torch.device = "cpu"
) -> tuple[nn.Module, dict[str, Any]]:
    """The model (eval mode, on ``device``'s tensors) and metadata of a radflow checkpoint.

    ``InputSpec.from_checkpoint(ck)`` gives the input the model expects.
    """
    ck = torch.load(path, map_location=device, weights_only=True)
    model = build_model(ck["arch"], len(ck["channels"]), ck["n_classes"], "none")
    model.load_state_dict(ck["model"])
    return model.eval(), ck


# --------------------------------------------------------------------------- inference, device


@torch.no_grad()
def predict(model: nn.Module, cache: Any, batch_size: int, amp: bool) -> np.ndarray:
    """Positive-class probability of every case of an ``inputs.Cache``, in order."""
    model.eval()
    out = []
    for i in range(0, len(cache), batch_size):
        x = cache.batch(range(i, min(i + batch_size, len(cache))))
        with torch.autocast(cache.device.type, dtype=torch.bfloat16, enabled=amp):
            logits = model(x)
        out.append(logits.float().softmax(1)[:, 1].cpu())
    return torch.cat(out).numpy() if out else np.zeros(0)


DEVICE_PATTERN = r"auto|cpu|cuda|cuda:[0-9]+"  # the schema's pattern of train/explain.device
_DEVICE = re.compile(r"(auto|cpu|cuda|gpu)(?::([0-9]+))?")


def resolve_device(name: str) -> torch.device:
    """A device name -> ``torch.device``.

    ``auto``: cuda when torch sees a GPU, else cpu; ``cpu``; ``cuda`` or ``cuda:N``; the legacy
    ``gpu`` and ``gpu:N`` (TotalSegmentator's spelling) mean ``cuda`` and ``cuda:N``.
    """
    m = _DEVICE.fullmatch(str(name))
    if m is None or (m.group(2) is not None and m.group(1) in ("auto", "cpu")):
        raise ValueError(f"device must be auto, cpu, cuda or cuda:N (or gpu, gpu:N), got {name!r}")
    kind, index = m.groups()
    if kind == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if kind == "cpu":
        return torch.device("cpu")
    return torch.device("cuda", int(index)) if index is not None else torch.device("cuda")


def check_device(name: str, key: str) -> None:
    """A ValueError unless ``name`` matches the schema's device pattern (config key ``key``)."""
    if not re.fullmatch(DEVICE_PATTERN, str(name)):
        raise ValueError(f"{key} must be auto, cpu, cuda or cuda:N, got {name!r}")

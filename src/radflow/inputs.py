"""inputs: what the network sees of a case -- the one input contract of train, evaluate, explain,
the review page and ``data.CaseDataset``.

* channels: ``image`` (the masked volume) and ``roi`` (the ROI mask on the same grid), each read
  from its manifest column (``CHANNEL_COLUMNS``) and stored as int16 in RAS order (x, y, z);
* intensity: the ``image`` channel goes through a named rule (``INTENSITY_RULES``, config key
  ``train.intensity_rule``), ``roi`` channels become 0/1. A new rule is one function here and its
  name in the schema's ``train.intensity_rule`` enum; rules work on numpy arrays and torch
  tensors alike, so the dataset, the training cache and the viewer share it;
* the network layout: a batch (B, C, X, Y, Z) becomes float (B, C, Z, Y, X) -- the network sees
  the volume as a video (T, H, W) = (z, y, x);
* ``Cache``: one split's stored volumes loaded once (pinned, or on the GPU when they fit).

Nothing here imports torch at import time: the review page uses the intensity rule without it.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    import pandas as pd
    import torch

CHANNEL_COLUMNS = {"image": "masked", "roi": "roi"}  # channel -> manifest column of its file
CHANNELS = tuple(CHANNEL_COLUMNS)
HU_WINDOW = (-160.0, 240.0)  # the schema's default train.hu_window


# --------------------------------------------------------------------------- intensity rules


def hu_window(x: Any, window: Sequence[float]) -> Any:
    """HU -> [0, 1] through ``window`` = (low, high); values outside are clipped."""
    lo, hi = window
    return ((x - lo) / (hi - lo)).clip(0.0, 1.0)


# name (schema enum of train.intensity_rule) -> rule(float32 HU, train.hu_window) -> float32
INTENSITY_RULES: dict[str, Callable[[Any, Sequence[float]], Any]] = {"hu_window": hu_window}


def _float32(x: Any) -> Any:
    return x.astype(np.float32) if isinstance(x, np.ndarray) else x.float()


@dataclass(frozen=True)
class InputSpec:
    """Channels and intensity rule of a model's input (saved in, and read from, checkpoints)."""

    channels: tuple[str, ...] = ("image",)
    hu_window: tuple[float, float] = HU_WINDOW
    intensity_rule: str = "hu_window"

    def __post_init__(self) -> None:
        check_channels(self.channels)
        if self.intensity_rule not in INTENSITY_RULES:
            known = tuple(INTENSITY_RULES)
            raise ValueError(f"intensity rule must be one of {known}, got {self.intensity_rule!r}")

    @classmethod
    def from_checkpoint(cls, ck: Mapping[str, Any]) -> InputSpec:
        """The spec a checkpoint was trained with (older checkpoints: the HU window rule)."""
        return cls(
            tuple(ck["channels"]),
            tuple(ck["hu_window"]),  # type: ignore[arg-type]
            ck.get("intensity_rule", "hu_window"),
        )

    def to_checkpoint(self) -> dict[str, Any]:
        """The spec as checkpoint entries (plain lists and strings: ``weights_only`` loads them)."""
        return {
            "channels": list(self.channels),
            "hu_window": list(self.hu_window),
            "intensity_rule": self.intensity_rule,
        }

    @property
    def image_channels(self) -> list[int]:
        """Indices of the intensity channels (the others are masks)."""
        return [i for i, c in enumerate(self.channels) if c == "image"]

    def scale(self, name: str, x: Any) -> Any:
        """Stored values of one channel -> float32 network values (numpy array or torch tensor)."""
        if name == "image":
            return INTENSITY_RULES[self.intensity_rule](_float32(x), self.hu_window)
        return _float32(x > 0)

    def array(self, stored: np.ndarray) -> np.ndarray:
        """One case's stored (C, X, Y, Z) -> float32 (C, X, Y, Z), still in RAS order."""
        return np.stack([self.scale(c, stored[i]) for i, c in enumerate(self.channels)])

    def network_input(self, x: torch.Tensor) -> torch.Tensor:
        """Stored volumes (B, C, X, Y, Z) in RAS -> the network's float input (B, C, Z, Y, X)."""
        x = x.float()
        for i, name in enumerate(self.channels):
            x[:, i] = self.scale(name, x[:, i])
        return x.permute(0, 1, 4, 3, 2).contiguous()


def check_channels(channels: Sequence[str]) -> None:
    """A non-empty sequence of known channel names, or a ValueError."""
    bad = [c for c in channels if c not in CHANNELS]
    if bad or not channels:
        raise ValueError(f"channels must be a non-empty subset of {CHANNELS}, got {channels}")


def removed(spec: InputSpec, shape: Sequence[int], fill_hu: float) -> np.ndarray:
    """Stored (C, X, Y, Z) int16 of a volume whose every voxel is removed: what the mask stage
    writes outside the ROI -- ``fill_hu`` (``mask.background_hu``) in the image, 0 in the ROI.

    The baseline of explain's deletion and insertion curves."""
    fill = {"image": int(round(fill_hu)), "roi": 0}
    return np.stack([np.full(tuple(shape), fill[c], dtype=np.int16) for c in spec.channels])


def organ_median(spec: InputSpec, vol: np.ndarray, roi: np.ndarray) -> np.ndarray:
    """Stored (C, X, Y, Z) int16 of one case (``vol``, ``spec``'s channels) with every voxel of
    the image inside ``roi`` set to the ROI's median HU: the organ with its structure (lesion,
    vessels, texture) taken out, everything else as it was.

    The other baseline of explain's deletion and insertion curves: removing a lesion's voxels
    heals the organ instead of cutting a hole in it."""
    out = np.array(vol, dtype=np.int16, copy=True)
    roi = np.asarray(roi, dtype=bool)
    if "image" in spec.channels and roi.any():
        img = out[spec.channels.index("image")]
        img[roi] = int(np.rint(np.median(img[roi])))
    return out


# --------------------------------------------------------------------------- reading


def read_volume(path: str | os.PathLike) -> np.ndarray:
    """One stored volume as an int16 (X, Y, Z) array."""
    import nibabel as nib

    return np.asanyarray(nib.load(path).dataobj).astype(np.int16)


def read_case(
    row: Mapping[str, Any], channels: Sequence[str], root: str | os.PathLike = "."
) -> np.ndarray:
    """One case's channels as int16 (C, X, Y, Z): each from its manifest column's file.

    ``row`` is a manifest row (or any mapping of the columns of ``CHANNEL_COLUMNS``); its paths
    are relative to ``root`` (absolute paths stay as they are).
    """
    return np.stack([read_volume(Path(root) / row[CHANNEL_COLUMNS[c]]) for c in channels])


# --------------------------------------------------------------------------- a split in memory


class Cache:
    """One split's volumes as int16 tensors, loaded once (pinned, or on the GPU when it fits)."""

    def __init__(
        self,
        cases: pd.DataFrame,
        root: str | os.PathLike,
        spec: InputSpec,
        device: torch.device,
    ) -> None:
        import torch

        self.case_ids = list(cases["case_id"])
        # -1: an unlabelled case (predicted, never in a loss or a metric)
        labels = cases["label"].astype("Float64").fillna(-1).to_numpy(dtype="int64")
        self.labels = torch.tensor(labels, dtype=torch.long)
        vols = [
            torch.from_numpy(read_case(r, spec.channels, root)) for r in cases.to_dict("records")
        ]
        self.data = torch.stack(vols) if vols else torch.empty(0)
        self.device = device
        if device.type == "cuda":
            free, _ = torch.cuda.mem_get_info(device)
            if self.data.numel() * 2 < 0.3 * free:
                self.data = self.data.to(device)
            else:
                self.data = self.data.pin_memory()
        self.spec = spec
        self.image_channels = spec.image_channels

    def __len__(self) -> int:
        return len(self.case_ids)

    def batch(self, idx: Sequence[int]) -> torch.Tensor:
        """The network input (B, C, Z, Y, X) of cases ``idx``, on the device."""
        x = self.data[list(idx)].to(self.device, non_blocking=True)
        return self.spec.network_input(x)

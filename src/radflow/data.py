"""A torch Dataset over a radflow manifest, for downstream models."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
import pandas as pd

from radflow import manifest

CHANNELS = ("image", "roi")


def window(hu: np.ndarray, low: float, high: float) -> np.ndarray:
    """HU -> [0, 1] float32 through a window (values outside are clipped)."""
    return np.clip((hu.astype(np.float32) - low) / (high - low), 0.0, 1.0)


class CaseDataset:
    """Cases of one split as ``(tensor[C, X, Y, Z], label, case_id)``.

    ``channels``: ``image`` (the masked volume, HU windowed to [0, 1]) and/or ``roi`` (the ROI
    mask on the same grid). Paths in the manifest are relative to ``root`` (default: the folder
    holding ``manifests/``). Volumes are in RAS order (x, y, z).
    """

    def __init__(
        self,
        cases: pd.DataFrame | str | os.PathLike,
        split: str | Sequence[str] | None = "train",
        channels: Sequence[str] = ("image",),
        hu_window: tuple[float, float] = (-160.0, 240.0),
        root: str | os.PathLike | None = None,
        fold: int | None = None,
    ) -> None:
        if not isinstance(cases, pd.DataFrame):
            path = Path(cases)
            root = root if root is not None else path.resolve().parent.parent
            cases = manifest.read(path)
        else:
            cases = manifest.validate(cases)
        bad = [c for c in channels if c not in CHANNELS]
        if bad or not channels:
            raise ValueError(f"channels must be a non-empty subset of {CHANNELS}, got {channels}")
        if split is not None:
            splits = [split] if isinstance(split, str) else list(split)
            cases = cases[cases["split"].isin(splits)]
        if fold is not None:
            cases = cases[cases["fold"] == fold]
        self.cases = cases.reset_index(drop=True)
        self.channels = tuple(channels)
        self.hu_window = hu_window
        self.root = Path(root) if root is not None else Path.cwd()

    def __len__(self) -> int:
        return len(self.cases)

    @property
    def labels(self) -> np.ndarray:
        """Labels of every case, in order (for samplers and class weights)."""
        return self.cases["label"].to_numpy(dtype=np.int64)

    def array(self, i: int) -> np.ndarray:
        """The (C, X, Y, Z) float32 input of case ``i``."""
        row = self.cases.iloc[i]
        chans = []
        for c in self.channels:
            data = np.asanyarray(
                nib.load(self.root / row[{"image": "masked", "roi": "roi"}[c]]).dataobj
            )
            chans.append(
                window(data, *self.hu_window) if c == "image" else (data > 0).astype(np.float32)
            )
        return np.stack(chans)

    def __getitem__(self, i: int) -> tuple[Any, int, str]:
        import torch

        row = self.cases.iloc[i]
        return torch.from_numpy(self.array(i)), int(row["label"]), str(row["case_id"])

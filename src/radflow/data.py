"""A torch Dataset over a radflow manifest, for downstream models."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from radflow import manifest
from radflow.inputs import CHANNELS, HU_WINDOW, InputSpec, read_case

__all__ = ["CHANNELS", "CaseDataset"]


class CaseDataset:
    """Cases of one split as ``(tensor[C, X, Y, Z], label, case_id)``.

    ``channels``: ``image`` (the masked volume, through the intensity rule: by default the HU
    window to [0, 1]) and/or ``roi`` (the ROI mask on the same grid, 0/1) -- the input contract
    of ``radflow.inputs``, as training sees it but in RAS order (x, y, z). Paths in the manifest
    are relative to ``root`` (default: the folder holding ``manifests/``). An unlabelled case
    (empty ``label`` in the manifest) has label -1: filter with ``cases.label.notna()`` first
    to train.
    """

    def __init__(
        self,
        cases: pd.DataFrame | str | os.PathLike,
        split: str | Sequence[str] | None = "train",
        channels: Sequence[str] = ("image",),
        hu_window: tuple[float, float] = HU_WINDOW,
        root: str | os.PathLike | None = None,
        fold: int | None = None,
        intensity_rule: str = "hu_window",
    ) -> None:
        if not isinstance(cases, pd.DataFrame):
            path = Path(cases)
            root = root if root is not None else path.resolve().parent.parent
            cases = manifest.read(path)
        else:
            cases = manifest.validate(cases)
        self.inputs = InputSpec(tuple(channels), tuple(hu_window), intensity_rule)  # type: ignore[arg-type]
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
        """Labels of every case, in order (for samplers and class weights); -1 = unlabelled."""
        return self.cases["label"].astype("Float64").fillna(-1).to_numpy(dtype=np.int64)

    def array(self, i: int) -> np.ndarray:
        """The (C, X, Y, Z) float32 input of case ``i``."""
        return self.inputs.array(read_case(self.cases.iloc[i], self.channels, self.root))

    def __getitem__(self, i: int) -> tuple[Any, int, str]:
        import torch

        row = self.cases.iloc[i]
        label = -1 if pd.isna(row["label"]) else int(row["label"])
        return torch.from_numpy(self.array(i)), label, str(row["case_id"])

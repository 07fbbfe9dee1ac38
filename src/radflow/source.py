"""The cohort's input: a raw DICOM tree or a NIfTI cohort sheet (config ``input`` + ``raw_dir``).

``InputSpec`` says what the input is; ``InputSpec.location`` is the one path ingest reads (the
DICOM tree or the sheet). Every stage that meets the input (the ingest and convert rules, the
``radflow ingest``/``convert`` commands, prediction on a new cohort) asks the spec, so the
difference between the two formats lives here and in the two readers, nowhere else.
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

from radflow.settings import section

FORMATS = ("dicom", "nifti")
MODALITIES = ("CT", "MR", "other")
SHEET_SUFFIXES = (".csv",)
NIFTI_SUFFIXES = (".nii", ".nii.gz")


@dataclass(frozen=True)
class InputSpec:
    """What the cohort's input is (config key ``input``)."""

    format: str = "dicom"  # dicom (raw_dir) | nifti (sheet)
    sheet: str | None = None  # the NIfTI cohort sheet (CSV), for format nifti
    modality: str = "CT"  # CT | MR | other: how NIfTI intensities are stored
    volume_index: int | None = None  # the volume taken from a 4-D NIfTI; None refuses 4-D

    @classmethod
    def from_dict(cls, d: dict[str, Any] | None) -> InputSpec:
        """Build from a config mapping (unknown keys are an error)."""
        d = section(cls, d, "input")
        if d.get("format", "dicom") not in FORMATS:
            raise ValueError(f"input.format must be one of {FORMATS}, got {d['format']!r}")
        if d.get("modality", "CT") not in MODALITIES:
            raise ValueError(f"input.modality must be one of {MODALITIES}, got {d['modality']!r}")
        if d.get("volume_index") is not None and int(d["volume_index"]) < 0:
            raise ValueError("input.volume_index must be >= 0 (or null to refuse 4-D volumes)")
        spec = cls(**d)
        if spec.format == "nifti" and not spec.sheet:
            raise ValueError("input.format nifti needs input.sheet (the cohort sheet, CSV)")
        return spec

    @classmethod
    def for_path(cls, path: str | os.PathLike, **kw: Any) -> InputSpec:
        """The spec of a path given alone: a ``.csv`` sheet or a ``.nii``/``.nii.gz`` volume
        is NIfTI input, anything else a DICOM tree (``kw`` sets modality, volume_index)."""
        return cls.resolve(kw, path)

    @classmethod
    def resolve(cls, d: dict[str, Any] | None, path: str | os.PathLike) -> InputSpec:
        """The spec of mapping ``d`` for ``path`` (what ingest or convert reads): without a
        ``format``, the path's kind says it; a NIfTI sheet's path is the path itself."""
        d = dict(d or {})
        name = Path(path).name.lower()
        if "format" not in d:
            nifti = name.endswith((*SHEET_SUFFIXES, *NIFTI_SUFFIXES))
            d["format"] = "nifti" if nifti else "dicom"
        if d["format"] == "nifti" and not d.get("sheet"):
            d["sheet"] = str(path)
        return cls.from_dict(d)

    def location(self, raw_dir: str | None = None) -> str:
        """The path ingest reads: the sheet (nifti) or ``raw_dir`` (dicom)."""
        if self.format == "nifti":
            return str(self.sheet)
        if not raw_dir:
            raise ValueError("input.format dicom needs raw_dir (the raw DICOM tree)")
        return str(raw_dir)

    def stage_settings(self) -> dict[str, Any]:
        """What convert needs to know (not the sheet's path: the file list names the volume)."""
        return {k: v for k, v in asdict(self).items() if k != "sheet"}

    def with_sheet(self, sheet: str | os.PathLike | None) -> InputSpec:
        return replace(self, sheet=None if sheet is None else str(sheet))


def from_config(config: dict[str, Any]) -> tuple[InputSpec, str]:
    """(spec, location) of a workflow config: ``input`` and ``raw_dir``."""
    spec = InputSpec.from_dict(config.get("input"))
    return spec, spec.location(config.get("raw_dir"))

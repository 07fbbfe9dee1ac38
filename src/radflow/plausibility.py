"""Segmentation plausibility: is this mask the organ it claims to be, and all of it?

A segmentation model applied to data it does not know (the demo's phantom weights on a real
CT, an abdominal model on a head scan) still returns masks, and masking goes on with them. These
checks, per case and ROI on the image grid, catch that before a classifier trains on it:

* ``volume``: organ volume in mL against the organ's reference range (``qc.plausibility``);
* ``hu``: mean HU inside the organ against its range (a "liver" of fat or bone is not one);
* ``truncated``: the organ's largest cross-section on a face of the field of view, as a share
  of its largest cross-section along that axis (``qc.max_boundary_share``): a scan that ends
  through the middle of the organ shows only part of it;
* ``components``: connected pieces of at least ``qc.min_component_ml`` (``qc.max_components``):
  a fragmented organ is a model that does not know the anatomy.

Pure functions on arrays; ``radflow.mask`` calls them and records the flags.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from scipy import ndimage

from radflow.settings import section

SEVERITIES = ("exclude", "flag")

# Adult reference ranges (screening bounds, wide on purpose: they catch a wrong model or a wrong
# body region, not disease). Volumes from CT volumetry of adults (liver ~1.0-2.5 L, spleen
# ~0.1-0.5 L, kidney ~0.1-0.25 L each, pancreas ~0.05-0.1 L, lung lobes 0.4-2 L) widened for
# organomegaly; HU cover unenhanced to portal-venous phase, steatosis and fatty pancreas.
DEFAULT_RANGES: dict[str, dict[str, list[float]]] = {
    "liver": {"volume_ml": [800, 3000], "hu": [-50, 250]},
    "spleen": {"volume_ml": [40, 1500], "hu": [0, 250]},
    "kidney_left": {"volume_ml": [50, 450], "hu": [0, 350]},
    "kidney_right": {"volume_ml": [50, 450], "hu": [0, 350]},
    "pancreas": {"volume_ml": [20, 250], "hu": [-60, 250]},
    "lung_upper_lobe_left": {"volume_ml": [200, 3500], "hu": [-1000, -500]},
    "lung_lower_lobe_left": {"volume_ml": [200, 3500], "hu": [-1000, -500]},
    "lung_upper_lobe_right": {"volume_ml": [150, 3000], "hu": [-1000, -500]},
    "lung_middle_lobe_right": {"volume_ml": [50, 1500], "hu": [-1000, -500]},
    "lung_lower_lobe_right": {"volume_ml": [200, 3500], "hu": [-1000, -500]},
    "heart": {"volume_ml": [250, 1500], "hu": [0, 300]},
    "gallbladder": {"volume_ml": [5, 200], "hu": [-30, 100]},
}


@dataclass(frozen=True)
class QcSettings:
    """Plausibility settings (config key ``qc``; ``qc.reference`` is the workflow's)."""

    plausibility: Mapping[str, Mapping[str, Sequence[float]]] = field(
        default_factory=lambda: {k: dict(v) for k, v in DEFAULT_RANGES.items()}, hash=False
    )
    max_boundary_share: float = 0.25
    max_components: int = 3
    min_component_ml: float = 1.0
    implausible: str = "exclude"

    @classmethod
    def from_dict(cls, d: Mapping[str, Any] | None) -> QcSettings:
        """Build from a config mapping (unknown keys are an error; ``reference`` is ignored)."""
        d = section(cls, {k: v for k, v in dict(d or {}).items() if k != "reference"}, "qc")
        if d.get("implausible", "exclude") not in SEVERITIES:
            raise ValueError(
                f"qc.implausible must be one of {SEVERITIES}, got {d['implausible']!r}"
            )
        for organ, rng in dict(d.get("plausibility") or {}).items():
            for key, bounds in dict(rng or {}).items():
                if key not in ("volume_ml", "hu"):
                    raise ValueError(f"qc.plausibility.{organ}: unknown key {key!r}")
                if bounds is not None and (len(bounds) != 2 or bounds[0] > bounds[1]):
                    raise ValueError(f"qc.plausibility.{organ}.{key}: want [low, high]")
        if d.get("plausibility") is None and "plausibility" in d:
            d["plausibility"] = {}
        return cls(**d)


@dataclass
class RoiCheck:
    """The measurements and flags of one ROI of one case."""

    roi: str
    volume_ml: float
    mean_hu: float
    boundary_share: float
    components: int
    flags: list[str] = field(default_factory=list)
    reasons: list[str] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        return {
            "roi": self.roi,
            "volume_ml": round(self.volume_ml, 3),
            "mean_hu": None if np.isnan(self.mean_hu) else round(self.mean_hu, 2),
            "boundary_share": round(self.boundary_share, 4),
            "components": self.components,
            "flags": list(self.flags),
        }


def boundary_share(mask: np.ndarray) -> float:
    """Largest share, over the six faces of the volume, of the mask's cross-section on the face
    relative to its largest cross-section along that axis (0: touches no face; 1: cut at its
    widest)."""
    if not mask.any():
        return 0.0
    best = 0.0
    for axis in range(mask.ndim):
        other = tuple(a for a in range(mask.ndim) if a != axis)
        areas = mask.sum(axis=other)
        top = float(areas.max())
        best = max(best, float(areas[0]) / top, float(areas[-1]) / top)
    return best


def components(mask: np.ndarray, voxel_ml: float, min_ml: float) -> int:
    """26-connected components of at least ``min_ml`` mL."""
    labels, n = ndimage.label(mask, structure=np.ones((3, 3, 3), dtype=bool))
    if n == 0:
        return 0
    sizes = np.bincount(labels.ravel())[1:] * voxel_ml
    return int((sizes >= min_ml).sum())


def _outside(value: float, bounds: Sequence[float] | None) -> str:
    if bounds is None or np.isnan(value):
        return ""
    if value < bounds[0]:
        return "low"
    if value > bounds[1]:
        return "high"
    return ""


def check_roi(
    roi: str, mask: np.ndarray, image: np.ndarray, voxel_ml: float, settings: QcSettings
) -> RoiCheck:
    """Measure one organ's mask against its reference range and the field of view."""
    n = int(mask.sum())
    res = RoiCheck(
        roi=roi,
        volume_ml=n * voxel_ml,
        mean_hu=float(image[mask].mean()) if n else float("nan"),
        boundary_share=boundary_share(mask),
        components=components(mask, voxel_ml, settings.min_component_ml),
    )
    ranges = settings.plausibility.get(roi) or {}
    vol = ranges.get("volume_ml")
    where = _outside(res.volume_ml, vol)
    if where:
        res.flags.append(f"{roi}:volume_{where}")
        res.reasons.append(
            f"{roi} {res.volume_ml:.0f} mL outside qc.plausibility.{roi}.volume_ml "
            f"[{vol[0]:g}, {vol[1]:g}]"
        )
    hu = ranges.get("hu")
    where = _outside(res.mean_hu, hu)
    if where:
        res.flags.append(f"{roi}:hu_{where}")
        res.reasons.append(
            f"{roi} mean {res.mean_hu:.0f} HU outside qc.plausibility.{roi}.hu "
            f"[{hu[0]:g}, {hu[1]:g}]"
        )
    if res.boundary_share > settings.max_boundary_share:
        res.flags.append(f"{roi}:truncated")
        res.reasons.append(
            f"{roi} cut by the field of view ({res.boundary_share:.0%} of its cross-section on "
            f"the edge > qc.max_boundary_share {settings.max_boundary_share:g})"
        )
    if res.components > settings.max_components:
        res.flags.append(f"{roi}:components")
        res.reasons.append(
            f"{roi} in {res.components} pieces of >= {settings.min_component_ml:g} mL "
            f"(> qc.max_components {settings.max_components})"
        )
    return res


def check(
    seg: np.ndarray,
    image: np.ndarray,
    spacing: Sequence[float],
    names: Mapping[int, str],
    rois: Sequence[str],
    settings: QcSettings,
) -> list[RoiCheck]:
    """Every ROI of one case (classes absent from the label map count as empty)."""
    voxel_ml = float(np.prod(spacing)) / 1000.0
    by_name = {n: i for i, n in names.items()}
    out = []
    for roi in rois:
        m = seg == by_name[roi] if roi in by_name else np.zeros(seg.shape, bool)
        out.append(check_roi(roi, m, image, voxel_ml, settings))
    return out


def summary(checks: Sequence[RoiCheck], settings: QcSettings) -> dict[str, Any]:
    """The record of one case: flags, one-line reason, whether it is excluded, and per ROI."""
    flags = [f for c in checks for f in c.flags]
    reasons = [r for c in checks for r in c.reasons]
    return {
        "flags": flags,
        "reason": ("implausible segmentation: " + "; ".join(reasons)) if reasons else "",
        "exclude": bool(flags) and settings.implausible == "exclude",
        "rois": [c.as_dict() for c in checks],
    }

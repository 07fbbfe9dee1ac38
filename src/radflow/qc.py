"""QC: tri-planar pictures with the ROI outline, and segmentation volume/overlap tables."""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from radflow import geometry

WINDOW = (40.0, 400.0)  # abdomen soft-tissue window (level, width)


def centroid_index(mask: np.ndarray) -> tuple[int, int, int]:
    """Voxel index of the mask centroid (volume centre when the mask is empty)."""
    if not mask.any():
        return tuple(int(n // 2) for n in mask.shape)  # type: ignore[return-value]
    return tuple(int(round(v)) for v in np.argwhere(mask).mean(0))  # type: ignore[return-value]


def triplanar_png(
    image: np.ndarray,
    affine: np.ndarray,
    mask: np.ndarray,
    out_path: str | os.PathLike,
    title: str,
    window: tuple[float, float] = WINDOW,
) -> None:
    """Axial, coronal and sagittal slices through the mask centroid with its outline (RAS data)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from radflow.io import atomic_path

    sp = geometry.ras_spacing(affine)
    i, j, k = centroid_index(mask)
    lo, hi = window[0] - window[1] / 2, window[0] + window[1] / 2
    views = [
        ("axial", image[:, :, k].T, mask[:, :, k].T, (sp[0], sp[1])),
        ("coronal", image[:, j, :].T, mask[:, j, :].T, (sp[0], sp[2])),
        ("sagittal", image[i, :, :].T, mask[i, :, :].T, (sp[1], sp[2])),
    ]
    fig, axes = plt.subplots(1, 3, figsize=(12, 4.4), facecolor="black")
    for ax, (name, img, m, (sx, sy)) in zip(axes, views, strict=True):
        h, w = img.shape
        extent = (0, w * sx, 0, h * sy)
        ax.imshow(img, cmap="gray", vmin=lo, vmax=hi, origin="lower", extent=extent)
        if m.any():
            ax.contour(
                m.astype(float),
                levels=[0.5],
                colors="#ffb000",
                linewidths=1.2,
                origin="lower",
                extent=extent,
            )
        radiological(ax, name)
    # radiological convention: patient right on the picture's left, anterior left in sagittal
    fig.suptitle(title, color="white", fontsize=11)
    fig.tight_layout()
    with atomic_path(out_path) as tmp:
        fig.savefig(tmp, format="png", dpi=90, facecolor="black")
    plt.close(fig)


ORIENT = {"axial": ("R", "L"), "coronal": ("R", "L"), "sagittal": ("A", "P")}


def radiological(ax: Any, view: str) -> None:
    """Flip a RAS-extent slice to the radiological convention and letter its sides."""
    ax.invert_xaxis()  # +x is patient right (axial/coronal) or anterior (sagittal)
    left, right = ORIENT[view]
    kw = {"color": "#9fd3ff", "fontsize": 9, "transform": ax.transAxes, "va": "center"}
    ax.text(0.01, 0.5, left, ha="left", **kw)
    ax.text(0.99, 0.5, right, ha="right", **kw)
    ax.set_title(view, color="white", fontsize=10)
    ax.set_axis_off()


def dice_iou(a: np.ndarray, b: np.ndarray) -> tuple[float, float]:
    """Dice and IoU of two binary masks (NaN when both are empty)."""
    a, b = a.astype(bool), b.astype(bool)
    inter = np.logical_and(a, b).sum()
    total = a.sum() + b.sum()
    union = np.logical_or(a, b).sum()
    if total == 0:
        return float("nan"), float("nan")
    return float(2 * inter / total), float(inter / union)


def to_grid(
    labels: np.ndarray, affine: np.ndarray, target_affine: np.ndarray, shape: Sequence[int]
) -> np.ndarray:
    """Nearest-neighbour resampling of a label map onto another grid (world coordinates kept)."""
    from radflow.resampling import resample

    if labels.shape == tuple(shape) and np.allclose(affine, target_affine, atol=1e-4):
        return labels
    out = resample(labels.astype(np.int16), affine, target_affine, tuple(shape), order=0, fill=0)
    return out.astype(labels.dtype)


def segmentation_rows(
    case_id: str,
    seg: np.ndarray,
    affine: np.ndarray,
    names: Mapping[int, str],
    rois: Sequence[str],
    reference: tuple[np.ndarray, np.ndarray, Mapping[int, str]] | None = None,
) -> list[dict[str, Any]]:
    """Per ROI: volume in mL and, when a reference label map is given, Dice and IoU."""
    voxel_ml = float(np.prod(geometry.ras_spacing(affine))) / 1000.0
    by_name = {n: i for i, n in names.items()}
    ref_on_grid, ref_by_name = None, {}
    if reference is not None:
        ref, ref_aff, ref_names = reference
        ref_on_grid = to_grid(ref, ref_aff, affine, seg.shape)
        ref_by_name = {n: i for i, n in ref_names.items()}
    rows = []
    for roi in rois:
        m = seg == by_name[roi] if roi in by_name else np.zeros(seg.shape, bool)
        row: dict[str, Any] = {"case_id": case_id, "roi": roi, "volume_ml": m.sum() * voxel_ml}
        if ref_on_grid is not None and roi in ref_by_name:
            r = ref_on_grid == ref_by_name[roi]
            row["reference_volume_ml"] = r.sum() * voxel_ml
            row["dice"], row["iou"] = dice_iou(m, r)
        else:
            row["reference_volume_ml"] = row["dice"] = row["iou"] = float("nan")
        rows.append(row)
    return rows


SEG_QC_COLUMNS = [
    "case_id",
    "roi",
    "volume_ml",
    "reference_volume_ml",
    "dice",
    "iou",
    "mean_hu",
    "boundary_share",
    "components",
    "flags",
]


def write_seg_qc(rows: list[dict[str, Any]], path: str | os.PathLike) -> None:
    """One case's per-ROI segmentation table (a failed case: the header alone)."""
    import pandas as pd

    from radflow.io import write_table

    write_table(pd.DataFrame(rows, columns=SEG_QC_COLUMNS), path)


def concat_seg_qc(inputs: Sequence[str | os.PathLike], out: str | os.PathLike) -> Any:
    """The cohort's segmentation table from the per-case ones; returns it."""
    import pandas as pd

    from radflow.io import write_table

    frames = [pd.read_csv(p) for p in inputs]
    frames = [f for f in frames if len(f)]
    df = pd.concat(frames, ignore_index=True) if frames else pd.DataFrame(columns=SEG_QC_COLUMNS)
    write_table(df, out)
    return df


def failure_png(out_path: str | os.PathLike, text: str) -> None:
    """The QC picture of a case that failed before masking: the reason, in words."""
    import textwrap

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from radflow.io import atomic_path

    fig = plt.figure(figsize=(12, 4.4), facecolor="black")
    fig.text(
        0.5, 0.5, "\n".join(textwrap.wrap(text, 90)), color="#ff8080", ha="center", va="center"
    )
    with atomic_path(out_path) as tmp:
        fig.savefig(tmp, format="png", dpi=90, facecolor="black")
    plt.close(fig)

"""mask: ROI union, dilation in mm, background fill, organ crop and fixed-size resampling.

"Find the organ first, then look closely": the segmentation picks the region, the crop follows
it with a margin, and the crop is resampled (aspect ratio kept, isotropic voxels) to a fixed
``size`` for the classifier. Every output keeps world coordinates: the affine follows the crop.

A case whose ROI is empty or implausibly small is not a crash: ``mask`` still writes its
outputs and a status JSON with ``usable: false`` and the reason, which the manifest reads.
"""

from __future__ import annotations

import difflib
import os
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
from scipy import ndimage

from radflow import geometry, paths, plausibility, status
from radflow.ids import case_keys_reader, fill_template
from radflow.io import save_nifti, write_json
from radflow.resampling import resample
from radflow.settings import section


@dataclass(frozen=True)
class MaskSettings:
    """Masking settings (config key ``mask``)."""

    rois: tuple[str, ...] = ("liver",)
    dilation_mm: float = 0.0
    background_hu: float = -1024.0
    crop: bool = True
    margin_mm: float = 10.0
    size: tuple[int, int, int] | None = (64, 64, 64)
    min_roi_ml: float = 5.0
    largest_component: bool = True
    fill_holes: bool = True
    enabled: bool = True
    fill_background: bool = True

    @classmethod
    def from_dict(cls, d: Mapping[str, Any] | None) -> MaskSettings:
        """Build from a config mapping (unknown keys are an error)."""
        d = section(cls, d, "mask", ("rois",))
        if d.get("size") is not None:
            d["size"] = tuple(int(v) for v in d["size"])
        return cls(**d)


def validate_roi_names(rois: Iterable[str], known: Iterable[str]) -> None:
    """Raise a clear error for ROI names that are not classes, listing close matches."""
    known = list(known)
    problems = []
    for roi in rois:
        if roi not in known:
            close = difflib.get_close_matches(roi, known, n=4, cutoff=0.5)
            hint = f" (did you mean {', '.join(close)}?)" if close else ""
            problems.append(f"{roi!r}{hint}")
    if problems:
        raise ValueError(
            f"unknown ROI name(s) {'; '.join(problems)}: mask.rois must be TotalSegmentator "
            "class names of the configured task"
        )


def roi_mask(seg: np.ndarray, names: Mapping[int, str], rois: Sequence[str]) -> np.ndarray:
    """Union of the labels named ``rois`` in a multilabel map."""
    validate_roi_names(rois, names.values())
    ids = [i for i, n in names.items() if n in set(rois)]
    return np.isin(seg, ids)


def dilate_mm(mask: np.ndarray, spacing: Sequence[float], mm: float) -> np.ndarray:
    """Dilate a binary mask by ``mm`` millimetres (Euclidean, honouring anisotropic voxels)."""
    if mm <= 0 or not mask.any():
        return mask.copy()
    pad = [int(np.ceil(mm / s)) + 1 for s in spacing]
    lo, hi = bbox(mask)
    lo = [max(0, a - p) for a, p in zip(lo, pad, strict=True)]
    hi = [min(n, b + p) for b, p, n in zip(hi, pad, mask.shape, strict=True)]
    sl = tuple(slice(a, b) for a, b in zip(lo, hi, strict=True))
    dist = ndimage.distance_transform_edt(~mask[sl], sampling=spacing)
    out = np.zeros_like(mask)
    out[sl] = dist <= mm + 1e-6
    return out


def largest_component(mask: np.ndarray) -> np.ndarray:
    """The largest 26-connected component (stray islands would stretch the crop)."""
    labels, n = ndimage.label(mask, structure=np.ones((3, 3, 3), dtype=bool))
    if n <= 1:
        return mask
    sizes = np.bincount(labels.ravel())
    sizes[0] = 0
    return labels == int(np.argmax(sizes))


def bbox(mask: np.ndarray) -> tuple[list[int], list[int]]:
    """Inclusive-exclusive bounding box (lo, hi) of the True voxels."""
    idx = np.argwhere(mask)
    return idx.min(0).tolist(), (idx.max(0) + 1).tolist()


def crop_box(
    mask: np.ndarray, spacing: Sequence[float], margin_mm: float
) -> tuple[list[int], list[int]]:
    """Bounding box of ``mask`` grown by ``margin_mm`` on every side, clipped to the volume."""
    lo, hi = bbox(mask)
    m = [int(np.ceil(margin_mm / s)) for s in spacing]
    lo = [max(0, a - p) for a, p in zip(lo, m, strict=True)]
    hi = [min(n, b + p) for b, p, n in zip(hi, m, mask.shape, strict=True)]
    return lo, hi


def shifted_affine(affine: np.ndarray, offset: Sequence[int]) -> np.ndarray:
    """Affine of a sub-volume starting at voxel ``offset`` of the parent grid."""
    out = affine.copy()
    out[:3, 3] = geometry.voxel_to_world(affine, np.asarray(offset, dtype=float))
    return out


def fit_grid(
    affine: np.ndarray, shape: Sequence[int], size: Sequence[int]
) -> tuple[np.ndarray, tuple[int, int, int]]:
    """Isotropic axis-aligned grid of ``size`` voxels centred on a box, the box fitting inside.

    The voxel size is the largest extent/size ratio, so the aspect ratio is kept and the shorter
    axes are padded.
    """
    spacing = geometry.ras_spacing(affine)
    size_f = np.asarray(size, dtype=float)
    s = float(np.max(spacing * np.asarray(shape, dtype=float) / size_f))
    centre = geometry.voxel_to_world(affine, (np.asarray(shape, dtype=float) - 1) / 2)
    out = np.eye(4)
    out[:3, :3] = affine[:3, :3] / spacing * s  # same axis directions, voxel size s
    out[:3, 3] = centre - out[:3, :3] @ ((size_f - 1) / 2)
    return out, (int(size[0]), int(size[1]), int(size[2]))


@dataclass
class MaskResult:
    """What ``apply_mask`` produced and decided."""

    masked: np.ndarray
    roi: np.ndarray
    affine: np.ndarray
    usable: bool
    reason: str
    roi_ml: float
    bbox_vox: list[list[int]] | None
    roi_on_input: np.ndarray  # the ROI used, on the input grid (for QC pictures)


def apply_mask(
    image: np.ndarray,
    affine: np.ndarray,
    seg: np.ndarray,
    names: Mapping[int, str],
    settings: MaskSettings,
    threads: int = 1,
) -> MaskResult:
    """Mask (and crop/resample) one image with its label map; pure (no file I/O)."""
    if image.shape != seg.shape:
        raise ValueError(f"image shape {image.shape} != label map shape {seg.shape}")
    spacing = geometry.ras_spacing(affine)
    roi = roi_mask(seg, names, settings.rois)
    if settings.largest_component:
        roi = largest_component(roi)
    if settings.fill_holes:  # organ models leave focal lesions out: keep them in the ROI
        roi = ndimage.binary_fill_holes(roi)
    roi_ml = float(roi.sum() * np.prod(spacing) / 1000.0)
    usable, reason = True, ""
    if roi_ml < settings.min_roi_ml:
        usable = False
        reason = (
            f"ROI {'+'.join(settings.rois)} is "
            + ("empty" if roi_ml == 0 else f"{roi_ml:.1f} mL")
            + f" (< mask.min_roi_ml {settings.min_roi_ml:g} mL)"
        )
    keep = dilate_mm(roi, spacing, settings.dilation_mm)
    if settings.fill_background:
        masked = np.where(keep, image, image.dtype.type(settings.background_hu)).astype(image.dtype)
    else:  # the ablation's "unmasked" input: the same crop, the CT around the organ kept
        masked = image.copy()
    out_aff, box = affine, None
    if settings.crop and keep.any():
        lo, hi = crop_box(keep, spacing, settings.margin_mm)
        sl = tuple(slice(a, b) for a, b in zip(lo, hi, strict=True))
        masked, keep = masked[sl], keep[sl]
        out_aff, box = shifted_affine(affine, lo), [lo, hi]
    masked, keep, out_aff = to_size(masked, keep, out_aff, settings, threads)
    return MaskResult(masked, keep.astype(np.uint8), out_aff, usable, reason, roi_ml, box, roi)


def to_size(
    volume: np.ndarray,
    keep: np.ndarray,
    affine: np.ndarray,
    settings: MaskSettings,
    threads: int = 1,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The volume (linear, filled with ``background_hu``, its own dtype) and its mask (nearest)
    resampled onto the isotropic ``mask.size`` grid that holds them; as they are when size is
    None."""
    if settings.size is None:
        return volume, keep, affine
    grid_aff, grid_shape = fit_grid(affine, volume.shape, settings.size)
    fill, dtype = settings.background_hu, volume.dtype
    volume = resample(volume, affine, grid_aff, grid_shape, 1, fill, threads, dtype=dtype)
    keep = resample(keep.astype(np.int16), affine, grid_aff, grid_shape, 0, 0, threads) > 0
    return volume, keep, grid_aff


def whole_volume(
    image: np.ndarray, affine: np.ndarray, settings: MaskSettings, threads: int = 1
) -> MaskResult:
    """``mask.enabled: false``: the whole volume, resampled to ``size``; pure (no file I/O).

    The ROI written beside it is the field of view: 1 where the volume has data, 0 in the
    padding of the isotropic grid (so ``roi_ml`` is the volume covered, not an organ).
    """
    fov = np.ones(image.shape, dtype=bool)
    fov_ml = float(image.size * np.prod(geometry.ras_spacing(affine)) / 1000.0)
    masked, keep, out_aff = to_size(image.copy(), fov, affine, settings, threads)
    return MaskResult(masked, keep.astype(np.uint8), out_aff, True, "", fov_ml, None, fov)


def load_names(path: str | os.PathLike) -> dict[int, str]:
    """Label id -> class name from a segment JSON record."""
    import json

    raw = json.loads(Path(path).read_text())
    labels = raw.get("labels", raw)
    return {int(k): str(v) for k, v in labels.items()}


def mask(
    image_path: str | os.PathLike,
    seg_path: str | os.PathLike | None,
    out_path: str | os.PathLike,
    settings: MaskSettings,
    roi_path: str | os.PathLike,
    status_path: str | os.PathLike,
    names_path: str | os.PathLike | None = None,
    threads: int = 1,
    qc_png: str | os.PathLike | None = None,
    seg_qc: str | os.PathLike | None = None,
    reference: str | os.PathLike | None = None,
    reference_names: str | os.PathLike | None = None,
    case_id: str = "",
    upstream: Sequence[str | os.PathLike] = (),
    qc: plausibility.QcSettings | None = None,
) -> dict[str, Any]:
    """Mask one case from files: masked volume, ROI mask, status JSON and optionally its QC.

    ``qc_png``: tri-planar picture with the ROI outline; ``seg_qc``: per-ROI volume table with
    Dice/IoU against ``reference`` when one is given. ``upstream``: the case's records of
    earlier stages (convert sidecar, label map JSON); when one says the case failed there, the
    status carries that failure over, the QC picture says so, and no volume is written.
    ``qc``: the plausibility checks (``radflow.plausibility``; defaults when None): their flags
    go to the status, the table and the picture, and with ``qc.implausible: exclude`` an
    implausible case is not usable (reason code IMPLAUSIBLE).
    ``seg_path`` None (``segment.backend: none``) needs ``settings.enabled`` false: the whole
    volume is the input (``whole_volume``).
    """
    qc = qc or plausibility.QcSettings()
    if seg_path is None and settings.enabled:
        raise ValueError(
            "no label map to mask with: mask.enabled true needs a segmentation "
            "(segment.backend none: set mask.enabled false)"
        )
    names_path = names_path or (paths.sidecar_of(seg_path) if seg_path is not None else None)
    records = (*upstream, names_path) if names_path is not None else tuple(upstream)
    for rec in records:
        failed = status.read_upstream(rec, "segment") if Path(rec).exists() else None
        if failed is not None:
            return _carry_failure(
                failed, settings, out_path, roi_path, status_path, qc_png, seg_qc, case_id
            )
    try:
        img = nib.load(str(image_path))
        # int16 HU (CT) stays int16; a float volume (MR/other from a NIfTI sheet) stays float32
        raw = np.asanyarray(img.dataobj)
        kind = np.int16 if np.issubdtype(raw.dtype, np.integer) else np.float32
        image = raw.astype(kind, copy=False)
        seg, names = None, {}
        if seg_path is not None:
            seg_img = nib.load(str(seg_path))
            if not np.allclose(img.affine, seg_img.affine, atol=1e-3):
                raise ValueError("the label map is not on the image grid (affines differ)")
            names = load_names(names_path)
            seg = np.asanyarray(seg_img.dataobj).astype(np.uint8, copy=False)
        if settings.enabled:
            res = apply_mask(image, img.affine, seg, names, settings, threads)
        else:
            res = whole_volume(image, img.affine, settings, threads)
        spacing = geometry.ras_spacing(img.affine)
        checks = (
            [] if seg is None else plausibility.check(seg, image, spacing, names, settings.rois, qc)
        )
    except Exception as exc:  # noqa: BLE001 - a corrupt volume fails this case alone
        if status.is_environmental(exc):
            raise  # the machine's trouble, not the case's: the job fails and a rerun retries
        failed = status.failure("mask", exc)
        return _carry_failure(
            failed, settings, out_path, roi_path, status_path, qc_png, seg_qc, case_id
        )
    plaus = plausibility.summary(checks, qc)
    usable, reason, code = res.usable, res.reason, "" if res.usable else "ROI"
    if usable and plaus["exclude"]:
        usable, reason, code = False, plaus["reason"], "IMPLAUSIBLE"
    save_nifti(res.masked, res.affine, out_path, threads=threads)
    save_nifti(res.roi, res.affine, roi_path, threads=threads)
    record = {
        "status": status.OK,
        "stage": "mask",
        "usable": usable,
        "reason_code": code,
        "reason": reason,
        "flags": plaus["flags"],
        "plausibility": plaus["rois"],
        "segmented": seg is not None,
        "roi_ml": round(res.roi_ml, 3),
        "rois": list(settings.rois) if settings.enabled else [],
        "crop_bbox_vox": res.bbox_vox,
        "shape": list(res.masked.shape),
        "spacing_mm": [round(float(v), 6) for v in geometry.ras_spacing(res.affine)],
        "affine": np.round(res.affine, 6).tolist(),
        "settings": asdict(settings),
        "qc_settings": asdict(qc),
    }
    if qc_png is not None:
        from radflow.qc import triplanar_png

        what = "+".join(settings.rois) if settings.enabled else "whole volume (no mask)"
        title = f"{case_id}   {what} {res.roi_ml:.1f} mL"
        if not usable:
            title += f"   EXCLUDED: {reason}"
        elif plaus["flags"]:
            title += f"   FLAGGED: {', '.join(plaus['flags'])}"
        triplanar_png(image, img.affine, res.roi_on_input, qc_png, title)
    if seg_qc is not None:
        from radflow.qc import segmentation_rows, write_seg_qc

        ref = None
        if reference is not None and seg is not None:
            r = nib.load(str(reference))
            ref_names = load_names(reference_names or paths.sidecar_of(reference))
            ref = (np.asanyarray(r.dataobj), r.affine, ref_names)
        rows = (
            []
            if seg is None
            else segmentation_rows(case_id, seg, img.affine, names, settings.rois, ref)
        )
        write_seg_qc(with_checks(rows, checks), seg_qc)
    write_json(status_path, record)  # last: the job's record says the outputs are complete
    return record


def with_checks(
    rows: list[dict[str, Any]], checks: Sequence[plausibility.RoiCheck]
) -> list[dict[str, Any]]:
    """The segmentation table's rows with each ROI's plausibility measurements and flags."""
    by_roi = {c.roi: c.as_dict() for c in checks}
    out = []
    for row in rows:
        c = by_roi.get(row["roi"], {})
        out.append(
            {
                **row,
                "mean_hu": c.get("mean_hu"),
                "boundary_share": c.get("boundary_share"),
                "components": c.get("components"),
                "flags": ";".join(c.get("flags", [])),
            }
        )
    return out


def _carry_failure(
    failed: dict[str, Any],
    settings: MaskSettings,
    out_path: str | os.PathLike,
    roi_path: str | os.PathLike,
    status_path: str | os.PathLike,
    qc_png: str | os.PathLike | None,
    seg_qc: str | os.PathLike | None,
    case_id: str,
) -> dict[str, Any]:
    """Status, QC picture and table of a case that failed before masking."""
    from radflow.qc import failure_png, write_seg_qc

    status.remove_stale(out_path, roi_path)
    record = {**failed, "usable": False, "rois": list(settings.rois), "settings": asdict(settings)}
    if qc_png is not None:
        failure_png(qc_png, f"{case_id}   {failed['stage']} failed: {failed['reason']}")
    if seg_qc is not None:
        write_seg_qc([], seg_qc)
    write_json(status_path, record)
    return record


def reference_for(
    case_id: str, template: str | None, id_map: str | os.PathLike | None
) -> Path | None:
    """A case's reference label map from ``qc.reference``'s template (None when absent)."""
    if not template:
        return None
    path = Path(fill_template(template, case_keys_reader(id_map)(case_id)))
    return path if path.exists() else None

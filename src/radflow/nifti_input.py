"""NIfTI volumes as cohort input: per-volume checks (ingest) and conversion (convert).

``check_image`` looks at a header only (dimensions, orientation codes, affine) and says why a
volume cannot be used, in one line; ``index_sheet`` turns a validated cohort sheet into the
same file and series tables DICOM ingest makes, so everything after ingest sees one shape of
case. ``convert_nifti`` reads one volume, refuses non-finite voxels and (CT) values that are not
HU, reorients to RAS+ with nibabel's orientation tools, resamples with radflow's resampler (the
code DICOM conversion uses, settings ``convert.spacing_mm``/``interpolation``) and writes the
volume (CT: int16 HU; MR/other: float32) with a sidecar. The source's text fields (descrip,
aux_file, intent_name, db_name) can hold identifiers: they are never read into any output.
"""

from __future__ import annotations

import os
import platform
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
import pandas as pd
import scipy

import radflow
from radflow import dicomsafe, geometry
from radflow.io import save_nifti, sha256_file, write_json
from radflow.resampling import resample
from radflow.source import InputSpec
from radflow.status import CaseFailedError

MIN_EXTENT = 3  # voxels along each spatial axis (convert.MIN_SLICES for DICOM)
SHEAR_TOL_DEG = 0.1  # voxel axes further from perpendicular than this are a shear
MR_FILL = 0.0  # MR/other: outside the source volume after resampling


class VolumeRefusedError(CaseFailedError, ValueError):
    """A NIfTI volume that cannot be used; ``code`` is machine-readable, the text one line."""


@dataclass(frozen=True)
class VolumeInfo:
    """What a header says about the volume to convert."""

    shape: tuple[int, int, int]
    zooms: tuple[float, float, float]
    affine: np.ndarray  # nibabel's choice: sform when its code > 0, else qform
    volume_index: int | None  # the volume taken from a 4-D file
    flags: tuple[str, ...]


def load(path: str | os.PathLike) -> nib.Nifti1Image:
    """A NIfTI-1/2 image (header read, voxels not yet); a clear refusal when it is not one."""
    p = Path(path)
    if not p.exists():
        raise VolumeRefusedError("NIFTI_MISSING", "image file listed in the sheet does not exist")
    if not p.is_file():
        raise VolumeRefusedError("NIFTI_MISSING", "image path in the sheet is not a file")
    try:
        img = nib.load(str(p))
    except Exception as exc:  # noqa: BLE001 - any unreadable file is this volume's reason
        msg = dicomsafe.scrub(f"{type(exc).__name__}: {exc}", str(p))
        raise VolumeRefusedError("NIFTI_UNREADABLE", f"not a readable NIfTI ({msg})") from None
    if not isinstance(img, nib.Nifti1Image | nib.Nifti2Image):
        raise VolumeRefusedError("NIFTI_UNREADABLE", f"not a NIfTI image ({type(img).__name__})")
    return img


def _angles(m: np.ndarray) -> float:
    """Largest departure from 90 degrees between two voxel axes (columns of ``m``), degrees."""
    u = m / np.linalg.norm(m, axis=0)
    worst = 0.0
    for i in range(3):
        for j in range(i + 1, 3):
            cos = float(np.clip(abs(u[:, i] @ u[:, j]), 0.0, 1.0))
            worst = max(worst, 90.0 - float(np.degrees(np.arccos(cos))))
    return worst


def check_image(
    img: nib.Nifti1Image,
    volume_index: int | None = None,
    max_image_mb: float = dicomsafe.DEFAULT_MAX_IMAGE_MB,
) -> VolumeInfo:
    """The volume's geometry, or ``VolumeRefusedError`` saying in one line why it is unusable:
    2-D or too thin, 4-D without ``volume_index`` (or beyond it), 5-D and more, no spatial
    code (qform and sform codes 0), a singular or non-finite affine, a shear, a data type that
    is not a scalar, or a volume over the memory budget. Only the header is read."""
    hdr = img.header
    shape = tuple(int(v) for v in img.shape)
    flags: list[str] = []
    picked = None
    if len(shape) < 3:
        raise VolumeRefusedError("NIFTI_2D", f"2-D image (shape {shape}): a volume needs 3 axes")
    extra = shape[3:]
    if len(extra) > 1 and int(np.prod(extra[1:])) > 1:
        raise VolumeRefusedError(
            "NIFTI_5D", f"{len(shape)}-D image (shape {shape}): only 3-D or 4-D volumes are read"
        )
    if extra and extra[0] > 1:
        if volume_index is None:
            raise VolumeRefusedError(
                "NIFTI_4D",
                f"4-D image with {extra[0]} volumes (shape {shape}); set input.volume_index "
                "to take one",
            )
        if volume_index >= extra[0]:
            raise VolumeRefusedError(
                "NIFTI_4D",
                f"input.volume_index {volume_index} but the 4-D image has {extra[0]} volumes",
            )
        picked = volume_index
        flags.append(f"volume_{volume_index}_of_{extra[0]}")
    spatial = shape[:3]
    if min(spatial) < MIN_EXTENT:
        raise VolumeRefusedError(
            "NIFTI_2D",
            f"shape {spatial}: {min(spatial)} voxel(s) along an axis, a volume needs at least "
            f"{MIN_EXTENT} (a 2-D image or a single slice)",
        )
    dtype = hdr.get_data_dtype()
    if dtype.names is not None or dtype.kind not in "iuf":
        raise VolumeRefusedError(
            "NIFTI_DTYPE", f"data type {dtype} is not a scalar integer or float type"
        )
    q_code, s_code = int(hdr["qform_code"]), int(hdr["sform_code"])
    if q_code == 0 and s_code == 0:
        raise VolumeRefusedError(
            "NIFTI_NO_ORIENTATION",
            "qform_code and sform_code are both 0: the orientation in space is unknown",
        )
    affine = np.asarray(img.affine, dtype=float)
    m = affine[:3, :3]
    if not np.isfinite(affine).all() or abs(np.linalg.det(m)) < 1e-6:
        raise VolumeRefusedError(
            "NIFTI_SINGULAR_AFFINE",
            "the voxel-to-world affine is singular or not finite (a zero or NaN voxel size?)",
        )
    shear = _angles(m)
    if shear > SHEAR_TOL_DEG:
        raise VolumeRefusedError(
            "NIFTI_SHEAR",
            f"the affine shears the voxel axes by {shear:.2f} deg (non-perpendicular axes: "
            "correct the tilt when exporting)",
        )
    if q_code > 0 and s_code > 0:
        q = np.asarray(hdr.get_qform(), dtype=float)
        if not np.allclose(q, affine, atol=1e-3):
            flags.append("qform_sform_differ")  # nibabel (and radflow) use the sform
    # the chosen volume as read (scaled data comes as float: at least 4 bytes a voxel)
    scaled = hdr.get_slope_inter() != (None, None) and hdr.get_slope_inter() != (1.0, 0.0)
    itemsize = max(dtype.itemsize, 4 if scaled else 2)
    over = dicomsafe.too_large(int(np.prod(spatial)) * itemsize, max_image_mb, "volume data")
    if over:
        raise VolumeRefusedError("TOO_LARGE", f"the volume {over}; refused before reading")
    zooms = tuple(float(v) for v in np.linalg.norm(m, axis=0))
    return VolumeInfo(spatial, zooms, affine, picked, tuple(flags))


# --------------------------------------------------------------------------- ingest


def _inventory_row(info: VolumeInfo | None, modality: str) -> dict[str, Any]:
    """The inventory's descriptive columns for one volume (NaN where NIfTI has no answer)."""
    nan = float("nan")
    row: dict[str, Any] = {
        "series_number": nan,
        "modality": modality,
        "image_type": "",
        "description": "",  # a file name can hold a name: never copied
        "kernel": "",
        "kernel_class": "",
        "manufacturer": "",
        "model": "",
        "n_instances": 0,
        "n_bad_files": 0,
        "n_frames": 0,
        "slice_thickness_mm": nan,
        "pixel_spacing_row_mm": nan,
        "pixel_spacing_col_mm": nan,
        "rows": nan,
        "cols": nan,
        "orientation": "",
        "obliquity_deg": nan,
        "gantry_tilt_deg": 0.0,
        "slice_spacing_mm": nan,
        "slice_spacing_uniform": True,
        "missing_slices": 0,
        "irregular_spacing": False,
        "duplicate_positions": 0,
        "instance_order": "",
        "transfer_syntax": "nifti",
        "rescale_intercept": "",
        "sop_class_uid": "",
        "has_pixels": False,
        "consistent_geometry": True,
        "too_large": "",
        "duplicate_copies": 0,
        "duplicate_conflicts": 0,
    }
    if info is None:
        return row
    ornt = nib.orientations.io_orientation(info.affine)
    u = info.affine[:3, :3] / np.linalg.norm(info.affine[:3, :3], axis=0)
    oblique = max(
        float(np.degrees(np.arccos(np.clip(np.abs(u[:, i]).max(), 0, 1)))) for i in range(3)
    )
    row.update(
        n_instances=1,
        n_frames=info.shape[2],
        pixel_spacing_row_mm=info.zooms[1],
        pixel_spacing_col_mm=info.zooms[0],
        slice_spacing_mm=info.zooms[2],
        rows=info.shape[1],
        cols=info.shape[0],
        orientation=geometry._AXES[int(ornt[2, 0])] if oblique <= 20 else "oblique",
        obliquity_deg=round(oblique, 3),
        has_pixels=True,
    )
    return row


def index_sheet(
    sheet: pd.DataFrame, spec: InputSpec, max_image_mb: float = dicomsafe.DEFAULT_MAX_IMAGE_MB
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(files, series) of a validated cohort sheet (``radflow.sheet.read_sheet``), in the form
    DICOM ingest makes them: ``files`` (path, error, SeriesInstanceUID) lists each volume and
    why it is unusable, ``series`` has one row per volume with the raw keys (PatientID = the
    sheet's subject_id, StudyInstanceUID = its study_id, else the volume's own), selection,
    reason, label and the private ``image``/``mask`` paths. Every usable volume is a case."""
    files, rows = [], []
    for r in sheet.itertuples():
        series_uid = f"nifti:{Path(r.image).as_posix()}"
        study_uid = f"nifti-study:{r.study_id}" if r.study_id else f"nifti-study:{series_uid}"
        try:
            info = check_image(load(r.image_path), spec.volume_index, max_image_mb)
            code, reason = (
                "SELECTED",
                (
                    f"selected: NIfTI volume {'x'.join(map(str, info.shape))}, "
                    f"{'x'.join(f'{z:g}' for z in info.zooms)} mm"
                ),
            )
        except VolumeRefusedError as exc:
            info, code, reason = None, exc.code, exc.reason
        files.append(
            {
                "path": r.image_path,
                "error": "" if info is not None else f"{code}: {reason}",
                "SeriesInstanceUID": series_uid,
                "StudyInstanceUID": study_uid,
                "study_key": study_uid,
                "series_key": series_uid,
                "kind": "nifti",
                "duplicate": "",
            }
        )
        rows.append(
            {
                "PatientID": r.subject_id,
                "PatientName": "",
                "AccessionNumber": "",
                "StudyInstanceUID": study_uid,
                "SeriesInstanceUID": series_uid,
                "study_key": study_uid,
                "series_key": series_uid,
                "image": r.image_path,
                "mask": r.mask_path,
                "split": r.split,
                "selected": info is not None,
                "reason_code": code,
                "reason": reason,
                "label": r.label,
                "source_flags": ";".join(info.flags) if info is not None else "",
                **_inventory_row(info, spec.modality),
            }
        )
    series = pd.DataFrame(rows)
    series["label"] = pd.array(series["label"], dtype="Int64")
    # no label anywhere in the sheet: unknown (NA), as for DICOM without a labels sheet
    labelled = series["label"].notna()
    series["has_label"] = pd.array(labelled if labelled.any() else [pd.NA] * len(series), "boolean")
    return pd.DataFrame(files), series


# --------------------------------------------------------------------------- convert


def hu_check(values: np.ndarray) -> tuple[str, list[str]]:
    """Why a CT volume's values are not HU ("" when they look like HU), and QC flags.

    HU put air near -1000 and soft tissue near 0-100. Values within [-1, 2] are intensity-
    normalised data; values that never go below 0 are stored values without their rescale
    (HU + 1024 when air sits near 0 and soft tissue near 1000-1100). A volume with no air at
    all may be cropped to the body: flagged, not refused.
    """
    v = values[np.isfinite(values)] if values.dtype.kind == "f" else values
    lo, hi = float(v.min()), float(v.max())
    flags = []
    if lo >= -1.0 and hi <= 2.0:
        return (
            f"values span [{lo:.3g}, {hi:.3g}]: intensity-normalised data ([0, 1] or z-scores), "
            "not HU; give the original CT or set input.modality other",
            flags,
        )
    if lo >= 0:
        air = float(np.mean(v <= 100))
        soft = float(np.mean((v >= 900) & (v <= 1200)))
        cause = (
            "stored values with +1024 offset (air at 0, soft tissue near 1024): the rescale "
            "intercept (scl_inter -1024) is missing"
            if air > 0.05 and soft > 0.05
            else "0-based stored values (no negative HU): the rescale slope/intercept is missing"
        )
        return f"values span [{lo:.6g}, {hi:.6g}], nothing below 0: {cause}", flags
    if lo > -500:
        flags.append("no_air_below_-500hu")  # cropped to the body, or not CT
    if float(np.mean((v >= -200) & (v <= 300))) < 0.01:
        flags.append("little_soft_tissue")
    return "", flags


def _volume(img: nib.Nifti1Image, info: VolumeInfo) -> np.ndarray:
    """The voxels of the chosen volume, scaled by scl_slope/scl_inter (as nibabel applies)."""
    if info.volume_index is not None:
        return np.asanyarray(img.dataobj[..., info.volume_index])
    data = np.asanyarray(img.dataobj)
    return data.reshape(data.shape[:3])


def convert_nifti(
    image_path: str | os.PathLike,
    out_path: str | os.PathLike,
    settings: Any,
    spec: InputSpec,
    sidecar_path: str | os.PathLike,
    case_id: str = "",
    series_id: str = "",
    threads: int = 1,
    max_image_mb: float = dicomsafe.DEFAULT_MAX_IMAGE_MB,
) -> dict[str, Any]:
    """Convert one NIfTI volume (``settings``: convert.ConvertSettings); returns the sidecar.

    Raises ``VolumeRefusedError`` for a volume that cannot be used (header problems as at
    ingest, non-finite voxels, CT values that are not HU).
    """
    from radflow.convert import check_grid, target_grid

    t0 = time.perf_counter()
    img = load(image_path)
    info = check_image(img, spec.volume_index, max_image_mb)
    data = _volume(img, info)
    if data.dtype.kind == "f":
        bad = int(np.count_nonzero(~np.isfinite(data)))
        if bad:
            raise VolumeRefusedError(
                "NIFTI_NOT_FINITE",
                f"{bad} of {data.size} voxels are NaN or infinite ({100 * bad / data.size:.3g}%)",
            )
    ornt = nib.orientations.io_orientation(info.affine)
    data = nib.orientations.apply_orientation(data, ornt)
    affine = info.affine @ nib.orientations.inv_ornt_aff(ornt, info.shape)
    flags = list(info.flags)
    if spec.modality == "CT":
        why, hu_flags = hu_check(data)
        if why:
            raise VolumeRefusedError("NOT_HU", why)
        flags += hu_flags
        lo, hi = settings.hu_clip if settings.hu_clip is not None else (-32768, 32767)
        if data.dtype.kind == "f":
            data = np.rint(data)
        vol = np.clip(data, max(lo, -32768), min(hi, 32767)).astype(np.int16)
        dtype, fill = np.int16, settings.fill_hu
    else:
        vol, dtype, fill = data.astype(np.float32), np.float32, MR_FILL
    vol = np.asfortranarray(vol)
    src_shape, src_affine = vol.shape, affine
    grid = target_grid(affine, vol.shape, settings, not geometry.is_axis_aligned(affine))
    order = 3 if settings.interpolation == "cubic" else 1
    if grid is not None:
        check_grid(grid[1], max_image_mb, "resampled volume")
        vol = resample(vol, affine, grid[0], grid[1], order, fill, threads, dtype=dtype)
        affine = grid[0]
    save_nifti(vol, affine, out_path, threads=threads)
    sidecar = _sidecar(
        img, info, image_path, vol, affine, src_shape, src_affine, grid is not None, order,
        settings, spec, flags, case_id, series_id,
    )  # fmt: skip
    sidecar["qc"]["seconds"] = round(time.perf_counter() - t0, 3)
    write_json(sidecar_path, sidecar)
    return sidecar


def _source(img: nib.Nifti1Image, info: VolumeInfo, path: str | os.PathLike) -> dict[str, Any]:
    """The source's hash and geometry: numbers and codes only, never its text fields."""
    hdr = img.header
    slope, inter = hdr.get_slope_inter()
    return {
        "format": "nifti",
        "sha256": sha256_file(path),
        "shape": [int(v) for v in img.shape],
        "volume_index": info.volume_index,
        "zooms": [round(float(v), 6) for v in hdr.get_zooms()],
        "affine": np.round(info.affine, 6).tolist(),
        "orientation": "".join(nib.aff2axcodes(info.affine)),
        "qform_code": int(hdr["qform_code"]),
        "sform_code": int(hdr["sform_code"]),
        "qform": np.round(hdr.get_qform(), 6).tolist(),
        "sform": np.round(hdr.get_sform(), 6).tolist(),
        "datatype": str(hdr.get_data_dtype()),
        "scl_slope": None if slope is None else float(slope),
        "scl_inter": None if inter is None else float(inter),
        "xyzt_units": list(hdr.get_xyzt_units()),
    }


def _sidecar(
    img: nib.Nifti1Image,
    info: VolumeInfo,
    path: str | os.PathLike,
    vol: np.ndarray,
    affine: np.ndarray,
    src_shape: tuple[int, ...],
    src_affine: np.ndarray,
    resampled: bool,
    order: int,
    settings: Any,
    spec: InputSpec,
    flags: list[str],
    case_id: str,
    series_id: str,
) -> dict[str, Any]:
    """Provenance without PHI, in the DICOM sidecar's shape (geometry, acquisition, qc...)."""
    ct = spec.modality == "CT"
    return {
        "case_id": case_id,
        "series_id": series_id,
        "geometry": geometry.sidecar_geometry(
            vol.shape, affine, resampled, order, src_shape, src_affine
        ),
        "acquisition": {"modality": spec.modality, "n_instances": 1, "transfer_syntax": "nifti"},
        "source": _source(img, info, path),
        "dtype": str(vol.dtype),
        "settings": {"convert": asdict(settings), "input": spec.stage_settings()},
        "tools": {
            "radflow": radflow.__version__,
            "nibabel": nib.__version__,
            "numpy": np.__version__,
            "scipy": scipy.__version__,
            "python": platform.python_version(),
        },
        "qc": {
            "flags": flags,
            ("hu_min" if ct else "value_min"): float(vol.min()) if not ct else int(vol.min()),
            ("hu_max" if ct else "value_max"): float(vol.max()) if not ct else int(vol.max()),
        },
    }

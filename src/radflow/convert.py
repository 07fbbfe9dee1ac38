"""convert: one DICOM series -> RAS+, resampled, int16-HU NIfTI with a de-identified sidecar.

dicom2nifti checks the series (slice count, orientation, orthogonality, slice increment) and
computes its affine, with its settings set explicitly on every call. radflow then does the pixel
path itself, because dicom2nifti's (a copy of the whole folder, a deep copy of every dataset,
float64 rescaling, zlib level-6 gzip) costs ~4x the time and ~8x the memory of the int16 result:

* pass 1 reads headers only and validates/sorts them;
* pass 2 reads each slice's pixels straight into a preallocated int16 volume already laid out in
  RAS+ order (a strided view does the flips/permutation), applying slope/intercept in int32;
* gantry tilt, obliquity and the target spacing are handled by one trilinear (or cubic)
  resampling onto an axis-aligned RAS+ grid, in z-slabs on the job's threads;
* the file is written with multithreaded ISA-L gzip to a temporary name and renamed.
"""

from __future__ import annotations

import json
import os
import platform
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import dicom2nifti
import nibabel as nib
import numpy as np
import pydicom
import scipy
from dicom2nifti import common as d2n_common
from dicom2nifti import settings as d2n_settings
from dicom2nifti.exceptions import ConversionError, ConversionValidationError
from tqdm import tqdm

import radflow
from radflow import codecs, dicomsafe, geometry, ids, multiframe, status
from radflow.io import save_nifti, write_json
from radflow.resampling import resample
from radflow.settings import section
from radflow.source import InputSpec
from radflow.status import CaseFailedError

NATIVE_LE = {"1.2.840.10008.1.2", "1.2.840.10008.1.2.1"}
MIN_SLICES = 3  # fewest slices a volume can be made of (ingest.selection.min_slices selects)
PIXEL_TAG = b"\xe0\x7f\x10\x00"
codecs.register()  # imagecodecs joins pydicom's JPEG decoders (12-bit extended, lossless)


class ConversionRefusedError(CaseFailedError, RuntimeError):
    """A series that cannot be converted faithfully; ``code`` is machine-readable."""


@dataclass(frozen=True)
class ConvertSettings:
    """Conversion settings (config key ``convert``)."""

    spacing_mm: tuple[float, float, float] | None = None  # None = native spacing
    interpolation: str = "linear"  # linear | cubic
    gantry_tilt: str = "resample"  # resample | refuse
    irregular_spacing: str = "resample"  # resample | refuse
    max_missing_slices: int = 1
    hu_clip: tuple[float, float] | None = (-1024.0, 3071.0)
    fill_hu: float = -1024.0

    @classmethod
    def from_dict(cls, d: dict[str, Any] | None) -> ConvertSettings:
        """Build from a config mapping (unknown keys are an error)."""
        d = section(cls, d, "convert")
        for key in ("spacing_mm", "hu_clip"):
            if d.get(key) is not None:
                d[key] = tuple(float(v) for v in d[key])
        if d.get("spacing_mm") is not None and len(d["spacing_mm"]) == 1:
            d["spacing_mm"] = d["spacing_mm"] * 3
        if d.get("interpolation", "linear") not in ("linear", "cubic"):
            raise ValueError("convert.interpolation must be 'linear' or 'cubic'")
        if d.get("gantry_tilt", "resample") not in ("resample", "refuse"):
            raise ValueError("convert.gantry_tilt must be 'resample' or 'refuse'")
        if d.get("irregular_spacing", "resample") not in ("resample", "refuse"):
            raise ValueError("convert.irregular_spacing must be 'resample' or 'refuse'")
        return cls(**d)


def configure_dicom2nifti(settings: ConvertSettings) -> dict[str, Any]:
    """Set every dicom2nifti setting explicitly for this call; return them for the sidecar."""
    d2n_settings.enable_validate_slicecount()
    d2n_settings.enable_validate_orientation()
    d2n_settings.disable_validate_instance_number()  # reversed instance order is legitimate
    d2n_settings.disable_pydicom_read_force()
    d2n_settings.disable_resampling()  # radflow resamples once, onto the final grid
    d2n_settings.set_resample_padding(settings.fill_hu)
    d2n_settings.set_resample_spline_interpolation_order(1)
    # gaps and tilt are measured by radflow and then handled or refused with a reason
    d2n_settings.disable_validate_slice_increment()
    d2n_settings.disable_validate_orthogonal()
    return {
        k: getattr(d2n_settings, k)
        for k in (
            "validate_slicecount",
            "validate_orientation",
            "validate_orthogonal",
            "validate_slice_increment",
            "validate_instance_number",
            "pydicom_read_force",
            "resample",
            "resample_padding",
            "resample_spline_interpolation_order",
        )
    }


# --------------------------------------------------------------------------- inputs


def list_source(source: str | os.PathLike, series_uid: str | None = None) -> list[str]:
    """Files of one series: ``source`` is a folder, a JSON list of paths (what ingest writes,
    ``results/private/series/{case}.json``) or a text file listing one path per line."""
    source = Path(source)
    if source.is_file() and source.suffix == ".json":
        try:
            files = json.loads(source.read_text(encoding="utf-8"))
        except ValueError as exc:
            raise ConversionRefusedError("BAD_FILE_LIST", f"file list is not JSON: {exc}") from None
        if not isinstance(files, list) or not all(isinstance(f, str) for f in files):
            raise ConversionRefusedError("BAD_FILE_LIST", "file list is not a JSON list of paths")
    elif source.is_file() and source.suffix == ".txt":
        files = [ln.strip() for ln in source.read_text().splitlines() if ln.strip()]
    elif source.is_dir():
        files = sorted(str(p) for p in source.rglob("*") if p.is_file())
    else:
        raise FileNotFoundError("source is not a series folder or a .json/.txt file list")
    if not files:
        raise ConversionRefusedError("NO_FILES", "no files in the source")
    return files


def _unreadable(index: int, total: int, exc: BaseException, path: str) -> ConversionRefusedError:
    """The refusal for an instance that cannot be read, naming it by index, never by path."""
    return ConversionRefusedError(
        "UNREADABLE_INSTANCE",
        f"instance {index + 1} of {total} in the file list cannot be read "
        f"({dicomsafe.error_text(exc, path)}); a listed file is never skipped or interpolated",
    )


_INSTANCE_KEYS = ("SeriesInstanceUID", "Rows", "Columns", "ImagePositionPatient")


def read_headers(
    files: Sequence[str],
    series_uid: str | None = None,
    max_image_mb: float = dicomsafe.DEFAULT_MAX_IMAGE_MB,
    skip_non_dicom: bool = True,
) -> list[pydicom.Dataset]:
    """Headers (no pixels) of the files of one series, each checked against the budget.

    Non-DICOM files and non-image objects (a DICOMDIR, reports) are skipped when
    ``skip_non_dicom`` (a folder, as a DICOM CD holds it); otherwise (a file
    list: ingest lists only image instances) every file must be a readable image instance. A
    file that cannot be read refuses the series (UNREADABLE_INSTANCE), never silently dropped and
    interpolated over. Errors name instances by their index in the list, never by path.
    """
    headers: list[pydicom.Dataset] = []
    for i, f in enumerate(files):
        try:
            head = dicomsafe.read_header(f, max_image_mb)
        except pydicom.errors.InvalidDicomError as exc:
            if skip_non_dicom:
                continue
            raise _unreadable(i, len(files), exc, f) from None
        except Exception as exc:  # noqa: BLE001 - refused with a path-free reason
            raise _unreadable(i, len(files), exc, f) from None
        ds = head.ds
        if skip_non_dicom and dicomsafe.non_image_reason(ds, head.has_pixels):
            continue  # a folder's DICOMDIR, structured reports, presentation states...
        over = dicomsafe.claim_error(ds, max_image_mb) if "Rows" in ds else ""
        if over:
            raise ConversionRefusedError(
                "TOO_LARGE", f"instance {i + 1} of {len(files)} {over}; refused before reading"
            )
        if multiframe.is_multiframe(ds):
            try:
                frames = multiframe.frame_headers(ds)
            except multiframe.MultiFrameError as exc:
                raise ConversionRefusedError(
                    exc.code, f"instance {i + 1} of {len(files)}: {exc.reason}"
                ) from None
            for fh in frames:
                fh.radflow_pixel_offset = None
                fh.radflow_path = f
                fh.radflow_index = i
                fh.radflow_total = len(files)
            headers.extend(frames)
            continue
        if not skip_non_dicom and not all(k in ds for k in _INSTANCE_KEYS):
            missing = [k for k in _INSTANCE_KEYS if k not in ds]
            raise ConversionRefusedError(
                "UNREADABLE_INSTANCE",
                f"instance {i + 1} of {len(files)} in the file list has no {', '.join(missing)} "
                "(truncated or not an image); a listed file is never skipped or interpolated",
            )
        ds.radflow_frame = None
        ds.radflow_pixel_offset = head.pixel_offset
        ds.radflow_path = f
        ds.radflow_index = i
        ds.radflow_total = len(files)
        headers.append(ds)
    uids = {str(h.get("SeriesInstanceUID", "")) for h in headers}
    if series_uid is not None:
        headers = [h for h in headers if str(h.get("SeriesInstanceUID", "")) == series_uid]
    elif len(uids) > 1:
        raise ConversionRefusedError(
            "MIXED_SERIES",
            f"{len(uids)} series in the input; choose one with --series-uid "
            "(radflow ingest writes one file list per selected series)",
        )
    headers = [h for h in headers if "Rows" in h and "ImagePositionPatient" in h]
    if not headers:
        raise ConversionRefusedError("NO_IMAGES", "no image instances with geometry in the input")
    over = dicomsafe.too_large(
        sum(dicomsafe.int16_claim_bytes(h) for h in headers), max_image_mb, "int16 volume"
    )
    if over:
        raise ConversionRefusedError("TOO_LARGE", f"the series {over}; refused before reading")
    return headers


def check_grid(shape: Sequence[int], max_image_mb: float, what: str) -> None:
    """Refuse (TOO_LARGE) an int16 volume of ``shape`` over the budget, before allocating it."""
    over = dicomsafe.too_large(2 * int(np.prod([int(v) for v in shape])), max_image_mb, what)
    if over:
        raise ConversionRefusedError("TOO_LARGE", f"{over}; refused before allocating")


# --------------------------------------------------------------------------- geometry


@dataclass(frozen=True)
class StackGeometry:
    """Sorted stack: files in spatial order, their slice index, and the affine.

    For a regular stack the slices sit on a uniform grid (``slot``; ``missing`` slots are
    interpolated) and ``affine`` is that grid's. For irregular spacing (``zplan`` set) the
    sorted slices are read as they are (``slot`` = 0..n-1) and then interpolated onto the regular
    grid of ``zplan`` along the stack, whose voxel -> RAS map ``affine`` is.
    """

    order: list[int]  # header index per sorted slice
    slot: list[int]  # slice index of each sorted slice in the read buffer
    n_slices: int  # slices of the read buffer (uniform grid, including missing ones)
    missing: list[int]  # uniform indices with no file (filled by interpolation)
    affine: np.ndarray  # voxel (col, row, slice of the output stack) -> RAS
    tilt_deg: float
    instance_order: str  # InstanceNumber increasing/decreasing along the slice normal
    zplan: geometry.StackResampling | None = None  # irregular spacing: the regular grid
    positions_mm: tuple[float, ...] = ()  # sorted positions along the normal (irregular only)
    line_deviation_mm: float = 0.0


def _regular_plan(
    pos: np.ndarray, thickness: float, s: ConvertSettings
) -> geometry.StackResampling:
    """The regular grid for irregularly spaced slices, or the refusal that applies."""
    steps = np.diff(pos)
    what = f"slice spacing is irregular (steps {steps.min():.2f}-{steps.max():.2f} mm)"
    if s.irregular_spacing == "refuse":
        raise ConversionRefusedError(
            "IRREGULAR_SPACING", f"{what} and convert.irregular_spacing=refuse"
        )
    plan = geometry.regular_stack(pos, thickness)
    if len(plan.missing) > s.max_missing_slices:
        raise ConversionRefusedError(
            "SLICE_GAP",
            f"{what}: {len(plan.missing)} slice(s) of the regular {plan.step_mm:.2f} mm grid lie "
            f"in gaps no acquired slice covers (largest gap {plan.max_gap_mm:.2f} mm) > "
            f"convert.max_missing_slices {s.max_missing_slices}",
        )
    return plan


def _positions_off_line(ipps: np.ndarray, pos: np.ndarray, ps: np.ndarray) -> float:
    """Deviation of the slice positions from a straight stack; refused beyond 0.1 pixel."""
    dev = geometry.line_deviation_mm(ipps, pos)
    tol = 0.1 * float(np.min(ps))
    if dev > tol:
        raise ConversionRefusedError(
            "NONLINEAR_POSITIONS",
            f"slice positions stray {dev:.2f} mm (> {tol:.2f} mm, 0.1 pixel) from a straight "
            "stack; interpolating between them would misplace voxels",
        )
    return dev


def stack_geometry(headers: Sequence[pydicom.Dataset], settings: ConvertSettings) -> StackGeometry:
    """Validate (dicom2nifti) and describe the slice stack; refuse what cannot be fixed."""
    try:
        if len(headers) < MIN_SLICES:
            raise ConversionRefusedError(
                "TOO_FEW_SLICES",
                f"{len(headers)} slices: a volume needs at least {MIN_SLICES}",
            )
        d2n_common.validate_slicecount(headers)
        d2n_common.validate_orientation(headers)
        ordered = d2n_common.sort_dicoms(list(headers))
    except (ConversionValidationError, ConversionError) as exc:
        raise ConversionRefusedError(
            "DICOM2NIFTI_" + str(exc.args[0] if exc.args else exc), str(exc)
        ) from exc
    index = {id(h): i for i, h in enumerate(headers)}
    iop = np.asarray(ordered[0].ImageOrientationPatient, dtype=float)
    ipps = np.array([h.ImagePositionPatient for h in ordered], dtype=float)
    pos = geometry.project_positions(ipps, iop)
    # dicom2nifti sorts by the most varying coordinate; we want positions increasing along
    # +normal (a stable sort keeps its order where they tie, and duplicates are refused below)
    rank = np.argsort(pos, kind="stable")
    ordered, ipps, pos = [ordered[i] for i in rank], ipps[rank], pos[rank]
    sp = geometry.slice_spacing(pos)
    if sp.duplicates:
        raise ConversionRefusedError(
            "DUPLICATE_POSITIONS", f"{sp.duplicates} slices share a position"
        )
    ps = np.asarray(ordered[0].PixelSpacing, dtype=float)
    zplan = None
    dev = 0.0
    if sp.irregular:
        thickness = float(ordered[0].get("SliceThickness", 0) or 0)
        zplan = _regular_plan(pos, thickness, settings)
        dev = _positions_off_line(ipps, pos, ps)
    elif sp.missing > settings.max_missing_slices:
        raise ConversionRefusedError(
            "SLICE_GAP",
            f"{sp.missing} missing slice(s) > convert.max_missing_slices "
            f"{settings.max_missing_slices}",
        )
    tilt = geometry.gantry_tilt_deg(ipps, iop)
    if tilt > 0.5 and settings.gantry_tilt == "refuse":
        raise ConversionRefusedError(
            "GANTRY_TILT", f"gantry tilt {tilt:.1f} deg and gantry_tilt=refuse"
        )
    inst = [float(h.get("InstanceNumber", 0) or 0) for h in ordered]
    common = {
        "order": [index[id(h)] for h in ordered],
        "tilt_deg": tilt,
        "instance_order": "decreasing" if len(inst) > 1 and inst[0] > inst[-1] else "increasing",
    }
    if zplan is not None:
        step = (ipps[-1] - ipps[0]) / (zplan.n_slices - 1)
        return StackGeometry(
            slot=list(range(len(ordered))),
            n_slices=len(ordered),
            missing=[],
            affine=geometry.series_affine_ras(iop, ipps[0], step, ps),
            zplan=zplan,
            positions_mm=tuple(float(v) for v in pos),
            line_deviation_mm=dev,
            **common,
        )
    slot = [int(round(v)) for v in (pos - pos[0]) / sp.step_mm] if len(pos) > 1 else [0]
    n = slot[-1] + 1
    if sp.missing == 0:
        affine, _ = d2n_common.create_affine(ordered)  # dicom2nifti's own LPS->RAS affine
    else:
        step = (ipps[-1] - ipps[0]) / (n - 1)
        affine = geometry.series_affine_ras(iop, ipps[0], step, ps)
    return StackGeometry(
        slot=slot,
        n_slices=n,
        missing=sorted(set(range(n)) - set(slot)),
        affine=np.asarray(affine, dtype=float),
        **common,
    )


def ras_view(out: np.ndarray, ornt: np.ndarray) -> np.ndarray:
    """A view of ``out`` (RAS+ array) indexed in source voxel order (col, row, slice)."""
    v = out
    for src_axis in range(3):
        if ornt[src_axis, 1] < 0:
            v = np.flip(v, axis=int(ornt[src_axis, 0]))
    return v.transpose([int(ornt[a, 0]) for a in range(3)])


# --------------------------------------------------------------------------- pixels


def _native_pixels(ds: pydicom.Dataset) -> np.ndarray | None:
    """Read uncompressed little-endian pixels straight from the file, or None to fall back."""
    ts = str(ds.file_meta.get("TransferSyntaxUID", "")) if ds.file_meta else ""
    if ts not in NATIVE_LE or ds.radflow_pixel_offset is None:
        return None
    if ts not in NATIVE_LE or int(ds.BitsAllocated) != 16 or int(ds.get("SamplesPerPixel", 1)) != 1:
        return None
    n = int(ds.Rows) * int(ds.Columns)
    with open(ds.radflow_path, "rb") as fh:
        fh.seek(ds.radflow_pixel_offset)
        head = fh.read(12)
        if head[:4] != PIXEL_TAG:
            return None
        if ts == "1.2.840.10008.1.2.1" and head[4:6] in (b"OW", b"OB"):
            length, start = int.from_bytes(head[8:12], "little"), 12
        else:
            length, start = int.from_bytes(head[4:8], "little"), 8
        if length != 2 * n:
            return None
        fh.seek(ds.radflow_pixel_offset + start)
        dtype = np.int16 if int(ds.PixelRepresentation) == 1 else np.uint16
        arr = np.fromfile(fh, dtype=dtype, count=n)
    if arr.size != n:
        raise ConversionRefusedError(
            "TRUNCATED", "pixel data shorter than declared (truncated file)"
        )
    return arr.reshape(int(ds.Rows), int(ds.Columns))


def to_hu(raw: np.ndarray, ds: pydicom.Dataset, clip: tuple[float, float] | None) -> np.ndarray:
    """Stored values of one slice or frame in HU as int16, slope/intercept without float64."""
    bits = int(ds.get("BitsStored", 16))
    if bits < 16:
        if int(ds.PixelRepresentation) == 1:
            shift = 16 - bits
            raw = (raw.astype(np.int16) << shift) >> shift
        else:
            raw = raw & ((1 << bits) - 1)
    slope = float(ds.get("RescaleSlope", 1) or 1)
    inter = float(ds.get("RescaleIntercept", 0) or 0)
    if slope.is_integer() and inter.is_integer():
        hu = raw.astype(np.int32) * int(slope) + int(inter)
    else:
        hu = np.rint(raw.astype(np.float32) * slope + inter)
    lo, hi = clip if clip is not None else (-32768, 32767)
    return np.clip(hu, max(lo, -32768), min(hi, 32767)).astype(np.int16)


def slice_hu(ds: pydicom.Dataset, clip: tuple[float, float] | None) -> np.ndarray:
    """One single-frame slice in HU as int16 (rows, cols)."""
    raw = _native_pixels(ds)
    if raw is None:  # the header's claim was checked against the budget by read_headers
        full = pydicom.dcmread(ds.radflow_path)
        raw = full.pixel_array
        if raw.shape != (int(ds.Rows), int(ds.Columns)):
            raise ValueError(f"decoded pixel array has shape {raw.shape}, not one slice")
    return to_hu(raw, ds, clip)


def _refused_at(h: pydicom.Dataset, exc: Exception) -> ConversionRefusedError:
    """The refusal for a slice that cannot be read, naming its instance by index only."""
    if isinstance(exc, ConversionRefusedError):
        return ConversionRefusedError(
            exc.code, f"instance {h.radflow_index + 1} of {h.radflow_total}: {exc.reason}"
        )
    return _unreadable(h.radflow_index, h.radflow_total, exc, h.radflow_path)


def acquired_slices(
    headers: Sequence[pydicom.Dataset], order: Sequence[int], clip: tuple[float, float] | None
) -> Iterator[tuple[int, np.ndarray]]:
    """(rank in ``order``, HU slice rows x cols) for every slice; each file is read once.

    Frames of a multi-frame file are decoded one at a time in file order
    (``pydicom.pixels.iter_pixels``), each with its own frame's slope and intercept.
    """
    rank_of = {hidx: r for r, hidx in enumerate(order)}
    by_file: dict[str, dict[int, int]] = {}
    for hidx in order:
        h = headers[hidx]
        if h.radflow_frame is None:
            try:
                yield rank_of[hidx], slice_hu(h, clip)
            except Exception as exc:  # noqa: BLE001 - refused, naming the instance by index
                raise _refused_at(h, exc) from None
        else:
            by_file.setdefault(h.radflow_path, {})[h.radflow_frame] = hidx
    for path, frame_to_hidx in by_file.items():
        first = headers[next(iter(frame_to_hidx.values()))]
        try:
            for f, raw in enumerate(pydicom.pixels.iter_pixels(path)):
                hidx = frame_to_hidx.get(f)
                if hidx is None:
                    continue
                h = headers[hidx]
                if raw.shape != (int(h.Rows), int(h.Columns)):
                    raise ValueError(f"decoded frame has shape {raw.shape}, not one slice")
                yield rank_of[hidx], to_hu(raw, h, clip)
        except Exception as exc:  # noqa: BLE001 - refused, naming the instance by index
            raise _refused_at(first, exc) from None


def read_volume(
    headers: Sequence[pydicom.Dataset], geo: StackGeometry, clip: tuple[float, float] | None
) -> tuple[np.ndarray, np.ndarray]:
    """Read pixels into an int16 RAS+ volume; returns (volume, its affine)."""
    first = headers[geo.order[0]]
    n_out = geo.zplan.n_slices if geo.zplan is not None else geo.n_slices
    shape_src = (int(first.Columns), int(first.Rows), n_out)
    ornt = nib.orientations.io_orientation(geo.affine)
    shape_out = tuple(int(shape_src[int(np.flatnonzero(ornt[:, 0] == ax)[0])]) for ax in range(3))
    out = np.empty(shape_out, dtype=np.int16, order="F")
    view = ras_view(out, ornt)
    # irregular spacing: the acquired slices first, then interpolated onto the regular grid
    buf = view if geo.zplan is None else np.empty((*shape_src[:2], geo.n_slices), np.int16, "F")
    bar = tqdm(
        total=len(geo.order), desc="convert slices", unit="slice", file=sys.stderr, mininterval=2
    )
    for rank, hu in acquired_slices(headers, geo.order, clip):
        buf[:, :, geo.slot[rank]] = hu.T
        bar.update()
    bar.close()
    for k in geo.missing:  # linear interpolation between the neighbouring acquired slices
        lo = max(s for s in geo.slot if s < k)
        hi = min(s for s in geo.slot if s > k)
        _blend(view, k, view[:, :, lo], view[:, :, hi], (k - lo) / (hi - lo))
    if geo.zplan is not None:
        for k, (lo, w) in enumerate(zip(geo.zplan.lower, geo.zplan.weight, strict=True)):
            _blend(view, k, buf[:, :, lo], buf[:, :, lo + 1], float(w))
    affine = geo.affine @ nib.orientations.inv_ornt_aff(ornt, shape_src)
    return out, affine


def _blend(view: np.ndarray, k: int, a: np.ndarray, b: np.ndarray, w: float) -> None:
    """``view[:, :, k]`` = (1 - w) a + w b, rounded to int16 (a copy when w is 0 or 1)."""
    if w <= 1e-6:
        view[:, :, k] = a
    elif w >= 1 - 1e-6:
        view[:, :, k] = b
    else:
        mix = a.astype(np.float32)
        mix *= 1 - w
        mix += w * b.astype(np.float32)
        view[:, :, k] = np.rint(mix)


# --------------------------------------------------------------------------- resampling


def target_grid(
    affine: np.ndarray, shape: tuple[int, int, int], settings: ConvertSettings, needs_grid: bool
) -> tuple[np.ndarray, tuple[int, int, int]] | None:
    """The output grid, or None when the reoriented source grid is already the output."""
    spacing = geometry.ras_spacing(affine)
    if settings.spacing_mm is not None:
        target = np.asarray(settings.spacing_mm, dtype=float)
        if not needs_grid and np.allclose(target, spacing, atol=1e-3):
            return None
        return geometry.aligned_grid(affine, shape, target)
    if not needs_grid:
        return None
    return geometry.aligned_grid(affine, shape, spacing)


# --------------------------------------------------------------------------- entry point


def convert(
    source: str | os.PathLike,
    out_path: str | os.PathLike,
    settings: ConvertSettings,
    sidecar_path: str | os.PathLike | None = None,
    case_id: str = "",
    series_id: str = "",
    salt: str = "",
    series_uid: str | None = None,
    threads: int = 1,
    max_image_mb: float = dicomsafe.DEFAULT_MAX_IMAGE_MB,
    input_spec: InputSpec | None = None,
) -> dict[str, Any]:
    """Convert one series to ``out_path`` (+ JSON sidecar); returns the sidecar content.

    ``input_spec`` (config ``input``) of format nifti: ``source`` is one NIfTI volume (or a
    file list naming it) and ``radflow.nifti_input`` converts it. ``max_image_mb`` (config
    ``ingest.max_image_mb``) bounds what a header may claim: a file or volume over it is
    refused (TOO_LARGE) before anything is allocated or decoded. Errors name instances by
    their index in the file list, never by their (private) path.
    """
    if input_spec is not None and input_spec.format == "nifti":
        sidecar = sidecar_path or _sidecar_name(out_path)
        return _convert_nifti(
            source, out_path, settings, input_spec, sidecar, case_id, series_id, threads,
            max_image_mb,
        )  # fmt: skip
    return _convert_dicom(
        source, out_path, settings, sidecar_path, case_id, series_id, salt, series_uid, threads,
        max_image_mb,
    )  # fmt: skip


def _convert_nifti(
    source: str | os.PathLike,
    out_path: str | os.PathLike,
    settings: ConvertSettings,
    spec: InputSpec,
    sidecar_path: str | os.PathLike,
    case_id: str,
    series_id: str,
    threads: int,
    max_image_mb: float,
) -> dict[str, Any]:
    """One NIfTI volume: given itself, or as the one path of a file list (what ingest writes)."""
    from radflow import nifti_input

    name = Path(source).name
    files = [str(source)] if name.endswith((".nii", ".nii.gz")) else list_source(source)
    if len(files) != 1:
        raise ConversionRefusedError(
            "NIFTI_FILE_LIST", f"{len(files)} files listed: a NIfTI case is one volume"
        )
    return nifti_input.convert_nifti(
        files[0], out_path, settings, spec, sidecar_path, case_id, series_id, threads,
        max_image_mb,
    )  # fmt: skip


def _convert_dicom(
    source: str | os.PathLike,
    out_path: str | os.PathLike,
    settings: ConvertSettings,
    sidecar_path: str | os.PathLike | None,
    case_id: str,
    series_id: str,
    salt: str,
    series_uid: str | None,
    threads: int,
    max_image_mb: float,
) -> dict[str, Any]:
    """One DICOM series (see ``convert``)."""
    t0 = time.perf_counter()
    d2n = configure_dicom2nifti(settings)
    files = list_source(source, series_uid)
    headers = read_headers(files, series_uid, max_image_mb, skip_non_dicom=Path(source).is_dir())
    geo = stack_geometry(headers, settings)
    first = headers[geo.order[0]]
    n_out = geo.zplan.n_slices if geo.zplan is not None else 0
    check_grid((first.Rows, first.Columns, geo.n_slices + n_out), max_image_mb, "int16 volume")
    vol, affine = read_volume(headers, geo, settings.hu_clip)
    src_shape, src_affine = vol.shape, affine
    needs_grid = not geometry.is_axis_aligned(affine)
    grid = target_grid(affine, vol.shape, settings, needs_grid)
    order = 3 if settings.interpolation == "cubic" else 1
    if grid is not None:
        check_grid(grid[1], max_image_mb, "resampled int16 volume")
        vol = resample(vol, affine, grid[0], grid[1], order, settings.fill_hu, threads)
        affine = grid[0]
    save_nifti(vol, affine, out_path, threads=threads)
    sidecar = _sidecar(
        first,
        headers,
        geo,
        settings,
        d2n,
        vol,
        affine,
        src_shape,
        src_affine,
        grid is not None,
        order,
        case_id,
        series_id,
        salt,
    )
    sidecar["qc"]["seconds"] = round(time.perf_counter() - t0, 3)
    write_json(sidecar_path or _sidecar_name(out_path), sidecar)
    return sidecar


def _sidecar_name(out_path: str | os.PathLike) -> Path:
    p = Path(out_path)
    name = p.name[: -len(".nii.gz")] if p.name.endswith(".nii.gz") else p.stem
    return p.with_name(name + ".json")


def _sidecar(
    first: pydicom.Dataset,
    headers: Sequence[pydicom.Dataset],
    geo: StackGeometry,
    settings: ConvertSettings,
    d2n: dict[str, Any],
    vol: np.ndarray,
    affine: np.ndarray,
    src_shape: tuple[int, ...],
    src_affine: np.ndarray,
    resampled: bool,
    order: int,
    case_id: str,
    series_id: str,
    salt: str,
) -> dict[str, Any]:
    """Provenance without PHI: geometry, acquisition, settings, versions and QC flags."""
    ts = str(first.file_meta.get("TransferSyntaxUID", "")) if first.file_meta else ""
    series_uid = str(first.get("SeriesInstanceUID", ""))
    return {
        "case_id": case_id,
        "series_id": series_id or (ids.pseudonym("series", series_uid, salt) if salt else ""),
        "geometry": geometry.sidecar_geometry(
            vol.shape, affine, resampled, order, src_shape, src_affine
        ),
        "acquisition": {
            "modality": str(first.get("Modality", "")),
            "manufacturer": str(first.get("Manufacturer", "")),
            "model": str(first.get("ManufacturerModelName", "")),
            "kernel": str(first.get("ConvolutionKernel", "")),
            "image_type": "\\".join(first.get("ImageType", [])),
            "series_description": str(first.get("SeriesDescription", "")),
            "slice_thickness_mm": float(first.get("SliceThickness", 0) or 0),
            "kvp": float(first.get("KVP", 0) or 0),
            "n_instances": len({h.radflow_index for h in headers}),
            "n_slices": len(headers),
            "multiframe": any(h.radflow_frame is not None for h in headers),
            "transfer_syntax": ts,
        },
        "settings": {"convert": asdict(settings), "dicom2nifti": d2n},
        "tools": {
            "radflow": radflow.__version__,
            "dicom2nifti": dicom2nifti.__version__
            if hasattr(dicom2nifti, "__version__")
            else _ver("dicom2nifti"),
            "pydicom": pydicom.__version__,
            "nibabel": nib.__version__,
            "numpy": np.__version__,
            "scipy": scipy.__version__,
            "python": platform.python_version(),
        },
        "qc": {
            "gantry_tilt_deg": round(geo.tilt_deg, 3),
            "tilt_corrected": bool(resampled and geo.tilt_deg > 0.5),
            "interpolated_slices": geo.missing,
            "irregular_spacing": _irregular_record(geo),
            "instance_order": geo.instance_order,
            "hu_min": int(vol.min()),
            "hu_max": int(vol.max()),
        },
    }


def _irregular_record(geo: StackGeometry) -> dict[str, Any] | None:
    """What was done to irregularly spaced slices (None for a regular stack)."""
    if geo.zplan is None:
        return None
    pos = np.asarray(geo.positions_mm)
    return {
        "action": "resampled along the stack from the exact slice positions (linear)",
        "source_slices": len(pos),
        "source_extent_mm": round(float(pos[-1] - pos[0]), 4),
        "source_min_gap_mm": round(geo.zplan.min_gap_mm, 4),
        "source_max_gap_mm": round(geo.zplan.max_gap_mm, 4),
        "source_positions_mm": [round(float(v - pos[0]), 4) for v in pos],
        "output_slices": geo.zplan.n_slices,
        "output_step_mm": round(geo.zplan.step_mm, 6),
        "uncovered_output_slices": geo.zplan.missing,
        "positions_off_line_mm": round(geo.line_deviation_mm, 4),
    }


def _ver(name: str) -> str:
    from importlib.metadata import version

    return version(name)


def convert_case(
    source: str | os.PathLike,
    out_path: str | os.PathLike,
    settings: ConvertSettings,
    sidecar_path: str | os.PathLike,
    case_id: str,
    series_id: str = "",
    threads: int = 1,
    max_image_mb: float | None = None,
    input_spec: InputSpec | None = None,
) -> dict[str, Any]:
    """Convert one case of the workflow: like ``convert``, but a series that cannot be
    converted gets a failed record as its sidecar (stage, code, reason) instead of an error,
    so the case fails alone and the rest of the cohort goes on. Environment errors (no memory,
    a full disk, I/O) still fail the job, so that a rerun retries them."""
    try:
        budget = {} if max_image_mb is None else {"max_image_mb": max_image_mb}
        return convert(
            source,
            out_path,
            settings,
            sidecar_path,
            case_id,
            series_id,
            threads=threads,
            input_spec=input_spec,
            **budget,
        )
    except Exception as exc:  # noqa: BLE001 - any data error is this case's, recorded
        if status.is_environmental(exc):
            raise
        rec = status.failure("convert", exc)  # a refusal's code and reason, else the error's
        rec["reason"] = redact(rec["reason"], source)
        rec["case_id"] = case_id
        rec["series_id"] = series_id
        status.remove_stale(out_path)
        write_json(sidecar_path, rec)
        return rec


def redact(text: str, source: str | os.PathLike) -> str:
    """``text`` without the raw paths of a series (they carry names and MRNs): its files and
    their folders, through ``dicomsafe.scrub`` (the one path scrubber)."""
    try:
        files = list_source(source)
    except Exception:  # noqa: BLE001 - nothing to redact with
        files = []
    folders = {str(Path(f).parent) for f in files}
    # longest first, so a folder is not replaced inside a file's path before the file is
    return dicomsafe.scrub(text, *sorted([*files, *folders], key=len, reverse=True))

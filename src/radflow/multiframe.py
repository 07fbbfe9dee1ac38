"""Multi-frame DICOM (enhanced and legacy converted CT/MR): one header per frame.

An enhanced object holds a whole series in one file; each frame's geometry lives in its item of
PerFrameFunctionalGroupsSequence, or in SharedFunctionalGroupsSequence when it is the same for
every frame: PlanePositionSequence (ImagePositionPatient), PlaneOrientationSequence
(ImageOrientationPatient), PixelMeasuresSequence (PixelSpacing, SliceThickness) and
PixelValueTransformationSequence (RescaleSlope, RescaleIntercept). ``frame_headers`` turns such
an object into one small data set per frame carrying those values at the top level, as a
single-frame series has them, so that sorting, validation and the affine are the same code for
both. What cannot be one volume (several orientations or stacks, temporal positions, frames
sharing a position, no per-frame position) is refused with its own reason. No file I/O here.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import pydicom

from radflow.dicomsafe import frames
from radflow.status import CaseFailedError

# top-level attributes every frame header carries over from its object
_COPY = (
    "SOPClassUID",
    "SeriesInstanceUID",
    "StudyInstanceUID",
    "FrameOfReferenceUID",
    "Modality",
    "Manufacturer",
    "ManufacturerModelName",
    "ImageType",
    "SeriesDescription",
    "KVP",
    "ConvolutionKernel",
    "Rows",
    "Columns",
    "SamplesPerPixel",
    "PhotometricInterpretation",
    "BitsAllocated",
    "BitsStored",
    "HighBit",
    "PixelRepresentation",
    "SliceThickness",
    "RescaleSlope",
    "RescaleIntercept",
)
# (functional group, attribute) read per frame, the frame's own item before the shared one
_GROUPS = (
    ("PlanePositionSequence", "ImagePositionPatient"),
    ("PlaneOrientationSequence", "ImageOrientationPatient"),
    ("PixelMeasuresSequence", "PixelSpacing"),
    ("PixelMeasuresSequence", "SliceThickness"),
    ("PixelValueTransformationSequence", "RescaleSlope"),
    ("PixelValueTransformationSequence", "RescaleIntercept"),
    ("CTReconstructionSequence", "ConvolutionKernel"),
)
_REQUIRED = ("ImagePositionPatient", "ImageOrientationPatient", "PixelSpacing")


class MultiFrameError(CaseFailedError, ValueError):
    """A multi-frame object that is not one 3-D volume; ``code`` says why."""


def is_multiframe(ds: pydicom.Dataset) -> bool:
    """More than one frame, or enhanced functional groups (a one-frame enhanced object)."""
    return frames(ds) > 1 or "PerFrameFunctionalGroupsSequence" in ds


def _group_value(items: Sequence[pydicom.Dataset], group: str, key: str) -> Any:
    for item in items:
        seq = item.get(group) if item is not None else None
        if seq and key in seq[0] and seq[0].get(key) not in (None, ""):
            return seq[0].get(key)
    return None


def _frame_content(item: pydicom.Dataset, key: str) -> Any:
    seq = item.get("FrameContentSequence")
    return seq[0].get(key) if seq and key in seq[0] else None


def frame_headers(ds: pydicom.Dataset) -> list[pydicom.Dataset]:
    """One header per frame of a multi-frame object, with its own geometry and rescale at the
    top level and ``radflow_frame`` set to its index in the object's pixel data."""
    n = frames(ds)
    per_frame = ds.get("PerFrameFunctionalGroupsSequence")
    if not per_frame:
        raise MultiFrameError(
            "MULTIFRAME_NO_GEOMETRY",
            f"multi-frame object of {n} frames without PerFrameFunctionalGroupsSequence: "
            "no position per frame",
        )
    if len(per_frame) != n:
        raise MultiFrameError(
            "MULTIFRAME_GEOMETRY",
            f"{len(per_frame)} per-frame functional groups for {n} frames",
        )
    shared_seq = ds.get("SharedFunctionalGroupsSequence")
    shared = shared_seq[0] if shared_seq else None
    out = []
    for f, item in enumerate(per_frame):
        h = pydicom.Dataset()
        h.file_meta = getattr(ds, "file_meta", pydicom.dataset.FileMetaDataset())
        for key in _COPY:
            if key in ds and ds.get(key) not in (None, ""):
                setattr(h, key, ds.get(key))
        for group, key in _GROUPS:
            value = _group_value([item, shared], group, key)
            if value is not None:
                setattr(h, key, value)
        absent = [k for k in _REQUIRED if k not in h]
        if absent:
            raise MultiFrameError(
                "MULTIFRAME_GEOMETRY",
                f"frame {f + 1} of {n} has no {', '.join(absent)} (per-frame or shared)",
            )
        h.InstanceNumber = f + 1
        h.radflow_frame = f
        h.radflow_stack = _frame_content(item, "StackID")
        h.radflow_temporal = _frame_content(item, "TemporalPositionIndex")
        out.append(h)
    check_one_volume(out)
    return out


def check_one_volume(headers: Sequence[pydicom.Dataset]) -> None:
    """Refuse frames that are not one 3-D stack: several orientations, stacks or temporal
    positions, pixel spacings that differ, or frames that share a position (4-D)."""
    n = len(headers)
    iops = np.array([h.ImageOrientationPatient for h in headers], dtype=float)
    n_iop = len({tuple(np.round(v, 3)) for v in iops})
    if n_iop > 1:
        raise MultiFrameError(
            "MULTIFRAME_ORIENTATION",
            f"{n} frames in {n_iop} orientations (several stacks in one object)",
        )
    stacks = {str(h.radflow_stack) for h in headers if getattr(h, "radflow_stack", None)}
    if len(stacks) > 1:
        raise MultiFrameError("MULTIFRAME_STACKS", f"{n} frames in {len(stacks)} stacks")
    times = {h.radflow_temporal for h in headers if getattr(h, "radflow_temporal", None)}
    if len(times) > 1:
        raise MultiFrameError(
            "MULTIFRAME_4D", f"{n} frames at {len(times)} temporal positions (4-D, not a volume)"
        )
    spacings = {tuple(np.round(np.asarray(h.PixelSpacing, dtype=float), 4)) for h in headers}
    if len(spacings) > 1:
        raise MultiFrameError(
            "MULTIFRAME_GEOMETRY", f"pixel spacing differs between frames ({len(spacings)} values)"
        )
    normal = np.cross(iops[0, :3], iops[0, 3:])
    pos = np.array([h.ImagePositionPatient for h in headers], dtype=float) @ normal
    n_pos = len(np.unique(np.round(pos, 2)))
    if n_pos < n:
        raise MultiFrameError(
            "MULTIFRAME_4D",
            f"{n} frames at {n_pos} positions (repeated positions: 4-D, multi-echo or "
            "multi-contrast, not one volume)",
        )

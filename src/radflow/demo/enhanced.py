"""Synthetic enhanced multi-frame CT: a single-frame series packed into one object.

``write_enhanced`` takes the files ``write_series`` wrote and stores the same slices as one
Enhanced CT Image object (per-frame PlanePositionSequence and FrameContentSequence, shared
PixelMeasures, PlaneOrientation and PixelValueTransformation), so a test can check that the
multi-frame object converts to exactly what the single-frame series does.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pydicom
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.sequence import Sequence as DicomSequence
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

ENHANCED_CT = "1.2.840.10008.5.1.4.1.1.2.1"
_TOP = (
    "PatientName",
    "PatientID",
    "PatientBirthDate",
    "PatientSex",
    "StudyInstanceUID",
    "StudyDate",
    "StudyTime",
    "StudyID",
    "AccessionNumber",
    "Manufacturer",
    "ManufacturerModelName",
    "SeriesInstanceUID",
    "SeriesNumber",
    "SeriesDescription",
    "ImageType",
    "KVP",
    "FrameOfReferenceUID",
    "Modality",
    "Rows",
    "Columns",
    "SamplesPerPixel",
    "PhotometricInterpretation",
    "BitsAllocated",
    "BitsStored",
    "HighBit",
    "PixelRepresentation",
)


def _item(**kw: object) -> Dataset:
    ds = Dataset()
    for k, v in kw.items():
        setattr(ds, k, v)
    return ds


def write_enhanced(
    files: Sequence[str | Path],
    out_path: str | Path,
    frame_order: Sequence[int] | None = None,
    per_frame_rescale: bool = False,
) -> Path:
    """Pack single-frame CT ``files`` into one Enhanced CT object at ``out_path``.

    ``frame_order`` permutes the frames in the file (their geometry goes with them);
    ``per_frame_rescale`` stores each frame with its own intercept in its own
    PixelValueTransformationSequence (the stored values shifted to keep the same HU).
    """
    slices = [pydicom.dcmread(f) for f in files]
    order = list(range(len(slices))) if frame_order is None else list(frame_order)
    first = slices[0]
    ds = Dataset()
    for key in _TOP:
        if key in first:
            setattr(ds, key, first.get(key))
    sop_uid = generate_uid(entropy_srcs=[str(ds.SeriesInstanceUID), "enhanced"])
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = ENHANCED_CT
    ds.file_meta.MediaStorageSOPInstanceUID = sop_uid
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.SOPClassUID = ENHANCED_CT
    ds.SOPInstanceUID = sop_uid
    ds.InstanceNumber = 1
    ds.NumberOfFrames = len(order)
    shared = _item(
        PixelMeasuresSequence=DicomSequence(
            [_item(PixelSpacing=first.PixelSpacing, SliceThickness=first.SliceThickness)]
        ),
        PlaneOrientationSequence=DicomSequence(
            [_item(ImageOrientationPatient=first.ImageOrientationPatient)]
        ),
        CTReconstructionSequence=DicomSequence([_item(ConvolutionKernel=first.ConvolutionKernel)]),
    )
    if not per_frame_rescale:
        shared.PixelValueTransformationSequence = DicomSequence(
            [
                _item(
                    RescaleIntercept=first.RescaleIntercept,
                    RescaleSlope=first.RescaleSlope,
                    RescaleType="HU",
                )
            ]
        )
    ds.SharedFunctionalGroupsSequence = DicomSequence([shared])
    per_frame, pixels = [], []
    for pos, k in enumerate(order):
        s = slices[k]
        item = _item(
            PlanePositionSequence=DicomSequence(
                [_item(ImagePositionPatient=s.ImagePositionPatient)]
            ),
            FrameContentSequence=DicomSequence(
                [_item(StackID="1", InStackPositionNumber=pos + 1, DimensionIndexValues=[1, pos])]
            ),
        )
        stored = s.pixel_array.astype(np.int32)
        if per_frame_rescale:  # a different intercept per frame, same HU
            shift = (k % 3) * 10
            stored = stored + shift
            item.PixelValueTransformationSequence = DicomSequence(
                [
                    _item(
                        RescaleIntercept=float(s.RescaleIntercept) - shift,
                        RescaleSlope=s.RescaleSlope,
                        RescaleType="HU",
                    )
                ]
            )
        per_frame.append(item)
        pixels.append(stored.astype(s.pixel_array.dtype))
    ds.PerFrameFunctionalGroupsSequence = DicomSequence(per_frame)
    ds.PixelData = np.stack(pixels).tobytes()
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(out_path, enforce_file_format=True)
    return out_path

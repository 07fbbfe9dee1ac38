"""Every compressed transfer syntax real archives hold decodes through the pinned decoders.

A small CT series is written uncompressed and converted; then every file is re-encoded in one
transfer syntax (pydicom's own encoders where it has them: RLE, JPEG-LS, JPEG 2000, deflate;
imagecodecs' libjpeg-turbo for the JPEG processes pydicom cannot write), converted again and
compared with the uncompressed conversion: lossless syntaxes exactly, lossy ones within a bound.
"""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
import pytest
from pydicom import uid
from pydicom.encaps import encapsulate

from radflow import convert
from radflow.demo import VENDORS, Phantom, SeriesSpec, StudySpec, SubjectSpec, write_series

SPEC = SeriesSpec(
    number=2,
    description="codec",
    kernel="B30f",
    rows=32,
    cols=32,
    pixel_spacing=(4.0, 4.0),
    thickness=5.0,
    n_slices=8,
    center=(0.0, 0.0, -60.0),
    noise_hu=12.0,
)


def _series(folder: Path, spec: SeriesSpec = SPEC) -> list[Path]:
    subj = SubjectSpec(0, "PID", "TEST^NAME", "19700101", "F", 0, True, Phantom())
    study = StudySpec(0, "ACC1", "20200101", VENDORS[0], (spec,))
    return write_series(folder, Phantom(), spec, subj, study, "1.2.3.4", "1.2.3.4.5", 0)


def _convert(folder: Path) -> np.ndarray:
    out = folder.with_suffix(".nii.gz")
    sc = convert.convert(folder, out, convert.ConvertSettings(spacing_mm=None))
    assert sc["acquisition"]["n_slices"] == SPEC.n_slices
    return np.asanyarray(nib.load(out).dataobj).astype(np.int32)


def _encapsulate(ds: pydicom.Dataset, frame: bytes, ts: str) -> None:
    ds.file_meta.TransferSyntaxUID = ts
    ds.PixelData = encapsulate([frame])
    ds["PixelData"].VR = "OB"
    ds["PixelData"].is_undefined_length = True


def _imagecodecs():
    return pytest.importorskip("imagecodecs")


def _jpeg(ds, ts, **kw):
    ic = _imagecodecs()
    _encapsulate(ds, ic.jpeg8_encode(ds.pixel_array, **kw), ts)


def _deflate(ds):  # a data set encoding: pydicom deflates the whole data set on save
    ds.file_meta.TransferSyntaxUID = uid.DeflatedExplicitVRLittleEndian


# syntax -> (re-encode one dataset in place, maximum |HU difference| allowed)
CODECS = {
    "rle": (lambda ds: ds.compress(uid.RLELossless, generate_instance_uid=False), 0),
    "jpeg-ls": (lambda ds: ds.compress(uid.JPEGLSLossless, generate_instance_uid=False), 0),
    "jpeg-ls-near": (  # near-lossless: every value within jls_error of the original
        lambda ds: ds.compress(uid.JPEGLSNearLossless, jls_error=3, generate_instance_uid=False),
        3,
    ),
    "j2k-lossless": (
        lambda ds: ds.compress(uid.JPEG2000Lossless, generate_instance_uid=False),
        0,
    ),
    "j2k": (
        lambda ds: ds.compress(uid.JPEG2000, j2k_cr=[4], generate_instance_uid=False),
        120,
    ),
    "jpeg-lossless-sv1": (
        lambda ds: _jpeg(ds, uid.JPEGLosslessSV1, lossless=True, predictor=1, bitspersample=12),
        0,
    ),
    "jpeg-lossless": (
        lambda ds: _jpeg(ds, uid.JPEGLossless, lossless=True, predictor=6, bitspersample=12),
        0,
    ),
    "jpeg-extended-12bit": (
        lambda ds: _jpeg(ds, uid.JPEGExtended12Bit, level=95, bitspersample=12),
        120,
    ),
    "deflate": (_deflate, 0),
}


@pytest.mark.parametrize("name", sorted(CODECS))
def test_transfer_syntax_decodes_to_the_uncompressed_volume(tmp_path, name):
    files = _series(tmp_path / "plain")
    reference = _convert(tmp_path / "plain")
    encode, tolerance = CODECS[name]
    coded = tmp_path / name
    coded.mkdir()
    for f in files:
        ds = pydicom.dcmread(f)
        encode(ds)
        ds.save_as(coded / f.name, enforce_file_format=True)
    ts = pydicom.dcmread(coded / files[0].name, stop_before_pixels=True).file_meta
    assert ts.TransferSyntaxUID != uid.ExplicitVRLittleEndian
    diff = np.abs(_convert(coded) - reference)
    assert diff.max() <= tolerance, f"{name}: max |HU difference| {diff.max()}"
    if tolerance > 10:  # lossy: small on average, not only bounded
        assert diff.mean() < 10


def test_jpeg_baseline_8bit_decodes(tmp_path):
    """8-bit baseline (.50) holds 8-bit pixels: a CT stored as 0-255 with slope 8."""
    files = _series(tmp_path / "plain")
    ic = _imagecodecs()
    plain8, coded = tmp_path / "plain8", tmp_path / "jpeg"
    plain8.mkdir()
    coded.mkdir()
    for f in files:
        ds = pydicom.dcmread(f)
        hu = ds.pixel_array.astype(np.int32) + int(ds.RescaleIntercept)
        u8 = np.clip((hu + 1024) // 8, 0, 255).astype(np.uint8)
        ds.BitsAllocated = ds.BitsStored = 8
        ds.HighBit = 7
        ds.PixelRepresentation = 0
        ds.RescaleSlope, ds.RescaleIntercept = 8, -1024
        ds.PixelData = u8.tobytes()
        ds.save_as(plain8 / f.name, enforce_file_format=True)
        _encapsulate(ds, ic.jpeg8_encode(u8, level=95), uid.JPEGBaseline8Bit)
        ds.save_as(coded / f.name, enforce_file_format=True)
    diff = np.abs(_convert(coded) - _convert(plain8))
    assert diff.max() <= 8 * 12 and diff.mean() < 8 * 2


def test_corrupt_compressed_frame_is_a_clear_refusal(tmp_path):
    """The failure mode: a frame the decoders cannot read refuses the series by index."""
    files = _series(tmp_path / "plain")
    coded = tmp_path / "bad"
    coded.mkdir()
    for i, f in enumerate(files):
        ds = pydicom.dcmread(f)
        ds.compress(uid.JPEGLSLossless, generate_instance_uid=False)
        if i == 3:
            _encapsulate(ds, b"\xff\xd8\xff\xf7" + b"\x00" * 64, uid.JPEGLSLossless)
        ds.save_as(coded / f.name, enforce_file_format=True)
    with pytest.raises(convert.ConversionRefusedError, match=r"UNREADABLE_INSTANCE.*instance \d"):
        _convert(coded)


def test_decoders_are_pinned():
    """Each decoder radflow relies on is a pinned dependency (pyproject.toml)."""
    text = (Path(__file__).resolve().parents[1] / "pyproject.toml").read_text()
    for pin in (
        "python-gdcm==",
        "pylibjpeg==",
        "pylibjpeg-openjpeg==",
        "pylibjpeg-rle==",
        "pyjpegls==",
    ):
        assert pin in text

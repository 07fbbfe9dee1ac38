"""World-coordinate correctness of convert: a bright marker at a known patient position must land
at the same RAS position in the output, for every geometry scanners produce."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
import pytest
from dicom2nifti import common as d2n_common

from radflow import convert, geometry
from radflow.demo import VENDORS, Phantom, SeriesSpec, StudySpec, SubjectSpec, write_series

MARKER_LPS = np.array([14.0, -9.0, 7.0])  # off-centre on every axis, so any flip shows
MARKER_HU = 1000.0
BLOCK_HU = 200.0


class MarkerPhantom:
    """0 HU everywhere, a 200 HU slab for x > 20 (LPS) and a 1000 HU ball at MARKER_LPS."""

    def hu(self, points: np.ndarray) -> np.ndarray:
        out = np.where(points[..., 0] > 20.0, BLOCK_HU, 0.0).astype(np.float32)
        d = np.linalg.norm(points - MARKER_LPS, axis=-1)
        out[d <= 4.5] = MARKER_HU
        return out


BASE = SeriesSpec(
    number=2,
    description="test",
    kernel="B30f",
    rows=36,
    cols=40,
    pixel_spacing=(2.0, 2.0),
    thickness=2.0,
    n_slices=30,
    center=(3.0, -2.0, 5.0),
    noise_hu=0.0,
)
T12 = np.radians(12.0)
R30 = np.radians(30.0)
CASES = {
    "axial": BASE,
    "reversed": replace(BASE, reversed_order=True),
    "anisotropic": replace(BASE, pixel_spacing=(1.5, 2.5), thickness=3.0, n_slices=22),
    "oblique": replace(
        BASE,
        iop=(
            np.cos(R30),
            np.sin(R30) * np.cos(T12),
            np.sin(R30) * np.sin(T12),
            0.0,
            np.cos(T12),
            -np.sin(T12),
        ),
    ),
    "coronal": replace(BASE, iop=(1, 0, 0, 0, 0, -1)),
    "sagittal": replace(BASE, iop=(0, 1, 0, 0, 0, -1)),
    "tilted": replace(
        BASE, iop=(1, 0, 0, 0, np.cos(T12), -np.sin(T12)), step_dir=(0, 0, 1), gantry_tilt_deg=12
    ),
    "rle": replace(BASE, rle=True),
    "intercept_8192": replace(BASE, intercept=-8192.0),
    "signed": replace(BASE, intercept=0.0),
    "missing_slice": replace(BASE, drop_slices=(14,)),
}
RESAMPLED = {"oblique", "tilted"}


def _orthonormal(iop):
    r = np.asarray(iop[:3], float)
    c = np.asarray(iop[3:], float)
    c = c - (c @ r) * r
    return tuple(np.round(np.r_[r / np.linalg.norm(r), c / np.linalg.norm(c)], 6))


def write_case(tmp: Path, name: str) -> list[Path]:
    spec = replace(CASES[name], iop=_orthonormal(CASES[name].iop))
    subj = SubjectSpec(0, "PID", "TEST^NAME", "19700101", "F", 0, True, Phantom())
    study = StudySpec(0, "ACC1", "20200101", VENDORS[0], (spec,))
    return write_series(
        tmp / name, MarkerPhantom(), spec, subj, study, "1.2.3.4", f"1.2.3.4.{hash(name) % 997}", 0
    )


def marker_centroid(data: np.ndarray, affine: np.ndarray) -> np.ndarray:
    w = np.clip(data.astype(float) - 600.0, 0, None)
    ijk = np.argwhere(w > 0)
    c = (ijk * w[w > 0][:, None]).sum(0) / w[w > 0].sum()
    return geometry.voxel_to_world(affine, c)


@pytest.mark.parametrize("name", sorted(CASES))
def test_marker_lands_at_its_ras_position(tmp_path, name):
    files = write_case(tmp_path, name)
    out = tmp_path / f"{name}.nii.gz"
    sc = convert.convert(tmp_path / name, out, convert.ConvertSettings(), case_id="case-x")
    img = nib.load(out)
    data = np.asanyarray(img.dataobj)
    assert data.dtype == np.int16
    assert nib.aff2axcodes(img.affine) == ("R", "A", "S")
    np.testing.assert_allclose(img.get_qform(), img.get_sform(), atol=1e-5)
    spacing = geometry.ras_spacing(img.affine)
    err = np.abs(marker_centroid(data, img.affine) - geometry.lps_to_ras(MARKER_LPS))
    assert (err <= spacing / 2).all(), f"{name}: marker off by {err} mm (spacing {spacing})"
    assert sc["geometry"]["resampled"] == (name in RESAMPLED)
    if name not in RESAMPLED and name != "missing_slice":
        # no interpolation: the output is exactly a permutation of the DICOM HU pixels
        hu = np.concatenate([_hu(f).ravel() for f in files])
        np.testing.assert_array_equal(np.sort(data.ravel()), np.sort(hu))
    else:
        assert MARKER_HU * 0.6 < data.max() <= MARKER_HU
        assert set(np.unique(data[(data > -1) & (data < 1)])) <= {0}


def _hu(path):
    ds = pydicom.dcmread(path)
    return ds.pixel_array.astype(np.int32) * int(ds.RescaleSlope) + int(ds.RescaleIntercept)


def test_every_voxel_world_position_matches_dicom(tmp_path):
    """Not just the marker: each output voxel sits at its DICOM pixel's patient position."""
    files = write_case(tmp_path, "reversed")
    out = tmp_path / "o.nii.gz"
    convert.convert(tmp_path / "reversed", out, convert.ConvertSettings())
    img = nib.load(out)
    data = np.asanyarray(img.dataobj)
    inv = np.linalg.inv(img.affine)
    for f in files[::7]:
        ds = pydicom.dcmread(f)
        iop = np.asarray(ds.ImageOrientationPatient, float)
        dr, dc = (float(v) for v in ds.PixelSpacing)
        for r, c in [(0, 0), (5, 31), (35, 2)]:
            lps = np.asarray(ds.ImagePositionPatient, float) + c * dc * iop[:3] + r * dr * iop[3:]
            ijk = np.rint(geometry.voxel_to_world(inv, geometry.lps_to_ras(lps))).astype(int)
            assert data[tuple(ijk)] == _hu(f)[r, c]


def test_resampling_to_spacing_keeps_world_position(tmp_path):
    write_case(tmp_path, "anisotropic")
    out = tmp_path / "iso.nii.gz"
    sc = convert.convert(
        tmp_path / "anisotropic", out, convert.ConvertSettings(spacing_mm=(1.25, 1.25, 1.25))
    )
    img = nib.load(out)
    np.testing.assert_allclose(geometry.ras_spacing(img.affine), [1.25] * 3)
    assert sc["geometry"]["resampled"] and sc["geometry"]["interpolation"] == "linear"
    err = np.abs(
        marker_centroid(np.asanyarray(img.dataobj), img.affine) - geometry.lps_to_ras(MARKER_LPS)
    )
    assert (err <= 0.625).all()


def test_cubic_interpolation_runs_and_keeps_position(tmp_path):
    write_case(tmp_path, "axial")
    out = tmp_path / "c.nii.gz"
    convert.convert(
        tmp_path / "axial",
        out,
        convert.ConvertSettings(spacing_mm=(1.5, 1.5, 1.5), interpolation="cubic"),
    )
    img = nib.load(out)
    err = np.abs(
        marker_centroid(np.asanyarray(img.dataobj), img.affine) - geometry.lps_to_ras(MARKER_LPS)
    )
    assert (err <= 0.75).all()


def test_affine_agrees_with_dicom2nifti(tmp_path):
    files = write_case(tmp_path, "oblique")
    headers = [pydicom.dcmread(f, stop_before_pixels=True) for f in files]
    ordered = d2n_common.sort_dicoms(headers)
    d2n_aff, _ = d2n_common.create_affine(ordered)
    step = (
        np.asarray(ordered[-1].ImagePositionPatient, float)
        - np.asarray(ordered[0].ImagePositionPatient, float)
    ) / (len(ordered) - 1)
    ours = geometry.series_affine_ras(
        ordered[0].ImageOrientationPatient,
        ordered[0].ImagePositionPatient,
        step,
        ordered[0].PixelSpacing,
    )
    np.testing.assert_allclose(ours, d2n_aff, atol=1e-6)


def test_missing_slice_is_interpolated_and_recorded(tmp_path):
    write_case(tmp_path, "missing_slice")
    sc = convert.convert(
        tmp_path / "missing_slice", tmp_path / "m.nii.gz", convert.ConvertSettings()
    )
    assert sc["qc"]["interpolated_slices"] == [14]
    assert nib.load(tmp_path / "m.nii.gz").shape[2] == 30


def test_gap_beyond_limit_is_refused(tmp_path):
    write_case(tmp_path, "missing_slice")
    with pytest.raises(convert.ConversionRefusedError, match="SLICE_GAP"):
        convert.convert(
            tmp_path / "missing_slice",
            tmp_path / "m.nii.gz",
            convert.ConvertSettings(max_missing_slices=0),
        )
    assert not (tmp_path / "m.nii.gz").exists()


def test_tilt_refused_by_config(tmp_path):
    write_case(tmp_path, "tilted")
    with pytest.raises(convert.ConversionRefusedError, match="GANTRY_TILT"):
        convert.convert(
            tmp_path / "tilted",
            tmp_path / "t.nii.gz",
            convert.ConvertSettings(gantry_tilt="refuse"),
        )


def test_tilt_is_measured_and_corrected(tmp_path):
    write_case(tmp_path, "tilted")
    sc = convert.convert(tmp_path / "tilted", tmp_path / "t.nii.gz", convert.ConvertSettings())
    assert sc["qc"]["gantry_tilt_deg"] == pytest.approx(12.0, abs=0.1)
    assert sc["qc"]["tilt_corrected"] is True
    assert geometry.is_axis_aligned(nib.load(tmp_path / "t.nii.gz").affine)


def test_sidecar_has_provenance_and_no_phi(tmp_path):
    write_case(tmp_path, "axial")
    sc = convert.convert(
        tmp_path / "axial",
        tmp_path / "a.nii.gz",
        convert.ConvertSettings(),
        case_id="case-1",
        salt="salt-123456789",
    )
    text = (tmp_path / "a.json").read_text()
    for phi in ("PID", "TEST^NAME", "19700101", "ACC1", "1.2.3.4", "Demo General"):
        assert phi not in text
    assert sc["series_id"].startswith("ser-")
    assert sc["tools"]["dicom2nifti"] and sc["settings"]["dicom2nifti"]["validate_orientation"]
    assert sc["geometry"]["orientation"] == "RAS"


def test_mixed_folder_needs_a_series_choice(tmp_path):
    write_case(tmp_path / "mixed", "axial")
    write_case(tmp_path / "mixed", "coronal")
    with pytest.raises(convert.ConversionRefusedError, match="MIXED_SERIES"):
        convert.convert(tmp_path / "mixed", tmp_path / "x.nii.gz", convert.ConvertSettings())


def test_truncated_file_is_a_clear_refusal(tmp_path):
    files = write_case(tmp_path, "axial")
    with open(files[10], "r+b") as fh:
        fh.truncate(files[10].stat().st_size - 100)
    with pytest.raises(convert.ConversionRefusedError, match="TRUNCATED"):
        convert.convert(tmp_path / "axial", tmp_path / "x.nii.gz", convert.ConvertSettings())

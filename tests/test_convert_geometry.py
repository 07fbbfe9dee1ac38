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
from scipy import ndimage

from radflow import convert, geometry
from radflow.demo import VENDORS, Phantom, SeriesSpec, StudySpec, SubjectSpec, write_series
from radflow.demo.enhanced import write_enhanced

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


# --------------------------------------------------------------------------- irregular spacing

# 24 slices at irregular steps (1.4-3.1 mm, none a multiple of another), like a head CT
# reconstructed with varying increments
IRREGULAR_STEPS = (2.0, 1.4, 2.6, 2.0, 3.1, 1.7, 2.0, 2.4, 1.4, 2.0) * 2 + (2.2, 1.6, 2.9)
_OFFSETS = np.concatenate([[0.0], np.cumsum(IRREGULAR_STEPS)])
IRREGULAR_OFFSETS = tuple(np.round(_OFFSETS - _OFFSETS.mean(), 3))


class RampPhantom:
    """HU linear in LPS position: linear interpolation reproduces it exactly wherever it is
    done in the right place, so any voxel off its world position shows as an HU error."""

    def hu(self, points: np.ndarray) -> np.ndarray:
        return (100.0 + 10.0 * points[..., 2] + 0.5 * points[..., 0] - 0.3 * points[..., 1]).astype(
            np.float32
        )


def ramp_lps(world_ras: np.ndarray) -> np.ndarray:
    lps = geometry.lps_to_ras(world_ras)  # the flip is its own inverse
    return 100.0 + 10.0 * lps[..., 2] + 0.5 * lps[..., 0] - 0.3 * lps[..., 1]


def write_spec(tmp: Path, name: str, spec: SeriesSpec, phantom=None) -> list[Path]:
    spec = replace(spec, iop=_orthonormal(spec.iop))
    subj = SubjectSpec(0, "PID", "TEST^NAME", "19700101", "F", 0, True, Phantom())
    study = StudySpec(0, "ACC1", "20200101", VENDORS[0], (spec,))
    return write_series(
        tmp / name,
        phantom or MarkerPhantom(),
        spec,
        subj,
        study,
        "1.2.3.4",
        f"1.2.3.4.{abs(hash(name)) % 997}",
        0,
    )


IRREGULAR = replace(  # 3 mm slices: every gap covered but for < half a slice
    BASE, thickness=3.0, n_slices=len(IRREGULAR_OFFSETS), offsets_mm=IRREGULAR_OFFSETS
)
IRREGULAR_TILTED = replace(  # GE head CT: gantry tilt and irregular steps together
    IRREGULAR,
    iop=(1, 0, 0, 0, np.cos(np.radians(18.5)), -np.sin(np.radians(18.5))),
    step_dir=(0, 0, 1),
    gantry_tilt_deg=18.5,
)


@pytest.mark.parametrize("spec", [IRREGULAR, IRREGULAR_TILTED], ids=["axial", "tilted"])
def test_irregular_spacing_is_resampled_world_exact(tmp_path, spec):
    write_spec(tmp_path, "m", spec)
    out = tmp_path / "m.nii.gz"
    sc = convert.convert(tmp_path / "m", out, convert.ConvertSettings())
    img = nib.load(out)
    data = np.asanyarray(img.dataobj)
    spacing = geometry.ras_spacing(img.affine)
    err = np.abs(marker_centroid(data, img.affine) - geometry.lps_to_ras(MARKER_LPS))
    assert (err <= spacing / 2).all(), f"marker off by {err} mm (spacing {spacing})"
    rec = sc["qc"]["irregular_spacing"]
    assert rec["source_slices"] == 24
    assert rec["source_max_gap_mm"] == pytest.approx(3.1, abs=0.01)
    assert rec["source_min_gap_mm"] == pytest.approx(1.4, abs=0.01)
    assert rec["output_step_mm"] == pytest.approx(np.median(IRREGULAR_STEPS), rel=0.05)
    assert rec["uncovered_output_slices"] == []


def ramp_error(tmp: Path, spec: SeriesSpec) -> float:
    """Largest |HU - ramp(world position)| over voxels inside the acquired volume."""
    write_spec(tmp, "r", replace(spec, noise_hu=0.0), RampPhantom())
    out = tmp / "r.nii.gz"
    convert.convert(tmp / "r", out, convert.ConvertSettings(hu_clip=None))
    img = nib.load(out)
    data = np.asanyarray(img.dataobj).astype(float)
    inside = ndimage.binary_erosion(data > -1024, iterations=2)
    assert inside.sum() > 0.3 * data.size
    expect = ramp_lps(geometry.voxel_to_world(img.affine, np.argwhere(inside)))
    return float(np.abs(data[inside] - expect).max())


@pytest.mark.parametrize("spec", [IRREGULAR, IRREGULAR_TILTED], ids=["axial", "tilted"])
def test_irregular_every_voxel_has_the_hu_of_its_world_position(tmp_path, spec):
    """A linear ramp (10 HU/mm along z) survives linear interpolation exactly: every voxel
    inside the acquired volume holds the ramp's value at its own world position."""
    err = ramp_error(tmp_path, spec)
    assert err <= 1.5, f"HU off by up to {err:.1f} (world misplacement)"


def test_ramp_check_catches_nominal_positions(tmp_path, monkeypatch):
    """The failure mode: slices treated as evenly spaced between the first and the last."""
    exact = geometry.regular_stack

    def nominal(pos, thickness_mm=0.0):
        return exact(np.linspace(pos[0], pos[-1], len(pos)), thickness_mm)

    monkeypatch.setattr(convert.geometry, "regular_stack", nominal)
    assert ramp_error(tmp_path, IRREGULAR) > 5.0


def test_irregular_spacing_refused_by_config(tmp_path):
    write_spec(tmp_path, "m", IRREGULAR)
    with pytest.raises(convert.ConversionRefusedError, match="IRREGULAR_SPACING.*refuse"):
        convert.convert(
            tmp_path / "m",
            tmp_path / "m.nii.gz",
            convert.ConvertSettings(irregular_spacing="refuse"),
        )
    assert not (tmp_path / "m.nii.gz").exists()


def test_irregular_gap_beyond_max_missing_slices_is_refused(tmp_path):
    offsets = np.array(IRREGULAR_OFFSETS)
    offsets[12:] += 7.0  # a 7+ mm hole: several 2 mm output slices no 2 mm slice covers
    spec = replace(IRREGULAR, offsets_mm=tuple(offsets))
    write_spec(tmp_path, "g", spec)
    with pytest.raises(convert.ConversionRefusedError, match="SLICE_GAP.*no acquired slice"):
        convert.convert(tmp_path / "g", tmp_path / "g.nii.gz", convert.ConvertSettings())
    sc = convert.convert(
        tmp_path / "g", tmp_path / "g.nii.gz", convert.ConvertSettings(max_missing_slices=5)
    )
    assert 2 <= len(sc["qc"]["irregular_spacing"]["uncovered_output_slices"]) <= 5


def test_irregular_positions_off_a_straight_stack_are_refused(tmp_path):
    files = write_spec(tmp_path, "b", IRREGULAR)
    ds = pydicom.dcmread(files[7])
    ipp = [float(v) for v in ds.ImagePositionPatient]
    ds.ImagePositionPatient = [ipp[0] + 3.0, *ipp[1:]]
    ds.save_as(files[7])
    with pytest.raises(convert.ConversionRefusedError, match="NONLINEAR_POSITIONS"):
        convert.convert(tmp_path / "b", tmp_path / "b.nii.gz", convert.ConvertSettings())


# --------------------------------------------------------------------------- multi-frame


def _enhanced(tmp: Path, name: str, **kw) -> tuple[list[Path], Path]:
    files = write_case(tmp, name)
    rng = np.random.default_rng(0)
    mf = write_enhanced(
        files, tmp / "mf" / name / "enhanced.dcm", frame_order=rng.permutation(len(files)), **kw
    )
    return files, mf


@pytest.mark.parametrize("name", ["axial", "reversed", "oblique", "tilted", "signed"])
def test_enhanced_multiframe_converts_like_its_single_frame_series(tmp_path, name):
    _, mf = _enhanced(tmp_path, name, per_frame_rescale=True)
    a = tmp_path / "single.nii.gz"
    b = tmp_path / "multi.nii.gz"
    convert.convert(tmp_path / name, a, convert.ConvertSettings())
    sc = convert.convert(mf.parent, b, convert.ConvertSettings())
    ia, ib = nib.load(a), nib.load(b)
    np.testing.assert_allclose(ib.affine, ia.affine, atol=1e-4)
    np.testing.assert_array_equal(np.asanyarray(ib.dataobj), np.asanyarray(ia.dataobj))
    assert sc["acquisition"]["multiframe"] is True
    assert sc["acquisition"]["n_instances"] == 1 and sc["acquisition"]["n_slices"] == 30
    assert sc["acquisition"]["kernel"] == "B30f"


def _mutate(mf: Path, change) -> None:
    ds = pydicom.dcmread(mf)
    change(ds)
    ds.save_as(mf)


def _tilt_half(ds):
    for item in ds.PerFrameFunctionalGroupsSequence[::2]:
        iop = pydicom.Dataset()
        iop.ImageOrientationPatient = [1, 0, 0, 0, 0, -1]
        item.PlaneOrientationSequence = [iop]


def _two_times(ds):
    for i, item in enumerate(ds.PerFrameFunctionalGroupsSequence):
        item.FrameContentSequence[0].TemporalPositionIndex = 1 + i % 2


def _repeat_positions(ds):
    seq = ds.PerFrameFunctionalGroupsSequence
    for i in range(1, len(seq), 2):
        seq[i].PlanePositionSequence = seq[i - 1].PlanePositionSequence


def _no_per_frame(ds):
    del ds.PerFrameFunctionalGroupsSequence


def _no_position(ds):
    del ds.PerFrameFunctionalGroupsSequence[4].PlanePositionSequence


@pytest.mark.parametrize(
    ("change", "code"),
    [
        (_tilt_half, "MULTIFRAME_ORIENTATION"),
        (_two_times, "MULTIFRAME_4D"),
        (_repeat_positions, "MULTIFRAME_4D"),
        (_no_per_frame, "MULTIFRAME_NO_GEOMETRY"),
        (_no_position, "MULTIFRAME_GEOMETRY"),
    ],
)
def test_multiframe_that_is_not_one_volume_is_refused(tmp_path, change, code):
    _, mf = _enhanced(tmp_path, "axial")
    _mutate(mf, change)
    with pytest.raises(convert.ConversionRefusedError, match=code):
        convert.convert(mf.parent, tmp_path / "x.nii.gz", convert.ConvertSettings())
    assert not (tmp_path / "x.nii.gz").exists()


def test_ingest_counts_frames_as_slices(tmp_path):
    from radflow import ingest

    _, mf = _enhanced(tmp_path, "axial")
    rules = ingest.SelectionRules(min_slices=20)
    series = ingest.select_series(
        ingest.summarize_series(ingest.scan(mf.parent), rules), rules
    ).iloc[0]
    assert series["n_instances"] == 1 and series["n_frames"] == 30
    assert series["reason_code"] == "SELECTED", series["reason"]
    assert series["slice_spacing_mm"] == pytest.approx(2.0)
    _mutate(mf, _two_times)
    series = ingest.select_series(
        ingest.summarize_series(ingest.scan(mf.parent), rules), rules
    ).iloc[0]
    assert series["reason_code"] == "MULTIFRAME_4D" and "temporal" in series["reason"]


def test_ingest_judges_irregular_spacing_as_convert_does(tmp_path):
    """Ingest selects what convert resamples and excludes what convert refuses, same reason."""
    from radflow import ingest

    offsets = np.array(IRREGULAR_OFFSETS)
    offsets[12:] += 7.0
    write_spec(tmp_path, "ok", IRREGULAR)
    write_spec(tmp_path, "hole", replace(IRREGULAR, offsets_mm=tuple(offsets), number=3))
    for name, rules, code in [
        ("ok", {}, "SELECTED"),
        ("ok", {"irregular_spacing": "refuse"}, "IRREGULAR_SPACING"),
        ("hole", {}, "SLICE_GAP"),
        ("hole", {"max_missing_slices": 5}, "SELECTED"),
    ]:
        r = ingest.SelectionRules.from_dict(rules)
        row = ingest.select_series(
            ingest.summarize_series(ingest.scan(tmp_path / name), r), r
        ).iloc[0]
        assert row["irregular_spacing"], name
        assert row["reason_code"] == code, (name, rules, row["reason"])

"""The real files in ../shared/data (TotalSegmentator's example CT: 20 Siemens slices, JPEG 2000,
blank UIDs), where that folder exists; skipped on a fresh clone without it."""

from __future__ import annotations

import nibabel as nib
import numpy as np
import pandas as pd
import pytest

from radflow import convert, ingest, labels

from .conftest import REPO

EXAMPLE = REPO.parent / "shared" / "data" / "totalseg_example_ct"
pytestmark = pytest.mark.skipif(not EXAMPLE.exists(), reason="../shared/data is not here")


def test_real_series_with_blank_uids_is_one_flagged_case_on_the_reference_grid(tmp_path):
    """The real anonymised series (StudyInstanceUID, SeriesInstanceUID, SOPInstanceUID,
    SOPClassUID and PatientID blank) is one selected series flagged uid_fallback and
    patient_id_fallback, not 20 rejected files; its file list converts onto exactly the grid of
    TotalSegmentator's reference label map, and the labelled voxels are body, not air."""
    pub = ingest.ingest(
        EXAMPLE,
        tmp_path / "inv",
        tmp_path / "priv",
        ingest.SelectionRules(),
        labels.LabelSpec(),
        "salt-0123456789",
    )
    assert pub["reason_code"].tolist() == ["SELECTED"]
    case = pub.iloc[0]
    assert {"uid_fallback", "patient_id_fallback"} <= set(case["flags"].split(";"))
    assert (case["n_instances"], case["kernel_class"]) == (20, "soft")
    assert "Siemens Br38f" in case["reason"]
    rejected = pd.read_csv(tmp_path / "inv" / "rejected_files.csv")
    assert len(rejected) == 2  # the README and the reference label map: not DICOM
    assert rejected["error"].str.startswith("not DICOM").all()
    public = pd.concat([pub.astype(str), rejected.astype(str)])
    assert not public.apply(lambda c: c.str.contains("CT.1.3.12|totalseg")).any().any()

    sc = convert.convert(
        tmp_path / "priv" / "series" / f"{case['case_id']}.json",
        tmp_path / "ct.nii.gz",
        convert.ConvertSettings(),  # native spacing: the reference's grid
    )
    assert sc["acquisition"]["n_instances"] == 20
    img = nib.load(tmp_path / "ct.nii.gz")
    ref = nib.as_closest_canonical(nib.load(EXAMPLE / "reference_seg.nii.gz"))
    assert img.shape == ref.shape == (512, 512, 20)
    np.testing.assert_allclose(img.affine, ref.affine, atol=1e-3)
    hu = np.asarray(img.dataobj)
    seg = np.asarray(ref.dataobj)
    assert seg.any()
    assert (hu[seg > 0] > -300).mean() > 0.95  # labels land on tissue: voxels correspond
    assert (hu[seg == 0] < -900).mean() > 0.2  # and the air around the body is unlabelled


def test_convert_of_the_real_jpeg2000_series_lands_on_the_reference_in_world_space(tmp_path):
    sc = convert.convert(
        EXAMPLE / "dicom",
        tmp_path / "ct.nii.gz",
        convert.ConvertSettings.from_dict({"spacing_mm": [3.0, 3.0, 3.0]}),
    )
    assert sc["acquisition"]["transfer_syntax"] == "1.2.840.10008.1.2.4.90"
    img, ref = nib.load(tmp_path / "ct.nii.gz"), nib.load(EXAMPLE / "reference_seg.nii.gz")
    assert img.get_data_dtype() == np.int16 and nib.aff2axcodes(img.affine) == ("R", "A", "S")
    assert -1024 <= sc["qc"]["hu_min"] < -900 and 500 < sc["qc"]["hu_max"] < 3072  # HU

    def box(im):
        ijk = np.array([[i, j, k] for i in (0, 1) for j in (0, 1) for k in (0, 1)])
        world = nib.affines.apply_affine(im.affine, ijk * (np.array(im.shape[:3]) - 1))
        return world.min(0), world.max(0)

    (lo, hi), (rlo, rhi) = box(img), box(ref)
    np.testing.assert_allclose(lo, rlo, atol=3.0)  # within one output voxel of the reference
    np.testing.assert_allclose(hi, rhi, atol=3.0)

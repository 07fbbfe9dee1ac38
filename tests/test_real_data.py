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


def test_ingest_of_a_tree_with_no_usable_series_records_every_file(tmp_path):
    """Every file rejected (blank UIDs, non-DICOM): ingest finishes with an empty inventory and
    one recorded reason per file, no raw path in the public table (it crashed before)."""
    pub = ingest.ingest(
        EXAMPLE,
        tmp_path / "inv",
        tmp_path / "priv",
        ingest.SelectionRules(),
        labels.LabelSpec(),
        "salt-0123456789",
    )
    assert len(pub) == 0
    rejected = pd.read_csv(tmp_path / "inv" / "rejected_files.csv")
    assert len(rejected) == 22
    assert (rejected["error"].str.contains("without StudyInstanceUID")).sum() == 20
    assert not rejected.astype(str).apply(lambda c: c.str.contains("CT.1.3.12")).any().any()


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

"""mask: geometry of the crop, background, dilation in mm, exclusions; QC metrics."""

from __future__ import annotations

import json

import nibabel as nib
import numpy as np
import pytest

from radflow import geometry, mask, plausibility, qc
from radflow.io import save_nifti

NAMES = {1: "spleen", 5: "liver", 2: "kidney_right"}


def _case(shape=(60, 50, 40), spacing=(0.8, 0.8, 2.5)):
    aff = np.diag([*spacing, 1.0])
    aff[:3, 3] = [-20.0, 15.0, -100.0]
    img = np.full(shape, 30, np.int16)
    seg = np.zeros(shape, np.uint8)
    seg[20:40, 10:30, 10:25] = 5  # liver block
    seg[45:50, 35:40, 5:8] = 1
    img[seg == 5] = 60
    img[30, 20, 17] = 999  # a known voxel inside the ROI
    return img, aff, seg


def test_crop_affine_keeps_world_position():
    img, aff, seg = _case()
    s = mask.MaskSettings(rois=("liver",), margin_mm=5.0, size=None)
    res = mask.apply_mask(img, aff, seg, NAMES, s)
    world = geometry.voxel_to_world(aff, [30, 20, 17])
    ijk = np.rint(geometry.voxel_to_world(np.linalg.inv(res.affine), world)).astype(int)
    assert res.masked[tuple(ijk)] == 999
    lo, hi = res.bbox_vox
    assert lo == [20 - 7, 10 - 7, 10 - 2] and hi == [
        40 + 7,
        30 + 7,
        25 + 2,
    ]  # ceil(5/0.8)=7, ceil(5/2.5)=2
    assert res.masked.shape == tuple(b - a for a, b in zip(lo, hi, strict=True))


def test_background_value_outside_roi():
    img, aff, seg = _case()
    res = mask.apply_mask(
        img, aff, seg, NAMES, mask.MaskSettings(background_hu=-777, crop=False, size=None)
    )
    assert (res.masked[seg != 5] == -777).all()
    assert (res.masked[seg == 5] >= 60).all()
    assert res.masked.dtype == np.int16


def test_dilation_is_in_mm_on_anisotropic_voxels():
    shape, spacing = (41, 41, 41), (0.5, 0.5, 2.0)
    m = np.zeros(shape, bool)
    m[20, 20, 20] = True
    d = mask.dilate_mm(m, spacing, 4.0)
    idx = np.argwhere(d)
    assert idx[:, 0].min() == 20 - 8 and idx[:, 0].max() == 20 + 8  # 4 mm / 0.5 mm
    assert idx[:, 2].min() == 20 - 2 and idx[:, 2].max() == 20 + 2  # 4 mm / 2 mm
    assert not d[20 + 6, 20 + 6, 20]  # 4.24 mm away: outside the ball


def test_fixed_size_resample_keeps_world_and_aspect():
    img, aff, seg = _case()
    res = mask.apply_mask(img, aff, seg, NAMES, mask.MaskSettings(size=(32, 32, 32), margin_mm=0))
    assert res.masked.shape == (32, 32, 32) and res.roi.shape == (32, 32, 32)
    sp = geometry.ras_spacing(res.affine)
    assert np.allclose(sp, sp[0])  # isotropic: aspect kept
    # the ROI box centre stays at the same world point
    box_centre = geometry.voxel_to_world(aff, [29.5, 19.5, 17.0])
    grid_centre = geometry.voxel_to_world(res.affine, [15.5, 15.5, 15.5])
    np.testing.assert_allclose(box_centre, grid_centre, atol=1e-6)
    roi_world = geometry.voxel_to_world(res.affine, np.argwhere(res.roi).mean(0))
    np.testing.assert_allclose(roi_world, box_centre, atol=sp[0])


def test_empty_roi_is_excluded_with_reason():
    img, aff, seg = _case()
    seg[seg == 5] = 0
    res = mask.apply_mask(img, aff, seg, NAMES, mask.MaskSettings())
    assert not res.usable and "empty" in res.reason


def test_small_roi_is_excluded_with_reason():
    img, aff, seg = _case()
    res = mask.apply_mask(img, aff, seg, NAMES, mask.MaskSettings(rois=("spleen",), min_roi_ml=1.0))
    assert not res.usable and "0.1 mL" in res.reason  # 5*5*3 voxels of 1.6 uL


def test_bad_roi_name_lists_close_matches():
    with pytest.raises(ValueError, match="did you mean liver"):
        mask.validate_roi_names(["livers"], NAMES.values())


def _run_on_files(tmp_path, img, aff, seg, **kw):
    """Write a case as files (image, label map, label names) and run mask.mask on them."""
    save_nifti(img, aff, tmp_path / "img.nii.gz")
    save_nifti(seg, aff, tmp_path / "seg.nii.gz")
    (tmp_path / "seg.json").write_text(
        json.dumps({"labels": {str(k): v for k, v in NAMES.items()}})
    )
    # the toy liver is 10 mL: plausibility flags it (tests/test_plausibility.py), not excludes
    kw.setdefault("qc", plausibility.QcSettings(implausible="flag"))
    return mask.mask(
        tmp_path / "img.nii.gz",
        tmp_path / "seg.nii.gz",
        tmp_path / "m.nii.gz",
        mask.MaskSettings(size=(16, 16, 16)),
        tmp_path / "roi.nii.gz",
        tmp_path / "st.json",
        **kw,
    )


def test_run_writes_outputs_and_status(tmp_path):
    img, aff, seg = _case()
    st = _run_on_files(tmp_path, img, aff, seg)
    assert st["usable"] and st["shape"] == [16, 16, 16]
    m = nib.load(tmp_path / "m.nii.gz")
    assert m.get_data_dtype() == np.int16
    np.testing.assert_allclose(m.affine, nib.load(tmp_path / "roi.nii.gz").affine)


def test_segmentation_metrics_against_reference_on_another_grid():
    img, aff, seg = _case()
    ref_aff = aff.copy()
    ref_aff[:3, :3] *= 2  # coarser reference grid
    ref = np.zeros((30, 25, 20), np.uint8)
    ref[10:20, 5:15, 5:12] = 7  # the same liver block (half-res indices), own label id
    rows = qc.segmentation_rows("case-x", seg, aff, NAMES, ["liver"], (ref, ref_aff, {7: "liver"}))
    assert 0.75 < rows[0]["dice"] < 1 and 0.6 < rows[0]["iou"] < 1  # nearest-neighbour edges
    same = qc.segmentation_rows("case-x", seg, aff, NAMES, ["liver", "spleen"], (seg, aff, NAMES))
    assert [r["dice"] for r in same] == [1.0, 1.0]
    shifted = np.roll(seg, 10, axis=0)
    moved = qc.segmentation_rows("case-x", seg, aff, NAMES, ["liver"], (shifted, aff, NAMES))
    assert moved[0]["dice"] == pytest.approx(0.5)
    assert rows[0]["volume_ml"] == pytest.approx(20 * 20 * 15 * 0.8 * 0.8 * 2.5 / 1000)


def test_dice_iou_values():
    a = np.zeros(10, bool)
    b = np.zeros(10, bool)
    a[:4], b[2:6] = True, True
    assert qc.dice_iou(a, b) == (0.5, pytest.approx(1 / 3))


def test_qc_picture_is_written(tmp_path):
    img, aff, seg = _case()
    qc.triplanar_png(img, aff, seg == 5, tmp_path / "q.png", "case-x  liver 15.4 mL")
    assert (tmp_path / "q.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_stray_islands_do_not_stretch_the_crop():
    img, aff, seg = _case()
    seg[2:4, 2:4, 35:37] = 5  # a false-positive speck of "liver" far away
    s = mask.MaskSettings(margin_mm=0.0, size=None)
    res = mask.apply_mask(img, aff, seg, NAMES, s)
    assert res.bbox_vox == [[20, 10, 10], [40, 30, 25]]
    keep_all = mask.apply_mask(
        img, aff, seg, NAMES, mask.MaskSettings(margin_mm=0.0, size=None, largest_component=False)
    )
    assert keep_all.bbox_vox == [[2, 2, 10], [40, 30, 37]]


def test_run_writes_qc_picture_and_table_with_reference(tmp_path):
    img, aff, seg = _case()
    st = _run_on_files(
        tmp_path,
        img,
        aff,
        seg,
        qc_png=tmp_path / "qc.png",
        seg_qc=tmp_path / "q.csv",
        reference=tmp_path / "seg.nii.gz",
        case_id="case-x",
    )
    assert st["usable"]
    assert (tmp_path / "qc.png").read_bytes()[:4] == b"\x89PNG"
    import pandas as pd

    table = pd.read_csv(tmp_path / "q.csv")
    assert table.loc[0, "roi"] == "liver" and table.loc[0, "dice"] == 1.0


def test_lesion_left_out_by_the_organ_model_stays_in_the_roi():
    """A hypodense lesion labelled background inside the liver: a hole that fill_holes keeps."""
    img, aff, seg = _case()
    seg[28:32, 18:22, 15:19] = 0  # enclosed hole in the liver block
    img[28:32, 18:22, 15:19] = 5  # the lesion's HU
    s = mask.MaskSettings(crop=False, size=None, background_hu=-1024)
    res = mask.apply_mask(img, aff, seg, NAMES, s)
    assert (res.masked[28:32, 18:22, 15:19] == 5).all()
    assert res.roi[28:32, 18:22, 15:19].all()
    holes = mask.apply_mask(
        img, aff, seg, NAMES, mask.MaskSettings(crop=False, size=None, fill_holes=False)
    )
    assert (holes.masked[28:32, 18:22, 15:19] == -1024).all()


def test_qc_picture_is_radiological(tmp_path):
    """Patient right (high x in RAS) is drawn on the left of the axial panel."""
    import matplotlib.image as mpimg

    img = np.full((40, 40, 20), 40, np.int16)
    img[34:38, 18:22, :] = 3000  # a bright marker on the patient's right
    m = np.zeros(img.shape, bool)
    m[10:30, 10:30, 5:15] = True
    qc.triplanar_png(img, np.eye(4), m, tmp_path / "q.png", "orientation")
    pix = mpimg.imread(tmp_path / "q.png")[..., :3].mean(-1)
    axial = pix[:, : pix.shape[1] // 3]
    cols = np.nonzero((axial > 0.95).any(0))[0]
    assert len(cols) and cols.mean() < axial.shape[1] / 2


def test_a_case_failed_upstream_is_carried_over_with_its_reason(tmp_path):
    (tmp_path / "sidecar.json").write_text(
        json.dumps(
            {"status": "failed", "stage": "convert", "reason_code": "TRUNCATED", "reason": "cut"}
        )
    )
    st = mask.mask(
        tmp_path / "missing.nii.gz",
        tmp_path / "missing_seg.nii.gz",
        tmp_path / "m.nii.gz",
        mask.MaskSettings(),
        tmp_path / "roi.nii.gz",
        tmp_path / "st.json",
        qc_png=tmp_path / "qc.png",
        seg_qc=tmp_path / "q.csv",
        case_id="case-x",
        upstream=[tmp_path / "sidecar.json"],
    )
    assert st["status"] == "failed" and st["stage"] == "convert" and not st["usable"]
    assert json.loads((tmp_path / "st.json").read_text())["reason_code"] == "TRUNCATED"
    assert (tmp_path / "qc.png").read_bytes()[:4] == b"\x89PNG"
    assert not (tmp_path / "m.nii.gz").exists()


def test_no_background_fill_keeps_the_ct_in_the_same_crop():
    img, aff, seg = _case()
    filled = mask.apply_mask(img, aff, seg, NAMES, mask.MaskSettings(background_hu=-777))
    kept = mask.apply_mask(
        img, aff, seg, NAMES, mask.MaskSettings(background_hu=-777, fill_background=False)
    )
    np.testing.assert_allclose(kept.affine, filled.affine)  # the same crop and grid
    assert kept.masked.shape == filled.masked.shape == (64, 64, 64)
    np.testing.assert_array_equal(kept.roi, filled.roi)
    around = (filled.roi == 0) & (kept.masked != -777)  # outside the ROI, inside the volume
    assert around.sum() > 1000
    assert (kept.masked[around] == 30).mean() > 0.9  # the CT's own value around the organ
    assert (filled.masked[around] == -777).mean() > 0.9  # there the mask filled the background


def test_whole_volume_without_mask_is_resampled_and_its_roi_is_the_field_of_view(tmp_path):
    img, aff, _ = _case()
    save_nifti(img, aff, tmp_path / "img.nii.gz")
    s = mask.MaskSettings(enabled=False, size=(16, 16, 16))
    st = mask.mask(
        tmp_path / "img.nii.gz",
        None,
        tmp_path / "m.nii.gz",
        s,
        tmp_path / "r.nii.gz",
        tmp_path / "st.json",
    )
    assert st["usable"] and st["shape"] == [16, 16, 16] and not st["segmented"]
    assert st["roi_ml"] == pytest.approx(60 * 50 * 40 * 0.8 * 0.8 * 2.5 / 1000, rel=1e-6)
    m = np.asanyarray(nib.load(tmp_path / "m.nii.gz").dataobj)
    r = np.asanyarray(nib.load(tmp_path / "r.nii.gz").dataobj)
    assert (m[r > 0] == 30).mean() > 0.9  # the whole volume, nothing filled inside it
    assert 0 < r.mean() < 1  # the field of view, padded on the short axes (48 x 40 x 100 mm)
    assert st["crop_bbox_vox"] is None and st["rois"] == []


def test_masking_without_a_label_map_is_refused_clearly(tmp_path):
    img, aff, _ = _case()
    save_nifti(img, aff, tmp_path / "img.nii.gz")
    with pytest.raises(ValueError, match="mask.enabled true needs a segmentation"):
        mask.mask(
            tmp_path / "img.nii.gz",
            None,
            tmp_path / "m.nii.gz",
            mask.MaskSettings(),
            tmp_path / "r.nii.gz",
            tmp_path / "st.json",
        )


def test_float_volume_keeps_its_values_through_the_mask(tmp_path):
    """An MR/other volume (float32 from a NIfTI sheet) is not rounded to int16 by the mask."""
    import numpy as np

    from radflow.mask import MaskSettings, apply_mask, whole_volume

    rng = np.random.default_rng(0)
    image = rng.normal(0.5, 0.1, (20, 20, 20)).astype(np.float32)  # normalised MR-like values
    seg = np.zeros(image.shape, np.uint8)
    seg[5:15, 5:15, 5:15] = 1
    affine = np.diag([2.0, 2.0, 2.0, 1.0])
    s = MaskSettings(
        rois=("liver",),
        size=None,
        crop=True,
        margin_mm=0.0,
        dilation_mm=0.0,
        min_roi_ml=0.0,
        background_hu=0.0,
    )
    res = apply_mask(image, affine, seg, {1: "liver"}, s)
    assert res.masked.dtype == np.float32
    inside = res.masked[res.roi > 0]
    assert np.allclose(np.sort(inside), np.sort(image[seg > 0]))  # exact, not rounded
    whole = whole_volume(image, affine, MaskSettings(size=(8, 8, 8), background_hu=0.0))
    assert whole.masked.dtype == np.float32 and 0.3 < float(whole.masked.mean()) < 0.7

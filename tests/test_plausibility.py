"""Segmentation plausibility: each flag on tiny arrays, the record mask writes, and an
implausible case excluded from the manifest with its reason."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest

from radflow import manifest, mask, paths, plausibility
from radflow.io import save_nifti

LIVER = 5
NAMES = {LIVER: "liver", 1: "spleen"}
# 10 mm voxels: 1 voxel = 1 mL, so volumes read as voxel counts
SPACING = (10.0, 10.0, 10.0)


def _settings(**kw):
    ranges = {"liver": {"volume_ml": [100, 300], "hu": [20, 120]}}
    return plausibility.QcSettings(plausibility=ranges, **kw)


def _organ(shape=(20, 20, 20), lo=(5, 5, 5), hi=(11, 11, 11), hu=60):
    """A 6x6x6 = 216 mL block of liver at 60 HU in a 20^3 volume of -100 HU."""
    seg = np.zeros(shape, np.uint8)
    img = np.full(shape, -100, np.int16)
    sl = tuple(slice(a, b) for a, b in zip(lo, hi, strict=True))
    seg[sl] = LIVER
    img[sl] = hu
    return seg, img


def _flags(seg, img, **kw):
    (c,) = plausibility.check(seg, img, SPACING, NAMES, ["liver"], _settings(**kw))
    return c


def test_a_plausible_organ_has_no_flag():
    c = _flags(*_organ())
    assert c.flags == [] and c.volume_ml == 216 and c.mean_hu == 60
    assert c.components == 1 and c.boundary_share == 0


@pytest.mark.parametrize(
    ("organ", "flag"),
    [
        ({"hi": (8, 8, 8)}, "liver:volume_low"),  # 27 mL
        ({"lo": (1, 1, 1), "hi": (19, 19, 8)}, "liver:volume_high"),  # 18*18*7 mL
        ({"hu": -90}, "liver:hu_low"),  # fat, not liver
        ({"hu": 700}, "liver:hu_high"),  # bone, not liver
    ],
)
def test_volume_and_hu_outside_the_organs_range_are_flagged(organ, flag):
    c = _flags(*_organ(**organ))
    assert c.flags == [flag], c
    assert "qc.plausibility.liver" in c.reasons[0]


def test_an_organ_cut_by_the_field_of_view_is_flagged_truncated():
    seg, img = _organ(lo=(5, 5, 0), hi=(11, 11, 6))  # its widest section on the bottom face
    c = _flags(seg, img)
    assert c.flags == ["liver:truncated"] and c.boundary_share == 1.0
    assert "qc.max_boundary_share" in c.reasons[0]


def test_a_tip_on_the_edge_is_not_a_truncation():
    seg, img = _organ()
    seg[8, 8, 0:5] = LIVER  # a one-voxel spur reaching the face: 1/36 of the section
    img[seg == LIVER] = 60
    c = _flags(seg, img)
    assert 0 < c.boundary_share < 0.25 and "liver:truncated" not in c.flags


def test_a_fragmented_organ_is_flagged_and_specks_do_not_count():
    seg, img = _organ()
    for z in (1, 14, 17):  # three more pieces of 2x2x2 = 8 mL
        seg[1:3, 1:3, z : z + 2] = LIVER
    img[seg == LIVER] = 60
    assert _flags(seg, img, max_components=3).flags == ["liver:components"]
    assert _flags(seg, img, max_components=4).flags == []
    assert _flags(seg, img, max_components=1, min_component_ml=10).flags == []


def test_summary_excludes_or_flags_by_severity():
    seg, img = _organ(hu=-90)
    checks = plausibility.check(seg, img, SPACING, NAMES, ["liver"], _settings())
    out = plausibility.summary(checks, _settings())
    assert out["exclude"] and out["flags"] == ["liver:hu_low"]
    assert out["reason"].startswith("implausible segmentation: liver mean -90 HU")
    assert not plausibility.summary(checks, _settings(implausible="flag"))["exclude"]


def test_an_organ_without_a_range_gets_the_geometric_checks_only():
    seg, img = _organ(lo=(5, 5, 0), hi=(11, 11, 6))
    seg[seg == LIVER] = 1
    (c,) = plausibility.check(seg, img, SPACING, NAMES, ["spleen"], _settings())
    assert c.flags == ["spleen:truncated"]


def test_settings_refuse_unknown_keys_and_severities():
    with pytest.raises(ValueError, match="qc.implausible"):
        plausibility.QcSettings.from_dict({"implausible": "warn"})
    with pytest.raises(ValueError, match="unknown key 'volume'"):
        plausibility.QcSettings.from_dict({"plausibility": {"liver": {"volume": [1, 2]}}})
    with pytest.raises(ValueError, match="unknown qc keys"):
        plausibility.QcSettings.from_dict({"max_components": 2, "typo": 1})
    assert plausibility.QcSettings.from_dict({"reference": "x"}) == plausibility.QcSettings()


def _write_case(root, case_id, seg, img, qc=None):
    aff = np.diag([*SPACING, 1.0])
    save_nifti(img, aff, root / paths.for_case(paths.NIFTI, case_id))
    save_nifti(seg, aff, root / paths.for_case(paths.SEG, case_id))
    names = root / paths.for_case(paths.SEG_NAMES, case_id)
    names.write_text(json.dumps({"labels": {str(k): v for k, v in NAMES.items()}}))
    sidecar = {"status": "ok", "geometry": {"shape": list(seg.shape), "spacing_mm": SPACING}}
    (root / paths.for_case(paths.SIDECAR, case_id)).write_text(json.dumps(sidecar))
    return mask.mask(
        root / paths.for_case(paths.NIFTI, case_id),
        root / paths.for_case(paths.SEG, case_id),
        root / paths.for_case(paths.MASKED, case_id),
        mask.MaskSettings(size=(8, 8, 8), min_roi_ml=1.0),
        root / paths.for_case(paths.ROI, case_id),
        root / paths.for_case(paths.MASK_STATUS, case_id),
        qc_png=root / paths.for_case(paths.QC_PNG, case_id),
        seg_qc=root / paths.for_case(paths.SEG_QC, case_id),
        case_id=case_id,
        qc=qc or _settings(),
    )


def test_an_implausible_case_is_excluded_from_the_manifest_with_its_reason(tmp_path):
    """Through the files: mask records the flags and reason, the per-case QC table carries
    them, and the manifest lists the case in excluded.csv at stage mask."""
    for d in ("nifti", "seg", "masked", "qc"):
        (tmp_path / "results" / d).mkdir(parents=True)
    good, bad = "case-00000000000a", "case-00000000000b"
    st_good = _write_case(tmp_path, good, *_organ())
    st_bad = _write_case(tmp_path, bad, *_organ(lo=(5, 5, 0), hi=(11, 11, 6)))
    assert st_good["usable"] and st_good["flags"] == []
    assert not st_bad["usable"] and st_bad["reason_code"] == "IMPLAUSIBLE"
    assert st_bad["flags"] == ["liver:truncated"]
    table = pd.read_csv(tmp_path / paths.for_case(paths.SEG_QC, bad))
    assert table.loc[0, "flags"] == "liver:truncated" and table.loc[0, "boundary_share"] == 1.0
    inventory = pd.DataFrame(
        {
            "series_id": ["ser-00000000000a", "ser-00000000000b"],
            "subject_id": ["sub-00000000000a", "sub-00000000000b"],
            "study_id": ["stu-00000000000a", "stu-00000000000b"],
            "case_id": [good, bad],
            "selected": [True, True],
            "label": pd.array([pd.NA, pd.NA], dtype="Int64"),
            "has_label": pd.array([pd.NA, False], dtype="boolean"),  # no sheet; not in it
            "flags": ["gantry_tilt", ""],
            "slice_thickness_mm": [1.0, 1.0],
            "kernel": ["B30f", "B30f"],
            "manufacturer": ["X", "X"],
        }
    )
    cases, excluded, _ = manifest.build(
        inventory, tmp_path, manifest.SplitSettings(), "0123456789abcdef"
    )
    assert cases["case_id"].tolist() == [good] and cases["label"].isna().all()
    assert cases["flags"].tolist() == ["gantry_tilt"]
    row = excluded.set_index("id").loc[bad]
    assert (row["stage"], row["reason_code"]) == ("mask", "IMPLAUSIBLE")
    assert "liver cut by the field of view" in row["reason"]
    # severity flag: the same case is kept, its flags in the manifest's flags column
    flag = _settings(implausible="flag")
    st = _write_case(tmp_path, bad, *_organ(lo=(5, 5, 0), hi=(11, 11, 6)), qc=flag)
    assert st["usable"] and st["flags"] == ["liver:truncated"]
    cases, excluded, _ = manifest.build(
        inventory, tmp_path, manifest.SplitSettings(), "0123456789abcdef"
    )
    assert cases.set_index("case_id").loc[bad, "flags"] == "no_label;liver:truncated"
    assert excluded.empty

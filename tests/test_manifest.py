"""manifest: patient-level, stratified, stable splits and a schema that rejects bad manifests."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from radflow import manifest, paths


def _subjects(n, start=0, seed=0):
    rng = np.random.default_rng(seed)
    return pd.DataFrame(
        {
            "subject_id": [f"sub-{i:012x}" for i in range(start, start + n)],
            "label": rng.integers(0, 2, n),
        }
    )


def test_first_assignment_is_stratified_and_deterministic():
    subs = _subjects(50)
    s = manifest.SplitSettings(train=0.6, val=0.2, test=0.2, seed=3)
    a = manifest.assign_splits(subs, s)
    b = manifest.assign_splits(subs, s)
    pd.testing.assert_frame_equal(a, b)
    for _label, g in a.groupby("label"):
        n = len(g)
        counts = g["split"].value_counts()
        for split, frac in s.fractions().items():
            assert abs(counts.get(split, 0) - frac * n) <= 1
    other = manifest.assign_splits(subs, manifest.SplitSettings(seed=4))
    assert not a["split"].equals(other["split"])


def test_subjects_with_several_studies_never_cross_splits():
    subs = _subjects(30)
    assigned = manifest.assign_splits(subs, manifest.SplitSettings())
    cases = pd.concat([assigned] * 3)  # three studies per subject
    assert (cases.groupby("subject_id")["split"].nunique() == 1).all()


def test_adding_cases_keeps_old_assignments():
    s = manifest.SplitSettings(folds=3)
    first = manifest.assign_splits(_subjects(24), s)
    grown = pd.concat([_subjects(24), _subjects(40, start=24, seed=9)])
    second = manifest.assign_splits(grown, s, registry=first)
    merged = first.merge(second, on="subject_id", suffixes=("_old", "_new"))
    assert len(merged) == 24
    assert (merged["split_old"] == merged["split_new"]).all()
    assert (merged["fold_old"] == merged["fold_new"]).all()
    new = second[~second["subject_id"].isin(first["subject_id"])]
    assert set(new["split"]) == {"train", "val", "test"}
    for _label, g in second.groupby("label"):  # still close to the targets after growth
        frac = g["split"].value_counts(normalize=True)
        assert abs(frac.get("test", 0) - 0.2) < 0.12


def test_folds_cover_train_and_val_only():
    a = manifest.assign_splits(_subjects(40), manifest.SplitSettings(folds=4))
    assert (a.loc[a["split"] == "test", "fold"] == -1).all()
    cv = a[a["split"] != "test"]
    assert set(cv["fold"]) == {0, 1, 2, 3}
    assert cv["fold"].value_counts().max() - cv["fold"].value_counts().min() <= 2


def _valid_cases():
    row = {
        "case_id": "case-0123456789ab",
        "subject_id": "sub-0123456789ab",
        "study_id": "stu-0123456789ab",
        "series_id": "ser-0123456789ab",
        "label": 1,
        "split": "train",
        "fold": -1,
        **paths.case_files("case-0123456789ab"),
        "image_nx": 10,
        "image_ny": 10,
        "image_nz": 10,
        "image_sx_mm": 1.0,
        "image_sy_mm": 1.0,
        "image_sz_mm": 1.0,
        "masked_nx": 8,
        "masked_ny": 8,
        "masked_nz": 8,
        "masked_sx_mm": 2.0,
        "masked_sy_mm": 2.0,
        "masked_sz_mm": 2.0,
        "roi_volume_ml": 1500.0,
        "flags": "gantry_tilt;liver:truncated",
        **{f"sha256_{k}": "a" * 64 for k in ("image", "label_map", "masked", "roi", "qc")},
        "slice_thickness_mm": 1.5,
        "kernel": "B30f",
        "manufacturer": "SIEMENS",
        "radflow_version": "0.1.0",
        "config_hash": "0123456789abcdef",
    }
    return pd.DataFrame([row])


def test_schema_accepts_a_valid_manifest():
    manifest.validate(_valid_cases())


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda d: d.drop(columns="label"), "label"),
        (lambda d: d.assign(label=-1), "label: greater_than_or_equal_to"),
        (lambda d: d.assign(split="training"), "split: isin"),
        (lambda d: d.assign(masked="/etc/passwd"), "masked: str_matches"),
        (lambda d: d.assign(case_id="../../etc"), "case_id: str_matches"),
        (lambda d: d.assign(extra=1), "extra"),
        (
            lambda d: pd.concat([d, d.assign(case_id="case-ffffffffffff", split="test")]),
            "more than one split",
        ),
    ],
)
def test_schema_rejects_malformed_manifests(change, message):
    with pytest.raises(ValueError, match="manifest does not match the schema") as err:
        manifest.validate(change(_valid_cases()))
    assert message in str(err.value)


def test_read_checks_the_schema(tmp_path):
    bad = _valid_cases().assign(label=-3)
    bad.to_csv(tmp_path / "cases.csv", index=False)
    with pytest.raises(ValueError, match="label"):
        manifest.read(tmp_path / "cases.csv")


def test_an_unlabelled_case_is_a_row_with_an_empty_label(tmp_path):
    """Unlabelled cases stay in the manifest (preprocessing-only use); the CSV round trip keeps
    the label empty, and the datalist item has no label."""
    cases = pd.concat(
        [_valid_cases(), _valid_cases().assign(case_id="case-ffffffffffff", label=pd.NA)]
    )
    cases = manifest.validate(cases)
    cases.to_csv(tmp_path / "cases.csv", index=False)
    back = manifest.read(tmp_path / "cases.csv")
    assert back["label"].isna().tolist() == [False, True]
    items = manifest.datalist(back)["training"]
    assert [("label" in i) for i in items] == [True, False]
    assert manifest.labelled(back)["case_id"].tolist() == ["case-0123456789ab"]
    with pytest.raises(manifest.NoLabelledCasesError, match="training needs labels"):
        manifest.labelled(back[back["label"].isna()])


def test_unlabelled_subjects_are_split_by_subject_too():
    subjects = _subjects(30)
    subjects["label"] = subjects["label"].astype("Int64")
    subjects.loc[subjects.index[:12], "label"] = pd.NA
    a = manifest.assign_splits(subjects, manifest.SplitSettings())
    assert a["split"].notna().all()
    unl = a[a["label"].isna()]
    assert len(unl) == 12  # a stratum of their own (not dropped as a missing group key)
    counts = unl["split"].value_counts()
    for split, frac in manifest.SplitSettings().fractions().items():
        assert abs(counts.get(split, 0) - frac * 12) <= 1, counts


def test_exclusion_reads_the_mask_records_reason_code():
    ok = {"status": "ok", "usable": True}
    assert manifest.exclusion(ok) is None
    bad = {"status": "ok", "usable": False, "reason_code": "IMPLAUSIBLE", "reason": "liver x"}
    assert manifest.exclusion(bad) == {
        "stage": "mask",
        "reason_code": "IMPLAUSIBLE",
        "reason": "liver x",
    }
    assert manifest.exclusion({"usable": False, "reason": "small"})["reason_code"] == "ROI"

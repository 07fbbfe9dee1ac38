"""ingest: header scan, series decisions with reasons, labels, pseudonyms, rejected files."""

from __future__ import annotations

import pandas as pd
import pytest

from radflow import ingest, labels
from radflow.demo import plan_cohort

from .conftest import SMALL


def _by_description(pub: pd.DataFrame) -> dict[str, set[str]]:
    out: dict[str, set[str]] = {}
    for desc, code in zip(pub["description"], pub["reason_code"], strict=True):
        key = desc.split()[0]
        out.setdefault(key, set()).add(code)
    return out


def test_each_demo_series_type_gets_its_decision(inventory):
    pub, _ = inventory
    codes = _by_description(pub)
    assert codes["Topogram"] == {"IMAGE_TYPE"}
    assert codes["Abdomen"] >= {"SELECTED", "TOO_THICK", "BAD_FILES"}
    assert codes["Bone"] == {"NOT_PREFERRED"}
    assert codes["Cor"] == {"IMAGE_TYPE"}
    assert codes["Oblique"] == {"ORIENTATION"}
    assert codes["Dose"] == {"MODALITY"}
    # the thin soft-kernel axial series is the one picked in every study
    sel = pub[pub["selected"]]
    assert sel["study_id"].is_unique
    assert set(sel["study_id"]) == set(pub["study_id"])
    assert (sel["series_number"] == 2).all()
    assert (sel["slice_thickness_mm"] <= 3.0).all()


def test_reasons_are_specific(inventory):
    pub, _ = inventory
    r = dict(zip(pub["reason_code"], pub["reason"], strict=False))
    assert "LOCALIZER" in r["IMAGE_TYPE"] or "DERIVED" in r["IMAGE_TYPE"]
    assert "5 mm > max 3 mm" in r["TOO_THICK"]
    assert "SR" in r["MODALITY"]
    assert "oblique" in r["ORIENTATION"] and "35.0 deg" in r["ORIENTATION"]
    assert "truncated" in r["BAD_FILES"]
    assert "preferred kernel" in r["NOT_PREFERRED"]
    assert all(pub["reason"].str.len() > 0)


def test_geometry_columns_describe_the_variety(inventory):
    pub, _ = inventory
    sel = pub[pub["selected"]].set_index("flags", append=True)
    flags = ";".join(pub["flags"])
    for flag in ("gantry_tilt", "missing_slices", "rle", "instance_number_descending", "no_label"):
        assert flag in flags
    tilted = pub[pub["flags"].str.contains("gantry_tilt") & pub["selected"]]
    assert tilted["gantry_tilt_deg"].iloc[0] == pytest.approx(12.0, abs=0.1)
    gap = pub[pub["flags"].str.contains("missing_slices") & pub["selected"]]
    assert gap["missing_slices"].iloc[0] == 1 and not gap["slice_spacing_uniform"].iloc[0]
    assert set(pub["rescale_intercept"]) >= {"0", "-1024", "-8192"}
    assert {"axial", "coronal", "oblique"} <= set(pub["orientation"])
    assert len(sel)


def test_rejected_files_are_listed_with_errors(inventory):
    _, res = inventory
    rej = pd.read_csv(res / "inventory" / "rejected_files.csv")
    assert len(rej) == 3
    assert {"db", "txt"} <= set(rej["extension"])  # Thumbs.db, a PACS viewer note
    assert rej["error"].str.startswith("not DICOM").sum() == 2
    assert rej["error"].str.startswith("truncated").sum() == 1
    private = pd.read_csv(res / "private" / "rejected_files.csv")
    assert set(private["file_id"]) == set(rej["file_id"])


def test_labels_join_by_patient_id_including_hostile_id(inventory, demo_cohort):
    pub, res = inventory
    idmap = pd.read_csv(res / "private" / "id_map.csv", dtype=str)
    subjects = {s.patient_id: s for s in plan_cohort(SMALL)}
    merged = pub.merge(idmap[["series_id", "PatientID"]], on="series_id")
    for pid, g in merged.groupby("PatientID"):
        subj = subjects[pid]
        if subj.labeled:
            assert (g["label"] == subj.label).all() and g["has_label"].all()
        else:
            assert g["label"].isna().all() and not g["has_label"].any()
            assert g.loc[g["selected"], "flags"].str.contains("no_label").all()
    assert "../../etc" in set(merged["PatientID"])


def test_inventory_and_file_lists_are_consistent(inventory):
    pub, res = inventory
    sel = pub[pub["selected"]]
    lists = sorted(p.stem for p in (res / "private" / "series").glob("*.json"))
    assert lists == sorted(sel["case_id"])
    assert (pub.loc[~pub["selected"], "case_id"] == "").all()
    assert sel["case_id"].str.fullmatch(r"case-[0-9a-f]{12}").all()
    parquet = pd.read_parquet(res / "inventory" / "series.parquet")
    csv = pd.read_csv(res / "inventory" / "series.csv")
    assert list(parquet.columns) == list(csv.columns) == ingest.INVENTORY_COLUMNS
    for col in ingest.PHI_COLUMNS:
        assert col not in parquet.columns


def test_convert_reads_the_series_pseudonym_from_the_inventory(inventory, tmp_path, capsys):
    """The workflow's convert job gets the inventory, not a per-case series id: the sidecar's
    series_id is the inventory's, and a case the inventory lacks is a clear error."""
    import json

    from radflow import cli, ids

    pub, res = inventory
    sel = pub[pub["selected"]].iloc[0]
    table = res / "inventory" / "series.csv"
    assert ids.series_id_of(table, sel["case_id"]) == sel["series_id"]
    files = res / "private" / "series" / f"{sel['case_id']}.json"
    out = tmp_path / "img.nii.gz"
    argv = ["convert", str(files), str(out), "--inventory", str(table)]
    assert cli.main([*argv, "--case-id", sel["case_id"]]) == 0
    sidecar = json.loads((tmp_path / "img.json").read_text())
    assert sidecar["series_id"] == sel["series_id"] and sidecar["case_id"] == sel["case_id"]
    assert cli.main([*argv, "--case-id", "case-000000000000"]) == 2
    err = capsys.readouterr().err
    assert "case-000000000000" in err and "not in the inventory" in err
    assert cli.main(argv) == 2  # no --case-id: refused, not the first rejected series' id
    assert "a case id is needed" in capsys.readouterr().err


def _row(**kw):
    base = dict(
        StudyInstanceUID="1.2",
        SeriesInstanceUID="1.2.1",
        series_number=2,
        modality="CT",
        image_type="ORIGINAL\\PRIMARY\\AXIAL",
        kernel="B30f",
        n_instances=100,
        n_bad_files=0,
        has_pixels=True,
        slice_thickness_mm=1.5,
        orientation="axial",
        obliquity_deg=0.0,
        consistent_geometry=True,
        duplicate_positions=0,
        irregular_spacing=False,
        missing_slices=0,
        gantry_tilt_deg=0.0,
    )
    base.update(kw)
    base.setdefault("n_frames", base["n_instances"])  # single-frame unless a test says otherwise
    return base


def test_tie_break_thinnest_then_most_instances():
    rules = ingest.SelectionRules()
    df = pd.DataFrame(
        [
            _row(SeriesInstanceUID="a", series_number=2, slice_thickness_mm=2.0),
            _row(SeriesInstanceUID="b", series_number=3, slice_thickness_mm=1.0, n_instances=80),
            _row(SeriesInstanceUID="c", series_number=4, slice_thickness_mm=1.0, n_instances=120),
        ]
    )
    out = select_df(df, rules)
    assert out["c"] == ("SELECTED", True)
    assert out["a"][0] == "NOT_PREFERRED" and out["b"][0] == "NOT_PREFERRED"
    reasons = ingest.select_series(df, rules).set_index("SeriesInstanceUID")["reason"]
    assert "thinner" in reasons["a"] and "more instances" in reasons["b"]


def select_df(df, rules):
    out = ingest.select_series(df, rules).set_index("SeriesInstanceUID")
    return {k: (r["reason_code"], bool(r["selected"])) for k, r in out.iterrows()}


@pytest.mark.parametrize(
    ("kw", "rules", "code"),
    [
        (dict(missing_slices=2), {}, "SLICE_GAP"),
        (dict(missing_slices=1), {"max_missing_slices": 0}, "SLICE_GAP"),
        (dict(gantry_tilt_deg=12.0), {"gantry_tilt": "refuse"}, "GANTRY_TILT"),
        (dict(gantry_tilt_deg=40.0), {}, "GANTRY_TILT"),
        (dict(n_instances=10, n_frames=10), {}, "TOO_FEW_SLICES"),
        (dict(irregular_spacing=True), {"irregular_spacing": "refuse"}, "IRREGULAR_SPACING"),
        (dict(n_frames=10, n_instances=1), {}, "TOO_FEW_SLICES"),
        (dict(n_instances=1, multiframe_error="[MULTIFRAME_4D] t"), {}, "MULTIFRAME_4D"),
        (dict(modality="MR"), {}, "MODALITY"),
        (dict(orientation="coronal"), {}, "ORIENTATION"),
    ],
)
def test_exclusions(kw, rules, code):
    df = pd.DataFrame([_row(**kw)])
    assert select_df(df, ingest.SelectionRules.from_dict(rules))["1.2.1"] == (code, False)


@pytest.mark.parametrize(
    "kw",
    [
        dict(irregular_spacing=True),  # resampled by convert (convert.irregular_spacing)
        dict(n_frames=300, n_instances=1),  # one enhanced multi-frame file: 300 slices
    ],
)
def test_irregular_spacing_and_multiframe_are_eligible(kw):
    df = pd.DataFrame([_row(**kw)])
    assert select_df(df, ingest.SelectionRules())["1.2.1"] == ("SELECTED", True)


def test_one_gap_within_limit_is_eligible():
    df = pd.DataFrame([_row(missing_slices=1)])
    assert select_df(df, ingest.SelectionRules())["1.2.1"] == ("SELECTED", True)


def test_unknown_selection_key_is_an_error():
    with pytest.raises(ValueError, match="unknown selection keys"):
        ingest.SelectionRules.from_dict({"min_slice": 3})


def test_raw_tree_is_not_modified_by_ingest(demo_cohort, tmp_path):
    from .conftest import SALT, tree_digest

    before = tree_digest(demo_cohort / "raw")
    ingest.ingest(
        demo_cohort / "raw",
        tmp_path / "inv",
        tmp_path / "priv",
        ingest.SelectionRules(),
        labels.LabelSpec(),
        SALT,
        threads=1,
    )
    assert tree_digest(demo_cohort / "raw") == before


def test_labels_join_by_study_instance_uid(demo_cohort, tmp_path):
    studies = pd.read_csv(demo_cohort / "studies.csv", dtype=str)
    sheet = studies[["StudyInstanceUID", "label"]].iloc[1:]  # first study left unlabeled
    sheet.to_csv(tmp_path / "by_study.csv", index=False)
    spec = labels.LabelSpec(path=str(tmp_path / "by_study.csv"), key="StudyInstanceUID")
    pub = ingest.ingest(
        demo_cohort / "raw",
        tmp_path / "inv",
        tmp_path / "priv",
        ingest.SelectionRules(),
        spec,
        "salt-for-this-test",
        threads=1,
    )
    idmap = pd.read_csv(tmp_path / "priv" / "id_map.csv", dtype=str)
    sel = pub[pub["selected"]].merge(idmap[["case_id", "StudyInstanceUID"]], on="case_id")
    want = dict(zip(studies["StudyInstanceUID"], studies["label"].astype(int), strict=True))
    first = studies["StudyInstanceUID"].iloc[0]
    for uid, label, has in zip(
        sel["StudyInstanceUID"], sel["label"], sel["has_label"], strict=True
    ):
        assert has == (uid != first)
        if has:
            assert label == want[uid]


def test_labels_sheet_errors_are_specific(tmp_path):
    (tmp_path / "l.csv").write_text("PatientID,diagnosis\nA,1\n")
    with pytest.raises(ValueError, match="no column 'label'"):
        labels.read_labels(labels.LabelSpec(path=str(tmp_path / "l.csv")))
    (tmp_path / "d.csv").write_text("PatientID,label\nA,1\nA,0\n")
    with pytest.raises(ValueError, match="duplicated PatientID"):
        labels.read_labels(labels.LabelSpec(path=str(tmp_path / "d.csv")))

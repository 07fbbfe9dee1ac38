"""ingest: header scan, series decisions with reasons, labels, pseudonyms, rejected files."""

from __future__ import annotations

import json

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
    assert "Dose" not in codes  # a non-image object: listed in rejected_files, not a series
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
    assert "oblique" in r["ORIENTATION"] and "35.0 deg" in r["ORIENTATION"]
    assert "truncated" in r["BAD_FILES"]
    assert "kernel class soft" in r["NOT_PREFERRED"] and "preferred over bone" in r["NOT_PREFERRED"]
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
    private = pd.read_csv(res / "private" / "rejected_files.csv")
    assert set(private["file_id"]) == set(rej["file_id"])
    dose = rej["error"].str.startswith("NON_IMAGE_OBJECT: X-Ray Radiation Dose SR Storage")
    assert dose.sum() >= 1
    assert rej.loc[dose, "error"].str.endswith("(modality SR), no pixel data").all()
    rej = rej[~dose]
    assert len(rej) == 3
    assert {"db", "txt"} <= set(rej["extension"])  # Thumbs.db, a PACS viewer note
    assert rej["error"].str.startswith("not DICOM").sum() == 2
    assert rej["error"].str.startswith("truncated").sum() == 1


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


# --------------------------------------------------------------------------- DICOM as archives
# hold it: blank UIDs, blank PatientIDs, DICOMDIR, non-image objects, vendor kernels. Tiny
# synthetic series (8 x 8 pixels, 4 slices) written with pydicom.

CT_IMAGE = "1.2.840.10008.5.1.4.1.1.2"
SMALL_RULES = {"min_slices": 4}


def _ct_slice(
    path,
    z,
    *,
    study="",
    series="",
    sop="",
    patient="",
    number=2,
    kernel="B30f",
    manufacturer="SIEMENS",
    frame_of_reference="1.2.826.0.1.3680043.8.498.1",
    description="Abdomen 1.5",
    date="20240102",
):
    """One 8 x 8 axial CT slice at height ``z``; blank UIDs stay blank strings, as anonymisers
    leave them (SOPClassUID blanked too: only the file meta names the class)."""
    import numpy as np
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = CT_IMAGE
    meta.MediaStorageSOPInstanceUID = sop or generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID = CT_IMAGE if sop else ""
    ds.SOPInstanceUID = sop
    ds.StudyInstanceUID, ds.SeriesInstanceUID = study, series
    ds.FrameOfReferenceUID = frame_of_reference
    ds.PatientID, ds.PatientName = patient, ""
    ds.StudyDate, ds.StudyTime, ds.AccessionNumber, ds.StudyID = date, "000000", "", ""
    ds.Modality, ds.Manufacturer, ds.ConvolutionKernel = "CT", manufacturer, kernel
    ds.SeriesDescription, ds.ImageType = description, ["ORIGINAL", "PRIMARY", "AXIAL"]
    ds.SeriesNumber, ds.InstanceNumber = number, int(z) + 1
    ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
    ds.ImagePositionPatient = [-8.0, -8.0, float(z) * 1.5]
    ds.PixelSpacing, ds.SliceThickness = [2.0, 2.0], 1.5
    ds.Rows = ds.Columns = 8
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 1
    ds.RescaleIntercept, ds.RescaleSlope = 0, 1
    ds.PixelData = np.full((8, 8), 40 + int(z), dtype=np.int16).tobytes()
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(path, enforce_file_format=True)
    return ds


def _ct_series(folder, n=4, **kw):
    return [_ct_slice(folder / f"IM{z:03d}", z, **kw) for z in range(n)]


def _run_ingest(raw, out, salt="salt-0123456789", **rules):
    pub = ingest.ingest(
        raw,
        out / "inv",
        out / "priv",
        ingest.SelectionRules.from_dict({**SMALL_RULES, **rules}),
        labels.LabelSpec(),
        salt,
    )
    return pub, pd.read_csv(out / "inv" / "rejected_files.csv")


def test_blank_uids_group_into_flagged_series_never_rejected_file_by_file(tmp_path):
    """Two reconstructions in one folder and one in another, every UID blank: three series by
    fallback keys (folder, kernel, series number...), one study (same patient, day, frame of
    reference), the soft one selected; a byte-identical copy of a blank-SOP file is a copy."""
    import shutil

    raw = tmp_path / "raw"
    _ct_series(raw / "cd", patient="P1", kernel="B30f", number=2)
    for z in range(4):  # bone kernel, same folder, same series number: told apart by kernel
        _ct_slice(raw / "cd" / f"BONE{z:03d}", z, patient="P1", kernel="B70f", number=2)
    _ct_series(raw / "other", patient="P1", kernel="B30f", number=5)
    shutil.copyfile(raw / "cd" / "IM001", raw / "cd" / "IM001_copy")
    pub, rej = _run_ingest(raw, tmp_path / "a")
    assert len(rej) == 0  # not one file refused for its blank UIDs
    assert len(pub) == 3 and pub["study_id"].nunique() == 1 and pub["subject_id"].nunique() == 1
    assert pub["flags"].str.contains("uid_fallback").all()
    sel = pub[pub["selected"]].iloc[0]
    assert (sel["kernel"], sel["n_instances"]) == ("B30f", 4)
    assert "duplicate_files_ignored" in sel["flags"]
    bone = pub[pub["kernel"] == "B70f"].iloc[0]
    assert bone["reason_code"] == "NOT_PREFERRED"
    assert "kernel class soft (Siemens B30f) preferred over bone (Siemens B70f)" in bone["reason"]
    # the synthetic keys are stable: a rerun on the tree moved elsewhere names the same case
    shutil.copytree(raw, tmp_path / "moved" / "raw")
    again, _ = _run_ingest(tmp_path / "moved" / "raw", tmp_path / "b")
    assert sorted(again["case_id"]) == sorted(pub["case_id"])
    assert sorted(again["series_id"]) == sorted(pub["series_id"])
    listed = json.loads((tmp_path / "a" / "priv" / "series" / f"{sel['case_id']}.json").read_text())
    assert len(listed) == 4  # the copy is listed once
    idmap = pd.read_csv(tmp_path / "a" / "priv" / "id_map.csv", dtype=str)
    assert idmap["series_key"].str.startswith("series-fallback-").all()


def test_blank_study_uids_of_two_patients_stay_two_studies(tmp_path):
    """Blank UIDs and blank PatientIDs on one day: their frames of reference keep them apart."""
    raw = tmp_path / "raw"
    _ct_series(raw / "a", frame_of_reference="1.2.3.1")
    _ct_series(raw / "b", frame_of_reference="1.2.3.2")
    pub, _ = _run_ingest(raw, tmp_path)
    assert pub["selected"].sum() == 2
    assert pub["study_id"].nunique() == 2 and pub["subject_id"].nunique() == 2


def test_blank_patient_id_never_merges_patients(tmp_path):
    raw = tmp_path / "raw"
    _ct_series(raw / "s1", study="1.2.3.10", series="1.2.3.10.1", sop="", patient="")
    _ct_series(raw / "s2", study="1.2.3.20", series="1.2.3.20.1", sop="", patient="")
    _ct_series(raw / "s3", study="1.2.3.30", series="1.2.3.30.1", patient="KNOWN")
    _ct_series(raw / "s4", study="1.2.3.40", series="1.2.3.40.1", patient="KNOWN")
    pub, _ = _run_ingest(raw, tmp_path)
    assert pub["selected"].all() and pub["study_id"].nunique() == 4
    blank = pub[pub["flags"].str.contains("patient_id_fallback")]
    assert len(blank) == 2 and blank["subject_id"].nunique() == 2  # two studies: two subjects
    known = pub[~pub["flags"].str.contains("patient_id_fallback")]
    assert known["subject_id"].nunique() == 1  # one named patient's two studies: one subject
    assert not set(blank["subject_id"]) & set(known["subject_id"])


def _non_image(path, sop_class, modality, **extra):
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = sop_class
    ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.SOPClassUID, ds.SOPInstanceUID = sop_class, ds.file_meta.MediaStorageSOPInstanceUID
    ds.StudyInstanceUID, ds.SeriesInstanceUID = "1.2.3.9", generate_uid()
    ds.Modality, ds.PatientID = modality, "P9"
    for k, v in extra.items():
        setattr(ds, k, v)
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(path, enforce_file_format=True)


NON_IMAGE = [
    ("1.2.840.10008.5.1.4.1.1.88.11", "SR", "Basic Text SR Storage"),
    ("1.2.840.10008.5.1.4.1.1.88.59", "KO", "Key Object Selection Document Storage"),
    ("1.2.840.10008.5.1.4.1.1.11.1", "PR", "Grayscale Softcopy Presentation State Storage"),
    ("1.2.840.10008.5.1.4.1.1.481.3", "RTSTRUCT", "RT Structure Set Storage"),
    ("1.2.840.10008.5.1.4.1.1.66", "OT", "Raw Data Storage"),
    # Siemens' private CSA non-image objects sit in CT series folders with modality CT
    ("1.3.12.2.1107.5.9.1", "CT", "1.3.12.2.1107.5.9.1"),
]


def test_dicomdir_and_non_image_objects_get_their_own_reasons(tmp_path):
    """A DICOM CD (written by pydicom.fileset: DICOMDIR + images) beside reports, presentation
    states, RT structures and raw data: each listed with its reason, the series selected."""
    from pydicom.fileset import FileSet

    src = tmp_path / "src"
    slices = _ct_series(src, study="1.2.3.9", series="1.2.3.9.1", sop="", patient="P9")
    fs = FileSet()
    for i, ds in enumerate(slices):
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = f"1.2.3.9.1.{i + 1}"
        ds.SOPClassUID, ds.StudyID = CT_IMAGE, "1"
        fs.add(ds)
    raw = tmp_path / "raw"
    fs.write(raw / "cd")
    assert (raw / "cd" / "DICOMDIR").is_file()
    for i, (uid, modality, _) in enumerate(NON_IMAGE):
        _non_image(raw / "other" / f"obj{i}.dcm", uid, modality)
    pub, rej = _run_ingest(raw, tmp_path)
    assert pub["reason_code"].tolist() == ["SELECTED"] and pub["n_instances"].iloc[0] == 4
    assert "uid_fallback" not in pub["flags"].iloc[0]
    errors = sorted(rej["error"])
    assert not any("StudyInstanceUID" in e for e in errors)
    assert sum(e.startswith("DICOMDIR_INDEX: a DICOMDIR media index (") for e in errors) == 1
    for _, modality, name in NON_IMAGE:
        want = f"NON_IMAGE_OBJECT: {name} (modality {modality}), no pixel data"
        assert want in errors, (want, errors)
    assert len(rej) == 1 + len(NON_IMAGE)
    # convert on the CD's folder ignores its DICOMDIR (it refused MIXED_SERIES before)
    from radflow import convert

    sc = convert.convert(raw / "cd", tmp_path / "cd.nii.gz", convert.ConvertSettings())
    assert sc["acquisition"]["n_instances"] == 4


def test_a_cut_short_image_is_still_truncated_not_a_non_image_object(tmp_path):
    raw = tmp_path / "raw"
    slices = _ct_series(raw / "s", study="1.2.3.5", series="1.2.3.5.1", sop="", patient="P")
    ds = slices[0]
    del ds.PixelData
    ds.save_as(raw / "s" / "IM000", enforce_file_format=True)
    pub, rej = _run_ingest(raw, tmp_path)
    assert rej["error"].tolist() == ["truncated: header present but no pixel data"]
    assert pub["reason_code"].tolist() == ["BAD_FILES"]


def test_kernel_class_decides_and_the_reason_names_it():
    rules = ingest.SelectionRules()
    df = pd.DataFrame(
        [
            _row(SeriesInstanceUID="d", series_number=2, kernel="D", manufacturer="Philips"),
            _row(SeriesInstanceUID="b", series_number=3, kernel="B", manufacturer="Philips"),
            _row(SeriesInstanceUID="ya", series_number=1, kernel="YA", manufacturer="Philips"),
        ]
    )
    out = ingest.select_series(df, rules).set_index("SeriesInstanceUID")
    assert out.loc["b", "selected"]  # by class, not by the lower series number
    assert out.loc["b", "reason"].startswith("selected: axial soft kernel (Philips B)")
    want = "kernel class soft (Philips B) preferred over sharp (Philips D)"
    assert want in out.loc["d", "reason"]
    assert "preferred over lung (Philips YA)" in out.loc["ya", "reason"]
    assert out["kernel_class"].to_dict() == {"d": "sharp", "b": "soft", "ya": "lung"}
    sharp_first = ingest.SelectionRules.from_dict({"preferred_kernel_classes": ["sharp"]})
    assert ingest.select_series(df, sharp_first).set_index("SeriesInstanceUID").loc["d", "selected"]


def test_old_preferred_kernel_regex_is_refused_with_its_replacement():
    with pytest.raises(ValueError, match="replaced by preferred_kernel_classes"):
        ingest.SelectionRules.from_dict({"preferred_kernel": "^b30f$"})
    with pytest.raises(ValueError, match="unknown preferred_kernel_classes"):
        ingest.SelectionRules.from_dict({"preferred_kernel_classes": ["smooth"]})


def test_a_tree_of_only_non_image_objects_gives_an_empty_inventory(tmp_path):
    raw = tmp_path / "raw"
    for i, (uid, modality, _) in enumerate(NON_IMAGE):
        _non_image(raw / f"obj{i}.dcm", uid, modality)
    (raw / "notes.txt").write_text("not dicom")
    pub, rej = _run_ingest(raw, tmp_path)
    assert len(pub) == 0 and list(pub.columns) == ingest.INVENTORY_COLUMNS
    assert len(rej) == len(NON_IMAGE) + 1
    assert rej["error"].str.startswith("NON_IMAGE_OBJECT").sum() == len(NON_IMAGE)

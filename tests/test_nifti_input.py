"""NIfTI cohorts: the sheet, per-volume checks, conversion (world coordinates), ingest's outputs
and the manifest's splits; one workflow run through the manifest on a tiny NIfTI cohort."""

from __future__ import annotations

import gzip
import json
import re
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
import pytest
import yaml

from radflow import convert, ingest, manifest, nifti_input
from radflow.labels import LabelSpec
from radflow.sheet import SheetError, read_sheet
from radflow.source import InputSpec

from .conftest import REPO, SALT, snakemake, tree_digest, workdir

SECRET = "DOE^JANE_MRN4711"  # an identifier a NIfTI text field may carry
LPS = np.array([[-1.5, 0, 0, 30.0], [0, -1.5, 0, 20.0], [0, 0, 2.5, -10.0], [0, 0, 0, 1]])
LIVER = 5  # TotalSegmentator "total": liver
SHEAR = np.array([[1, 0.3, 0, 0], [0, 1, 0, 0], [0, 0, 1, 0], [0, 0, 0, 1.0]])


def _oblique(deg: float = 25.0) -> np.ndarray:
    c, s = np.cos(np.radians(deg)), np.sin(np.radians(deg))
    rot = np.array([[c, -s, 0], [s, c, 0], [0, 0, 1.0]])
    aff = np.eye(4)
    aff[:3, :3] = rot @ np.diag([2.0, 2.0, 2.5])
    aff[:3, 3] = [-20.0, -15.0, -30.0]
    return aff


def ct_volume(shape=(20, 18, 12)) -> np.ndarray:
    """Air around a soft-tissue body with a denser block: HU as a CT has them."""
    v = np.full(shape, -1000, np.int16)
    v[3:-3, 3:-3, 2:-2] = 40
    v[6:12, 6:12, 4:8] = 60
    return v


def save(path: Path, data: np.ndarray, affine: np.ndarray, codes=(1, 1), **text) -> Path:
    img = nib.Nifti1Image(data, affine)
    img.set_qform(affine, code=codes[0])
    img.set_sform(affine, code=codes[1])
    for key, value in text.items():
        img.header[key] = value.encode()
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(img, str(path))
    return path


def world(affine: np.ndarray, ijk) -> np.ndarray:
    return (affine @ np.array([*ijk, 1.0]))[:3]


# --------------------------------------------------------------------------- the sheet


def test_sheet_checks_name_lines_and_resolve_paths(tmp_path):
    good = tmp_path / "s.csv"
    good.write_text("image,subject_id,label,split\nimg/a.nii.gz,P1,1,Train\nimg/b.nii.gz,P2,,\n")
    df = read_sheet(good)
    assert df["image_path"][0] == str(tmp_path.resolve() / "img/a.nii.gz")
    assert list(df["split"]) == ["train", ""] and df["label"].isna().tolist() == [False, True]
    cases = {
        "image,label\na.nii,1\n": "no column(s) ['subject_id']",
        "image,subject_id\na.nii,P1\na.nii,P2\n": "same image is listed on line(s) 2, 3",
        "image,subject_id,split\na.nii,P1,training\n": "split value(s) ['training'] on line(s) 2",
        "image,subject_id,split\na.nii,P1,train\nb.nii,P1,test\n": "1 subject(s) in more than",
        "image,subject_id,label\na.nii,P1,2\n": "label value(s) [2]",
        "image,subject_id\na.nii,\n": "empty 'subject_id' on line(s) 2",
    }
    for text, message in cases.items():
        good.write_text(text)
        with pytest.raises(SheetError, match=re.escape(message)):
            read_sheet(good)
    good.write_text("image,subject_id,label\na.nii,P1,benign\n")
    df = read_sheet(good, LabelSpec(mapping={"benign": 0, "malignant": 1}))
    assert df["label"].tolist() == [0]


def test_sheet_schema_lists_the_columns_read_sheet_reads():
    from radflow import sheet

    schema = yaml.safe_load((REPO / "workflow/schemas/sheet.schema.yaml").read_text())
    assert set(schema["properties"]) == {*sheet.REQUIRED, *sheet.OPTIONAL}
    assert schema["required"] == list(sheet.REQUIRED)


def test_input_spec_dispatches_on_format_and_path(tmp_path):
    assert InputSpec.resolve({}, tmp_path).format == "dicom"
    spec = InputSpec.resolve({"modality": "MR"}, tmp_path / "cohort.csv")
    assert (spec.format, spec.sheet, spec.modality) == ("nifti", str(tmp_path / "cohort.csv"), "MR")
    assert InputSpec.resolve({}, "x.nii.gz").format == "nifti"
    with pytest.raises(ValueError, match="needs input.sheet"):
        InputSpec.from_dict({"format": "nifti"})
    with pytest.raises(ValueError, match="needs raw_dir"):
        InputSpec().location(None)


# --------------------------------------------------------------------------- volume checks


@pytest.mark.parametrize(
    "make, code",
    [
        (lambda: nib.Nifti1Image(np.zeros((8, 8), np.int16), np.eye(4)), "NIFTI_2D"),
        (lambda: nib.Nifti1Image(np.zeros((8, 8, 1), np.int16), np.eye(4)), "NIFTI_2D"),
        (lambda: nib.Nifti1Image(np.zeros((8, 8, 8, 3), np.int16), np.eye(4)), "NIFTI_4D"),
        (lambda: nib.Nifti1Image(np.zeros((8, 8, 8, 2, 2), np.int16), np.eye(4)), "NIFTI_5D"),
        (lambda: nib.Nifti1Image(np.zeros((8, 8, 8), np.int16), SHEAR), "NIFTI_SHEAR"),
        (lambda: nib.Nifti1Image(np.zeros((8, 8, 8), np.complex64), np.eye(4)), "NIFTI_DTYPE"),
    ],
)  # fmt: skip
def test_check_image_refuses_with_one_line(make, code):
    with pytest.raises(nifti_input.VolumeRefusedError) as err:
        nifti_input.check_image(make())
    assert err.value.code == code and "\n" not in err.value.reason


def test_check_image_refuses_a_singular_affine(tmp_path):
    img = nib.Nifti1Image(ct_volume(), None)
    img.header.set_sform(np.diag([1.5, 0.0, 2.5, 1.0]), code=1)  # a zero voxel size
    nib.save(img, tmp_path / "s.nii.gz")
    with pytest.raises(nifti_input.VolumeRefusedError, match="singular") as err:
        nifti_input.check_image(nib.load(tmp_path / "s.nii.gz"))
    assert err.value.code == "NIFTI_SINGULAR_AFFINE"


def test_check_image_codes_zero_and_4d_pick(tmp_path):
    p = save(tmp_path / "z.nii.gz", ct_volume(), LPS, codes=(0, 0))
    with pytest.raises(nifti_input.VolumeRefusedError, match="qform_code and sform_code"):
        nifti_input.check_image(nib.load(p))
    img4 = nib.Nifti1Image(np.stack([ct_volume(), ct_volume() + 5], -1), LPS)
    info = nifti_input.check_image(img4, volume_index=1)
    assert info.volume_index == 1 and info.shape == (20, 18, 12)
    with pytest.raises(nifti_input.VolumeRefusedError, match="has 2 volumes"):
        nifti_input.check_image(img4, volume_index=2)
    # a trailing axis of one volume is a 3-D volume
    assert nifti_input.check_image(nib.Nifti1Image(ct_volume()[..., None], LPS)).shape[2] == 12


def test_hu_check_names_the_likely_cause():
    assert nifti_input.hu_check(ct_volume())[0] == ""
    norm = (ct_volume().astype(np.float32) + 1024) / 4095
    assert "intensity-normalised" in nifti_input.hu_check(norm)[0]
    shifted = ct_volume() + 1024
    shifted[5:15, 5:15] = 1064  # most of the body soft tissue near 1024 + 40
    assert "+1024 offset" in nifti_input.hu_check(shifted)[0]
    assert "0-based" in nifti_input.hu_check(np.arange(0, 5000, dtype=np.int16))[0]
    cropped = np.full((10, 10, 10), 40, np.int16)
    cropped[0, 0, 0] = -100
    why, flags = nifti_input.hu_check(cropped)
    assert why == "" and "no_air_below_-500hu" in flags


# --------------------------------------------------------------------------- conversion


@pytest.mark.parametrize("affine", [LPS, _oblique()], ids=["lps", "oblique"])
def test_convert_keeps_world_coordinates(tmp_path, affine):
    """A bright voxel lands at the same world point after reorientation and resampling."""
    data = ct_volume()
    data[10, 7, 5] = 1500
    src = save(tmp_path / "in.nii.gz", data, affine, descrip=SECRET, aux_file="x" + SECRET[:20])
    settings = convert.ConvertSettings(spacing_mm=None, hu_clip=(-1024.0, 3071.0))
    sc = convert.convert(
        src, tmp_path / "out.nii.gz", settings, input_spec=InputSpec(format="nifti", sheet="s")
    )
    out = nib.load(tmp_path / "out.nii.gz")
    assert nib.aff2axcodes(out.affine) == ("R", "A", "S") and out.get_data_dtype() == np.int16
    vol = np.asanyarray(out.dataobj)
    peak = np.unravel_index(int(np.argmax(vol)), vol.shape)
    # within a voxel diagonal of the output grid (linear interpolation of a single voxel)
    tol = float(np.linalg.norm(sc["geometry"]["spacing_mm"]))
    assert np.linalg.norm(world(out.affine, peak) - world(affine, (10, 7, 5))) <= tol
    assert sc["geometry"]["resampled"] == (affine is not LPS)
    assert sc["source"]["sha256"] == __import__("hashlib").sha256(src.read_bytes()).hexdigest()
    assert sc["source"]["shape"] == [20, 18, 12] and sc["source"]["qform_code"] == 1
    text = json.dumps(sc) + gzip.decompress((tmp_path / "out.nii.gz").read_bytes()).decode("latin1")
    assert SECRET not in text and SECRET[:20] not in text
    assert out.header["descrip"].tobytes().strip(b"\x00") == b""


def test_convert_lps_is_an_exact_flip(tmp_path):
    """No resampling when only axes flip: voxel values are moved, never interpolated."""
    data = ct_volume()
    data[1, 2, 3] = 777
    src = save(tmp_path / "in.nii.gz", data, LPS)
    settings = convert.ConvertSettings()
    convert.convert(src, tmp_path / "o.nii.gz", settings, input_spec=InputSpec("nifti", "s"))
    out = nib.load(tmp_path / "o.nii.gz")
    vol = np.asanyarray(out.dataobj)
    assert vol[20 - 1 - 1, 18 - 1 - 2, 3] == 777 and vol.dtype == np.int16
    assert np.allclose(world(out.affine, (18, 15, 3)), world(LPS, (1, 2, 3)))


def test_convert_mr_is_float32_and_spacing_applies(tmp_path):
    data = np.random.default_rng(0).random((20, 18, 12)).astype(np.float32)  # [0, 1]: not HU
    src = save(tmp_path / "mr.nii.gz", data, LPS)
    spec = InputSpec("nifti", "s", modality="MR")
    settings = convert.ConvertSettings(spacing_mm=(3.0, 3.0, 3.0))
    sc = convert.convert(src, tmp_path / "o.nii.gz", settings, input_spec=spec)
    out = nib.load(tmp_path / "o.nii.gz")
    assert out.get_data_dtype() == np.float32 and sc["dtype"] == "float32"
    assert np.allclose(out.header.get_zooms(), 3.0) and sc["qc"]["value_max"] <= 1.0
    with pytest.raises(nifti_input.VolumeRefusedError, match="intensity-normalised"):
        convert.convert(
            src, tmp_path / "ct.nii.gz", settings, input_spec=InputSpec("nifti", "s", "CT")
        )


def test_convert_case_records_nan_and_redacts_path(tmp_path):
    data = ct_volume().astype(np.float32)
    data[0, 0, :] = np.nan
    src = save(tmp_path / "P-SECRET" / "nan.nii.gz", data, LPS)
    flist = tmp_path / "list.json"
    flist.write_text(json.dumps([str(src)]))
    rec = convert.convert_case(
        flist, tmp_path / "o.nii.gz", convert.ConvertSettings(), tmp_path / "o.json", "case-x",
        input_spec=InputSpec("nifti", "s"),
    )  # fmt: skip
    assert rec["status"] == "failed" and rec["reason_code"] == "NIFTI_NOT_FINITE"
    assert "12 of 4320 voxels" in rec["reason"] and not (tmp_path / "o.nii.gz").exists()
    flist.write_text(json.dumps([str(tmp_path / "P-SECRET" / "gone.nii.gz")]))
    rec = convert.convert_case(
        flist, tmp_path / "o.nii.gz", convert.ConvertSettings(), tmp_path / "o.json", "case-x",
        input_spec=InputSpec("nifti", "s"),
    )  # fmt: skip
    assert rec["reason_code"] == "NIFTI_MISSING" and "SECRET" not in json.dumps(rec)


# --------------------------------------------------------------------------- ingest


def make_cohort(root: Path, n_good: int = 5) -> Path:
    """``n_good`` usable CT volumes (LPS, RAS, oblique affines) with liver masks, a split
    column, identifiers in the NIfTI text fields, and one 2-D and one missing volume."""
    rows = ["image,subject_id,study_id,label,split,mask"]
    affines = [LPS, np.diag([2.0, 2.0, 2.5, 1.0]), _oblique()]
    splits = ["train", "train", "val", "test", ""]
    for i in range(n_good):
        aff = affines[i % len(affines)]
        shape = (40, 40, 30)
        data = np.full(shape, -1000, np.int16)
        data[5:-5, 5:-5, 3:-3] = 40
        data[12:26, 12:26, 8:20] = 60 + 30 * (i % 2)
        seg = np.zeros(shape, np.uint8)
        seg[12:26, 12:26, 8:20] = LIVER
        save(root / f"PAT{i}" / "ct.nii.gz", data, aff, descrip=SECRET, db_name=SECRET[:17])
        save(root / f"PAT{i}" / "liver.nii.gz", seg, aff)
        split = splits[i % len(splits)]
        rows.append(f"PAT{i}/ct.nii.gz,{SECRET}-{i},ST{i},{i % 2},{split},PAT{i}/liver.nii.gz")
    save(root / "flat" / "slice.nii.gz", np.zeros((40, 40, 1), np.int16), LPS)
    rows.append(f"flat/slice.nii.gz,{SECRET}-flat,,1,,")
    rows.append(f"gone/ct.nii.gz,{SECRET}-gone,,0,,")
    sheet = root / "cohort.csv"
    sheet.write_text("\n".join(rows) + "\n")
    return sheet


def test_ingest_sheet_writes_the_dicom_contract(tmp_path):
    sheet = make_cohort(tmp_path / "in", n_good=3)
    before = tree_digest(tmp_path / "in")
    out, private = tmp_path / "inventory", tmp_path / "private"
    spec = InputSpec("nifti", str(sheet))
    inv = ingest.ingest(
        sheet, out, private, ingest.SelectionRules(), LabelSpec(), SALT, source=spec
    )
    assert tree_digest(tmp_path / "in") == before
    assert list(inv.columns) == ingest.INVENTORY_COLUMNS
    assert list(pd.read_csv(out / "series.csv").columns) == ingest.INVENTORY_COLUMNS
    sel = inv[inv["selected"]]
    assert len(sel) == 3 and set(sel["split"]) == {"train", "val"}
    assert dict(zip(inv["reason_code"], inv["selected"], strict=True)) == {
        "SELECTED": True, "NIFTI_2D": False, "NIFTI_MISSING": False,
    }  # fmt: skip
    rejected = pd.read_csv(out / "rejected_files.csv")
    assert sorted(rejected["error"].str.split(":").str[0]) == ["NIFTI_2D", "NIFTI_MISSING"]
    # pseudonyms as for DICOM, stable from run to run; raw ids and paths only in private/
    again = ingest.ingest(
        sheet, tmp_path / "i2", tmp_path / "p2", ingest.SelectionRules(), LabelSpec(), SALT,
        source=spec,
    )  # fmt: skip
    assert list(again["case_id"]) == list(inv["case_id"])
    assert all(s.startswith("sub-") for s in inv["subject_id"])
    for f in out.iterdir():
        text = f.read_bytes().decode("latin1")
        assert SECRET not in text and str(tmp_path) not in text and "PAT0" not in text, f.name
    for cid in sel["case_id"]:
        listed = json.loads((private / "series" / f"{cid}.json").read_text())
        assert len(listed) == 1 and listed[0].endswith("ct.nii.gz")
    id_map = pd.read_parquet(private / "id_map.parquet")
    assert id_map["mask"].str.endswith("liver.nii.gz").sum() == 3


def test_manifest_honours_given_splits_over_registry():
    subjects = pd.DataFrame({"subject_id": [f"s{i}" for i in range(10)], "label": [0, 1] * 5})
    settings = manifest.SplitSettings(folds=2)
    registry = manifest.assign_splits(subjects, settings)
    first = registry.set_index("subject_id")["split"]
    moved = next(s for s in first.index if first[s] != "test")
    kept = next(s for s in first.index if s != moved)
    given = {moved: "test", kept: first[kept]}
    out = manifest.assign_splits(subjects, settings, registry, given).set_index("subject_id")
    assert out.loc[moved, "split"] == "test" and out.loc[moved, "fold"] == -1
    assert (out.drop(index=moved)["split"] == first.drop(index=moved)).all()
    # without given splits the stratified assignment stands (the test fails if ignored)
    plain = manifest.assign_splits(subjects, settings, registry).set_index("subject_id")
    assert plain.loc[moved, "split"] != "test"


# --------------------------------------------------------------------------- the workflow


@pytest.mark.slow
def test_workflow_nifti_cohort_through_manifest(tmp_path):
    sheet = make_cohort(tmp_path / "cohort")
    before = tree_digest(tmp_path / "cohort")
    work = workdir(tmp_path / "work", tmp_path / "no-dicom")
    cfg_path = work / "config" / "config.yaml"
    cfg = yaml.safe_load(cfg_path.read_text())
    cfg["input"] = {"format": "nifti", "sheet": str(sheet), "modality": "CT"}
    cfg["labels"]["path"] = None
    cfg["segment"].update({"backend": "precomputed", "batches": 1})
    cfg["qc"]["reference"] = None
    cfg["mask"]["min_roi_ml"] = 1.0
    cfg_path.write_text(yaml.safe_dump(cfg))
    proc = snakemake(work, "manifests/cases.csv", "manifests/excluded.csv")
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert tree_digest(tmp_path / "cohort") == before  # the sheet and its folder untouched
    cases = pd.read_csv(work / "manifests/cases.csv")
    inv = pd.read_parquet(work / "results/inventory/series.parquet")
    assert len(cases) == 5
    given = inv[inv["selected"] & (inv["split"] != "")].set_index("case_id")["split"]
    assert (cases.set_index("case_id").loc[given.index, "split"] == given).all()
    assert set(cases["label"]) == {0, 1}
    for r in cases.itertuples():  # the sheet's masks, on the converted grid
        img, seg = nib.load(work / r.image), nib.load(work / r.label_map)
        assert seg.shape == img.shape and np.allclose(seg.affine, img.affine)
        assert nib.aff2axcodes(img.affine) == ("R", "A", "S")
        assert r.roi_volume_ml > 1.0
    excluded = pd.read_csv(work / "manifests/excluded.csv")
    assert sorted(excluded["reason_code"]) == ["NIFTI_2D", "NIFTI_MISSING"]
    # no identifier of the sheet, its text fields or its paths in any public output
    for folder in ("results", "manifests"):
        for f in (work / folder).rglob("*"):
            if f.is_dir() or "private" in f.parts:
                continue
            raw = f.read_bytes()
            if f.name.endswith(".gz"):
                raw = gzip.decompress(raw)
            text = raw.decode("latin1")
            assert SECRET[:12] not in text and str(tmp_path / "cohort") not in text, f


@pytest.mark.slow
def test_workflow_stops_at_start_on_a_broken_sheet(tmp_path):
    """A structural problem of the sheet is named before any job runs (dry run)."""
    sheet = make_cohort(tmp_path / "cohort", n_good=1)
    sheet.write_text(sheet.read_text().replace(",train,", ",training,"))
    work = workdir(tmp_path / "work", tmp_path / "no-dicom")
    cfg = yaml.safe_load((work / "config/config.yaml").read_text())
    cfg["input"] = {"format": "nifti", "sheet": str(sheet)}
    cfg["labels"]["path"] = None
    (work / "config/config.yaml").write_text(yaml.safe_dump(cfg))
    proc = snakemake(work, "-n")
    assert proc.returncode != 0
    assert "split value(s) ['training'] on line(s) 2" in proc.stderr + proc.stdout


def test_check_image_refuses_a_volume_over_the_budget():
    img = nib.Nifti1Image(np.zeros((64, 64, 64), np.float32), LPS)  # 1 MiB as read
    assert nifti_input.check_image(img, max_image_mb=2).shape == (64, 64, 64)
    with pytest.raises(nifti_input.VolumeRefusedError, match="claims 1 MB of volume data"):
        nifti_input.check_image(img, max_image_mb=0.5)

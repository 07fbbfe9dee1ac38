"""The model bundle (radflow.bundle) and predict (radflow.predict): refusals of bad bundles,
the config conflict check, and -- on the small demo workflow -- predict_all and the one-study
API giving the probabilities evaluate gave (parity to 1e-5)."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pandas as pd
import pydicom
import pytest
import yaml

from radflow import bundle, paths, predict, status
from radflow.segment import DEMO_MARKER
from tests.conftest import BIN, REPO, snakemake, tree_digest

CONFIG = yaml.safe_load((REPO / "config" / "config.yaml").read_text())


# --------------------------------------------------------------------------- bundle refusals


def fake_bundle(d: Path, **meta) -> Path:
    """A bundle folder with valid hashes (verify does not load the weights)."""
    d.mkdir(parents=True)
    (d / bundle.WEIGHTS).write_bytes(b"weights")
    (d / bundle.MODEL_CARD).write_text("# card\n")
    m = {
        "bundle_format": bundle.BUNDLE_FORMAT,
        "radflow_version": "x",
        "threshold": 0.5,
        "files": {n: bundle.sha256_file(d / n) for n in (bundle.WEIGHTS, bundle.MODEL_CARD)},
        **meta,
    }
    m["model_json_sha256"] = bundle._self_hash(m)
    (d / bundle.MODEL_JSON).write_text(json.dumps(m))
    return d


def test_a_valid_bundle_verifies(tmp_path):
    assert bundle.verify(fake_bundle(tmp_path / "b"))["threshold"] == 0.5


@pytest.mark.parametrize(
    ("damage", "words"),
    [
        (lambda d: shutil.rmtree(d), "no model bundle"),
        (lambda d: (d / "model.json").write_text("{not json"), "not valid JSON"),
        (lambda d: (d / "weights.pt").write_bytes(b"weightz"), "weights.pt does not match"),
        (lambda d: (d / "weights.pt").unlink(), "weights.pt is missing"),
        (
            lambda d: (d / "model.json").write_text(
                (d / "model.json").read_text().replace('"threshold": 0.5', '"threshold": 0.1')
            ),
            "model.json does not match",
        ),
    ],
)
def test_a_damaged_bundle_is_refused_in_one_line(tmp_path, damage, words):
    d = fake_bundle(tmp_path / "b")
    damage(d)
    with pytest.raises(bundle.BundleError, match=words) as exc:
        bundle.verify(d)
    assert "\n" not in str(exc.value)


def test_a_bundle_of_another_format_is_refused(tmp_path):
    d = fake_bundle(tmp_path / "b", bundle_format=bundle.BUNDLE_FORMAT + 1)
    with pytest.raises(bundle.BundleError, match="incompatible model bundle.*format"):
        bundle.verify(d)


def test_hash_valid_but_unloadable_weights_are_refused(tmp_path):
    d = fake_bundle(
        tmp_path / "b",
        architecture="r3d_18",
        inputs={"channels": ["image"], "hu_window": [0, 1], "intensity_rule": "hu_window"},
        n_classes=2,
        checkpoint_epoch=1,
    )
    with pytest.raises(bundle.BundleError, match="weights.pt does not load"):
        bundle.load(d)


# --------------------------------------------------------------------------- config conflicts


def test_the_config_that_made_a_bundle_does_not_conflict():
    assert bundle.conflicts(CONFIG, bundle.preprocessing(CONFIG)) == []


def test_runtime_keys_are_not_preprocessing():
    cfg = json.loads(json.dumps(CONFIG))
    cfg["segment"].update(device="cpu", threads=8, batches=0, weights_dir="/elsewhere")
    assert bundle.conflicts(cfg, bundle.preprocessing(CONFIG)) == []


def test_a_conflicting_config_is_an_error_naming_the_keys():
    cfg = json.loads(json.dumps(CONFIG))
    cfg["convert"]["spacing_mm"] = [1.0, 1.0, 1.0]
    cfg["mask"]["rois"] = ["spleen"]
    cfg["predict"]["raw_dir"] = "/new"
    meta = {"preprocessing": bundle.preprocessing(CONFIG)}
    with pytest.raises(ValueError, match=r"convert\.spacing_mm.*mask\.rois"):
        predict.cohort_config(cfg, meta, "salt", None)


def test_cohort_config_takes_the_bundle_settings_and_the_new_cohort():
    cfg = json.loads(json.dumps(CONFIG))
    cfg["predict"].update(raw_dir="new/raw", labels={"path": "new/labels.csv"})
    out = predict.cohort_config(cfg, {"preprocessing": bundle.preprocessing(CONFIG)}, "s", "/w")
    assert out["raw_dir"] == str(Path("new/raw").resolve())
    assert out["labels"]["path"] == str(Path("new/labels.csv").resolve())
    assert out["ids"]["salt"] == "s" and out["segment"]["weights_dir"] == "/w"
    assert out["qc"]["reference"] is None and "predict" not in out


def _cohort(raw_dir, meta_pre=None, **input_):
    cfg = json.loads(json.dumps(CONFIG))
    cfg["predict"]["raw_dir"] = raw_dir
    if input_:
        cfg["input"] = input_
    pre = meta_pre if meta_pre is not None else bundle.preprocessing(CONFIG)
    return predict.cohort_config(cfg, {"preprocessing": pre}, "s", None)


def test_a_nifti_sheet_makes_a_nifti_predict_cohort(tmp_path):
    sheet = tmp_path / "new" / "cohort.csv"
    out = _cohort(str(sheet))
    assert out["input"]["format"] == "nifti" and out["input"]["sheet"] == str(sheet)
    assert out["input"]["modality"] == "CT"  # the bundle's
    assert out["raw_dir"] == str(sheet.parent)
    # labels come from the sheet's label column unless predict.labels is given
    assert out["labels"]["path"] is None
    from radflow.source import from_config

    spec, location = from_config(out)
    assert spec.format == "nifti" and location == str(sheet)


def test_a_dicom_predict_cohort_does_not_inherit_a_nifti_training_sheet():
    mr = {**bundle.preprocessing(CONFIG), "input": {"modality": "MR"}}
    out = _cohort("new/raw", mr, format="nifti", sheet="train.csv", modality="MR")
    assert out["input"]["format"] == "dicom" and out["input"]["sheet"] is None
    assert out["raw_dir"] == str(Path("new/raw").resolve())


def test_a_modality_other_than_the_bundle_s_is_a_conflict():
    with pytest.raises(ValueError, match=r"input\.modality: config \"MR\", bundle \"CT\""):
        _cohort("cohort.csv", modality="MR")


def test_a_bundle_from_before_nifti_cohorts_reads_as_ct():
    old = {k: v for k, v in bundle.preprocessing(CONFIG).items() if k != "input"}
    assert _cohort("cohort.csv", old)["input"]["modality"] == "CT"
    with pytest.raises(ValueError, match=r"input\.modality"):
        _cohort("cohort.csv", old, modality="other")


def test_qc_is_preprocessing_but_not_for_bundles_that_did_not_record_it():
    cfg = json.loads(json.dumps(CONFIG))
    cfg["qc"]["implausible"] = "flag"
    cfg["segment"]["allow_phantom"] = True  # a start guard, not preprocessing
    assert bundle.conflicts(cfg, bundle.preprocessing(CONFIG)) == [
        'qc.implausible: config "flag", bundle "exclude"'
    ]
    old = {k: v for k, v in bundle.preprocessing(CONFIG).items() if k not in ("qc", "input")}
    assert bundle.conflicts(cfg, old) == []


def test_one_nifti_volume_is_not_a_predict_cohort():
    with pytest.raises(ValueError, match="NIfTI cohort is a sheet"):
        _cohort("one.nii.gz")


# --------------------------------------------------------------------------- on the workflow


@pytest.fixture(scope="module")
def trained(workflow_run):
    work, proc, _ = workflow_run
    assert proc.returncode == 0, proc.stderr[-3000:]
    return work


@pytest.fixture(scope="module")
def predicted(trained, demo_cohort, tmp_path_factory):
    """predict_all on three of the demo's subjects (same salt: same case ids as training)."""
    raw = tmp_path_factory.mktemp("newcohort") / "raw"
    for subject in sorted((demo_cohort / "raw").iterdir())[:3]:
        shutil.copytree(subject, raw / subject.name)
    # demo studies: the demo's marker lets the phantom weights segment them (the phantom guard)
    shutil.copy(demo_cohort / DEMO_MARKER, raw.parent / DEMO_MARKER)
    before = {d: tree_digest(trained / d) for d in ("manifests", paths.EVAL_DIR, paths.EXPLAIN_DIR)}
    proc = snakemake(
        trained,
        "predict_all",
        "--config",
        f"predict={{'raw_dir': '{raw}', 'labels': {{'path': '{demo_cohort / 'labels.csv'}'}}}}",
    )
    return trained, proc, before, raw


def test_the_bundle_records_what_inference_needs(trained):
    meta = bundle.verify(trained / paths.MODEL_DIR)
    evaluation = json.loads((trained / paths.METRICS).read_text())
    assert meta["threshold"] == evaluation["threshold"]
    assert meta["metrics"]["test"]["auc_95ci"] == evaluation["test"]["auc_95ci"]
    assert meta["preprocessing"]["convert"]["spacing_mm"] == [4.0, 4.0, 4.0]
    assert meta["training_manifest_sha256"] == bundle.sha256_file(trained / paths.CASES_PARQUET)
    assert meta["input_grid"]["shape"] == [32, 32, 32]
    assert "Intended use" in (trained / paths.MODEL_DIR / "MODEL_CARD.md").read_text()
    # the segmenter: the weights sha256 its training masks came from, as the groups recorded it
    from radflow.segment import SegmentSettings, model_digests

    seg = meta["segmenter"]
    assert (
        seg["backend"] == "totalsegmentator" and seg["settings"] == meta["preprocessing"]["segment"]
    )
    records = [
        json.loads(p.read_text()) for p in (trained / "results" / "seg" / "groups").glob("*.json")
    ]
    assert records and all(r["weights_sha256"] == seg["weights_sha256"] for r in records)
    weights = REPO / "resources" / "totalseg_phantom"
    phantom = SegmentSettings.from_dict(
        {**meta["preprocessing"]["segment"], "device": "cpu", "weights_dir": str(weights)}
    )
    assert seg["weights_sha256"] == model_digests(phantom, declared=True)


def test_onnx_export_of_the_trained_bundle_gives_evaluate_s_probabilities(trained, tmp_path):
    """onnxruntime on the real masked test cases gives evaluate's (torch's) probabilities."""
    pytest.importorskip("onnxscript")
    ort = pytest.importorskip("onnxruntime")
    import torch

    from radflow import inputs
    from radflow.export import read_metadata

    out = tmp_path / "model.onnx"
    run = subprocess.run(
        [f"{BIN}/radflow", "export-onnx", paths.MODEL_DIR, str(out)],
        capture_output=True, text=True, cwd=trained,
    )  # fmt: skip
    assert run.returncode == 0, run.stderr[-2000:]
    meta = bundle.verify(trained / paths.MODEL_DIR)
    assert read_metadata(out)["radflow_model_json_sha256"] == meta["model_json_sha256"]
    old = pd.read_csv(trained / paths.PREDICTIONS)
    spec = inputs.InputSpec.from_checkpoint(meta["inputs"])
    x = np.stack(
        [inputs.read_case(paths.case_files(c), spec.channels, trained) for c in old["case_id"]]
    )
    x = spec.network_input(torch.from_numpy(x)).numpy()
    sess = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    _, prob = sess.run(None, {"input": x})
    assert len(prob) == len(old) >= 2
    assert np.abs(prob - old["probability"].to_numpy()).max() < 1e-4


def test_predict_all_gives_evaluate_s_probabilities(predicted):
    work, proc, before, _ = predicted
    assert proc.returncode == 0, proc.stderr[-3000:]
    new = pd.read_csv(work / paths.PREDICTIONS_NEW)
    old = pd.read_csv(work / paths.PREDICTIONS).set_index("case_id")
    both = new[new["case_id"].isin(old.index)]
    assert len(both) >= 2
    assert np.allclose(both["probability"], old.loc[both["case_id"], "probability"], atol=1e-5)
    assert (both["label"].to_numpy() == old.loc[both["case_id"], "label"].to_numpy()).all()
    thr = json.loads((work / paths.METRICS).read_text())["threshold"]
    assert (new["prediction"] == (new["probability"] >= thr)).all()
    m = json.loads((work / paths.PREDICT_METRICS).read_text())
    assert m["threshold"] == thr and m["external_validation"]["n"] == m["n_labelled"] > 0
    html = (work / paths.PREDICT_EXPLAIN / "index.html").read_text()
    assert all(c in html for c in new["case_id"])
    for c in new["case_id"]:
        assert (work / paths.PREDICT_EXPLAIN / f"{c}_cam_ct.nii.gz").exists()
    # the training cohort's outputs are untouched
    for d, digest in before.items():
        assert tree_digest(work / d) == digest, d


def test_predict_all_lists_why_series_were_left_out(predicted):
    work, proc, *_ = predicted
    assert proc.returncode == 0
    excl = pd.read_csv(work / paths.PREDICT_EXCLUDED)
    assert (excl["reason"].str.len() > 0).all() and "IMAGE_TYPE" in set(excl["reason_code"])
    # no raw identifier in the public outputs
    text = (work / paths.PREDICTIONS_NEW).read_text() + excl.to_csv()
    assert "MRN" not in text and "ACC" not in text


def test_one_study_api_gives_evaluate_s_probability(predicted):
    work, _, _, raw = predicted
    model = predict.load_model(work / paths.MODEL_DIR, device="cpu", threads=2)
    ids = pd.read_csv(work / paths.PREDICT_WORK / paths.ID_MAP)
    old = pd.read_csv(work / paths.PREDICTIONS).set_index("case_id")
    studies = sorted(p for p in raw.glob("*/*") if p.is_dir())[:2]
    for study in studies:
        first = next(f for f in study.glob("002_*/*") if f.is_file())
        study_uid = pydicom.dcmread(first, stop_before_pixels=True).StudyInstanceUID
        case = ids[ids["StudyInstanceUID"] == study_uid]["case_id"].dropna().iloc[0]
        res = model.predict(study)
        assert abs(res.probability - old.loc[case, "probability"]) < 1e-5
        assert res.prediction == int(res.probability >= model.threshold)
        assert set(res.seconds) == {"select", "convert", "segment", "mask", "model", "cam"}
        sidecar = work / paths.PREDICT_WORK / paths.for_case(paths.SIDECAR, case)
        geometry = json.loads(sidecar.read_text())["geometry"]
        assert res.cam.shape[:3] == tuple(geometry["source_shape"])


def test_one_study_that_fails_selection_is_refused_with_its_reason(predicted, tmp_path):
    work, _, _, raw = predicted
    study = next(p for p in raw.glob("*/*") if p.is_dir())
    shutil.copytree(study / "001_Topogram_0_6", tmp_path / "scout" / "001")
    with pytest.raises(status.CaseFailedError, match="NOT_SELECTED.*series 1"):
        predict.load_model(work / paths.MODEL_DIR, device="cpu").predict(tmp_path / "scout")


def test_radflow_predict_cli_and_its_refusals(predicted, tmp_path):
    work, _, _, raw = predicted
    study = next(p for p in raw.glob("*/*") if p.is_dir())
    run = lambda *a: subprocess.run(  # noqa: E731
        [f"{BIN}/radflow", "predict", *a], capture_output=True, text=True, cwd=work
    )
    ok = run(paths.MODEL_DIR, str(study), "--out", str(tmp_path / "o"), "--device", "cpu")
    assert ok.returncode == 0, ok.stderr
    assert json.loads((tmp_path / "o" / "prediction.json").read_text())["probability"] >= 0
    assert (tmp_path / "o" / "cam.nii.gz").exists()
    tampered = tmp_path / "model"
    shutil.copytree(work / paths.MODEL_DIR, tampered)
    with open(tampered / "weights.pt", "r+b") as fh:
        fh.seek(-8, 2)
        fh.write(b"\0" * 8)
    bad = run(str(tampered), str(study), "--out", str(tmp_path / "t"))
    assert bad.returncode == 2 and "tampered model bundle" in bad.stderr
    assert len(bad.stderr.strip().splitlines()) == 1


def test_a_nifti_volume_gives_evaluate_s_probability(trained, tmp_path):
    """A converted volume (results/nifti) given back as NIfTI input, stored LPS: reorientation
    to RAS+ and reconversion at the same spacing are the identity, so the probability is
    evaluate's and the CAM comes back on the file's own (LPS) grid."""
    import nibabel as nib

    old = pd.read_csv(trained / paths.PREDICTIONS).set_index("case_id")
    case = sorted(old.index)[0]
    ras = nib.load(trained / paths.for_case(paths.NIFTI, case))
    lps = nib.orientations.axcodes2ornt(("L", "P", "S"))
    flip = nib.orientations.ornt_transform(nib.io_orientation(ras.affine), lps)
    data = nib.orientations.apply_orientation(np.asanyarray(ras.dataobj), flip)
    aff = ras.affine @ nib.orientations.inv_ornt_aff(flip, ras.shape)
    src = tmp_path / "study.nii.gz"
    nib.save(nib.Nifti1Image(data, aff), src)
    model = predict.load_model(trained / paths.MODEL_DIR, device="cpu", threads=2)
    res = model.predict(src, out_dir=tmp_path / "work")
    reconverted = nib.load(tmp_path / "work" / "image.nii.gz")
    assert np.array_equal(np.asanyarray(reconverted.dataobj), np.asanyarray(ras.dataobj))
    assert np.allclose(reconverted.affine, ras.affine, atol=1e-5)
    assert abs(res.probability - old.loc[case, "probability"]) < 1e-5
    assert res.prediction == int(res.probability >= model.threshold)
    assert res.cam.shape == data.shape and np.allclose(res.cam.affine, aff, atol=1e-5)
    assert (
        nib.aff2axcodes(res.cam.affine) == ("L", "P", "S") and float(res.cam.get_fdata().max()) > 0
    )
    # a volume that is not HU is refused with ingest's reason, as in a NIfTI cohort
    nib.save(nib.Nifti1Image((data.astype(np.float32) + 1024), aff), tmp_path / "raw.nii.gz")
    with pytest.raises(status.CaseFailedError, match="NOT_HU.*intercept"):
        model.predict(tmp_path / "raw.nii.gz")
    (tmp_path / "notes.txt").write_text("x")
    with pytest.raises(status.CaseFailedError, match="NOT_A_STUDY"):
        model.predict(tmp_path / "notes.txt")

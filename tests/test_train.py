"""train/evaluate on tiny synthetic volumes: steps run, resume is exact, the dataset and the
training cache see the same input, metrics match scikit-learn and the threshold comes from
validation only."""

from __future__ import annotations

import json
import math

import numpy as np
import pandas as pd
import pytest
import torch

from radflow import evaluate, inputs, manifest, paths, train
from radflow.data import CaseDataset
from radflow.io import save_nifti


def _tiny_cohort(tmp_path, n=12, size=16, unlabelled=()):
    """n cases (12: 6 train, 3 val, 3 test; more: train, val, test in turn); the cases numbered
    in ``unlabelled`` get an empty label."""
    rng = np.random.default_rng(0)
    rows = []
    aff = np.diag([4.0, 4.0, 4.0, 1.0])
    for i in range(n):
        cid = f"case-{i:012x}"
        label = i % 2
        vol = rng.normal(40, 10, (size,) * 3)
        if label:
            vol[5:9, 6:10, 7:11] -= 80  # a hypodense "lesion"
        files = paths.case_files(cid)
        for key in ("image", "label_map", "masked", "roi", "qc"):
            (tmp_path / files[key]).parent.mkdir(parents=True, exist_ok=True)
        save_nifti(vol.astype(np.int16), aff, tmp_path / files["masked"])
        save_nifti(np.ones((size,) * 3, np.uint8), aff, tmp_path / files["roi"])
        split = ["train"] * 6 + ["val"] * 3 + ["test"] * 3 + ["train", "val", "test"] * 3
        rows.append(
            {
                "case_id": cid,
                "subject_id": f"sub-{i:012x}",
                "study_id": f"stu-{i:012x}",
                "series_id": f"ser-{i:012x}",
                "label": pd.NA if i in unlabelled else label,
                "split": split[i],
                "fold": -1,
                **files,
                "image_nx": size,
                "image_ny": size,
                "image_nz": size,
                "image_sx_mm": 4.0,
                "image_sy_mm": 4.0,
                "image_sz_mm": 4.0,
                "masked_nx": size,
                "masked_ny": size,
                "masked_nz": size,
                "masked_sx_mm": 4.0,
                "masked_sy_mm": 4.0,
                "masked_sz_mm": 4.0,
                "roi_volume_ml": 262.0,
                "flags": "",
                **{f"sha256_{k}": "0" * 64 for k in ("image", "label_map", "masked", "roi", "qc")},
                "slice_thickness_mm": 1.5,
                "kernel": "B30f",
                "manufacturer": "SIEMENS",
                "radflow_version": "0.1.0",
                "config_hash": "0" * 16,
            }
        )
    df = manifest.validate(pd.DataFrame(rows))
    df.to_parquet(tmp_path / "cases.parquet")
    return tmp_path / "cases.parquet"


def _settings(**kw):
    base = dict(epochs=2, batch_size=2, lr=1e-3, device="cpu", rotate_deg=5.0, seed=1)
    base.update(kw)
    return train.TrainSettings.from_dict(base)


@pytest.mark.parametrize("arch", ["r3d_18", "mc3_18", "r2plus1d_18", "r3d_slim"])
def test_training_runs_a_few_steps_on_cpu(tmp_path, arch):
    m = _tiny_cohort(tmp_path)
    s = _settings(arch=arch, epochs=1, channels=["image", "roi"])
    out = train.train(m, tmp_path / "run", s, root=tmp_path, threads=2)
    assert out["epochs_run"] == 1
    hist = pd.read_csv(tmp_path / "run" / "history.csv")
    assert list(hist.columns) == ["epoch", "loss", "val_loss", "val_auc", "lr", "seconds"]
    ck = torch.load(tmp_path / "run" / "best.pt", weights_only=True)
    assert ck["arch"] == arch and ck["channels"] == ["image", "roi"]


def test_model_selection_breaks_auc_ties_on_validation_loss():
    from sklearn.metrics import log_loss

    y, p = np.array([0, 1, 1, 0, 1]), np.array([0.2, 0.7, 0.9, 0.4, 0.6])
    assert train.log_loss(y, p) == pytest.approx(log_loss(y, p))
    best = (1.0, 0.5)  # AUC 1.0 reached with a loss of 0.5
    assert train.is_better(1.0, 0.3, *best)  # same AUC, more confident
    assert not train.is_better(1.0, 0.6, *best)
    assert not train.is_better(0.9, 0.01, *best)  # a lower AUC never wins on loss
    assert train.is_better(0.95, 0.9, 0.9, 0.1)
    assert train.is_better(float("nan"), 0.4, -1.0, math.inf)  # one-class validation: loss
    assert train.is_better(float("nan"), float("nan"), -1.0, 0.2)  # no validation: latest


def test_settings_are_those_of_the_schema():
    with pytest.raises(ValueError, match="unknown train keys"):
        train.TrainSettings.from_dict({"workers": 0})  # the reserved key is gone
    with pytest.raises(ValueError, match="train.device"):
        train.TrainSettings.from_dict({"device": "gpu"})
    with pytest.raises(ValueError, match="train.intensity_rule"):
        train.TrainSettings.from_dict({"intensity_rule": "zscore"})
    s = train.TrainSettings.from_dict({"channels": ["image", "roi"], "hu_window": [-40, 160]})
    assert s.inputs == inputs.InputSpec(("image", "roi"), (-40, 160), "hu_window")


def test_dataset_and_training_cache_see_the_same_input(tmp_path):
    m = _tiny_cohort(tmp_path)
    spec = inputs.InputSpec(("image", "roi"), (-40.0, 160.0))
    ds = CaseDataset(
        m, split="val", channels=spec.channels, hu_window=spec.hu_window, root=tmp_path
    )
    cases = manifest.read(m)
    cache = inputs.Cache(cases[cases["split"] == "val"], tmp_path, spec, torch.device("cpu"))
    assert cache.data.dtype == torch.int16 and cache.image_channels == [0]
    x = cache.batch(range(len(cache)))  # (B, C, Z, Y, X)
    assert x.shape == (3, 2, 16, 16, 16)
    for i in range(len(ds)):
        arr = ds.array(i)  # (C, X, Y, Z)
        hu = inputs.read_case(ds.cases.iloc[i], ("image",), tmp_path)[0].astype(np.float32)
        np.testing.assert_array_equal(arr[0], np.clip((hu + 40) / 200, 0, 1))
        np.testing.assert_array_equal(arr[1], 1.0)
        np.testing.assert_array_equal(x[i].permute(0, 3, 2, 1).numpy(), arr)


def test_resume_after_a_kill_is_exact(tmp_path):
    m = _tiny_cohort(tmp_path)
    s = _settings(epochs=3)
    train.train(m, tmp_path / "a", s, root=tmp_path, threads=1)
    steps_per_epoch = 3  # 6 training cases, batch 2
    with pytest.raises(train.InterruptedRunError):  # dies in the middle of epoch 1
        train.train(m, tmp_path / "b", s, root=tmp_path, threads=1, max_steps=steps_per_epoch + 2)
    last = torch.load(tmp_path / "b" / "last.pt", weights_only=True)
    assert last["epoch"] == 0 and last["optimizer"]["state"]
    # Snakemake removes an interrupted job's outputs before rerunning it; the best epoch so
    # far must survive that (it may be an epoch before the kill)
    (tmp_path / "b" / "best.pt").unlink(missing_ok=True)
    (tmp_path / "b" / "history.csv").unlink(missing_ok=True)
    train.train(m, tmp_path / "b", s, root=tmp_path, threads=1)
    for name in ("last.pt", "best.pt"):
        a = torch.load(tmp_path / "a" / name, weights_only=True)
        b = torch.load(tmp_path / "b" / name, weights_only=True)
        assert a["epoch"] == b["epoch"], name
        for k in a["model"]:
            torch.testing.assert_close(a["model"][k], b["model"][k], rtol=0, atol=0)
    assert torch.load(tmp_path / "a" / "last.pt", weights_only=True)["epoch"] == 2
    ha, hb = pd.read_csv(tmp_path / "a/history.csv"), pd.read_csv(tmp_path / "b/history.csv")
    pd.testing.assert_frame_equal(ha.drop(columns="seconds"), hb.drop(columns="seconds"))


def test_metrics_match_scikit_learn():
    from sklearn import metrics as skm

    y = np.array([0, 0, 0, 0, 1, 1, 1, 1, 0, 1])
    p = np.array([0.1, 0.4, 0.35, 0.8, 0.7, 0.9, 0.2, 0.65, 0.05, 0.55])
    m = evaluate.binary_metrics(y, p, 0.5, n_boot=200)
    pred = (p >= 0.5).astype(int)
    assert m["auc"] == pytest.approx(skm.roc_auc_score(y, p))
    assert m["accuracy"] == pytest.approx(skm.accuracy_score(y, pred))
    assert m["balanced_accuracy"] == pytest.approx(skm.balanced_accuracy_score(y, pred))
    assert m["precision"] == pytest.approx(skm.precision_score(y, pred))
    assert m["sensitivity"] == pytest.approx(skm.recall_score(y, pred))
    assert m["specificity"] == pytest.approx(skm.recall_score(1 - y, 1 - pred))
    assert m["f1"] == pytest.approx(skm.f1_score(y, pred))
    tn, fp, fn, tp = skm.confusion_matrix(y, pred).ravel()
    assert m["confusion_matrix"] == {"tn": tn, "fp": fp, "fn": fn, "tp": tp}
    lo, hi = m["auc_95ci"]
    assert lo <= m["auc"] <= hi


def test_threshold_comes_from_validation_only(tmp_path, monkeypatch):
    m = _tiny_cohort(tmp_path)
    s = _settings(epochs=1)
    train.train(m, tmp_path / "run", s, root=tmp_path, threads=1)
    seen = []
    real = evaluate.youden_threshold
    monkeypatch.setattr(
        evaluate, "youden_threshold", lambda y, p: seen.append(len(y)) or real(y, p)
    )
    res = evaluate.evaluate(
        tmp_path / "run/best.pt",
        m,
        tmp_path / "eval",
        root=tmp_path,
        history=tmp_path / "run/history.csv",
        device="cpu",
        bootstrap=50,
    )
    cases = manifest.read(m)
    # the network's threshold and the ROI baseline's: both from the validation cases alone
    assert seen and set(seen) == {int((cases["split"] == "val").sum())}
    preds = pd.read_csv(tmp_path / "eval/predictions.csv")
    val = preds[preds["split"] == "val"]
    assert res["threshold"] == pytest.approx(
        real(val["label"].to_numpy(), val["probability"].to_numpy())
    )
    assert res["test"]["threshold"] == res["threshold"]
    assert json.loads((tmp_path / "eval/metrics.json").read_text())["test"]["n"] == 3
    for png in ("roc.png", "confusion.png", "training_curves.png"):
        assert (tmp_path / "eval" / png).stat().st_size > 1000


def test_unlabelled_cases_are_predicted_but_never_trained_on_or_scored(tmp_path, monkeypatch):
    m = _tiny_cohort(tmp_path, n=15, unlabelled=(12, 13, 14))  # one in each split
    seen = []
    real_cache = train.Cache
    monkeypatch.setattr(train, "Cache", lambda df, *a: seen.append(len(df)) or real_cache(df, *a))
    train.train(m, tmp_path / "run", _settings(epochs=1), root=tmp_path, threads=1)
    assert seen == [6, 3]  # the labelled train and val cases alone
    res = evaluate.evaluate(
        tmp_path / "run/best.pt", m, tmp_path / "eval", root=tmp_path, device="cpu", bootstrap=20
    )
    assert res["test"]["n"] == 3 and res["validation"]["n"] == 3
    preds = pd.read_csv(tmp_path / "eval/predictions.csv")
    assert len(preds) == 15 and preds["label"].isna().sum() == 3
    assert preds["probability"].notna().all()


def test_a_manifest_without_labels_stops_training_with_one_line(tmp_path):
    m = _tiny_cohort(tmp_path, unlabelled=range(12))
    with pytest.raises(manifest.NoLabelledCasesError, match="no labelled case in the manifest"):
        train.train(m, tmp_path / "run", _settings(epochs=1), root=tmp_path, threads=1)


def test_killed_training_process_resumes_to_the_same_model(tmp_path):
    import os
    import signal
    import subprocess
    import sys
    import time

    m = _tiny_cohort(tmp_path)
    settings = {"epochs": 4, "batch_size": 2, "device": "cpu", "seed": 1}
    cmd = [
        sys.executable,
        "-m",
        "radflow.cli",
        "train",
        str(m),
        None,
        "--root",
        str(tmp_path),
        "--settings",
        json.dumps(settings),
        "--threads",
        "1",
    ]
    ref = subprocess.run([*cmd[:5], str(tmp_path / "ref"), *cmd[6:]], capture_output=True)
    assert ref.returncode == 0, ref.stderr[-2000:]
    out = tmp_path / "killed"
    proc = subprocess.Popen([*cmd[:5], str(out), *cmd[6:]], stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while not (out / "last.pt").exists() and time.time() < deadline:
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGKILL)  # in the middle of the next epoch
    proc.wait()
    first = torch.load(out / "last.pt", weights_only=True)["epoch"]
    assert first < 3
    again = subprocess.run([*cmd[:5], str(out), *cmd[6:]], capture_output=True, text=True)
    assert again.returncode == 0 and "resumed from" in again.stderr
    a = torch.load(tmp_path / "ref" / "last.pt", weights_only=True)
    b = torch.load(out / "last.pt", weights_only=True)
    assert a["epoch"] == b["epoch"] == 3
    for k in a["model"]:
        torch.testing.assert_close(a["model"][k], b["model"][k], rtol=0, atol=0)


def test_a_stale_last_checkpoint_is_not_resumed(tmp_path):
    m = _tiny_cohort(tmp_path)
    train.train(m, tmp_path / "run", _settings(epochs=1), root=tmp_path, threads=1)
    out = train.train(m, tmp_path / "run", _settings(epochs=1, lr=5e-4), root=tmp_path, threads=1)
    assert out["epochs_run"] == 1  # started afresh: other settings, not a resume
    ck = torch.load(tmp_path / "run" / "last.pt", weights_only=True)
    assert ck["fingerprint"] == train.run_fingerprint(m, _settings(epochs=1, lr=5e-4))

"""Per-study latency of predict on the CPU: DICOM folder -> probability and Grad-CAM.

Three ways, on the studies of a raw tree, with a project's model bundle (after `make demo`):

* warm API: ``radflow.load_model(bundle)`` once, a first study to warm up, then
  ``predict(study)`` per study; seconds per stage (select, convert, segment, mask, model, cam);
* separate processes: the workflow's per-case commands for one study, each a new process
  (``radflow ingest``, ``convert``, ``segment``, ``mask``), then one process that loads the
  bundle and computes the probability and the CAM -- what one study costs without a warm model;
* ``snakemake predict_all`` over ``--studies`` studies (per study: its wall time / studies).

    python bench/predict_speed.py --project . --raw data/demo/raw --studies 16
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

import _results
from radflow import bundle, paths
from radflow.segment import DEMO_MARKER, is_demo_cohort

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent

# the model + CAM step of the separate-process path (the same calls Predictor makes)
MODEL_STEP = """
import sys, torch
from radflow import bundle, explain, inputs, model
from radflow.predict import _One
torch.set_num_threads(int(sys.argv[4]))
net, ck, meta = bundle.load(sys.argv[1])
spec = inputs.InputSpec.from_checkpoint(ck)
x = spec.network_input(torch.from_numpy(inputs.read_case(
    {"masked": sys.argv[2], "roi": sys.argv[3]}, spec.channels)[None]))
p = float(model.predict(net, _One(x), 1, False)[0])
s = meta["explain"]
explain.compute_cam(net, x, s["method"], s["target_layer"], s["target_class"], s["score"])
print(p)
"""


def run(cmd: list[str], **kw) -> float:
    t = time.perf_counter()
    p = subprocess.run(cmd, capture_output=True, text=True, **kw)
    if p.returncode != 0:
        raise RuntimeError(f"{cmd[:3]} failed: {p.stderr[-2000:]}")
    return time.perf_counter() - t


def separate(study: Path, model_dir: Path, cfg: dict, threads: int) -> dict[str, float]:
    """One study through the per-case commands, each its own process, with the bundle's
    settings as the one-study API reads them (``predict.stage_settings``)."""
    from radflow.predict import stage_settings

    rf = str(BIN / "radflow")
    meta = json.loads((model_dir / bundle.MODEL_JSON).read_text())
    st = stage_settings(meta, "cpu", cfg["segment"]["weights_dir"])
    mb = ["--max-image-mb", str(st["max_image_mb"])]
    env = {**os.environ, "RADFLOW_SALT": "bench-salt"}
    t: dict[str, float] = {}
    with tempfile.TemporaryDirectory() as tmp:
        w = Path(tmp)
        tree = w / "raw" / study.name
        shutil.copytree(study, tree)
        t["ingest"] = run(
            [rf, "ingest", str(w / "raw"), str(w / "inv"), "--private-dir", str(w / "priv")]
            + ["--selection", json.dumps(st["selection"]), "--threads", str(threads), *mb],
            env=env,
        )
        lists = sorted((w / "priv" / "series").glob("*.json"))
        case = lists[0].stem
        img, sc = w / "nifti" / f"{case}.nii.gz", w / "nifti" / f"{case}.json"
        t["convert"] = run(
            [rf, "convert", str(lists[0]), str(img), "--sidecar", str(sc)]
            + ["--settings", json.dumps(st["convert"]), "--case-id", case, *mb],
            env=env,
        )
        t["segment"] = run(
            [rf, "segment", str(sc), "--seg-dir", str(w / "seg"), "--record", str(w / "r.json")]
            + ["--settings", json.dumps(st["segment"]), "--threads", str(threads)],
            env=env,
        )
        masked, roi = w / "m.nii.gz", w / "roi.nii.gz"
        t["mask"] = run(
            [rf, "mask", str(img), str(w / "seg" / f"{case}.nii.gz"), str(masked)]
            + ["--roi-out", str(roi), "--status", str(w / "s.json")]
            + ["--settings", json.dumps(st["mask"]), "--case-id", case]
            + ["--qc-settings", json.dumps(st["qc"])],
            env=env,
        )
        t["model+cam"] = run(
            [sys.executable, "-c", MODEL_STEP, str(model_dir), str(masked), str(roi), str(threads)]
        )
    t["total"] = sum(t.values())
    return t


def mean(rows: list[dict[str, float]]) -> dict[str, float]:
    return {k: round(sum(r[k] for r in rows) / len(rows), 3) for k in rows[0]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--project", default=".", help="project folder with results/model")
    ap.add_argument("--raw", default=None, help="raw DICOM tree (default: the project's)")
    ap.add_argument("--studies", type=int, default=16, help="studies for predict_all")
    ap.add_argument("--repeats", type=int, default=4, help="studies timed per single-study way")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--skip-predict-all", action="store_true")
    _results.add_argument(ap)
    args = ap.parse_args()
    _results.start("predict_speed", args)
    project = Path(args.project).resolve()
    cfg = yaml.safe_load((project / "config" / "config.yaml").read_text())
    cfg["segment"]["weights_dir"] = str(
        (project / cfg["segment"]["weights_dir"])
        if (project / cfg["segment"]["weights_dir"]).exists()
        else REPO / cfg["segment"]["weights_dir"]
    )
    raw = Path(args.raw or project / cfg["raw_dir"]).resolve()
    studies = sorted(p for p in raw.glob("*/*") if p.is_dir())
    model_dir = project / paths.MODEL_DIR

    from radflow import load_model

    t = time.perf_counter()
    model = load_model(model_dir, "cpu", args.threads, cfg["segment"]["weights_dir"])
    model.predict(studies[0])  # warm-up: imports, TotalSegmentator's model, first CAM
    print(f"load + warm-up study: {time.perf_counter() - t:.2f} s")
    warm = []
    for s in studies[1 : 1 + args.repeats]:
        t = time.perf_counter()
        r = model.predict(s)
        warm.append({**r.seconds, "total": time.perf_counter() - t})
    w = mean(warm)
    print(f"warm API, per study (mean of {len(warm)}): {json.dumps(w)}")
    cold = [separate(s, model_dir, cfg, args.threads) for s in studies[1 : 1 + args.repeats]]
    c = mean(cold)
    print(f"separate processes, per study (mean of {len(cold)}): {json.dumps(c)}")
    print(f"speed-up of the warm API: {c['total'] / w['total']:.1f}x")
    result = {"warm_api_s": w, "separate_processes_s": c, "speedup": c["total"] / w["total"]}

    if not args.skip_predict_all:
        with tempfile.TemporaryDirectory() as tmp:
            sub = Path(tmp) / "raw"
            for s in studies[: args.studies]:
                shutil.copytree(s, sub / s.parent.name / s.name)
            if is_demo_cohort(raw):  # the demo's studies: the phantom weights may segment them
                shutil.copy(raw.parent / DEMO_MARKER, sub.parent / DEMO_MARKER)
            n = len(studies[: args.studies])
            # from scratch: the predictions and the predict cohort's project folder
            for d in (paths.PREDICT_DIR, paths.PREDICT_WORK):
                shutil.rmtree(project / d, ignore_errors=True)
            # a config file, not --config predict={...}: that reads the numbers as strings
            extra = Path(tmp) / "predict.yaml"
            pred = {"raw_dir": str(sub), "device": "cpu", "threads": args.threads}
            extra.write_text(yaml.safe_dump({"predict": pred}))
            secs = run(
                [str(BIN / "snakemake"), "-s", str(REPO / "Snakefile"), "-d", str(project)]
                + ["--cores", str(args.threads), "predict_all", "--configfile", str(extra)]
            )
            predicted = len((project / paths.PREDICTIONS_NEW).read_text().splitlines()) - 1
        print(
            f"predict_all over {n} studies ({predicted} predicted): {secs:.1f} s, "
            f"{secs / n:.2f} s per study"
        )
        result["predict_all"] = {
            "studies": n,
            "predicted": predicted,
            "seconds": secs,
            "per_study_s": secs / n,
        }
    print(json.dumps(result))
    _results.finish()


if __name__ == "__main__":
    main()

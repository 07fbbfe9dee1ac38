"""Benchmark: one TotalSegmentator call with nnU-Net's default multi-process prediction vs
radflow's in-process sequential route, on the shipped phantom model (or --weights-dir).

Each run is a fresh `radflow segment` process, as a Snakemake job is. Prints median wall time of
each path, the ratio, and whether both label maps are identical. With ``--batch N`` it also
segments N phantom images as N fresh processes (segment.batches: 0, a group per case) and
as one `radflow segment` process for the group (segment.batches > 0), and prints seconds per
case of each and their ratio. Usage:

    python bench/segment_speed.py [--repeats 3] [--threads 2] [--device cpu] [--batch 8]
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

import nibabel as nib
import numpy as np

import _results
from radflow.demo import phantom_model
from radflow.io import save_nifti

REPO = Path(__file__).resolve().parents[1]


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--weights-dir", default=str(REPO / "resources" / "totalseg_phantom"))
    ap.add_argument("--workdir", default="/tmp/radflow-bench-segment")
    ap.add_argument("--batch", type=int, default=0, help="also compare N cases batched")
    _results.add_argument(ap)
    args = ap.parse_args()
    _results.start("segment_speed", args)

    work = Path(args.workdir)
    work.mkdir(parents=True, exist_ok=True)
    hu, truth = phantom_model.render_case(np.random.default_rng(3), lesion=True)
    aff = np.diag([3.0, 3.0, 3.0, 1.0])
    save_nifti(hu.astype(np.int16), aff, work / "ct.nii.gz")
    print(f"image: {hu.shape} at 3 mm; device {args.device}; threads {args.threads}")
    radflow = str(Path(sys.executable).parent / "radflow")
    times: dict[str, list[float]] = {"default": [], "sequential": []}
    inner: dict[str, list[float]] = {"default": [], "sequential": []}
    for _ in range(args.repeats):
        for mode in times:
            settings = {
                "weights_dir": args.weights_dir,
                "device": args.device,
                "sequential": mode == "sequential",
            }
            out = work / mode
            shutil.rmtree(out, ignore_errors=True)  # a kept label map would be reused
            t = time.perf_counter()
            subprocess.run(
                [
                    radflow,
                    "segment",
                    str(work / "ct.nii.gz"),
                    "--seg-dir",
                    str(out),
                    "--record",
                    str(out / "group.json"),
                    "--threads",
                    str(args.threads),
                    "--settings",
                    json.dumps(settings),
                ],
                check=True,
                capture_output=True,
            )
            times[mode].append(time.perf_counter() - t)
            inner[mode].append(json.loads((out / "ct.json").read_text())["seconds"])
    for mode in times:
        print(
            f"{mode:10s} process median {statistics.median(times[mode]):6.2f} s; "
            f"inside the job {statistics.median(inner[mode]):6.2f} s"
        )
    ratio = statistics.median(times["sequential"]) / statistics.median(times["default"])
    print(f"ratio sequential / default wall time: {ratio:.2f}")
    a = np.asanyarray(nib.load(work / "default" / "ct.nii.gz").dataobj)
    b = np.asanyarray(nib.load(work / "sequential" / "ct.nii.gz").dataobj)
    print(
        f"identical label maps: {np.array_equal(a, b)}; liver Dice vs phantom truth: "
        f"{phantom_model.dice_per_class(b, truth)['liver']:.3f}"
    )

    if args.batch:
        batched(work, args, radflow)


def batched(work: Path, args: argparse.Namespace, radflow: str) -> None:
    """N cases: one process each vs one process for all (the same images, the same settings)."""
    src = work / "nifti"
    src.mkdir(exist_ok=True)
    images = []
    for i in range(args.batch):
        hu, _ = phantom_model.render_case(np.random.default_rng(100 + i), lesion=bool(i % 2))
        images.append(src / f"case-{i:012x}.nii.gz")
        save_nifti(hu.astype(np.int16), np.diag([3.0, 3.0, 3.0, 1.0]), images[-1])
    settings = json.dumps({"weights_dir": args.weights_dir, "device": args.device})
    common = ["--threads", str(args.threads), "--settings", settings]
    for d in ("single", "batch"):
        shutil.rmtree(work / d, ignore_errors=True)
    t = time.perf_counter()
    for i, img in enumerate(images):
        out = work / "single"
        cmd = [radflow, "segment", str(img), "--seg-dir", str(out), "--record"]
        subprocess.run([*cmd, str(out / f"g{i}.json"), *common], check=True, capture_output=True)
    single = (time.perf_counter() - t) / len(images)
    t = time.perf_counter()
    out = work / "batch"
    cmd = [radflow, "segment", *map(str, images), "--seg-dir", str(out), "--record"]
    cmd += [str(out / "group.json")] + common
    subprocess.run(cmd, check=True, capture_output=True)
    batch = (time.perf_counter() - t) / len(images)
    same = all(
        np.array_equal(
            np.asanyarray(nib.load(work / "single" / img.name).dataobj),
            np.asanyarray(nib.load(work / "batch" / img.name).dataobj),
        )
        for img in images
    )
    print(
        f"{len(images)} cases: one process per case {single:6.2f} s/case; one batch process "
        f"{batch:6.2f} s/case; ratio batch / per-case {batch / single:.2f}; "
        f"identical label maps: {same}"
    )


if __name__ == "__main__":
    main()
    _results.finish()

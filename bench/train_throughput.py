"""Benchmark: training throughput (volumes/s) with synthetic tensors vs radflow's real data path.

The real path is what `radflow train` does per step: int16 cache -> windowing -> on-device
augmentation -> forward/backward/step. The synthetic path feeds ready float tensors already on
the device. Target: real >= 90% of synthetic (the loader is not the bottleneck). Usage:

    python bench/train_throughput.py [--size 32] [--batch 4] [--steps 10] [--device auto]
    python bench/train_throughput.py --size 128 --batch 8 --device cuda --amp   # on a GPU
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch

import _results
from radflow import inputs, manifest, train
from radflow.io import save_nifti
from radflow.model import build_model, resolve_device


def synthetic_manifest(root: Path, n: int, size: int) -> Path:
    rows = []
    aff = np.diag([2.0, 2.0, 2.0, 1.0])
    rng = np.random.default_rng(0)
    for i in range(n):
        cid = f"case-{i:012x}"
        paths = manifest.case_paths(cid)
        (root / paths["masked"]).parent.mkdir(parents=True, exist_ok=True)
        save_nifti(rng.normal(40, 30, (size,) * 3).astype(np.int16), aff, root / paths["masked"])
        save_nifti(np.ones((size,) * 3, np.uint8), aff, root / paths["roi"])
        g = {f"{p}_{a}": size for p in ("image", "masked") for a in ("nx", "ny", "nz")}
        g |= {f"{p}_{a}_mm": 2.0 for p in ("image", "masked") for a in ("sx", "sy", "sz")}
        rows.append(
            {
                "case_id": cid,
                "subject_id": f"sub-{i:012x}",
                "study_id": f"stu-{i:012x}",
                "series_id": f"ser-{i:012x}",
                "label": i % 2,
                "split": "train",
                "fold": -1,
                **paths,
                **g,
                "roi_volume_ml": 1.0,
                "flags": "",
                **{f"sha256_{k}": "0" * 64 for k in ("image", "label_map", "masked", "roi", "qc")},
                "slice_thickness_mm": 1.0,
                "kernel": "B30f",
                "manufacturer": "x",
                "radflow_version": "bench",
                "config_hash": "0" * 16,
            }
        )
    df = manifest.validate(pd.DataFrame(rows)[manifest.CASE_COLUMNS])
    df.to_parquet(root / "cases.parquet")
    return root / "cases.parquet"


def run_steps(model, opt, batches, device, amp, steps):
    loss_fn = torch.nn.CrossEntropyLoss()
    n = 0
    for i in range(steps + 2):
        if i == 2:  # two warm-up steps
            if device.type == "cuda":
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            n = 0
        x, y = batches(i)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
            loss = loss_fn(model(x).float(), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        n += x.shape[0]
    if device.type == "cuda":
        torch.cuda.synchronize()
    return n / (time.perf_counter() - t0)


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--arch", default="r3d_18")
    ap.add_argument("--size", type=int, default=32)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--cases", type=int, default=16)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--amp", action="store_true", help="bf16 autocast (CUDA)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--manifest", default=None, help="a real manifests/cases.parquet instead")
    _results.add_argument(ap)
    args = ap.parse_args()
    _results.start("train_throughput", args)

    torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    amp = args.amp and device.type == "cuda"
    settings = train.TrainSettings.from_dict({"arch": args.arch, "device": str(device)})
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        path = (
            Path(args.manifest)
            if args.manifest
            else synthetic_manifest(root, args.cases, args.size)
        )
        if args.manifest:
            root = path.resolve().parent.parent
        cases = manifest.read(path)
        cases = cases[cases["split"] == "train"] if args.manifest else cases
        cache = inputs.Cache(cases, root, settings.inputs, device)
        size = tuple(cache.data.shape[2:])
        results = {}
        for name in ("synthetic", "real"):
            torch.manual_seed(0)
            model = build_model(args.arch, 1, 2).to(device)
            opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
            gen = torch.Generator().manual_seed(0)
            fixed = torch.rand(args.batch, 1, *size[::-1], device=device)
            ys = torch.randint(0, 2, (args.batch,), device=device)
            if name == "synthetic":
                batches = lambda i, x=fixed, y=ys: (x, y)  # noqa: E731
            else:

                def batches(i, gen=gen):
                    idx = [(i * args.batch + k) % len(cache) for k in range(args.batch)]
                    x = train.augment(cache.batch(idx), settings, gen, cache.image_channels)
                    return x, cache.labels[idx].to(device)

            results[name] = run_steps(model, opt, batches, device, amp, args.steps)
    print(
        f"{args.arch} volume {size} batch {args.batch} on {device} "
        f"(amp={amp}, threads={args.threads})"
    )
    for name, v in results.items():
        print(f"{name:10s} {v:8.2f} volumes/s")
    print(f"real / synthetic: {results['real'] / results['synthetic']:.2f} (target >= 0.90)")


if __name__ == "__main__":
    main()
    _results.finish()

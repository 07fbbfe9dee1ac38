"""What a batch saves by loading each nnU-Net model once: model initialisation per image, fresh
(TotalSegmentator's way: a new predictor reads the checkpoint and builds the network for every
image) and kept (``radflow.segment.reuse_loaded_models``), in the same run.

The shipped phantom model is 1.5 MB, so its load is too small to see. This bench writes a
checkpoint of realistic size instead: the phantom's plans widened to 6 stages of 32-320
features (nnU-Net's 3d_fullres defaults), random weights plus SGD momentum buffers (a trained
nnU-Net checkpoint keeps its optimizer state too). Timing only: the weights are random.

    python bench/model_reuse.py --images 5
    python bench/model_reuse.py --images 2 --max-features 64   (small: the test's smoke run)
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
import time
from pathlib import Path

import torch

import _results

REPO = Path(__file__).resolve().parents[1]
PHANTOM = REPO / "resources" / "totalseg_phantom"


def write_model(root: Path, max_features: int = 320) -> tuple[Path, int]:
    """The phantom model folder with a 6-stage 3d_fullres network (features capped at
    ``max_features``); returns the trainer folder and the network's parameter count."""
    from radflow.demo.phantom_model import build_network
    from radflow.nnunet_patches import write_sha256sums

    shutil.copytree(PHANTOM, root, dirs_exist_ok=True)
    folder = next(root.glob("Dataset297*/nnUNet*"))
    plans = json.loads((folder / "plans.json").read_text())
    arch = plans["configurations"]["3d_fullres"]["architecture"]
    arch["arch_kwargs"].update(
        n_stages=6,
        features_per_stage=[min(f, max_features) for f in (32, 64, 128, 256, 320, 320)],
        kernel_sizes=[[3, 3, 3]] * 6,
        strides=[[1, 1, 1]] + [[2, 2, 2]] * 5,
        n_conv_per_stage=[2] * 6,
        n_conv_per_stage_decoder=[2] * 5,
    )
    (folder / "plans.json").write_text(json.dumps(plans))
    n_out = len(json.loads((folder / "dataset.json").read_text())["labels"])
    net = build_network(n_out, arch)  # as nnU-Net's predictor will build it
    path = folder / "fold_0" / "checkpoint_final.pth"
    ck = torch.load(path, weights_only=True)  # the phantom's: trainer name, init args, ...
    params = list(net.parameters())
    ck["network_weights"] = net.state_dict()  # some tensors under two names, stored once
    ck["optimizer_state"] = {  # SGD with momentum, as nnU-Net trains: one buffer a parameter
        "state": {i: {"momentum_buffer": p.detach().clone()} for i, p in enumerate(params)}
    }
    torch.save(ck, path)
    write_sha256sums(folder)  # the phantom's SHA256SUMS no longer holds: record the new files
    return folder, sum(p.numel() for p in params)


def initialise(folder: Path, n: int) -> list[float]:
    """Seconds of ``initialize_from_trained_model_folder`` for ``n`` new predictors in a row."""
    from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor

    times = []
    for _ in range(n):
        p = nnUNetPredictor(device=torch.device("cpu"), verbose=False, allow_tqdm=False)
        t0 = time.perf_counter()
        p.initialize_from_trained_model_folder(str(folder), (0,), "checkpoint_final.pth")
        times.append(time.perf_counter() - t0)
    return times


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=int, default=5, help="predictors (images) per mode")
    ap.add_argument(
        "--max-features",
        type=int,
        default=320,
        help="cap on the features per stage (320: nnU-Net's default network)",
    )
    _results.add_argument(ap)
    args = ap.parse_args()
    _results.start("model_reuse", args)
    import totalsegmentator.nnunet  # noqa: F401  (its runtime patches, as in a real run)

    from radflow import segment

    with tempfile.TemporaryDirectory(prefix="radflow-reuse-") as tmp:
        folder, params = write_model(Path(tmp), args.max_features)
        ck = folder / "fold_0" / "checkpoint_final.pth"
        fresh = initialise(folder, args.images)
        segment.reuse_loaded_models()
        kept = initialise(folder, args.images)
        print(f"checkpoint {ck.stat().st_size / 2**20:.0f} MiB, {params / 1e6:.1f} M parameters")
    for name, t in (("fresh (TotalSegmentator)", fresh), ("kept (radflow)", kept)):
        print(f"{name:>24}: {', '.join(f'{x:.3f}' for x in t)} s; {sum(t):.2f} s in all")
    print(
        f"per image after the first: fresh {sum(fresh[1:]) / max(1, len(fresh) - 1):.3f} s, "
        f"kept {sum(kept[1:]) / max(1, len(kept) - 1):.3f} s; "
        f"ratio kept / fresh over {args.images} images: {sum(kept) / sum(fresh):.2f}"
    )


if __name__ == "__main__":
    main()
    _results.finish()

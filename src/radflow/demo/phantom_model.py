"""Train the shipped phantom segmentation model (``radflow train-phantom-model``).

A tiny nnU-Net v2 network stored in TotalSegmentator's own folder layout for the ``total``
task's fast model (Dataset297, nnUNetTrainer_4000epochs_NoMirroring, nnUNetPlans, 3d_fullres),
so that the demo runs the real ``totalsegmentator()`` code path offline. It is trained on
renderings of the demo phantom only and outputs the ``total`` task's label ids for the phantom's
organs; it knows nothing about real anatomy. For real CT, point ``segment.weights_dir`` at the
official weights (see README).

The training data match what the network sees at inference: TotalSegmentator resamples the
RAS image to 3 mm and truncates to int32; nnU-Net's CTNormalization clips to the plans'
percentiles and z-scores; SimpleITK hands the array over as (z, y, x).
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

import numpy as np

from radflow.demo.cohort import ORGAN_LABELS, Phantom

DATASET = "Dataset297_TotalSegmentator_total_3mm_1559subj"
TRAINER = "nnUNetTrainer_4000epochs_NoMirroring"
MODEL_DIR = f"{TRAINER}__nnUNetPlans__3d_fullres"
SPACING = 3.0
PATCH = (64, 64, 64)
INTENSITY = {"mean": -60.0, "std": 380.0, "percentile_00_5": -1000.0, "percentile_99_5": 1200.0}
FEATURES = [8, 16, 32, 64]


def plans() -> dict[str, Any]:
    """nnU-Net v2 plans for a 4-stage PlainConvUNet at 3 mm with CT normalisation."""
    n = len(FEATURES)
    return {
        "dataset_name": DATASET,
        "plans_name": "nnUNetPlans",
        "original_median_spacing_after_transp": [SPACING] * 3,
        "original_median_shape_after_transp": [80, 128, 128],
        "image_reader_writer": "SimpleITKIO",
        "transpose_forward": [0, 1, 2],
        "transpose_backward": [0, 1, 2],
        "experiment_planner_used": "radflow phantom (hand-written plans)",
        "label_manager": "LabelManager",
        "foreground_intensity_properties_per_channel": {
            "0": {**INTENSITY, "median": 40.0, "min": -1024.0, "max": 3071.0}
        },
        "configurations": {
            "3d_fullres": {
                "data_identifier": "nnUNetPlans_3d_fullres",
                "preprocessor_name": "DefaultPreprocessor",
                "batch_size": 2,
                "patch_size": list(PATCH),
                "median_image_size_in_voxels": [80, 128, 128],
                "spacing": [SPACING] * 3,
                "normalization_schemes": ["CTNormalization"],
                "use_mask_for_norm": [False],
                "batch_dice": False,
                "resampling_fn_data": "resample_data_or_seg_to_shape",
                "resampling_fn_data_kwargs": {
                    "is_seg": False,
                    "order": 3,
                    "order_z": 0,
                    "force_separate_z": None,
                },
                "resampling_fn_seg": "resample_data_or_seg_to_shape",
                "resampling_fn_seg_kwargs": {
                    "is_seg": True,
                    "order": 1,
                    "order_z": 0,
                    "force_separate_z": None,
                },
                "resampling_fn_probabilities": "resample_data_or_seg_to_shape",
                "resampling_fn_probabilities_kwargs": {
                    "is_seg": False,
                    "order": 1,
                    "order_z": 0,
                    "force_separate_z": None,
                },
                "architecture": {
                    "network_class_name": (
                        "dynamic_network_architectures.architectures.unet.PlainConvUNet"
                    ),
                    "arch_kwargs": {
                        "n_stages": n,
                        "features_per_stage": FEATURES,
                        "conv_op": "torch.nn.modules.conv.Conv3d",
                        "kernel_sizes": [[3, 3, 3]] * n,
                        "strides": [[1, 1, 1]] + [[2, 2, 2]] * (n - 1),
                        "n_conv_per_stage": [2] * n,
                        "n_conv_per_stage_decoder": [2] * (n - 1),
                        "conv_bias": True,
                        "norm_op": "torch.nn.modules.instancenorm.InstanceNorm3d",
                        "norm_op_kwargs": {"eps": 1e-05, "affine": True},
                        "dropout_op": None,
                        "dropout_op_kwargs": None,
                        "nonlin": "torch.nn.LeakyReLU",
                        "nonlin_kwargs": {"inplace": True},
                    },
                    "_kw_requires_import": ["conv_op", "norm_op", "dropout_op", "nonlin"],
                },
            }
        },
    }


def dataset_json() -> dict[str, Any]:
    """dataset.json with every ``total`` label, so output value k means class_map['total'][k]."""
    from totalsegmentator.map_to_binary import class_map

    labels = {"background": 0, **{v: int(k) for k, v in sorted(class_map["total"].items())}}
    return {
        "channel_names": {"0": "CT"},
        "labels": labels,
        "numTraining": 0,
        "file_ending": ".nii.gz",
        "name": "radflow phantom stand-in for TotalSegmentator total (fast)",
    }


# Training uses only the phantom's classes (14 outputs, 8x cheaper than 118); at save time the
# segmentation heads are expanded to every ``total`` label, absent ones with a large negative bias.
PRESENT = sorted({0, *ORGAN_LABELS})
ABSENT_BIAS = -50.0


def build_network(n_out: int | None = None, arch: dict[str, Any] | None = None) -> Any:
    """The network exactly as nnU-Net builds it from ``plans()`` (``n_out`` heads), or from
    another 3d_fullres ``arch`` (a plans file's ``architecture`` entry)."""
    from nnunetv2.utilities.get_network_from_plans import get_network_from_plans

    arch = arch or plans()["configurations"]["3d_fullres"]["architecture"]
    n_out = n_out or len(dataset_json()["labels"])
    return get_network_from_plans(
        arch["network_class_name"],
        arch["arch_kwargs"],
        arch["_kw_requires_import"],
        1,
        n_out,
        allow_init=True,
        deep_supervision=False,
    )


def render_case(rng: np.random.Generator, lesion: bool) -> tuple[np.ndarray, np.ndarray]:
    """A random phantom on a 3 mm RAS grid: (int32 HU as TotalSegmentator feeds it, labels)."""
    scale = float(rng.uniform(0.88, 1.12))
    shift = (float(rng.uniform(-12, 12)), float(rng.uniform(-12, 12)), float(rng.uniform(-15, 15)))
    centre = None
    if lesion:
        u = rng.normal(size=3)
        centre = tuple(
            float(v)
            for v in (
                np.array([-60, -5, 0])
                + u / np.linalg.norm(u) * rng.uniform(0, 0.45) * np.array([80, 75, 65])
            )
            * scale
            + np.asarray(shift)
        )
    ph = Phantom(scale, shift, centre, float(rng.uniform(6, 16)), float(rng.uniform(-80, -30)))
    fov = float(rng.uniform(330, 430))
    zext = float(rng.uniform(180, 240))
    nx = ny = int(fov // SPACING)
    nz = int(zext // SPACING)
    zc = -50.0 + shift[2] + float(rng.uniform(-10, 10))
    # RAS voxel centres -> LPS points (x, y flip)
    xs = (np.arange(nx) - (nx - 1) / 2) * SPACING
    ys = (np.arange(ny) - (ny - 1) / 2) * SPACING
    zs = zc + (np.arange(nz) - (nz - 1) / 2) * SPACING
    grid = np.stack(np.meshgrid(-xs, -ys, zs, indexing="ij"), axis=-1)
    labels = ph.labels(grid)
    offs = [-0.75, 0.75]  # 2x2x2 supersampling = partial volume of the acquired slices
    hu = np.mean(
        [ph.hu(grid + np.array([a, b, c])) for a in offs for b in offs for c in offs], axis=0
    )
    hu = hu + float(rng.uniform(-8, 8)) + rng.normal(0, float(rng.uniform(2, 10)), hu.shape)
    return np.trunc(np.clip(hu, -1024, 3071)).astype(np.int32), labels.astype(np.uint8)


def normalise(hu: np.ndarray) -> np.ndarray:
    """nnU-Net's CTNormalization with the plans' intensity properties."""
    x = np.clip(hu.astype(np.float32), INTENSITY["percentile_00_5"], INTENSITY["percentile_99_5"])
    return (x - INTENSITY["mean"]) / INTENSITY["std"]


def to_network(hu: np.ndarray) -> np.ndarray:
    """RAS (x, y, z) array -> the (z, y, x) layout SimpleITK gives nnU-Net."""
    return np.ascontiguousarray(hu.transpose(2, 1, 0))


def _patch(
    rng: np.random.Generator, img: np.ndarray, lab: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    shape = np.array(img.shape)
    pad = np.maximum(np.array(PATCH) - shape, 0)
    if pad.any():
        widths = [(0, int(p)) for p in pad]
        img = np.pad(img, widths, constant_values=normalise(np.array([-1024]))[0])
        lab = np.pad(lab, widths)
        shape = np.array(img.shape)
    if rng.random() < 0.67:  # centre on a random foreground voxel (nnU-Net's oversampling)
        fg = np.argwhere(lab > 0)
        c = fg[rng.integers(len(fg))]
        lo = np.clip(c - np.array(PATCH) // 2, 0, shape - PATCH)
    else:
        lo = np.array([rng.integers(0, s - p + 1) for s, p in zip(shape, PATCH, strict=True)])
    sl = tuple(slice(int(a), int(a) + p) for a, p in zip(lo, PATCH, strict=True))
    return img[sl], lab[sl]


def dice_per_class(pred: np.ndarray, ref: np.ndarray) -> dict[str, float]:
    """Dice of every phantom organ (by TotalSegmentator name)."""
    out = {}
    for lid, name in ORGAN_LABELS.items():
        a, b = pred == lid, ref == lid
        denom = a.sum() + b.sum()
        if denom:
            out[name] = float(2 * np.logical_and(a, b).sum() / denom)
    return out


def expand_heads(compact: Any) -> Any:
    """Copy a network trained on PRESENT classes into one with a head for every label."""
    import torch

    full = build_network()
    src = compact.state_dict()
    dst = full.state_dict()
    idx = torch.tensor(PRESENT)
    with torch.no_grad():
        for key, value in dst.items():
            if value.shape == src[key].shape:
                value.copy_(src[key])
            elif key.endswith("weight"):  # seg head: (classes, features, 1, 1, 1)
                value.zero_()
                value[idx] = src[key]
            else:  # seg head bias
                value.fill_(ABSENT_BIAS)
                value[idx] = src[key]
    full.load_state_dict(dst)
    return full


def predict_volume(net: Any, hu_ras: np.ndarray) -> np.ndarray:
    """Whole-volume prediction (padded to a multiple of 8) -> RAS label map."""
    import torch

    x = normalise(to_network(hu_ras))
    pad = [(0, (-s) % 8) for s in x.shape]
    xp = np.pad(x, pad, constant_values=float(normalise(np.array([-1024]))[0]))
    with torch.no_grad():
        logits = net(torch.from_numpy(xp)[None, None])
    seg = logits.argmax(1)[0].numpy()[: x.shape[0], : x.shape[1], : x.shape[2]]
    return seg.transpose(2, 1, 0).astype(np.uint8)


def train(
    out_dir: str | os.PathLike,
    iterations: int = 800,
    n_train: int = 24,
    n_val: int = 4,
    seed: int = 0,
    threads: int = 2,
    lr: float = 3e-3,
) -> dict[str, Any]:
    """Train and write the model folder; returns validation Dice per organ."""
    import torch
    from torch import nn

    torch.manual_seed(seed)
    torch.set_num_threads(threads)
    rng = np.random.default_rng(seed)
    t0 = time.perf_counter()
    cases = [render_case(rng, lesion=i % 2 == 1) for i in range(n_train + n_val)]
    compact = np.zeros(256, dtype=np.uint8)
    compact[PRESENT] = np.arange(len(PRESENT))
    train_set = [(normalise(to_network(h)), compact[to_network(lab)]) for h, lab in cases[:n_train]]
    val_set = cases[n_train:]
    print(f"rendered {len(cases)} phantoms in {time.perf_counter() - t0:.1f} s", flush=True)

    n_out = len(PRESENT)
    net = build_network(n_out)
    ce = nn.CrossEntropyLoss()  # absent classes only ever get pushed down through the softmax
    opt = torch.optim.AdamW(net.parameters(), lr=lr, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=iterations)
    log = []
    for it in range(iterations):
        xs, ys = zip(
            *(_patch(rng, *train_set[rng.integers(len(train_set))]) for _ in range(2)), strict=True
        )
        x = torch.from_numpy(np.stack(xs)[:, None].astype(np.float32))
        y = torch.from_numpy(np.stack(ys).astype(np.int64))
        logits = net(x)
        prob = logits.softmax(1)
        onehot = torch.nn.functional.one_hot(y, n_out).permute(0, 4, 1, 2, 3).float()
        inter = (prob * onehot).sum((0, 2, 3, 4))
        denom = prob.sum((0, 2, 3, 4)) + onehot.sum((0, 2, 3, 4))
        dice = (2 * inter + 1e-5) / (denom + 1e-5)
        loss = ce(logits, y) + (1 - dice.mean())
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
        if it % 50 == 0 or it == iterations - 1:
            log.append({"iteration": it, "loss": round(loss.item(), 4)})
            print(
                f"iter {it:4d} loss {loss.item():.4f} ({time.perf_counter() - t0:.0f} s)",
                flush=True,
            )
    net = expand_heads(net).eval()
    val = [dice_per_class(predict_volume(net, h), lab) for h, lab in val_set]
    mean = {k: round(float(np.mean([v[k] for v in val if k in v])), 4) for k in val[0]}
    print("validation Dice:", json.dumps(mean), flush=True)
    save(
        net,
        out_dir,
        {
            "validation_dice": mean,
            "log": log,
            "iterations": iterations,
            "n_train": n_train,
            "seed": seed,
            "seconds": round(time.perf_counter() - t0, 1),
        },
    )
    return mean


def save(net: Any, out_dir: str | os.PathLike, meta: dict[str, Any]) -> Path:
    """Write plans.json, dataset.json, fold_0/checkpoint_final.pth (TotalSegmentator layout)
    and their SHA256SUMS."""
    import torch

    from radflow.nnunet_patches import write_sha256sums

    folder = Path(out_dir) / DATASET / MODEL_DIR
    (folder / "fold_0").mkdir(parents=True, exist_ok=True)
    (folder / "plans.json").write_text(json.dumps(plans(), indent=1))
    (folder / "dataset.json").write_text(json.dumps(dataset_json(), indent=1))
    ckpt = {  # shared tensors (decoder.encoder = encoder) are stored once
        "network_weights": net.state_dict(),
        "trainer_name": TRAINER,
        "init_args": {"configuration": "3d_fullres"},
        "inference_allowed_mirroring_axes": None,
    }
    torch.save(ckpt, folder / "fold_0" / "checkpoint_final.pth")
    write_sha256sums(folder)  # radflow verifies the model files against it before loading
    (Path(out_dir) / "training.json").write_text(json.dumps(meta, indent=1))
    write_phantom_marker(out_dir)
    return folder


def write_phantom_marker(out_dir: str | os.PathLike) -> Path:
    """Declare ``out_dir`` the phantom's weights folder: the workflow then refuses to run it on
    a cohort other than the demo's unless segment.allow_phantom is set."""
    from radflow.segment import PHANTOM_MARKER

    path = Path(out_dir) / PHANTOM_MARKER
    info = {
        "radflow_phantom": True,
        "note": "trained only on renderings of the radflow demo phantom; meaningless on real CT",
    }
    path.write_text(json.dumps(info, indent=1) + "\n")
    return path

"""segment: TotalSegmentator organ masks, offline by design (or user-supplied masks).

Offline guarantees, each tested:

* weights come only from ``weights_dir`` (exported as ``TOTALSEG_WEIGHTS_PATH``), and a missing
  model folder fails at once with what to place where -- TotalSegmentator would otherwise start
  a download with no timeout;
* every call gets its own ``TOTALSEG_HOME_DIR`` whose ``config.json`` says
  ``send_usage_stats: false`` before TotalSegmentator reads it (there is no environment variable
  for it, and a shared config.json is rewritten by every run, so parallel jobs would race).

Throughput: nnU-Net's ``predict_from_files`` starts a fork pool, a manager, a spawned
preprocessing worker and a spawned export pool on every call -- most of a small model's run
time. For one image that buys nothing, so the call is routed to nnU-Net's own in-process
``predict_from_files_sequential`` (bit-identical output). Torch threads stay within the job's.
Each model is loaded once per process (``reuse_loaded_models``), not once per image, so a
batch (``run_batch``) reads its checkpoints and builds its network once.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np

from radflow.io import save_nifti, write_json
from radflow.nnunet_patches import (
    bounded_torch_threads,
    reuse_loaded_models,
    use_sequential_prediction,
)
from radflow.settings import section

OFFLINE_CONFIG = {
    "totalseg_id": "totalseg_radflow_offline",
    "send_usage_stats": False,
    "prediction_counter": 0,
    "statistics_disclaimer_shown": True,
}


class WeightsMissingError(FileNotFoundError):
    """The configured weights folder does not hold the model a task needs."""


@dataclass(frozen=True)
class SegmentSettings:
    """Segmentation settings (config key ``segment``)."""

    backend: str = "totalsegmentator"  # or "precomputed"
    task: str = "total"
    fast: bool = True
    roi_subset: tuple[str, ...] | None = None
    device: str = "auto"  # auto | cpu | gpu | gpu:N
    weights_dir: str = "resources/totalseg_phantom"
    sequential: bool = True

    @classmethod
    def from_dict(cls, d: dict[str, Any] | None) -> SegmentSettings:
        """Build from a config mapping (unknown keys are an error)."""
        d = section(cls, d, "segment", ("roi_subset",))
        if d.get("backend", "totalsegmentator") not in ("totalsegmentator", "precomputed"):
            raise ValueError("segment.backend must be 'totalsegmentator' or 'precomputed'")
        return cls(**d)


def class_map(task: str) -> dict[int, str]:
    """Label id -> class name of a TotalSegmentator task (cheap: no torch import)."""
    from totalsegmentator.map_to_binary import class_map as maps

    if task not in maps:
        raise ValueError(f"unknown TotalSegmentator task {task!r}")
    return {int(k): str(v) for k, v in maps[task].items()}


def required_models(settings: SegmentSettings) -> list[tuple[int, Path]]:
    """(task id, model folder relative to the weights dir) for every model the call loads."""
    from totalsegmentator.map_tasks_config import TASK_ID_WEIGHTS_CONFIGS
    from totalsegmentator.python_api import get_task_config

    cfg = get_task_config(settings.task, fast=settings.fast, quiet=True, plans="nnUNetPlans")
    ids = cfg["task_id"] if isinstance(cfg["task_id"], list) else [cfg["task_id"]]
    out = []
    for tid in ids:
        folder = TASK_ID_WEIGHTS_CONFIGS[tid]["foldername"]
        sub = f"{cfg['trainer']}__{cfg['plans']}__{cfg['model']}"
        out.append((tid, Path(folder) / sub))
    if settings.roi_subset:  # TotalSegmentator first crops with the 6 mm model (task 298)
        out.append((298, Path(TASK_ID_WEIGHTS_CONFIGS[298]["foldername"])))
    return out


def _download_hint(task_id: int) -> str:
    from totalsegmentator.bin.totalseg_download_weights import TASK_TO_ID

    names = [name for name, tids in TASK_TO_ID.items() if task_id in tids]
    return names[0] if names else f"<task containing id {task_id}>"


def check_weights(settings: SegmentSettings) -> Path:
    """Fail fast, naming the folder expected, unless every model the call needs is present."""
    root = Path(settings.weights_dir).resolve()
    missing = []
    for tid, rel in required_models(settings):
        folder = root / rel
        probe = folder / "fold_0" / "checkpoint_final.pth" if "__" in rel.name else folder
        if not probe.exists():
            missing.append((tid, folder))
    if missing:
        lines = "\n".join(f"  - {f}  (task id {tid})" for tid, f in missing)
        hint = _download_hint(missing[0][0])
        raise WeightsMissingError(
            f"TotalSegmentator weights not found for task={settings.task!r} "
            f"fast={settings.fast}:\n{lines}\n"
            "radflow never downloads at run time. On a machine with network access run "
            f"`totalseg_download_weights -t {hint}` (it fills ~/.totalsegmentator/nnunet/results),"
            f" then copy the Dataset folder(s) into {root} (config segment.weights_dir)."
        )
    return root


@contextlib.contextmanager
def offline_environment(weights_dir: Path, threads: int) -> Iterator[Path]:
    """A private TotalSegmentator home with usage statistics off, weights from ``weights_dir``."""
    saved = {k: os.environ.get(k) for k in ("TOTALSEG_HOME_DIR", "TOTALSEG_WEIGHTS_PATH")}
    with tempfile.TemporaryDirectory(prefix="radflow-totalseg-") as home:
        Path(home, "config.json").write_text(json.dumps(OFFLINE_CONFIG))
        os.environ["TOTALSEG_HOME_DIR"] = home
        os.environ["TOTALSEG_WEIGHTS_PATH"] = str(weights_dir)
        os.environ.setdefault("nnUNet_def_n_proc", str(threads))
        try:
            yield Path(home)
        finally:
            for k, v in saved.items():
                if v is None:
                    os.environ.pop(k, None)
                else:
                    os.environ[k] = v


def resolve_device(device: str) -> str:
    """``auto`` -> ``gpu`` when torch sees CUDA, else ``cpu``; other values pass through."""
    if device != "auto":
        return device
    import torch

    return "gpu" if torch.cuda.is_available() else "cpu"


def run_totalsegmentator(
    img: nib.Nifti1Image, settings: SegmentSettings, threads: int = 1
) -> np.ndarray:
    """Run TotalSegmentator's Python API on an image; returns a uint8 label map on its grid."""
    weights = check_weights(settings)
    with offline_environment(weights, threads), bounded_torch_threads(threads):
        from totalsegmentator.python_api import totalsegmentator

        if settings.sequential:
            use_sequential_prediction()
        reuse_loaded_models()
        seg = totalsegmentator(
            img,
            None,
            ml=True,
            task=settings.task,
            fast=settings.fast,
            roi_subset=list(settings.roi_subset) if settings.roi_subset else None,
            device=resolve_device(settings.device),
            nr_thr_resamp=threads,
            nr_thr_saving=1,
            skip_saving=True,
            quiet=True,
        )
    data = np.asanyarray(seg.dataobj)
    if data.shape != img.shape or not np.allclose(seg.affine, img.affine, atol=1e-3):
        raise RuntimeError("TotalSegmentator output is not on the input grid")
    if data.max() > 255:
        raise RuntimeError(f"label id {int(data.max())} does not fit uint8")
    return data.astype(np.uint8)


def load_precomputed(
    path: str | os.PathLike, img: nib.Nifti1Image
) -> tuple[np.ndarray, dict[int, str] | None]:
    """A user-supplied label map, resampled onto the image grid (nearest neighbour)."""
    from radflow.qc import to_grid

    src = nib.load(str(path))
    labels = np.asanyarray(src.dataobj)
    if labels.max() > 255 or labels.min() < 0:
        raise ValueError(f"{path}: label values must be 0..255")
    data = to_grid(labels.astype(np.uint8), src.affine, img.affine, img.shape)
    names_file = Path(str(path).removesuffix(".nii.gz") + ".json")
    names = None
    if names_file.exists():
        raw = json.loads(names_file.read_text())
        names = {int(k): str(v) for k, v in raw.get("labels", raw).items()}
    return data.astype(np.uint8), names


def run(
    image_path: str | os.PathLike,
    out_path: str | os.PathLike,
    settings: SegmentSettings,
    names_path: str | os.PathLike | None = None,
    precomputed: str | os.PathLike | None = None,
    threads: int = 1,
) -> dict[str, Any]:
    """Segment one image; writes the label map (uint8, input grid) and its label-name JSON."""
    t0 = time.perf_counter()
    img = nib.load(str(image_path))
    names: dict[int, str] | None = None
    if settings.backend == "precomputed":
        if precomputed is None:
            raise ValueError("segment.backend=precomputed needs a mask path (--precomputed)")
        data, names = load_precomputed(precomputed, img)
    else:
        data = run_totalsegmentator(img, settings, threads)
    names = names or class_map(settings.task)
    save_nifti(data, img.affine, out_path, threads=threads)
    present = sorted(int(v) for v in np.unique(data) if v)
    info = {
        "labels": {str(k): v for k, v in sorted(names.items())},
        "present": {str(k): names.get(k, f"label_{k}") for k in present},
        "settings": asdict(settings),
        "device": resolve_device(settings.device) if settings.backend != "precomputed" else "n/a",
        "seconds": round(time.perf_counter() - t0, 3),
    }
    write_json(names_path or Path(str(out_path).removesuffix(".nii.gz") + ".json"), info)
    return info


def case_of(image_path: str | os.PathLike) -> str:
    """Case id of a converted image path (``results/nifti/{case}.nii.gz``)."""
    return Path(image_path).name.removesuffix(".nii.gz")


def batch_of(case_id: str, batches: int) -> int:
    """Stable batch of a case: its pseudonym's hash modulo the number of batches.

    Cases keep their batch when the cohort grows or shrinks, so adding a case reruns one
    batch, not all of them.
    """
    return int(case_id.removeprefix("case-"), 16) % batches


def run_batch(
    images: Sequence[str | os.PathLike],
    out_dir: str | os.PathLike,
    settings: SegmentSettings,
    threads: int = 1,
) -> dict[str, Any]:
    """Segment many images in one process: torch, nnU-Net and the model load once.

    Per case ``{case}.nii.gz`` and ``{case}.json`` in ``out_dir``; a case that fails leaves
    ``{case}.error.txt`` with the reason instead, and the others go on (``segment-collect``
    then fails that case alone). Missing weights fail the whole batch: no case could run.
    Writes ``batch.json`` (cases, failures, seconds) last.
    """
    if settings.backend != "totalsegmentator":
        raise ValueError("batched segmentation is for the totalsegmentator backend")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    check_weights(settings)
    t0 = time.perf_counter()
    done: dict[str, float] = {}
    failed: dict[str, str] = {}
    for image in images:
        case = case_of(image)
        try:
            info = run(image, out / f"{case}.nii.gz", settings, out / f"{case}.json", None, threads)
            done[case] = info["seconds"]
            print(f"{case}: {len(info['present'])} labels in {info['seconds']} s", flush=True)
        except WeightsMissingError:
            raise
        except Exception as exc:  # one bad image must not sink the batch
            failed[case] = f"{type(exc).__name__}: {exc}"
            (out / f"{case}.error.txt").write_text(failed[case] + "\n")
            print(f"{case}: FAILED: {failed[case]}", file=sys.stderr, flush=True)
    summary = {
        "cases": len(done) + len(failed),
        "segmented": done,
        "failed": failed,
        "seconds": round(time.perf_counter() - t0, 3),
    }
    write_json(out / "batch.json", summary)
    return summary


def collect(
    batch_dir: str | os.PathLike,
    case: str,
    out_path: str | os.PathLike,
    names_path: str | os.PathLike,
) -> None:
    """Copy one case's label map and names out of its batch folder (atomically), or raise the
    error the batch recorded for it."""
    src = Path(batch_dir)
    err = src / f"{case}.error.txt"
    if err.exists():
        raise RuntimeError(f"segmentation of {case} failed in {src}: {err.read_text().strip()}")
    for name, dst in ((f"{case}.nii.gz", out_path), (f"{case}.json", names_path)):
        if not (src / name).exists():
            raise FileNotFoundError(f"{src / name} is missing: was {case} in this batch?")
        dst = Path(dst)
        dst.parent.mkdir(parents=True, exist_ok=True)
        tmp = dst.with_name(f".{dst.name}.tmp{os.getpid()}")
        shutil.copyfile(src / name, tmp)
        os.replace(tmp, dst)


def known_rois(task: str) -> Sequence[str]:
    """Class names a ROI may use for a task."""
    return list(class_map(task).values())

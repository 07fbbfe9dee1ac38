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
group (``segment``) reads its checkpoints and builds its network once.
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np

from radflow import paths, status
from radflow.ids import case_keys_reader, fill_template
from radflow.io import save_nifti, sha256_file, write_json
from radflow.nnunet_patches import (
    SUMS_FILE,
    UntrustedWeightsError,
    bounded_torch_threads,
    read_sums,
    reuse_loaded_models,
    use_sequential_prediction,
    verify_model_folder,
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
    """Segmentation settings (config key ``segment``, less its ``WORKFLOW_KEYS``)."""

    backend: str = "totalsegmentator"  # or "precomputed" ("none": no segment job at all)
    task: str = "total"
    fast: bool = True
    roi_subset: tuple[str, ...] | None = None
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    weights_dir: str = "resources/totalseg_phantom"
    sequential: bool = True

    @classmethod
    def from_dict(cls, d: dict[str, Any] | None) -> SegmentSettings:
        """Build from a config mapping (unknown keys are an error)."""
        d = section(cls, d, "segment", ("roi_subset",))
        backend = d.get("backend", "totalsegmentator")
        if backend == "none":
            raise ValueError("segment.backend none runs no segmentation: there is nothing to do")
        if backend not in ("totalsegmentator", "precomputed"):
            raise ValueError("segment.backend must be 'totalsegmentator' or 'precomputed'")
        return cls(**d)

    @classmethod
    def from_config(cls, segment: dict[str, Any]) -> SegmentSettings:
        """From the whole config section ``segment``: the keys that steer the workflow
        (``WORKFLOW_KEYS``) are dropped, every other key must be a field."""
        return cls.from_dict(workflow_free(segment))


# keys of the config section ``segment`` for the workflow (job threads, batching, the
# precomputed backend's path template, the phantom guard), not for the segmentation call
WORKFLOW_KEYS = ("threads", "precomputed", "batches", "allow_phantom")


def workflow_free(segment: dict[str, Any]) -> dict[str, Any]:
    """The config section ``segment`` without its ``WORKFLOW_KEYS``."""
    return {k: v for k, v in segment.items() if k not in WORKFLOW_KEYS}


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


# A weights folder that declares itself the demo's phantom, and a cohort folder (beside its raw/)
# that declares itself written by `radflow demo-data`. Files, not path strings: a copied or
# moved demo is still the demo, and a real tree named data/demo/raw is not.
PHANTOM_MARKER = "radflow-phantom.json"
DEMO_MARKER = "radflow-demo.json"


def is_phantom(weights_dir: str | os.PathLike) -> bool:
    """True when ``weights_dir`` holds the phantom's marker (radflow's demo-only model)."""
    return (Path(weights_dir) / PHANTOM_MARKER).is_file()


def is_demo_cohort(raw_dir: str | os.PathLike) -> bool:
    """True when ``raw_dir`` is the raw tree of a cohort ``radflow demo-data`` wrote: the
    cohort folder holds the demo marker and the marker names this folder as its raw tree."""
    raw = Path(raw_dir)
    marker = raw.parent / DEMO_MARKER
    if not marker.is_file():
        return False
    try:
        info = json.loads(marker.read_text())
    except (OSError, ValueError):
        return False
    return isinstance(info, dict) and info.get("raw") == raw.name


def phantom_guard(
    backend: str, weights_dir: str | os.PathLike, raw_dir: str | os.PathLike, allow: bool
) -> str:
    """Why the workflow must not start (the phantom weights on a cohort other than the demo's),
    or "" when it may. A ``raw_dir`` that does not exist (yet) is Snakemake's missing input,
    named when ingest needs it; the guard waits for it."""
    if backend != "totalsegmentator" or allow or not is_phantom(weights_dir):
        return ""
    if not Path(raw_dir).is_dir():
        return ""
    if is_demo_cohort(raw_dir):
        return ""
    return (
        f"segment.weights_dir ({weights_dir}) holds radflow's phantom model, which knows only "
        "the synthetic demo cohort, but raw_dir is not a radflow demo cohort (no "
        f"{DEMO_MARKER} beside it): its masks would be meaningless. Point segment.weights_dir "
        "at TotalSegmentator's weights (resources/README.md), or set segment.allow_phantom: "
        "true to run the phantom anyway"
    )


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
    """The configured device (auto, cpu, cuda, cuda:N) as TotalSegmentator names it."""
    from radflow.model import resolve_device as torch_device

    d = torch_device(device)
    if d.type == "cuda":
        return "gpu" if d.index is None else f"gpu:{d.index}"
    return d.type


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


def segment_image(
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
        "status": "ok",
        "labels": {str(k): v for k, v in sorted(names.items())},
        "present": {str(k): names.get(k, f"label_{k}") for k in present},
        "settings": asdict(settings),
        "device": resolve_device(settings.device) if settings.backend != "precomputed" else "n/a",
        "seconds": round(time.perf_counter() - t0, 3),
    }
    write_json(names_path or paths.sidecar_of(out_path), info)
    return info


def group_of(case_id: str, batches: int) -> str:
    """The segmentation group of a case: its own id when ``batches`` is 0, else its batch.

    A batch is the pseudonym's hash modulo ``batches``: cases keep their batch when the cohort
    grows or shrinks, so adding a case reruns one group, not all of them.
    """
    if batches <= 0:
        return case_id
    return str(int(case_id.removeprefix("case-"), 16) % batches)


def segment(
    inputs: Sequence[str | os.PathLike],
    seg_dir: str | os.PathLike,
    record_path: str | os.PathLike,
    settings: SegmentSettings,
    threads: int = 1,
    precomputed: str | None = None,
    id_map: str | os.PathLike | None = None,
) -> dict[str, Any]:
    """Segment a group of cases in one process (torch, nnU-Net and the model load once).

    ``inputs``: each case's convert sidecar (``results/nifti/{case}.json``; a failed conversion
    is carried over as that case's status) or its image (``.nii.gz``). Per case the label map
    and its JSON go to ``seg_dir/{case}.nii.gz`` and ``.json``; a case that fails records why
    (status ``failed``, stage, reason) and the others go on. A case whose label map already
    exists for the same image bytes and settings (a group interrupted by a kill) is kept, not
    segmented again. ``precomputed`` (backend precomputed) is a path template filled per case
    from the private ``id_map``. The group's record is written last, atomically: it is the
    job's output, so an interrupted group is rerun. Missing weights fail the whole group.
    """
    seg_dir = Path(seg_dir)
    t0 = time.perf_counter()
    weights: dict[str, dict[str, str]] = {}
    if settings.backend == "totalsegmentator":
        weights = model_digests(settings)
    keys = case_keys_reader(id_map) if precomputed else None
    wanted = asdict(settings)
    cases: dict[str, dict[str, Any]] = {}
    for item in inputs:
        case = paths.stem(item)
        image = Path(item).with_name(f"{case}.nii.gz")
        out, names = seg_dir / f"{case}.nii.gz", seg_dir / f"{case}.json"
        upstream = status.read_upstream(item, "convert")
        if upstream is not None:
            cases[case] = upstream
            status.remove_stale(out, names)
            write_json(names, upstream)
            print(f"{case}: skipped, {upstream['stage']} failed: {upstream['reason']}", flush=True)
            continue
        try:
            digest = sha256_file(image)
            kept = _kept(out, names, digest, wanted)
            if kept is not None:
                cases[case] = {"status": "ok", "seconds": 0.0, "resumed": True}
                print(f"{case}: kept from an interrupted run", flush=True)
                continue
            mask = None
            if precomputed:
                mask = fill_template(precomputed, keys(case))
                if not mask:  # a sheet row with an empty mask cell
                    raise status.CaseFailedError(
                        "PRECOMPUTED_MISSING", "no mask for this volume in the sheet's mask column"
                    )
                if not Path(mask).is_file():
                    raise status.CaseFailedError(
                        "PRECOMPUTED_MISSING",
                        "no precomputed mask at the configured path (segment.precomputed, or "
                        "the sheet's mask column)",
                    )
            info = segment_image(image, out, settings, names, mask, threads)
            info["input_sha256"] = digest
            write_json(names, info)
            cases[case] = {"status": "ok", "seconds": info["seconds"]}
            print(f"{case}: {len(info['present'])} labels in {info['seconds']} s", flush=True)
        except (WeightsMissingError, UntrustedWeightsError):
            raise  # no case of the group could run: the job fails
        except Exception as exc:  # noqa: BLE001 - one bad image must not sink the group
            if status.is_environmental(exc):
                raise
            rec = status.failure("segment", exc)
            cases[case] = rec
            status.remove_stale(out)
            write_json(names, rec)
            print(f"{case}: FAILED: {rec['reason']}", file=sys.stderr, flush=True)
    record = {
        "cases": cases,
        "n_ok": sum(c["status"] == "ok" for c in cases.values()),
        "n_failed": sum(c["status"] != "ok" for c in cases.values()),
        "settings": wanted,
        "weights_sha256": weights,
        "seconds": round(time.perf_counter() - t0, 3),
    }
    write_json(record_path, record)
    return record


def model_digests(settings: SegmentSettings, declared: bool = False) -> dict[str, dict[str, str]]:
    """sha256 of every file of every model folder the task loads (per folder: file -> digest,
    the shape of a group record's ``weights_sha256``), checked against the folder's SHA256SUMS
    when it has one (fails fast on missing or untrusted weights).

    ``declared``: a folder with a SHA256SUMS gives its listing without hashing the weights
    (every file is checked against it when the model loads, so a folder that passes holds
    exactly these digests); a folder without one is hashed as before."""
    root = check_weights(settings)

    def digests(folder: Path) -> dict[str, str]:
        sums = folder / SUMS_FILE
        return read_sums(sums) if declared and sums.is_file() else verify_model_folder(folder, root)

    return {rel.as_posix(): digests(root / rel) for _, rel in required_models(settings)}


def _kept(out: Path, names: Path, digest: str, settings: dict[str, Any]) -> dict[str, Any] | None:
    """The record of a label map finished earlier for the same image and settings, else None."""
    if not (out.exists() and names.exists()):
        return None
    try:
        info = json.loads(names.read_text())
    except (OSError, ValueError):
        return None
    same = info.get("input_sha256") == digest and info.get("settings") == settings
    return info if same and info.get("status") == "ok" else None


def known_rois(task: str) -> Sequence[str]:
    """Class names a ROI may use for a task."""
    return list(class_map(task).values())

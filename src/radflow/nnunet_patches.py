"""nnunet_patches: radflow's runtime patches to nnU-Net and torch, kept apart from radflow's code.

* ``safe_checkpoint_loading`` -- nnU-Net unpickles checkpoints with ``weights_only=False``, so a
  crafted ``checkpoint_*.pth`` in a weights folder runs code. After this patch nnU-Net's own
  load is ``torch.load(weights_only=True)`` under an allow-list of the few non-tensor globals
  real nnU-Net checkpoints hold (``load_checkpoint``); anything else is refused before it
  runs. The patched call is the only load (no check-then-load race). Each model folder is
  also hashed first and checked against its ``SHA256SUMS`` when it has one
  (``verify_model_folder``).
* ``reuse_loaded_models`` -- each model loaded once per process, not once per image.
* ``use_sequential_prediction`` -- nnU-Net's in-process prediction instead of its pools.
* ``bounded_torch_threads`` -- torch threads within the job's.

Importing this module is cheap: torch, numpy and nnU-Net load when a patch is installed.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import pickle
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

SUMS_FILE = "SHA256SUMS"
# What nnU-Net reads from a model folder (initialize_from_trained_model_folder): these are
# hashed; folders one level down are included, so a Dataset folder can be passed too.
MODEL_FILES = ("plans.json", "dataset.json", "fold_*/checkpoint_*.pth")


class UntrustedWeightsError(RuntimeError):
    """A segmentation model file was refused: unsafe content or a SHA256SUMS mismatch."""


# ---------------------------------------------------------------------------------------------
# Safe checkpoint loading


def checkpoint_globals() -> list[Any]:
    """The globals a checkpoint may name beyond torch's weights-only defaults.

    nnU-Net's ``nnUNetTrainer.save_checkpoint`` stores ``network_weights`` and
    ``optimizer_state`` (tensors, numbers, lists), ``grad_scaler_state`` (None or numbers),
    ``logging`` (lists of floats and of numpy float32/float64 scalars: losses, pseudo Dice),
    ``_best_ema`` (a numpy float64), ``current_epoch``, ``init_args`` (plans and dataset dicts,
    strings, ints, bools and a ``torch.device`` -- torch allows that one by default),
    ``trainer_name`` and ``inference_allowed_mirroring_axes`` (a tuple or None). A numpy scalar
    unpickles as ``numpy.core.multiarray.scalar(numpy.dtype(...), bytes)`` --
    ``numpy._core`` since numpy 2, and TotalSegmentator's checkpoints were written with numpy
    1 -- so both names are allowed, with ``numpy.dtype`` and the numeric dtype classes its
    state is set on. Numpy arrays (``_reconstruct`` + ``ndarray``) are allowed too, though no
    nnU-Net release we know stores one: a custom trainer's log might. None of these runs code
    of the file's choosing, and whatever objects they hold pass the same restricted unpickler.
    """
    import numpy as np

    scalar = np._core.multiarray.scalar
    reconstruct = np._core.multiarray._reconstruct
    dtypes = [
        type(np.dtype(t))
        for t in ("float16", "float32", "float64", "int8", "int16", "int32", "int64")
        + ("uint8", "uint16", "uint32", "uint64", "bool")
    ]
    return [
        (scalar, "numpy.core.multiarray.scalar"),
        (scalar, "numpy._core.multiarray.scalar"),
        (reconstruct, "numpy.core.multiarray._reconstruct"),
        (reconstruct, "numpy._core.multiarray._reconstruct"),
        np.ndarray,
        np.dtype,
        *dtypes,
    ]


def _shown(path: str | os.PathLike, weights_dir: str | os.PathLike | None = None) -> str:
    """``path`` relative to the weights folder (``TOTALSEG_WEIGHTS_PATH`` by default)."""
    root = weights_dir or os.environ.get("TOTALSEG_WEIGHTS_PATH")
    p = Path(path).resolve()
    if root:
        with contextlib.suppress(ValueError):
            return f"{p.relative_to(Path(root).resolve()).as_posix()} (in {root})"
    return str(p)


def _reason(exc: Exception) -> str:
    """The unpickler's own reason, without torch's advice to load with weights_only=False."""
    boilerplate = ("Weights only load failed", "(1)", "(2)", "Check the documentation")
    lines = [line.strip() for line in str(exc).splitlines()]
    kept = [line for line in lines if line and not line.startswith(boilerplate)]
    reason = " ".join(kept).removeprefix("WeightsUnpickler error: ")
    return reason.split(" Please use `torch.serialization")[0] or str(exc)


def load_checkpoint(
    f: str | os.PathLike, map_location: Any = None, weights_only: Any = None, **kwargs: Any
) -> Any:
    """``torch.load`` of a segmentation checkpoint with ``weights_only=True``, whatever the caller
    asked, allowing ``checkpoint_globals()``; anything else raises ``UntrustedWeightsError``
    naming the file and what it asked for, before any of it runs."""
    import torch

    del weights_only  # nnU-Net passes False; never honoured
    with torch.serialization.safe_globals(checkpoint_globals()):
        try:
            return torch.load(f, map_location=map_location, weights_only=True, **kwargs)
        except pickle.UnpicklingError as exc:
            raise UntrustedWeightsError(
                f"refusing segmentation checkpoint {_shown(f)}: {_reason(exc)} -- a checkpoint "
                "may hold only tensors and plain data (numbers, strings, lists, dicts, numpy "
                "scalars, torch.device); nothing in it was run. Replace it with weights from a "
                "trusted source (totalseg_download_weights)."
            ) from None


class _TorchWithSafeLoad:
    """``torch`` as nnU-Net's predictor module sees it: all of torch, ``load`` made safe."""

    @staticmethod
    def load(f: Any, *args: Any, **kwargs: Any) -> Any:
        """``load_checkpoint`` in place of ``torch.load``."""
        return load_checkpoint(f, *args, **kwargs)

    def __getattr__(self, name: str) -> Any:
        import torch

        return getattr(torch, name)


_SAFE_PATCHED = False


def safe_checkpoint_loading() -> None:
    """Make nnU-Net load every checkpoint through ``load_checkpoint``, after checking its folder.

    ``nnUNetPredictor.initialize_from_trained_model_folder`` calls ``torch.load(...,
    weights_only=False)`` on each fold's checkpoint. The ``torch`` its module sees becomes
    ``_TorchWithSafeLoad`` (torch with a safe ``load``), so that very call is the weights-only
    load -- nothing is checked first and loaded unsafely after. Before it, the method now runs
    ``verify_model_folder`` on the folder (digests, ``SHA256SUMS``). If nnU-Net ever stops
    loading through that module's ``torch.load``, this raises instead of running unprotected.
    """
    global _SAFE_PATCHED
    if _SAFE_PATCHED:
        return
    import importlib

    import torch

    importlib.import_module("totalsegmentator.nnunet")  # its runtime patches come first
    import nnunetv2.inference.predict_from_raw_data as module
    from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor

    load = nnUNetPredictor.initialize_from_trained_model_folder
    code = getattr(load, "__code__", None)
    if (
        module.torch is not torch
        or getattr(load, "__globals__", None) is not module.__dict__
        or code is None
        or not {"torch", "load"} <= set(code.co_names)
    ):
        raise RuntimeError(
            "nnU-Net no longer loads checkpoints with torch.load in "
            "nnunetv2.inference.predict_from_raw_data.initialize_from_trained_model_folder; "
            "radflow's safe checkpoint loading (radflow.nnunet_patches) needs updating for "
            "this nnU-Net version, and segmentation will not run without it."
        )

    def initialize_from_trained_model_folder(
        self: Any, model_training_output_dir: str, *args: Any, **kwargs: Any
    ) -> None:
        verify_model_folder(model_training_output_dir)
        load(self, model_training_output_dir, *args, **kwargs)

    module.torch = _TorchWithSafeLoad()
    nnUNetPredictor.initialize_from_trained_model_folder = initialize_from_trained_model_folder
    _SAFE_PATCHED = True


# ---------------------------------------------------------------------------------------------
# Recorded digests


_DIGESTS: dict[str, tuple[tuple[int, ...], str]] = {}


def _sha256(path: Path) -> str:
    """sha256 of a file, computed once per process while its size, mtime and inode hold."""
    st = path.stat()
    stamp = (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)
    kept = _DIGESTS.get(str(path))
    if kept and kept[0] == stamp:
        return kept[1]
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    _DIGESTS[str(path)] = (stamp, h.hexdigest())
    return h.hexdigest()


def model_files(folder: str | os.PathLike) -> list[str]:
    """The files nnU-Net reads from a model folder (``MODEL_FILES``), relative, sorted."""
    root = Path(folder)
    found = {p for pat in MODEL_FILES for p in (*root.glob(pat), *root.glob(f"*/{pat}"))}
    return sorted(p.relative_to(root).as_posix() for p in found if p.is_file())


def read_sums(path: str | os.PathLike) -> dict[str, str]:
    """A ``sha256sum`` listing (``<hex>  <file>`` or ``<hex> *<file>``): file -> digest."""
    out = {}
    for n, line in enumerate(Path(path).read_text().splitlines(), 1):
        if not line.strip():
            continue
        m = re.fullmatch(r"([0-9a-fA-F]{64}) [ *](.+)", line.rstrip("\r"))
        name = m.group(2) if m else ""
        if not m or name.startswith("/") or ".." in Path(name).parts:
            raise UntrustedWeightsError(
                f"not a sha256sum line for a file in its folder: {line!r} (line {n} of "
                f"{_shown(path)})"
            )
        out[name] = m.group(1).lower()
    return out


def write_sha256sums(folder: str | os.PathLike) -> Path:
    """Write ``SHA256SUMS`` (sha256sum format) for the model files of ``folder``."""
    root = Path(folder)
    digests = {name: _sha256(root / name) for name in model_files(root)}
    out = root / SUMS_FILE
    out.write_text("".join(f"{d}  {name}\n" for name, d in digests.items()))
    return out


def verify_model_folder(
    folder: str | os.PathLike, weights_dir: str | os.PathLike | None = None
) -> dict[str, str]:
    """sha256 of every file nnU-Net reads from a model folder: relative path -> hex digest.

    When the folder holds a ``SHA256SUMS`` (``sha256sum`` format, paths relative to the
    folder), every file it lists must exist and match, and every model file must be listed
    (as ``sha256sum -c`` would check it, plus no unlisted checkpoint slips in); otherwise
    ``UntrustedWeightsError`` names the file (relative to ``weights_dir``, by default
    ``TOTALSEG_WEIGHTS_PATH``) and the mismatch. The digests returned cover the model files
    and everything listed. Files are hashed once per process while unchanged on disk.
    """
    root = Path(folder).resolve()
    names = model_files(root)
    if not names:
        raise FileNotFoundError(f"no nnU-Net model files ({', '.join(MODEL_FILES)}) in {root}")
    sums_path = root / SUMS_FILE
    expected = read_sums(sums_path) if sums_path.exists() else None
    wanted = sorted(set(names) | set(expected or {}))
    digests = {}
    for name in wanted:
        if not (root / name).is_file():
            raise UntrustedWeightsError(
                f"a file listed in {SUMS_FILE} is missing: {_shown(root / name, weights_dir)}"
            )
        digests[name] = _sha256(root / name)
    if expected is None:
        return digests
    for name in wanted:
        shown = _shown(root / name, weights_dir)
        if name not in expected:
            raise UntrustedWeightsError(
                f"refusing a model file that {SUMS_FILE} does not list: {shown}"
            )
        if digests[name] != expected[name]:
            raise UntrustedWeightsError(
                f"{SUMS_FILE} mismatch, refusing {shown}: its sha256 is {digests[name]}, "
                f"{SUMS_FILE} records {expected[name]}. The weights were changed or corrupted; "
                "restore them from a trusted source."
            )
    return digests


# ---------------------------------------------------------------------------------------------
# Throughput patches (moved from radflow.segment)


@contextlib.contextmanager
def bounded_torch_threads(threads: int) -> Iterator[None]:
    """Cap torch threads at ``threads``: TotalSegmentator asks for every core on CPU."""
    import torch

    original = torch.set_num_threads
    before = torch.get_num_threads()
    original(threads)
    torch.set_num_threads = lambda n: original(max(1, min(int(n), threads)))
    try:
        yield
    finally:
        torch.set_num_threads = original
        original(before)


_SEQUENTIAL_PATCHED = False


def use_sequential_prediction() -> None:
    """Route nnU-Net's multi-process ``predict_from_files`` to its in-process sequential twin.

    TotalSegmentator's own runtime patch of the predictor must be installed first (importing
    ``totalsegmentator.nnunet`` does it), or it would skip patching the other methods.
    """
    global _SEQUENTIAL_PATCHED
    if _SEQUENTIAL_PATCHED:
        return
    import importlib

    importlib.import_module("totalsegmentator.nnunet")
    from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor

    def predict_from_files(
        self: Any,
        list_of_lists_or_source_folder: Any,
        output_folder_or_list_of_truncated_output_files: Any,
        save_probabilities: bool = False,
        overwrite: bool = True,
        num_processes_preprocessing: int | None = None,
        num_processes_segmentation_export: int | None = None,
        folder_with_segs_from_prev_stage: str | None = None,
        num_parts: int = 1,
        part_id: int = 0,
        **kwargs: Any,
    ) -> Any:
        src = list_of_lists_or_source_folder
        if isinstance(src, str):  # listing a folder would start a fork pool of 12
            ending = self.dataset_json["file_ending"]
            src = [[str(p)] for p in sorted(Path(src).glob(f"*_0000{ending}"))]
        return self.predict_from_files_sequential(
            src,
            output_folder_or_list_of_truncated_output_files,
            save_probabilities=save_probabilities,
            overwrite=overwrite,
            folder_with_segs_from_prev_stage=folder_with_segs_from_prev_stage,
            **kwargs,
        )

    nnUNetPredictor.predict_from_files = predict_from_files
    _SEQUENTIAL_PATCHED = True


_LOADED_MODELS: dict[tuple[Any, ...], tuple[Any, ...]] = {}
_REUSE_PATCHED = False


def reuse_loaded_models() -> None:
    """Load each nnU-Net model once per process instead of once per image (and safely).

    TotalSegmentator builds a fresh ``nnUNetPredictor`` for every image and
    ``initialize_from_trained_model_folder`` then reads every fold's checkpoint from disk, finds
    the trainer class by walking nnU-Net's packages and builds the network again. In a batch
    process (a ``radflow segment`` group job) all of that is the same work for every case. The first
    call per model folder does it and keeps the result; later calls hand the same network,
    plans and weights to ``manual_initialization``, nnU-Net's own entry for an already built
    network (it loads the kept weights into the network before every prediction, so the output
    is bit-identical). A checkpoint whose size or modification time changed is loaded anew.

    The first load goes through ``safe_checkpoint_loading`` (installed here first): the folder
    is verified and every checkpoint loaded weights-only.

    The price: every model a process used stays in memory until it exits -- for a batch of the
    ``total`` task without ``fast`` (five models) their networks and weights, on the GPU too
    (a few hundred MB each, beside the sliding window's much larger working memory).
    """
    global _REUSE_PATCHED
    if _REUSE_PATCHED:
        return
    safe_checkpoint_loading()  # also installs TotalSegmentator's runtime patches first
    from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor

    load = nnUNetPredictor.initialize_from_trained_model_folder

    def initialize_from_trained_model_folder(
        self: Any,
        model_training_output_dir: str,
        use_folds: Any,
        checkpoint_name: str = "checkpoint_final.pth",
        *args: Any,
        **kwargs: Any,
    ) -> None:
        folder = Path(model_training_output_dir).resolve()
        stamps = []
        for p in sorted(folder.glob(f"fold_*/{checkpoint_name}")):
            st = p.stat()
            stamps.append((str(p), st.st_mtime_ns, st.st_size))
        folds = use_folds if use_folds is None or isinstance(use_folds, str) else tuple(use_folds)
        key = (str(folder), folds, checkpoint_name, tuple(stamps))
        if key not in _LOADED_MODELS:
            load(self, model_training_output_dir, use_folds, checkpoint_name, *args, **kwargs)
            _LOADED_MODELS[key] = (
                self.network,
                self.plans_manager,
                self.configuration_manager,
                self.list_of_parameters,
                self.dataset_json,
                self.trainer_name,
                self.allowed_mirroring_axes,
            )
            return
        self.manual_initialization(*_LOADED_MODELS[key])

    nnUNetPredictor.initialize_from_trained_model_folder = initialize_from_trained_model_folder
    _REUSE_PATCHED = True

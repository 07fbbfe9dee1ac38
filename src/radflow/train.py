"""train: fine-tune a 3D network (``model.ARCHITECTURES``) on the masked volumes of a manifest.

* the network, its pretrained weights and checkpoints come from ``radflow.model``; what it sees
  of a case (channels, intensity rule, layout) from ``radflow.inputs``;
* the whole split is cached once as int16 (on the GPU when it fits); augmentation runs on the
  device, batched: flips, rotation, zoom, intensity jitter;
* AdamW with a cosine or one-cycle schedule, class-balanced loss or sampler, bf16 autocast on
  CUDA, early stopping on validation AUC;
* ``last.pt`` (model, optimiser, scheduler, epoch, RNG states, history) is written at the end of
  every epoch; restarting after a kill resumes from it. ``best.pt`` holds the best epoch.

The loop is ``train``: ``setup`` (data, network, optimiser), ``resume`` (from ``last.pt``), then
per epoch ``train_epoch``, ``validate`` and ``end_epoch`` (model selection and checkpoints).
"""

from __future__ import annotations

import json
import math
import os
import random
import shutil
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from torch import nn
from torch.nn import functional as F  # noqa: N812 - the usual torch spelling

from radflow import manifest
from radflow.inputs import CHANNELS, HU_WINDOW, INTENSITY_RULES, Cache, InputSpec
from radflow.io import atomic_path
from radflow.model import (
    ARCHITECTURES,
    build_model,
    check_device,
    predict,
    resolve_device,
    save_atomic,
    save_checkpoint,
)
from radflow.settings import section


@dataclass(frozen=True)
class TrainSettings:
    """Training settings (config key ``train``; defaults: the schema's)."""

    arch: str = "r3d_18"  # a name of model.ARCHITECTURES
    pretrained: str = "none"  # none | kinetics400 | path to a checkpoint
    channels: tuple[str, ...] = ("image",)
    hu_window: tuple[float, float] = HU_WINDOW
    intensity_rule: str = "hu_window"  # a name of inputs.INTENSITY_RULES
    epochs: int = 100
    batch_size: int = 8
    lr: float = 3e-4
    weight_decay: float = 1e-4
    schedule: str = "cosine"  # cosine | onecycle
    balance: str = "loss"  # loss | sampler | none
    flip: bool = True
    rotate_deg: float = 10.0
    zoom: tuple[float, float] = (1.0, 1.1)
    intensity: float = 0.05
    patience: int = 15
    amp: bool = True
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    seed: int = 0
    fold: int | None = None  # validate on this manifest fold instead of the val split
    tensorboard: bool = False

    @classmethod
    def from_dict(cls, d: dict[str, Any] | None) -> TrainSettings:
        """Build from a config mapping (unknown keys are an error)."""
        d = section(cls, d, "train", ("channels", "hu_window", "zoom"))
        if d.get("arch", cls.arch) not in ARCHITECTURES:
            raise ValueError(f"train.arch must be one of {tuple(ARCHITECTURES)}")
        if d.get("intensity_rule", cls.intensity_rule) not in INTENSITY_RULES:
            raise ValueError(f"train.intensity_rule must be one of {tuple(INTENSITY_RULES)}")
        if any(c not in CHANNELS for c in d.get("channels", cls.channels)):
            raise ValueError(f"train.channels must be a subset of {CHANNELS}")
        check_device(d.get("device", cls.device), "train.device")
        return cls(**d)

    @property
    def inputs(self) -> InputSpec:
        """What the network sees of a case."""
        return InputSpec(self.channels, self.hu_window, self.intensity_rule)


# --------------------------------------------------------------------------- augmentation


def augment(
    x: torch.Tensor, s: TrainSettings, gen: torch.Generator, image_channels: Sequence[int] = (0,)
) -> torch.Tensor:
    """Batched flips, rotation, zoom and intensity jitter on the device (masks: nearest)."""
    b = x.shape[0]
    dev = x.device
    u = lambda *shape: torch.rand(*shape, generator=gen, device="cpu").to(dev)  # noqa: E731
    theta = torch.eye(3, device=dev).repeat(b, 1, 1)
    if s.rotate_deg:
        ang = (u(b, 3) * 2 - 1) * math.radians(s.rotate_deg)
        for axis in range(3):
            c, si = torch.cos(ang[:, axis]), torch.sin(ang[:, axis])
            r = torch.eye(3, device=dev).repeat(b, 1, 1)
            i, j = [k for k in range(3) if k != axis]
            r[:, i, i], r[:, i, j], r[:, j, i], r[:, j, j] = c, -si, si, c
            theta = theta @ r
    zoom = s.zoom[0] + u(b, 1, 1) * (s.zoom[1] - s.zoom[0])
    theta = theta / zoom  # sampling a smaller region = zooming in
    if s.flip:
        flips = torch.where(u(b, 3) < 0.5, -1.0, 1.0)
        theta = theta * flips[:, None, :]
    grid = F.affine_grid(
        torch.cat([theta, torch.zeros(b, 3, 1, device=dev)], 2), list(x.shape), align_corners=False
    )
    img = list(image_channels)
    masks = [c for c in range(x.shape[1]) if c not in img]
    out = torch.empty_like(x)
    if img:
        out[:, img] = F.grid_sample(x[:, img], grid, mode="bilinear", align_corners=False)
    if masks:
        out[:, masks] = F.grid_sample(x[:, masks], grid, mode="nearest", align_corners=False)
    if s.intensity and img:
        scale = 1 + (u(b, 1, 1, 1, 1) * 2 - 1) * s.intensity
        shift = (u(b, 1, 1, 1, 1) * 2 - 1) * s.intensity
        out[:, img] = (out[:, img] * scale + shift).clamp(0, 1)
    return out


# --------------------------------------------------------------------------- loop


def _rng_state() -> dict[str, Any]:
    """Python, numpy, torch (and CUDA) RNG states in types ``weights_only`` loading accepts."""
    name, keys, pos, has_gauss, cached = np.random.get_state()
    state = {
        "torch": torch.get_rng_state(),
        "numpy": [name, keys.tolist(), int(pos), int(has_gauss), float(cached)],
        "python": list(random.getstate()),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"].cpu())
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, np.array(keys, dtype=np.uint32), pos, has_gauss, cached))
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([t.cpu() for t in state["cuda"]])


def seed_everything(seed: int) -> None:
    """Seed python, numpy and torch (CPU and CUDA)."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def auc(labels: np.ndarray, scores: np.ndarray) -> float:
    """ROC AUC (NaN when only one class is present)."""
    from sklearn.metrics import roc_auc_score

    if len(np.unique(labels)) < 2:
        return float("nan")
    return float(roc_auc_score(labels, scores))


@torch.no_grad()
def recalibrate_batchnorm(model: nn.Module, cache: Cache, batch_size: int, amp: bool) -> None:
    """Recompute BatchNorm running statistics as exact averages over the (unaugmented) split.

    With a few small batches per epoch the momentum-averaged running statistics lag far behind
    the weights, so eval-mode predictions are garbage even when training fits ("precise BN").
    """
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    if not norms or len(cache) == 0:
        return
    saved = [m.momentum for m in norms]
    for m in norms:
        m.reset_running_stats()
        m.momentum = None  # cumulative average
    model.train()
    for i in range(0, len(cache), batch_size):
        x = cache.batch(range(i, min(i + batch_size, len(cache))))
        with torch.autocast(cache.device.type, dtype=torch.bfloat16, enabled=amp):
            model(x)
    for m, mom in zip(norms, saved, strict=True):
        m.momentum = mom


def log_loss(labels: np.ndarray, prob: np.ndarray) -> float:
    """Mean binary cross-entropy of positive-class probabilities (NaN for no cases)."""
    if len(labels) == 0:
        return float("nan")
    p = np.clip(np.asarray(prob, dtype=np.float64), 1e-7, 1 - 1e-7)
    y = np.asarray(labels) > 0
    return float(-np.mean(np.where(y, np.log(p), np.log1p(-p))))


def is_better(val_auc: float, val_loss: float, best_auc: float, best_loss: float) -> bool:
    """Model selection: a higher validation AUC, or an equal AUC with a lower validation loss.

    A small validation split saturates at AUC 1.0 early, while the model still barely separates
    the classes; the loss then tells the confident model from the unsure one. With no
    validation cases at all (NaN loss) the latest model is the best there is.
    """
    if math.isnan(val_loss):
        return True
    auc_ = -1.0 if math.isnan(val_auc) else val_auc
    return (auc_, -val_loss) > (best_auc, -best_loss)


def split_frames(cases: pd.DataFrame, fold: int | None) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(train, validation) rows: the val split, or one cross-validation fold."""
    if fold is None:
        return cases[cases["split"] == "train"], cases[cases["split"] == "val"]
    cv = cases[cases["split"] != "test"]
    if (cv["fold"] < 0).all():
        raise ValueError("train.fold is set but the manifest has no folds (manifest.folds)")
    return cv[cv["fold"] != fold], cv[cv["fold"] == fold]


def run_fingerprint(manifest_path: str | os.PathLike, settings: TrainSettings) -> str:
    """Identity of a training run: the manifest's bytes and the settings."""
    import hashlib

    h = hashlib.sha256(Path(manifest_path).read_bytes())
    h.update(json.dumps(asdict(settings), sort_keys=True).encode())
    return h.hexdigest()


class InterruptedRunError(RuntimeError):
    """Raised by ``max_steps`` to stop mid-epoch exactly as a killed job would."""


@dataclass
class Run:
    """One training run: its data, network and optimiser (``setup``) and its progress."""

    settings: TrainSettings
    out: Path
    device: torch.device
    amp: bool
    n_classes: int
    train: Cache
    val: Cache
    model: nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: Any
    loss_fn: nn.Module
    class_counts: torch.Tensor
    generator: torch.Generator
    fingerprint: str
    start: int = 0  # the first epoch still to run
    history: list[dict[str, Any]] = field(default_factory=list)
    best_auc: float = -1.0
    best_loss: float = math.inf
    bad_epochs: int = 0


def setup(
    manifest_path: str | os.PathLike,
    out_dir: str | os.PathLike,
    settings: TrainSettings,
    root: str | os.PathLike = ".",
) -> Run:
    """Seed, cache both splits, build the network, optimiser, schedule and loss."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    device = resolve_device(settings.device)
    amp = settings.amp and device.type == "cuda" and torch.cuda.is_bf16_supported()
    seed_everything(settings.seed)
    cases = manifest.labelled(manifest.read(manifest_path), "training")  # unlabelled: no loss
    train_df, val_df = split_frames(cases, settings.fold)
    n_classes = max(
        2, int(cases["label"].max()) + 1
    )  # binary labels; a tiny train split may hold one
    spec = settings.inputs
    tr, va = Cache(train_df, root, spec, device), Cache(val_df, root, spec, device)
    model = build_model(settings.arch, len(settings.channels), n_classes, settings.pretrained)
    model.to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=settings.lr, weight_decay=settings.weight_decay)
    steps_per_epoch = max(1, math.ceil(len(tr) / settings.batch_size))
    total = steps_per_epoch * settings.epochs
    if settings.schedule == "onecycle":
        sched: Any = torch.optim.lr_scheduler.OneCycleLR(opt, settings.lr, total_steps=total)
    else:
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=total)
    counts = torch.bincount(tr.labels, minlength=n_classes).float().clamp(min=1)
    class_w = (counts.sum() / (n_classes * counts)).to(device)
    loss_fn = nn.CrossEntropyLoss(weight=class_w if settings.balance == "loss" else None)
    return Run(
        settings=settings,
        out=out,
        device=device,
        amp=amp,
        n_classes=n_classes,
        train=tr,
        val=va,
        model=model,
        optimizer=opt,
        scheduler=sched,
        loss_fn=loss_fn,
        class_counts=counts,
        generator=torch.Generator().manual_seed(settings.seed),
        fingerprint=run_fingerprint(manifest_path, settings),
    )


def resume(run: Run) -> None:
    """Continue from ``last.pt`` -- only the same run's; a stale one (other manifest or
    settings) is removed with its ``best.pt``."""
    last = run.out / "last.pt"
    if last.exists():
        ck = torch.load(last, map_location=run.device, weights_only=True)
        if ck.get("fingerprint") != run.fingerprint:
            print(f"{last} is from another manifest or settings: starting afresh", file=sys.stderr)
            last.unlink()
            (run.out / BEST_SO_FAR).unlink(missing_ok=True)
            (run.out / "best.pt").unlink(missing_ok=True)
    if not last.exists():
        return
    ck = torch.load(last, map_location=run.device, weights_only=True)
    run.model.load_state_dict(ck["model"])
    run.optimizer.load_state_dict(ck["optimizer"])
    run.scheduler.load_state_dict(ck["scheduler"])
    run.generator.set_state(ck["generator"])
    _set_rng_state(ck["rng"])
    run.start, run.best_auc, run.bad_epochs = ck["epoch"] + 1, ck["best_auc"], ck["bad_epochs"]
    run.best_loss = ck.get("best_loss", math.inf)
    run.history = json.loads(ck["history"])
    print(f"resumed from {last} at epoch {run.start}", file=sys.stderr)


def train_epoch(
    run: Run, epoch: int, steps: int, max_steps: int | None = None
) -> tuple[float, int]:
    """One pass over the (shuffled or resampled) training split: (mean loss, steps so far).

    ``max_steps`` (tests) raises ``InterruptedRunError`` after that many steps of this process,
    exactly where a killed job would stop.
    """
    from tqdm import tqdm

    s, tr, gen = run.settings, run.train, run.generator
    run.model.train()
    if s.balance == "sampler":
        w = (1.0 / run.class_counts)[tr.labels]
        order = torch.multinomial(w, len(tr), replacement=True, generator=gen).tolist()
    else:
        order = torch.randperm(len(tr), generator=gen).tolist()
    losses = []
    bar = tqdm(
        range(0, len(order), s.batch_size), desc=f"epoch {epoch}", file=sys.stderr, mininterval=5
    )
    for i in bar:
        idx = order[i : i + s.batch_size]
        x = augment(tr.batch(idx), s, gen, tr.image_channels)
        y = tr.labels[idx].to(run.device)
        with torch.autocast(run.device.type, dtype=torch.bfloat16, enabled=run.amp):
            loss = run.loss_fn(run.model(x).float(), y)
        run.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        run.optimizer.step()
        run.scheduler.step()
        losses.append(loss.item())
        steps += 1
        if max_steps is not None and steps >= max_steps:  # tests: die like a killed job
            raise InterruptedRunError(f"stopped after {steps} steps (epoch {epoch})")
    return float(np.mean(losses)), steps


def validate(run: Run) -> tuple[float, float]:
    """(AUC, log loss) on the validation split, after recalibrating BatchNorm on training."""
    bs = run.settings.batch_size
    recalibrate_batchnorm(run.model, run.train, bs, run.amp)
    prob = predict(run.model, run.val, bs, run.amp)
    labels = run.val.labels.numpy()
    return auc(labels, prob), log_loss(labels, prob)


def save_best(run: Run, epoch: int, val_auc: float, name: str = "") -> None:
    """The best model so far (``best_so_far.pt``), with what evaluate and explain need to use
    it; ``best.pt`` is that file copied when training ends. (Snakemake removes an interrupted
    job's outputs before it reruns it: a ``best.pt`` written mid-run would be lost by a kill
    and the resumed run could not know the earlier best epoch's weights.)"""
    s = run.settings
    save_checkpoint(
        run.out / (name or BEST_SO_FAR),
        run.model,
        s.arch,
        s.inputs,
        run.n_classes,
        epoch,
        val_auc,
        settings=asdict(s),
    )


BEST_SO_FAR = "best_so_far.pt"  # not a rule output, like last.pt: a kill leaves it in place


def save_last(run: Run, epoch: int) -> None:
    """``last.pt``: everything a restarted job needs to continue exactly."""
    save_atomic(
        run.out / "last.pt",
        {
            "model": run.model.state_dict(),
            "optimizer": run.optimizer.state_dict(),
            "scheduler": run.scheduler.state_dict(),
            "generator": run.generator.get_state(),
            "rng": _rng_state(),
            "epoch": epoch,
            "best_auc": run.best_auc,
            "best_loss": run.best_loss,
            "bad_epochs": run.bad_epochs,
            "fingerprint": run.fingerprint,
            "history": json.dumps(run.history),
        },
    )


def end_epoch(run: Run, epoch: int, val_auc: float, val_loss: float) -> None:
    """Model selection (``best.pt``, early-stopping count), then ``last.pt`` and the history."""
    if is_better(val_auc, val_loss, run.best_auc, run.best_loss):
        run.best_auc = -1.0 if math.isnan(val_auc) else val_auc
        run.best_loss, run.bad_epochs = val_loss, 0
        save_best(run, epoch, val_auc)
    else:
        run.bad_epochs += 1
    save_last(run, epoch)
    pd.DataFrame(run.history).to_csv(run.out / "history.csv", index=False)


def train(
    manifest_path: str | os.PathLike,
    out_dir: str | os.PathLike,
    settings: TrainSettings,
    root: str | os.PathLike = ".",
    threads: int = 1,
    max_steps: int | None = None,
) -> dict[str, Any]:
    """Train (or resume) and write best.pt, last.pt and history.csv; returns a summary."""
    torch.set_num_threads(threads)
    run = setup(manifest_path, out_dir, settings, root)
    resume(run)
    writer = None
    if settings.tensorboard:
        from torch.utils.tensorboard import SummaryWriter

        writer = SummaryWriter(str(run.out / "tensorboard"))
    steps = 0
    for epoch in range(run.start, settings.epochs):
        if run.bad_epochs >= settings.patience:
            break
        t0 = time.perf_counter()
        loss, steps = train_epoch(run, epoch, steps, max_steps)
        val_auc, val_loss = validate(run)
        row = {
            "epoch": epoch,
            "loss": loss,
            "val_loss": val_loss,
            "val_auc": val_auc,
            "lr": run.scheduler.get_last_lr()[0],
            "seconds": round(time.perf_counter() - t0, 2),
        }
        run.history.append(row)
        print(json.dumps(row), file=sys.stderr)
        if writer is not None:
            for k in ("loss", "val_auc", "lr"):
                writer.add_scalar(k, row[k], epoch)
        end_epoch(run, epoch, val_auc, val_loss)
    if writer is not None:
        writer.close()
    if (run.out / BEST_SO_FAR).exists():
        with atomic_path(run.out / "best.pt") as tmp:
            shutil.copyfile(run.out / BEST_SO_FAR, tmp)
    else:  # no epoch to run (resumed after the last one) and no model kept: the current one
        save_best(run, run.start, run.best_auc, name="best.pt")
    pd.DataFrame(run.history).to_csv(run.out / "history.csv", index=False)
    return {"best_val_auc": run.best_auc, "epochs_run": len(run.history), "device": str(run.device)}

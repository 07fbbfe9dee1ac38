"""train: fine-tune a torchvision 3D ResNet on the masked volumes of a manifest.

* models: ``r3d_18`` (default), ``mc3_18``, ``r2plus1d_18``; the stem takes the configured
  channels (pretrained RGB kernels summed into the image channel, extra channels start at zero)
  and a new head; pretrained = none, kinetics400 (from the local torch hub cache, never
  downloaded) or a checkpoint path (radflow checkpoints transfer between tasks);
* the whole split is cached once as int16 (on the GPU when it fits); augmentation runs on the
  device, batched: flips, rotation, zoom, intensity jitter;
* AdamW with a cosine or one-cycle schedule, class-balanced loss or sampler, bf16 autocast on
  CUDA, early stopping on validation AUC;
* ``last.pt`` (model, optimiser, scheduler, epoch, RNG states, history) is written at the end of
  every epoch; restarting after a kill resumes from it. ``best.pt`` holds the best epoch.
"""

from __future__ import annotations

import json
import math
import os
import random
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from torch import nn
from torch.nn import functional as F  # noqa: N812 - the usual torch spelling

from radflow import manifest
from radflow.settings import section

ARCHS = ("r3d_18", "mc3_18", "r2plus1d_18")
KINETICS = {
    "r3d_18": "R3D_18_Weights",
    "mc3_18": "MC3_18_Weights",
    "r2plus1d_18": "R2Plus1D_18_Weights",
}


@dataclass(frozen=True)
class TrainSettings:
    """Training settings (config key ``train``)."""

    arch: str = "r3d_18"
    pretrained: str = "none"  # none | kinetics400 | path to a checkpoint
    channels: tuple[str, ...] = ("image",)
    hu_window: tuple[float, float] = (-160.0, 240.0)
    epochs: int = 30
    batch_size: int = 4
    lr: float = 3e-4  # the schema's default
    weight_decay: float = 1e-4
    schedule: str = "cosine"  # cosine | onecycle
    balance: str = "loss"  # loss | sampler | none
    flip: bool = True
    rotate_deg: float = 10.0
    zoom: tuple[float, float] = (1.0, 1.1)
    intensity: float = 0.05
    patience: int = 8
    amp: bool = True
    device: str = "auto"
    workers: int = 0
    seed: int = 0
    fold: int | None = None  # validate on this manifest fold instead of the val split
    tensorboard: bool = False

    @classmethod
    def from_dict(cls, d: dict[str, Any] | None) -> TrainSettings:
        """Build from a config mapping (unknown keys are an error)."""
        d = section(cls, d, "train", ("channels", "hu_window", "zoom"))
        if d.get("arch", "r3d_18") not in ARCHS:
            raise ValueError(f"train.arch must be one of {ARCHS}")
        return cls(**d)


# --------------------------------------------------------------------------- model


def resolve_device(device: str) -> torch.device:
    """``auto`` -> cuda when available, else cpu."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def kinetics_file(arch: str) -> Path:
    """Where torchvision's Kinetics-400 weights for ``arch`` live in the local torch hub cache."""
    import torchvision.models.video as tvv

    weights = getattr(tvv, KINETICS[arch]).KINETICS400_V1
    return Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(weights.url)


def adapt_stem(model: nn.Module, in_channels: int) -> nn.Module:
    """Replace the first conv so it takes ``in_channels``: RGB kernels summed into channel 0."""
    conv = model.stem[0]
    new = nn.Conv3d(
        in_channels,
        conv.out_channels,
        conv.kernel_size,
        conv.stride,
        conv.padding,
        bias=conv.bias is not None,
    )
    with torch.no_grad():
        new.weight.zero_()
        new.weight[:, 0] = conv.weight.sum(dim=1)
        if conv.bias is not None:
            new.bias.copy_(conv.bias)
    model.stem[0] = new
    return model


def build_model(arch: str, in_channels: int, n_classes: int, pretrained: str = "none") -> nn.Module:
    """A torchvision video ResNet adapted to ``in_channels`` and ``n_classes``."""
    import torchvision.models.video as tvv

    model = getattr(tvv, arch)(weights=None)
    if pretrained == "kinetics400":
        path = kinetics_file(arch)
        if not path.exists():
            raise FileNotFoundError(
                f"train.pretrained=kinetics400 needs {path.name} in {path.parent} (radflow never "
                f'downloads). On a connected machine: python -c "import torchvision.models.video '
                f"as v; v.{arch}(weights='KINETICS400_V1')\" then copy ~/.cache/torch/hub/"
                f"checkpoints/{path.name} there (or set TORCH_HOME)."
            )
        model.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
    adapt_stem(model, in_channels)
    model.fc = nn.Linear(model.fc.in_features, n_classes)
    if pretrained not in ("none", "kinetics400"):
        load_transfer(model, pretrained)
    return model


def load_transfer(model: nn.Module, path: str | os.PathLike) -> list[str]:
    """Load a radflow (or plain state-dict) checkpoint; a head of another shape is left new."""
    if not Path(path).exists():
        raise FileNotFoundError(f"train.pretrained: no checkpoint at {path}")
    ckpt = torch.load(path, map_location="cpu", weights_only=True)
    state = ckpt.get("model", ckpt)
    own = model.state_dict()
    skipped = [k for k, v in state.items() if k not in own or own[k].shape != v.shape]
    model.load_state_dict({k: v for k, v in state.items() if k not in skipped}, strict=False)
    return skipped


# --------------------------------------------------------------------------- data on device


class Cache:
    """One split's volumes as int16/uint8 tensors, loaded once (pinned, or on the GPU)."""

    def __init__(
        self, cases: pd.DataFrame, root: Path, settings: TrainSettings, device: torch.device
    ) -> None:
        import nibabel as nib

        self.case_ids = list(cases["case_id"])
        self.labels = torch.tensor(cases["label"].to_numpy(), dtype=torch.long)
        vols = []
        for r in cases.itertuples():
            chans = []
            for c in settings.channels:
                col = {"image": r.masked, "roi": r.roi}[c]
                arr = np.asanyarray(nib.load(root / col).dataobj)
                chans.append(torch.from_numpy(np.ascontiguousarray(arr.astype(np.int16))))
            vols.append(torch.stack(chans))
        self.data = torch.stack(vols) if vols else torch.empty(0)
        self.device = device
        if device.type == "cuda":
            free, _ = torch.cuda.mem_get_info(device)
            if self.data.numel() * 2 < 0.3 * free:
                self.data = self.data.to(device)
            else:
                self.data = self.data.pin_memory()
        self.window = settings.hu_window
        self.channels = settings.channels
        self.image_channels = [i for i, c in enumerate(settings.channels) if c == "image"]

    def __len__(self) -> int:
        return len(self.case_ids)

    def batch(self, idx: Sequence[int]) -> torch.Tensor:
        """Float batch (B, C, Z, Y, X) on the device, HU windowed to [0, 1]."""
        x = self.data[list(idx)].to(self.device, non_blocking=True)
        return model_input(x, self.channels, self.window)


def model_input(x: torch.Tensor, channels: Sequence[str], window: Sequence[float]) -> torch.Tensor:
    """Stored volumes (B, C, X, Y, Z) in RAS -> the network's float input (B, C, Z, Y, X).

    ``image`` channels: HU windowed to [0, 1]; ``roi`` channels: 0/1. The network sees the
    volume as a video (T, H, W) = (z, y, x).
    """
    x = x.float()
    lo, hi = window
    for c, name in enumerate(channels):
        if name == "image":
            x[:, c] = ((x[:, c] - lo) / (hi - lo)).clamp_(0, 1)
        else:
            x[:, c] = (x[:, c] > 0).float()
    return x.permute(0, 1, 4, 3, 2).contiguous()


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


@torch.no_grad()
def predict(model: nn.Module, cache: Cache, batch_size: int, amp: bool) -> np.ndarray:
    """Positive-class probability for every case of a cache."""
    model.eval()
    out = []
    for i in range(0, len(cache), batch_size):
        x = cache.batch(range(i, min(i + batch_size, len(cache))))
        with torch.autocast(cache.device.type, dtype=torch.bfloat16, enabled=amp):
            logits = model(x)
        out.append(logits.float().softmax(1)[:, 1].cpu())
    return torch.cat(out).numpy() if out else np.zeros(0)


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


def train(
    manifest_path: str | os.PathLike,
    out_dir: str | os.PathLike,
    settings: TrainSettings,
    root: str | os.PathLike = ".",
    threads: int = 1,
    max_steps: int | None = None,
) -> dict[str, Any]:
    """Train (or resume) and write best.pt, last.pt and history.csv; returns a summary."""
    from tqdm import tqdm

    torch.set_num_threads(threads)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    device = resolve_device(settings.device)
    amp = settings.amp and device.type == "cuda" and torch.cuda.is_bf16_supported()
    seed_everything(settings.seed)
    cases = manifest.read(manifest_path)
    train_df, val_df = split_frames(cases, settings.fold)
    n_classes = int(cases["label"].max()) + 1
    root = Path(root)
    tr, va = Cache(train_df, root, settings, device), Cache(val_df, root, settings, device)
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
    gen = torch.Generator().manual_seed(settings.seed)
    start, history, best_auc, best_loss, bad_epochs = 0, [], -1.0, math.inf, 0
    last = out / "last.pt"
    fingerprint = run_fingerprint(manifest_path, settings)
    if last.exists():  # resume after a kill -- only the same run, never a stale one
        ck = torch.load(last, map_location=device, weights_only=True)
        if ck.get("fingerprint") != fingerprint:
            print(f"{last} is from another manifest or settings: starting afresh", file=sys.stderr)
            last.unlink()
            (out / "best.pt").unlink(missing_ok=True)
    if last.exists():
        ck = torch.load(last, map_location=device, weights_only=True)
        model.load_state_dict(ck["model"])
        opt.load_state_dict(ck["optimizer"])
        sched.load_state_dict(ck["scheduler"])
        gen.set_state(ck["generator"])
        _set_rng_state(ck["rng"])
        start, best_auc, bad_epochs = ck["epoch"] + 1, ck["best_auc"], ck["bad_epochs"]
        best_loss = ck.get("best_loss", math.inf)
        history = json.loads(ck["history"])
        print(f"resumed from {last} at epoch {start}", file=sys.stderr)
    writer = None
    if settings.tensorboard:
        from torch.utils.tensorboard import SummaryWriter

        writer = SummaryWriter(str(out / "tensorboard"))
    steps = 0
    for epoch in range(start, settings.epochs):
        if bad_epochs >= settings.patience:
            break
        t0 = time.perf_counter()
        model.train()
        if settings.balance == "sampler":
            w = (1.0 / counts)[tr.labels]
            order = torch.multinomial(w, len(tr), replacement=True, generator=gen).tolist()
        else:
            order = torch.randperm(len(tr), generator=gen).tolist()
        losses = []
        bar = tqdm(
            range(0, len(order), settings.batch_size),
            desc=f"epoch {epoch}",
            file=sys.stderr,
            mininterval=5,
        )
        for i in bar:
            idx = order[i : i + settings.batch_size]
            x = augment(tr.batch(idx), settings, gen, tr.image_channels)
            y = tr.labels[idx].to(device)
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
                loss = loss_fn(model(x).float(), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            losses.append(loss.item())
            steps += 1
            if max_steps is not None and steps >= max_steps:  # tests: die like a killed job
                raise InterruptedRunError(f"stopped after {steps} steps (epoch {epoch})")
        recalibrate_batchnorm(model, tr, settings.batch_size, amp)
        val_prob = predict(model, va, settings.batch_size, amp)
        val_auc = auc(va.labels.numpy(), val_prob)
        val_loss = log_loss(va.labels.numpy(), val_prob)
        row = {
            "epoch": epoch,
            "loss": float(np.mean(losses)),
            "val_loss": val_loss,
            "val_auc": val_auc,
            "lr": sched.get_last_lr()[0],
            "seconds": round(time.perf_counter() - t0, 2),
        }
        history.append(row)
        print(json.dumps(row), file=sys.stderr)
        if writer is not None:
            for k in ("loss", "val_auc", "lr"):
                writer.add_scalar(k, row[k], epoch)
        if is_better(val_auc, val_loss, best_auc, best_loss):
            best_auc = -1.0 if math.isnan(val_auc) else val_auc
            best_loss, bad_epochs = val_loss, 0
            save_checkpoint(out / "best.pt", model, settings, n_classes, epoch, val_auc)
        else:
            bad_epochs += 1
        _atomic_save(
            out / "last.pt",
            {
                "model": model.state_dict(),
                "optimizer": opt.state_dict(),
                "scheduler": sched.state_dict(),
                "generator": gen.get_state(),
                "rng": _rng_state(),
                "epoch": epoch,
                "best_auc": best_auc,
                "best_loss": best_loss,
                "bad_epochs": bad_epochs,
                "fingerprint": fingerprint,
                "history": json.dumps(history),
            },
        )
        pd.DataFrame(history).to_csv(out / "history.csv", index=False)
    if writer is not None:
        writer.close()
    if not (out / "best.pt").exists():
        save_checkpoint(out / "best.pt", model, settings, n_classes, start, best_auc)
    pd.DataFrame(history).to_csv(out / "history.csv", index=False)
    return {"best_val_auc": best_auc, "epochs_run": len(history), "device": str(device)}


def save_checkpoint(
    path: Path,
    model: nn.Module,
    settings: TrainSettings,
    n_classes: int,
    epoch: int,
    val_auc: float,
) -> None:
    """A self-describing checkpoint that loads with ``torch.load(weights_only=True)``."""
    _atomic_save(
        path,
        {
            "model": model.state_dict(),
            "arch": settings.arch,
            "channels": list(settings.channels),
            "hu_window": list(settings.hu_window),
            "n_classes": n_classes,
            "epoch": epoch,
            "val_auc": val_auc,
            "settings": json.dumps(asdict(settings)),
        },
    )


def _atomic_save(path: Path, obj: dict[str, Any]) -> None:
    from radflow.io import atomic_path

    with atomic_path(path) as tmp:
        torch.save(obj, tmp)


def load_checkpoint(path: str | os.PathLike, device: str = "cpu") -> tuple[nn.Module, dict]:
    """Model and metadata from a radflow ``best.pt``."""
    ck = torch.load(path, map_location=device, weights_only=True)
    model = build_model(ck["arch"], len(ck["channels"]), ck["n_classes"], "none")
    model.load_state_dict(ck["model"])
    return model.eval(), ck

"""explain: class activation maps (grad-cam library) for one case, on its own grid and the CT's.

Methods (``explain.method``): Grad-CAM, Grad-CAM++, HiResCAM (gradient x activation per cell,
no spatial averaging of the gradients: the map is exactly what the layer contributes to the
score) and LayerCAM (positive gradients x activations per cell: usable at shallower, finer
layers). ``explain.compare_methods`` adds methods whose faithfulness numbers are computed beside
the main method's, for comparison; volumes and pictures are the main method's.

Per case this writes

* ``{case}_cam.nii.gz``: the CAM grad-cam returns (normalised to [0, 1] per volume), float32,
  on the masked volume's grid with its affine;
* ``{case}_cam_raw.nii.gz``: the same CAM before normalisation (ReLU of the weighted
  activations, upsampled linearly), so one case's evidence can be compared with another's;
* ``{case}_cam_ct.nii.gz``: the normalised CAM put back on the converted CT's grid (the crop and
  resampling undone through world coordinates), to open over the original volume in 3D Slicer
  or ITK-SNAP;
* ``{case}.png``: axial, coronal and sagittal slices through the CAM peak (radiological
  convention), the model's HU window underneath, the CAM with transparency and a colour bar,
  the ROI outline; prediction, probability and label in the title;
* ``{case}.json``: the numbers -- peak (voxel and world mm), raw CAM scale, the correlation with
  the CAM of a randomly re-initialised model (sanity check; over the input and within the ROI),
  deletion and insertion AUCs against
  a random voxel order (``radflow.faithfulness``), and, when a lesion mask is given, the
  pointing-game hit and the CAM mass inside the lesion; per method under ``methods``.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np

from radflow import faithfulness, geometry, inputs, paths
from radflow.faithfulness import correlation, peak_index
from radflow.ids import case_keys_reader, fill_template
from radflow.io import save_nifti, write_json
from radflow.settings import section

# explain.method (schema enum) -> the grad-cam class; all four take 5D (B, C, Z, Y, X) input
CAM_CLASSES = {
    "gradcam": "GradCAM",
    "gradcam++": "GradCAMPlusPlus",
    "hirescam": "HiResCAM",
    "layercam": "LayerCAM",
}
METHODS = tuple(CAM_CLASSES)
SCORES = ("log_odds", "logit")
BASELINES = ("organ", "fill")  # explain.perturbation_baseline
# per-method numbers that a case's JSON also carries at top level (for the main method)
PER_METHOD = (
    "pointing_hit",
    "pointing_hit_in_roi",
    "mass_in_lesion",
    "deletion_auc",
    "insertion_auc",
    "random_deletion_auc",
    "random_insertion_auc",
)


@dataclass(frozen=True)
class ExplainSettings:
    """Explanation settings (config key ``explain``; defaults: the schema's)."""

    method: str = "hirescam"  # gradcam | gradcam++ | hirescam | layercam
    compare_methods: tuple[str, ...] = ()  # more methods: faithfulness numbers only
    target_layer: str = "layer4"  # dotted module path; default: the last residual block
    target_class: int = 1  # the positive class
    # what the CAM explains: the target class's log-odds (its logit minus the log-sum-exp of
    # the others: what moves the softmax probability), or its bare logit (grad-cam's default,
    # which also credits evidence that raises every class's logit alike)
    score: str = "log_odds"
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    random_seed: int = 0  # seed of the re-initialised model and of the random voxel orders
    perturbation_steps: int = 16  # points of the deletion/insertion curves (0 = none)
    # what a removed voxel becomes: the ROI's median HU (the organ with its structure -- lesion,
    # vessels, texture -- taken out), or the mask's background fill
    perturbation_baseline: str = "organ"

    @property
    def methods(self) -> tuple[str, ...]:
        """The main method, then the comparison methods (each once)."""
        return tuple(dict.fromkeys((self.method, *self.compare_methods)))

    @classmethod
    def from_dict(cls, d: dict[str, Any] | None) -> ExplainSettings:
        """Build from a config mapping (unknown keys are an error)."""
        d = section(cls, d, "explain", ("compare_methods",))
        for m in (d.get("method", cls.method), *d.get("compare_methods", ())):
            if m not in METHODS:
                raise ValueError(f"explain.method {m!r}: must be one of {METHODS}")
        if d.get("perturbation_steps", 0) < 0:
            raise ValueError("explain.perturbation_steps must be >= 0")
        if d.get("perturbation_baseline", cls.perturbation_baseline) not in BASELINES:
            raise ValueError(f"explain.perturbation_baseline must be one of {BASELINES}")
        if d.get("score", "log_odds") not in SCORES:
            raise ValueError(f"explain.score must be one of {SCORES}")
        from radflow.model import check_device

        check_device(d.get("device", cls.device), "explain.device")
        return cls(**d)


def target_module(model: Any, path: str) -> Any:
    """The module at a dotted path (``layer4``, ``layer4.1.conv2``)."""
    mod = model
    for part in path.split("."):
        mod = mod[int(part)] if part.isdigit() else getattr(mod, part, None)
        if mod is None:
            raise ValueError(f"explain.target_layer: the model has no module {path!r}")
    return mod


class LogOdds:
    """grad-cam target: log-odds of one class, ``z_c - logsumexp(z_j, j != c)``.

    For two classes this is the logit margin ``z_1 - z_0``, whose gradient is that of the
    softmax probability up to a positive factor: the CAM shows what moves the prediction.
    """

    def __init__(self, category: int) -> None:
        self.category = category

    def __call__(self, output: Any) -> Any:
        import torch

        others = torch.cat([output[..., : self.category], output[..., self.category + 1 :]], -1)
        return output[..., self.category] - torch.logsumexp(others, -1)


def compute_cam(
    model: Any, x: Any, method: str, layer: str, target_class: int, score: str = "log_odds"
) -> tuple[np.ndarray, np.ndarray]:
    """(normalised, raw) CAM of one input ``x`` (1, C, Z, Y, X), both (Z, Y, X) float32.

    The normalised CAM is grad-cam's output. The raw CAM is grad-cam's own weighted activation
    map (``get_cam_image``) before its per-volume min-max scaling, upsampled linearly.
    """
    import pytorch_grad_cam
    import torch
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget
    from scipy import ndimage

    if method not in CAM_CLASSES:
        raise ValueError(f"unknown CAM method {method!r}; known: {METHODS}")
    cls = getattr(pytorch_grad_cam, CAM_CLASSES[method])
    targets = [
        LogOdds(target_class) if score == "log_odds" else ClassifierOutputTarget(target_class)
    ]
    mod = target_module(model, layer)
    with cls(model=model, target_layers=[mod]) as cam:
        with torch.autocast(x.device.type, enabled=False):
            norm = cam(input_tensor=x, targets=targets)[0]
        acts = cam.activations_and_grads.activations[-1].cpu().numpy()
        grads = cam.activations_and_grads.gradients[-1].cpu().numpy()
        small = cam.get_cam_image(x, mod, targets, acts, grads, eigen_smooth=False)[0]
        raw_small = np.maximum(small, 0)
    factors = [t / s for t, s in zip(x.shape[2:], raw_small.shape, strict=True)]
    raw = ndimage.zoom(raw_small.astype(np.float32), factors, order=1, mode="nearest")
    return norm.astype(np.float32), raw.astype(np.float32)


def to_ras(zyx: np.ndarray) -> np.ndarray:
    """Network order (Z, Y, X) -> RAS voxel order (X, Y, Z)."""
    return np.ascontiguousarray(np.transpose(zyx, (2, 1, 0)))


def uncrop(cam: np.ndarray, cam_affine: np.ndarray, ct: nib.Nifti1Image) -> np.ndarray:
    """The CAM resampled (linear, 0 outside) onto the converted CT's grid via world coordinates."""
    from radflow.resampling import resample

    return resample(cam, cam_affine, ct.affine, ct.shape[:3], order=1, fill=0.0, dtype=np.float32)


def random_model_like(ck: dict[str, Any], seed: int) -> Any:
    """The checkpoint's architecture with fresh random weights (model-randomisation check)."""
    import torch

    from radflow.model import build_model

    torch.manual_seed(seed)
    return build_model(ck["arch"], len(ck["channels"]), ck["n_classes"], "none").eval()


def load_models(
    checkpoint: str | os.PathLike, settings: ExplainSettings
) -> tuple[Any, Any, dict[str, Any]]:
    """(trained model, randomly re-initialised twin, checkpoint metadata) on the device."""
    from radflow.model import load_checkpoint, resolve_device

    dev = resolve_device(settings.device)
    model, ck = load_checkpoint(checkpoint, dev)
    return model.to(dev), random_model_like(ck, settings.random_seed).to(dev), ck


def randomisation_check(
    cam: np.ndarray, rand_cam: np.ndarray, roi: np.ndarray
) -> dict[str, dict[str, float]]:
    """Correlation of the trained and the randomised model's maps (Adebayo et al., 2018): over
    the whole input (``whole``) and within the ROI (``in_roi``). On a masked input both maps are
    near zero on the background fill, a support they share whatever the weights; that alone
    makes the whole-input r high. Within the organ only the pattern counts."""
    nan = {"pearson": float("nan"), "spearman": float("nan")}
    roi = np.asarray(roi, dtype=bool)
    return {
        "whole": correlation(cam, rand_cam),
        "in_roi": correlation(cam[roi], rand_cam[roi]) if roi.sum() > 1 else nan,
    }


def _finite(v: float) -> float | None:
    """``v``, or None where it is NaN or infinite (JSON has neither)."""
    return v if np.isfinite(v) else None


def method_numbers(
    model: Any,
    x: Any,
    baseline: Any,
    method: str,
    settings: ExplainSettings,
    roi: np.ndarray,
    lesion: np.ndarray | None,
    random_curves: dict[str, Any] | None = None,
) -> tuple[dict[str, Any], np.ndarray, np.ndarray]:
    """One method's faithfulness numbers on one case, and its (normalised, raw) CAM in RAS.

    ``x`` and ``baseline`` are network inputs (1, C, Z, Y, X) on the model's device; the
    baseline is ``x`` with every voxel removed (``inputs.removed``). ``random_curves``: the
    case's random-order curves from an earlier method (they do not depend on the map)."""
    import torch

    how = (settings.target_layer, settings.target_class, settings.score)
    norm_zyx, raw_zyx = compute_cam(model, x, method, *how)
    cam, raw = to_ras(norm_zyx), to_ras(raw_zyx)
    nums: dict[str, Any] = {"method": method, "peak_vox": list(peak_index(cam))}
    if settings.perturbation_steps:

        def predict(batch: np.ndarray) -> np.ndarray:
            with torch.no_grad(), torch.autocast(x.device.type, enabled=False):
                z = model(torch.from_numpy(batch).to(x.device)).float()
            return z.softmax(1)[:, settings.target_class].cpu().numpy()

        curves = faithfulness.deletion_insertion(
            predict,
            x[0].cpu().numpy(),
            baseline[0].cpu().numpy(),
            norm_zyx,
            settings.perturbation_steps,
            seed=settings.random_seed,
            with_random=random_curves is None,
        )
        nums |= curves | {k: v for k, v in (random_curves or {}).items() if k.startswith("random")}
    if lesion is not None:
        nums["pointing_hit"] = faithfulness.pointing_game(cam, lesion, 1) if lesion.any() else None
        # secondary: the peak of the map within the organ (a strict miss whose peak lies on the
        # background or the organ's edge can still find the lesion inside the organ)
        nums["pointing_hit_in_roi"] = (
            faithfulness.pointing_game(np.where(roi, cam, -np.inf), lesion, 1)
            if lesion.any() and roi.any()
            else None
        )
        # both within the ROI: the CAM's share of the organ that falls on the lesion, against
        # the lesion's share of the organ (what a CAM spread evenly over the organ would get)
        # None where undefined: no lesion inside the ROI, or a map that is zero on the whole
        # ROI (then nothing of it is anywhere in the organ; its pointing game is a miss)
        nums["mass_in_lesion"] = (
            _finite(faithfulness.mass_inside(np.where(roi, raw, 0), lesion & roi))
            if (lesion & roi).any()
            else None
        )
    return nums, cam, raw


def explain_case(
    models: tuple[Any, Any, dict[str, Any]],
    masked_path: str | os.PathLike,
    roi_path: str | os.PathLike,
    ct_path: str | os.PathLike,
    out_dir: str | os.PathLike,
    case_id: str,
    settings: ExplainSettings,
    prediction: dict[str, Any] | None = None,
    lesion_path: str | os.PathLike | None = None,
    *,
    fill_hu: float,
) -> dict[str, Any]:
    """Explain one case: CAM volumes, picture and numbers (see the module docstring).

    ``fill_hu`` is the mask stage's background fill (``mask.background_hu``): what a voxel
    removed by the deletion curve becomes."""
    import torch

    model, rand_model, ck = models
    spec = inputs.InputSpec.from_checkpoint(ck)
    dev = next(model.parameters()).device
    masked = nib.load(str(masked_path))
    # every channel once (the picture and the numbers need both), then the model's channels
    stored = inputs.read_case({"masked": masked_path, "roi": roi_path}, inputs.CHANNELS)
    hu, roi = stored[inputs.CHANNELS.index("image")], stored[inputs.CHANNELS.index("roi")] > 0
    vol = stored[[inputs.CHANNELS.index(c) for c in spec.channels]][None]
    x = spec.network_input(torch.from_numpy(vol).to(dev))
    if settings.perturbation_baseline == "organ":
        base = inputs.organ_median(spec, vol[0], roi)[None]
    else:
        base = inputs.removed(spec, vol.shape[2:], fill_hu)[None]
    baseline = spec.network_input(torch.from_numpy(base).to(dev))
    with torch.no_grad():
        prob = float(model(x).float().softmax(1)[0, settings.target_class])
    lesion = None
    if lesion_path is not None:
        from radflow.qc import to_grid

        les_img = nib.load(str(lesion_path))
        les = np.asanyarray(les_img.dataobj).astype(np.uint8)
        lesion = to_grid(les, les_img.affine, masked.affine, hu.shape) > 0
    methods = {}
    for m in settings.methods:
        first = next(iter(methods.values()), None)
        nums, c, r = method_numbers(model, x, baseline, m, settings, roi, lesion, first)
        methods[m] = nums
        if m == settings.method:
            cam, raw = c, r
    how = (settings.method, settings.target_layer, settings.target_class, settings.score)
    rand = randomisation_check(cam, to_ras(compute_cam(rand_model, x, *how)[0]), roi)
    ct = nib.load(str(ct_path))
    cam_ct = uncrop(cam, masked.affine, ct)

    out = Path(out_dir)
    save_nifti(cam, masked.affine, out / f"{case_id}_cam.nii.gz")
    save_nifti(raw, masked.affine, out / f"{case_id}_cam_raw.nii.gz")
    save_nifti(cam_ct, ct.affine, out / f"{case_id}_cam_ct.nii.gz")

    peak = peak_index(cam)
    pred = dict(prediction or {})
    info: dict[str, Any] = {
        "case_id": case_id,
        "method": settings.method,
        "target_layer": settings.target_layer,
        "target_class": settings.target_class,
        "probability": pred.get("probability", prob),
        "probability_recomputed": prob,
        "prediction": pred.get("prediction"),
        "label": pred.get("label"),
        "split": pred.get("split"),
        "threshold": pred.get("threshold"),
        "group": outcome(pred.get("label"), pred.get("prediction")),
        "peak_vox": list(peak),
        "peak_mm": [round(float(v), 2) for v in geometry.voxel_to_world(masked.affine, peak)],
        "raw_max": float(raw.max()),
        "raw_mean_in_roi": float(raw[roi].mean()) if roi.any() else None,
        "mass_in_roi": _finite(faithfulness.mass_inside(raw, roi)),  # None: an all-zero map
        "roi_fraction_of_volume": float(roi.mean()),
        "randomised_model": rand["whole"],
        "randomised_model_in_roi": rand["in_roi"],
        "checkpoint_epoch": int(ck["epoch"]),
        "hu_window": list(spec.hu_window),
        "intensity_rule": spec.intensity_rule,
        "fill_hu": float(fill_hu),
        "settings": asdict(settings),
    }
    main = methods[settings.method]
    for key in PER_METHOD:
        if key in main:
            info[key] = main[key]
    if lesion is not None:
        info["lesion_voxels"] = int(lesion.sum())
        info["lesion_fraction_of_roi"] = (
            float((lesion & roi).sum() / roi.sum()) if roi.any() and lesion.any() else None
        )
    info["methods"] = methods
    title = (
        f"{case_id}  {info['group']}  p={info['probability']:.2f}  pred={info['prediction']}  "
        f"label={info['label']}  ({settings.method})"
    )
    cam_png(hu, cam, roi, masked.affine, spec.hu_window, out / f"{case_id}.png", title)
    write_json(out / f"{case_id}.json", info)
    return info


def explain(
    checkpoint: str | os.PathLike,
    manifest_path: str | os.PathLike,
    out_dir: str | os.PathLike,
    predictions: str | os.PathLike,
    settings: ExplainSettings,
    splits: Sequence[str] = ("val", "test"),
    metrics: str | os.PathLike | None = None,
    root: str | os.PathLike = ".",
    lesion_template: str | None = None,
    id_map: str | os.PathLike | None = None,
    threads: int = 1,
    *,
    fill_hu: float,
) -> dict[str, Any]:
    """Explain every case of ``splits`` (model loaded once), then write the cohort outputs.

    ``fill_hu``: the mask stage's background fill (``mask.background_hu``), what the deletion
    curves put in place of a removed voxel. ``lesion_template`` (placeholders as in
    ``qc.reference``) is filled per case from the private ``id_map``; a missing lesion file
    leaves that case without lesion numbers and without a lesion outline on the review page.
    """
    import sys

    import torch
    from tqdm import tqdm

    from radflow import manifest

    torch.set_num_threads(threads)
    root = Path(root)
    cases = manifest.read(manifest_path)
    cases = cases[cases["split"].isin(list(splits))].sort_values("case_id")
    lesions = lesion_paths(list(cases["case_id"]), lesion_template, id_map, root)
    preds = read_predictions(predictions, metrics)
    models = load_models(checkpoint, settings)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    jsons = []
    for r in tqdm(list(cases.itertuples()), desc="explain", file=sys.stderr, mininterval=5):
        explain_case(
            models,
            root / r.masked,
            root / r.roi,
            root / r.image,
            out,
            r.case_id,
            settings,
            prediction=prediction_of(preds, r.case_id, predictions),
            lesion_path=lesions.get(r.case_id),
            fill_hu=fill_hu,
        )
        jsons.append(out / f"{r.case_id}.json")
    return report(jsons, out, root=root, metrics=metrics, lesions=lesions)


def outcome(label: Any, prediction: Any) -> str:
    """TP / FP / FN / TN; without a label the prediction (``positive`` / ``negative``), or
    ``unlabelled`` without either."""
    if prediction is None:
        return "unlabelled"
    if label is None or (isinstance(label, float) and np.isnan(label)):
        return "positive" if int(prediction) else "negative"
    return {(1, 1): "TP", (0, 1): "FP", (1, 0): "FN", (0, 0): "TN"}[(int(label), int(prediction))]


def cam_png(
    hu: np.ndarray,
    cam: np.ndarray,
    roi: np.ndarray,
    affine: np.ndarray,
    window: tuple[float, float] | list[float],
    out_path: str | os.PathLike,
    title: str,
) -> None:
    """Tri-planar CAM overlay through the CAM peak (radiological convention), with colour bar."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from radflow.io import atomic_path
    from radflow.qc import radiological

    sp = geometry.ras_spacing(affine)
    i, j, k = peak_index(cam)
    views = [
        ("axial", (slice(None), slice(None), k), (sp[0], sp[1])),
        ("coronal", (slice(None), j, slice(None)), (sp[0], sp[2])),
        ("sagittal", (i, slice(None), slice(None)), (sp[1], sp[2])),
    ]
    cmap = matplotlib.colormaps["jet"]
    fig, axes = plt.subplots(
        1, 4, figsize=(12.6, 4.4), facecolor="black", width_ratios=[1, 1, 1, 0.06]
    )
    for ax, (name, sl, (sx, sy)) in zip(axes[:3], views, strict=True):
        img, c, m = hu[sl].T, cam[sl].T, roi[sl].T
        h, w = img.shape
        extent = (0, w * sx, 0, h * sy)
        ax.imshow(img, cmap="gray", vmin=window[0], vmax=window[1], origin="lower", extent=extent)
        rgba = cmap(c)
        rgba[..., 3] = np.clip(c, 0, 1) * 0.6  # low CAM transparent
        ax.imshow(rgba, origin="lower", extent=extent, interpolation="nearest")
        if m.any():
            ax.contour(
                m.astype(float),
                [0.5],
                colors="white",
                linewidths=0.8,
                origin="lower",
                extent=extent,
            )
        radiological(ax, name)
    scale = matplotlib.cm.ScalarMappable(matplotlib.colors.Normalize(0, 1), cmap)
    cb = fig.colorbar(scale, cax=axes[3])
    cb.set_label("Grad-CAM (normalised)", color="white")
    cb.ax.yaxis.set_tick_params(color="white", labelcolor="white")
    fig.suptitle(title, color="white", fontsize=11)
    fig.tight_layout()
    with atomic_path(out_path) as tmp:
        fig.savefig(tmp, format="png", dpi=90, facecolor="black")
    plt.close(fig)


def read_predictions(
    predictions: str | os.PathLike, metrics: str | os.PathLike | None
) -> dict[str, dict[str, Any]]:
    """case_id -> its row of predictions.csv (+ the validation threshold from metrics.json)."""
    import pandas as pd

    df = pd.read_csv(predictions, dtype={"case_id": str})
    threshold = None
    if metrics is not None:
        threshold = float(json.loads(Path(metrics).read_text())["threshold"])
    out = {}
    for r in df.itertuples():
        row = {
            "probability": float(r.probability),
            "prediction": int(r.prediction),
            "label": None if pd.isna(r.label) else int(r.label),
            "split": str(r.split),
        }
        if threshold is not None:
            row["threshold"] = threshold
        out[r.case_id] = row
    return out


def prediction_of(
    rows: dict[str, dict[str, Any]], case_id: str, predictions: str | os.PathLike
) -> dict[str, Any]:
    """A case's row from ``read_predictions``; a clear error when predictions.csv lacks it."""
    if case_id not in rows:
        raise KeyError(f"{case_id} is not in {predictions}")
    return rows[case_id]


def read_prediction(
    predictions: str | os.PathLike, metrics: str | os.PathLike | None, case_id: str
) -> dict[str, Any]:
    """One case's row of predictions.csv (+ the validation threshold)."""
    return prediction_of(read_predictions(predictions, metrics), case_id, predictions)


# --------------------------------------------------------------------------- cohort summary


def _stats(v: list[float]) -> dict[str, float | None]:
    if not v:
        return {"mean": None, "sd": None, "min": None, "max": None}
    a = np.asarray(v, dtype=float)
    return {
        "mean": float(a.mean()),
        "sd": float(a.std(ddof=1)) if len(a) > 1 else 0.0,
        "min": float(a.min()),
        "max": float(a.max()),
    }


def _of_method(info: dict[str, Any], method: str) -> dict[str, Any]:
    """A case's numbers for one method (JSONs without ``methods``: the top level)."""
    if "methods" in info:
        return info["methods"].get(method, {})
    return info if info.get("method") == method else {}


def method_summary(infos: list[dict[str, Any]], method: str, hit_target: float) -> dict[str, Any]:
    """One method over the explained cases: pointing game and lesion mass over true positives
    with a lesion, deletion/insertion AUCs (and their random-order baselines) over true positives
    and over every case."""
    tps = [i for i in infos if i.get("group") == "TP"]
    with_lesion = [
        (i, n) for i in tps if (n := _of_method(i, method)).get("pointing_hit") is not None
    ]
    hits = [bool(n["pointing_hit"]) for _, n in with_lesion]
    in_roi = [bool(h) for _, n in with_lesion if (h := n.get("pointing_hit_in_roi")) is not None]
    mass = [(n["mass_in_lesion"], i["lesion_fraction_of_roi"]) for i, n in with_lesion]
    mass = [(m, c) for m, c in mass if m is not None and c]
    out: dict[str, Any] = {
        "pointing_game": faithfulness.hit_rate(hits, hit_target) | {"tolerance_vox": 1},
        # not the target's number: the same over the map's peak within the ROI
        "pointing_game_in_roi": faithfulness.hit_rate(in_roi, hit_target) | {"tolerance_vox": 1},
        "cam_mass_in_lesion": _stats([m for m, _ in mass]),
        "cam_mass_over_chance": _stats([m / c for m, c in mass]),
    }
    for key in PER_METHOD[3:]:  # the curves
        out[key] = {
            group: _stats([n[key] for i in cases if key in (n := _of_method(i, method))])
            for group, cases in (("true_positives", tps), ("all_cases", infos))
        }
    return out


def _pearsons(infos: list[dict[str, Any]], key: str) -> list[float]:
    """The cases' defined Pearson r under ``key`` (cases without it, or with NaN, left out)."""
    rs = [i.get(key, {}).get("pearson", float("nan")) for i in infos]
    return [r for r in rs if not np.isnan(r)]


def summarise(infos: list[dict[str, Any]], hit_target: float = 0.8) -> dict[str, Any]:
    """Faithfulness over the explained cases, per method (the main method's also at top level):
    pointing game and lesion mass for true positives, deletion/insertion AUCs against a random
    voxel order, and the model-randomisation check for every case."""
    main = infos[0]["method"] if infos else None
    names = list(infos[0].get("methods", {main: None})) if infos else []
    methods = {m: method_summary(infos, m, hit_target) for m in names}
    tps = [i for i in infos if i.get("group") == "TP" and i.get("pointing_hit") is not None]
    chance = [float(i["lesion_fraction_of_roi"]) for i in tps]
    rand, rand_roi = (
        _pearsons(infos, "randomised_model"),
        _pearsons(infos, "randomised_model_in_roi"),
    )
    top = methods.get(main) or method_summary([], "", hit_target)
    # does the model look at the organ at all? The main map's mass inside the ROI, against the
    # ROI's share of the input (what a map spread evenly over the volume would get)
    in_roi = {
        group: [(i.get("mass_in_roi"), i.get("roi_fraction_of_volume")) for i in cases]
        for group, cases in (
            ("true_positives", [i for i in infos if i.get("group") == "TP"]),
            ("all_cases", infos),
        )
    }
    in_roi = {g: [(m, f) for m, f in v if m is not None and f] for g, v in in_roi.items()}
    return {
        "n_cases": len(infos),
        "n_true_positives_with_lesion": len(tps),
        "method": main,
        **top,
        "lesion_fraction_of_roi": _stats(chance),
        "cam_mass_in_roi": {g: _stats([m for m, _ in v]) for g, v in in_roi.items()},
        "cam_mass_in_roi_over_chance": {
            g: _stats([m / f for m, f in v]) for g, v in in_roi.items()
        },
        "randomised_model_correlation": {
            "pearson": _stats(rand),
            "pearson_in_roi": _stats(rand_roi),
            "note": "CAM of the trained model vs the same architecture re-initialised at random; "
            "a faithful explanation depends on the learned weights, so this should be low. "
            "pearson: over the whole input, where both maps share the organ's support; "
            "pearson_in_roi: within the ROI",
        },
        "perturbation_baseline": (infos[0].get("settings") or {}).get("perturbation_baseline")
        if infos
        else None,
        "perturbation_note": "deletion: probability as the most-attributed voxels are set to the "
        "baseline (perturbation_baseline -- organ: the ROI's median HU; fill: the mask's "
        "background) (lower area = more faithful); insertion: as they are put back into the "
        "baseline volume (higher = more faithful); random_*: the same in a random order",
        "methods": methods,
        "per_case": [
            {
                k: i.get(k)
                for k in (
                    "case_id",
                    "split",
                    "group",
                    "probability",
                    "lesion_fraction_of_roi",
                    *PER_METHOD,
                )
            }
            | {"randomised_pearson": i["randomised_model"]["pearson"]}
            for i in infos
        ],
    }


def _shown(v: float | None, digits: int) -> float | str:
    """A number for the review page: rounded, or "n/a" where undefined (None, NaN)."""
    return round(float(v), digits) if v is not None and np.isfinite(v) else "n/a"


def viewer_case(
    info: dict[str, Any],
    ct_path: Path,
    roi_path: Path,
    cam_ct_path: Path,
    lesion_path: Path | None = None,
) -> Any:
    """A review-page case on the converted CT's own grid, from the per-case JSON and volumes.

    The CT is shown in HU with the model's window; the CAM is ``{case}_cam_ct.nii.gz`` (already
    on the CT grid); the ROI (model grid) is resampled linearly and cut at 0.5, the lesion mask
    (any grid) by nearest neighbour, both through world coordinates.
    """
    from radflow.qc import to_grid
    from radflow.resampling import resample
    from radflow.viewer import ViewerCase

    ct = nib.load(str(ct_path))
    shape = ct.shape[:3]
    hu = np.asanyarray(ct.dataobj)
    if not np.issubdtype(hu.dtype, np.integer):
        hu = np.clip(np.rint(hu), -32768, 32767).astype(np.int16)
    cam_img = nib.load(str(cam_ct_path))
    if cam_img.shape[:3] != shape or not np.allclose(cam_img.affine, ct.affine, atol=1e-3):
        raise ValueError(f"{cam_ct_path.name} is not on the grid of the converted CT")
    cam = np.asanyarray(cam_img.dataobj).astype(np.float32)
    roi_img = nib.load(str(roi_path))
    roi_src = (np.asanyarray(roi_img.dataobj) > 0).astype(np.float32)
    roi = resample(roi_src, roi_img.affine, ct.affine, shape, order=1, fill=0.0, dtype=np.float32)
    lesion = None
    if lesion_path is not None:
        les_img = nib.load(str(lesion_path))
        les = (np.asanyarray(les_img.dataobj) > 0).astype(np.uint8)
        lesion = to_grid(les, les_img.affine, ct.affine, shape) > 0
    numbers: dict[str, float | int | str] = {
        "raw CAM max": _shown(info["raw_max"], 4),
        "CAM mass in ROI": _shown(info.get("mass_in_roi"), 3),
        "r(trained, random CAM)": _shown(info["randomised_model"]["pearson"], 3),
        "r in ROI": _shown(info.get("randomised_model_in_roi", {}).get("pearson"), 3),
        "method": info["method"],
    }
    if info.get("mass_in_lesion") is not None:
        numbers["CAM mass in lesion"] = _shown(info["mass_in_lesion"], 3)
        numbers["peak in lesion"] = "yes" if info["pointing_hit"] else "no"
    return ViewerCase(
        case_id=info["case_id"],
        group=info["group"],
        probability=float(info["probability"]),
        prediction=int(info["prediction"]) if info["prediction"] is not None else 0,
        label=info["label"],
        split=str(info["split"]),
        threshold=float(info["threshold"]) if info.get("threshold") is not None else 0.5,
        numbers=numbers,
        ct=hu,
        cam=cam,
        roi=roi >= 0.5,
        affine=ct.affine,
        window=tuple(info.get("hu_window") or inputs.HU_WINDOW),  # type: ignore[arg-type]
        peak=peak_index(cam),
        lesion=lesion,
    )


def lesion_paths(
    case_ids: Sequence[str],
    template: str | None,
    id_map: str | os.PathLike | None,
    root: str | os.PathLike = ".",
) -> dict[str, Path]:
    """case_id -> its lesion mask (``template`` filled from the private id map), where it exists.

    A case the id map does not know, or whose file is missing, has no entry.
    """
    if not template:
        return {}
    if id_map is None:
        raise ValueError("explain.lesion_reference needs the private id map (--id-map)")
    keys = case_keys_reader(id_map)
    out = {}
    for cid in case_ids:
        try:
            path = Path(root) / fill_template(template, keys(cid))
        except KeyError:
            continue
        if path.exists():
            out[cid] = path
    return out


def report(
    case_jsons: list[str | os.PathLike],
    out_dir: str | os.PathLike,
    root: str | os.PathLike = ".",
    metrics: str | os.PathLike | None = None,
    lesions: dict[str, Path] | None = None,
) -> dict[str, Any]:
    """Cohort outputs: ``faithfulness.json``, ``faithfulness.png`` and the review ``index.html``.

    The review page shows each case on its converted CT (``radflow.viewer``) with the lesion
    outline from ``lesions`` (case_id -> mask path) where given. A case whose volumes cannot be
    read is left off the page with a one-line reason on stderr; the others are shown.
    """
    import sys

    from radflow.viewer import write_viewer

    out, root = Path(out_dir), Path(root)
    lesions = lesions or {}
    infos = [json.loads(Path(p).read_text()) for p in case_jsons]
    summary = summarise(infos)
    write_json(out / "faithfulness.json", summary)
    faithfulness_png(summary, out / "faithfulness.png")
    cases, left_off = [], 0
    for info, p in zip(infos, case_jsons, strict=True):
        cid = info["case_id"]
        try:
            cases.append(
                viewer_case(
                    info,
                    root / paths.for_case(paths.NIFTI, cid),
                    root / paths.for_case(paths.ROI, cid),
                    Path(p).with_name(f"{cid}_cam_ct.nii.gz"),
                    lesions.get(cid),
                )
            )
        except (OSError, ValueError, nib.filebasedimages.ImageFileError) as err:
            left_off += 1
            print(f"review page: {cid} left off: {type(err).__name__}: {err}", file=sys.stderr)
    meta: dict[str, Any] = {"cases": len(cases)}
    if left_off:
        meta["cases left off (see the log)"] = left_off
    if infos:
        meta["method"] = infos[0]["method"]
        meta["target layer"] = infos[0]["target_layer"]
    if metrics is not None and Path(metrics).exists():
        m = json.loads(Path(metrics).read_text())
        meta["model"] = m.get("arch")
        meta["test AUC"] = round(m["test"]["auc"], 3) if m["test"].get("auc") is not None else None
        meta["threshold (val)"] = round(m["threshold"], 3)
        base = m.get("baseline", {}).get("test", {})
        if base.get("auc") is not None:  # the classical baseline on the same test split
            meta["baseline test AUC"] = round(base["auc"], 3)
    pg = summary["pointing_game"]
    if pg["hit_rate"] is not None:
        meta["pointing game"] = f"{pg['hits']}/{pg['n']}"
    write_viewer(cases, out / "index.html", meta=meta)
    return summary


def faithfulness_png(summary: dict[str, Any], path: Path) -> None:
    """Per-case CAM mass in the lesion (vs the lesion's share of the ROI) and the randomisation
    correlations, with the pointing-game hit rate in the title."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from radflow.io import atomic_path

    rows = summary["per_case"]
    tp = [r for r in rows if r["mass_in_lesion"] is not None and r["group"] == "TP"]
    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 3.8))
    if tp:
        xs = np.arange(len(tp))
        a.bar(xs - 0.2, [r["mass_in_lesion"] for r in tp], 0.4, label="CAM mass in lesion")
        a.bar(xs + 0.2, [r["lesion_fraction_of_roi"] for r in tp], 0.4, label="lesion / ROI")
        for x, r in zip(xs, tp, strict=True):
            a.text(
                x - 0.2,
                r["mass_in_lesion"] + 0.02,
                "hit" if r["pointing_hit"] else "miss",
                ha="center",
                fontsize=7,
            )
        a.set_xticks(xs, [r["case_id"][-6:] for r in tp], rotation=45, fontsize=7)
        a.set_ylim(0, 1.1)
        a.legend(fontsize=8)
    else:
        a.text(0.5, 0.5, "no true positives with a lesion mask", ha="center", transform=a.transAxes)
    a.set_title("true positives: CAM mass inside the lesion", fontsize=10)
    r = [x["randomised_pearson"] for x in rows if x["randomised_pearson"] is not None]
    b.hist([v for v in r if not np.isnan(v)], bins=10, range=(-1, 1), color="#777")
    b.set_xlabel("Pearson r, trained vs randomised-model CAM")
    b.set_title("model-randomisation check", fontsize=10)
    pg = summary["pointing_game"]
    rate = "n/a" if pg["hit_rate"] is None else f"{pg['hit_rate']:.2f} ({pg['hits']}/{pg['n']})"
    fig.suptitle(f"Grad-CAM faithfulness — pointing-game hit rate {rate}", fontsize=11)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=90)
    plt.close(fig)

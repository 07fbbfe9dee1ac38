"""Benchmark: do the CAMs point at the lesion, and are they faithful to the model? Per CAM method
and training seed: test AUC, pointing game over the held-out true positives, CAM mass in the
lesion (against chance), deletion and insertion AUCs against a random voxel order, and the
model-randomisation correlation; mean +- sd over the seeds.

The cohort is the demo's phantom (``radflow.demo.cohort``: its subjects, anatomy and lesions)
sampled straight onto a 3 mm RAS grid -- what convert makes of the demo's DICOM -- with the
ground-truth organ map as the segmentation (what ``segment.backend: precomputed`` does with
it). From there the real stages run: ``mask.mask``, ``manifest.assign_splits``, ``train.train``,
``evaluate.evaluate`` and ``explain.explain_case``/``summarise``; only DICOM writing, ingest,
convert and TotalSegmentator are skipped, to save time. Variants (``--variants``): those of
``radflow.ablation`` -- masked (the demo's settings), unmasked (same crop, CT kept around the
organ), fullfov (no crop) -- each on the same subjects, splits and seeds.
Usage:

    python bench/faithfulness.py                       # 96 subjects, seeds 0 1 2, 20 epochs
    python bench/faithfulness.py --variants masked unmasked fullfov
    python bench/faithfulness.py --subjects 24 --seeds 0 --epochs 2 --methods gradcam
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch
import yaml

import _results
from radflow import (
    ablation,
    evaluate,
    explain,
    geometry,
    manifest,
    mask,
    paths,
    plausibility,
    train,
)
from radflow.demo.cohort import ORGAN_LABELS, DemoSettings, plan_cohort
from radflow.io import save_nifti, write_json

REPO = Path(__file__).resolve().parents[1]
DEMO = yaml.safe_load((REPO / "config" / "config.yaml").read_text())
SPACING = 3.0  # convert.spacing_mm of the demo
TARGET_MASKED = 0.9


def grid(demo: DemoSettings) -> tuple[np.ndarray, tuple[int, int, int]]:
    """RAS affine and shape of the body's box at 3 mm (the demo's converted CT)."""
    shape = (114, 80, int(round(demo.z_extent_mm / SPACING)))
    centre_ras = np.array([0.0, 0.0, demo.z_center_mm])
    aff = np.diag([SPACING, SPACING, SPACING, 1.0])
    aff[:3, 3] = centre_ras - SPACING * (np.asarray(shape) - 1) / 2
    return aff, shape  # type: ignore[return-value]


def write_cohort(root: Path, demo: DemoSettings, workers: int, variant: str) -> pd.DataFrame:
    """Every subject: CT, label map, lesion, the ablation ``variant``'s masked volume; one
    manifest row each."""
    aff, shape = grid(demo)
    ijk = np.stack(np.meshgrid(*[np.arange(n) for n in shape], indexing="ij"), axis=-1)
    lps = geometry.lps_to_ras(geometry.voxel_to_world(aff, ijk))  # RAS->LPS is the same flip
    msettings = mask.MaskSettings.from_dict(ablation.variant_mask_settings(variant, _mask_cfg()))
    qc = plausibility.QcSettings.from_dict(DEMO["qc"])  # the demo's plausibility checks
    rows = []
    for subj in plan_cohort(demo):
        cid = f"case-{subj.index:012x}"
        ph = subj.phantom
        rng = np.random.default_rng([demo.seed, subj.index, 7])
        hu = ph.hu(lps) + rng.normal(0.0, demo.noise_hu, shape)
        ct = np.clip(np.rint(hu), -1024, 3071).astype(np.int16)
        files = paths.case_files(cid)
        for p in files.values():
            (root / p).parent.mkdir(parents=True, exist_ok=True)
        save_nifti(ct, aff, root / files["image"])
        save_nifti(ph.labels(lps).astype(np.uint8), aff, root / files["label_map"])
        write_json(
            paths.sidecar_of(root / files["label_map"]),
            {"labels": {str(k): v for k, v in ORGAN_LABELS.items()}},
        )
        (root / "lesions").mkdir(exist_ok=True)
        save_nifti(ph.lesion(lps).astype(np.uint8), aff, root / "lesions" / f"{cid}.nii.gz")
        rec = mask.mask(
            root / files["image"],
            root / files["label_map"],
            root / files["masked"],
            msettings,
            root / files["roi"],
            root / paths.for_case(paths.MASK_STATUS, cid),
            threads=workers,
            qc=qc,
        )
        if not rec.get("usable", False):
            print(f"{cid}: excluded by mask ({rec.get('reason')})")
            continue
        rows.append(
            {
                "case_id": cid,
                "subject_id": f"sub-{subj.index:012x}",
                "study_id": f"stu-{subj.index:012x}",
                "series_id": f"ser-{subj.index:012x}",
                "label": subj.label,
                **files,
                **{f"image_n{a}": n for a, n in zip("xyz", shape, strict=True)},
                **{f"image_s{a}_mm": SPACING for a in "xyz"},
                **{f"masked_n{a}": n for a, n in zip("xyz", rec["shape"], strict=True)},
                **{f"masked_s{a}_mm": s for a, s in zip("xyz", rec["spacing_mm"], strict=True)},
                "roi_volume_ml": rec["roi_ml"],
                **{f"sha256_{k}": "0" * 64 for k in ("image", "label_map", "masked", "roi", "qc")},
                "slice_thickness_mm": SPACING,
                "kernel": "B30f",
                "manufacturer": "phantom",
                "radflow_version": "bench",
                "config_hash": "0" * 16,
                "flags": ";".join(rec.get("flags", [])),
            }
        )
    return pd.DataFrame(rows)


def _mask_cfg() -> dict:
    return {k: v for k, v in DEMO["mask"].items() if k != "threads"}


def split(cases: pd.DataFrame, fractions: tuple[float, float, float]) -> pd.DataFrame:
    s = manifest.SplitSettings(*fractions, folds=0, seed=0)
    splits = manifest.assign_splits(cases[["subject_id", "label"]], s)
    cases = cases.merge(splits, on=["subject_id", "label"])
    return manifest.validate(cases[manifest.CASE_COLUMNS])


def run_seed(
    root: Path, cases_path: Path, seed: int, args: argparse.Namespace
) -> dict[str, dict[str, float | None]]:
    """Train, evaluate and explain one seed; the numbers per method."""
    out = root / f"seed{seed}"
    cfg = {k: v for k, v in DEMO["train"].items() if k != "threads"}
    cfg |= {"seed": seed, "epochs": args.epochs, "device": args.device, "patience": args.epochs}
    t0 = time.perf_counter()
    train.train(cases_path, out / "train", train.TrainSettings.from_dict(cfg), root, args.threads)
    t_train = time.perf_counter() - t0
    ev = evaluate.evaluate(
        out / "train" / "best.pt",
        cases_path,
        out / "eval",
        root=root,
        device=args.device,
        threads=args.threads,
        bootstrap=200,
    )
    ecfg = {k: v for k, v in DEMO["explain"].items() if k not in ("threads", "splits")}
    ecfg.pop("lesion_reference", None)
    ecfg |= {
        "method": args.methods[0],
        "compare_methods": args.methods[1:],
        "device": args.device,
        "perturbation_steps": args.steps,
        "perturbation_baseline": args.baseline,
    }
    settings = explain.ExplainSettings.from_dict(ecfg)
    preds = explain.read_predictions(
        out / "eval" / "predictions.csv", out / "eval" / "metrics.json"
    )
    models = explain.load_models(out / "train" / "best.pt", settings)
    cases = manifest.read(cases_path)
    infos = []
    t0 = time.perf_counter()
    for r in cases[cases["split"].isin(["val", "test"])].sort_values("case_id").itertuples():
        lesion = root / "lesions" / f"{r.case_id}.nii.gz"
        infos.append(
            explain.explain_case(
                models,
                root / r.masked,
                root / r.roi,
                root / r.image,
                out / "explain",
                r.case_id,
                settings,
                prediction=preds[r.case_id],
                lesion_path=lesion if r.label == 1 else None,
                fill_hu=DEMO["mask"]["background_hu"],
            )
        )
    t_explain = time.perf_counter() - t0
    summary = explain.summarise(infos, hit_target=TARGET_MASKED)
    write_json(out / "faithfulness.json", summary)
    res = {}
    rand = summary["randomised_model_correlation"]  # the main method's
    for m, s in summary["methods"].items():
        res[m] = {
            "test_auc": ev["test"]["auc"],
            "pointing_game": s["pointing_game"]["hit_rate"],
            "pointing_game_in_roi": s["pointing_game_in_roi"]["hit_rate"],
            "n_true_positives": s["pointing_game"]["n"],
            "cam_mass_in_lesion": s["cam_mass_in_lesion"]["mean"],
            "cam_mass_over_chance": s["cam_mass_over_chance"]["mean"],
            "deletion_auc": s["deletion_auc"]["true_positives"]["mean"],
            "random_deletion_auc": s["random_deletion_auc"]["true_positives"]["mean"],
            "insertion_auc": s["insertion_auc"]["true_positives"]["mean"],
            "random_insertion_auc": s["random_insertion_auc"]["true_positives"]["mean"],
            "randomised_model_r": rand["pearson"]["mean"] if m == settings.method else None,
            "randomised_model_r_in_roi": (
                rand["pearson_in_roi"]["mean"] if m == settings.method else None
            ),
        }
    print(
        f"seed {seed}: test AUC {ev['test']['auc']:.3f}, {len(infos)} cases explained, "
        f"train {t_train:.0f} s, explain {t_explain:.0f} s"
    )
    for m, r in res.items():
        print(f"  {m:10s} " + ", ".join(f"{k} {_fmt(v)}" for k, v in r.items()))
    return res


def _fmt(v: float | int | None) -> str:
    return "n/a" if v is None else (str(v) if isinstance(v, int) else f"{v:.3f}")


def mean_sd(v: list[float | None]) -> str:
    a = np.asarray([x for x in v if x is not None], dtype=float)
    if not len(a):
        return "n/a"
    return f"{a.mean():.3f} +- {a.std(ddof=1) if len(a) > 1 else 0.0:.3f}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--subjects", type=int, default=96)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--epochs", type=int, default=DEMO["train"]["epochs"])
    # the demo's method first: it is the one the target and the randomisation check are on
    main = DEMO["explain"]["method"]
    ap.add_argument(
        "--methods", nargs="+", default=[main] + [m for m in explain.METHODS if m != main]
    )
    ap.add_argument("--steps", type=int, default=16, help="points of the deletion curves")
    ap.add_argument(
        "--baseline",
        choices=explain.BASELINES,
        default=DEMO["explain"].get(
            "perturbation_baseline", explain.ExplainSettings.perturbation_baseline
        ),
        help="explain.perturbation_baseline: what a removed voxel becomes",
    )
    ap.add_argument(
        "--split", type=float, nargs=3, default=(0.5, 0.2, 0.3), metavar=("TRAIN", "VAL", "TEST")
    )
    ap.add_argument(
        "--variants", nargs="+", default=["masked"], choices=list(paths.ABLATION_VARIANTS)
    )
    ap.add_argument("--device", default="auto")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--cohort-seed", type=int, default=42, help="the demo cohort's seed")
    ap.add_argument("--workdir", default=None, help="keep the cohort and outputs here")
    _results.add_argument(ap)
    args = ap.parse_args()
    bad = [m for m in args.methods if m not in explain.METHODS]
    if bad:
        ap.error(f"unknown methods {bad}; known: {explain.METHODS}")
    _results.start("faithfulness", args)
    torch.set_num_threads(args.threads)
    demo = DemoSettings(n_subjects=args.subjects, n_unlabeled=0, seed=args.cohort_seed)
    per: dict[str, dict[int, dict]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for variant in args.variants:
            root = Path(args.workdir or tmp) / variant
            root.mkdir(parents=True, exist_ok=True)
            t0 = time.perf_counter()
            cases = split(write_cohort(root, demo, args.threads, variant), tuple(args.split))
            cases_path = root / "manifests" / "cases.parquet"
            cases_path.parent.mkdir(parents=True, exist_ok=True)
            cases.to_parquet(cases_path)
            counts = cases.groupby(["split", "label"]).size().to_dict()
            print(
                f"cohort: {len(cases)} cases in {time.perf_counter() - t0:.0f} s; "
                f"(split, label) counts {counts}; variant {variant}; methods {args.methods}"
            )
            per[variant] = {s: run_seed(root, cases_path, s, args) for s in args.seeds}
    print(f"\nmean +- sd over seeds {args.seeds} (deletion/insertion over true positives)")
    keys = ("test_auc", "pointing_game", "pointing_game_in_roi", "cam_mass_over_chance")
    keys += ("deletion_auc", "random_deletion_auc", "insertion_auc", "random_insertion_auc")
    table: dict[str, dict[str, dict[str, str]]] = {}
    for variant, per_seed in per.items():
        table[variant] = {}
        for m in args.methods:
            row = {k: mean_sd([per_seed[s][m][k] for s in args.seeds]) for k in keys}
            table[variant][m] = row
            print(f"{variant:8s} {m:10s} " + ", ".join(f"{k} {v}" for k, v in row.items()))
    first = args.methods[0]
    ok = None
    if "masked" in per:
        pg = [per["masked"][s][first]["pointing_game"] for s in args.seeds]
        n_tp = [per["masked"][s][first]["n_true_positives"] for s in args.seeds]
        ok = all(p is not None and p >= TARGET_MASKED for p in pg)
        print(
            f"target pointing game >= {TARGET_MASKED} on every seed ({first}, masked): "
            f"{'met' if ok else 'NOT met'} ({pg}; true positives per seed {n_tp})"
        )
    print(json.dumps({"per_variant": per, "mean_sd": table, "target_met": ok}))
    _results.finish()


if __name__ == "__main__":
    main()

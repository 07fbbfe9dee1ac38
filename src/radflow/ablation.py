"""ablation: does the mask matter? The same cases, splits and seeds through three mask variants.

* ``masked``: the configured mask (ROI crop, background filled) -- the default run's input;
* ``unmasked``: the same crop, the CT around the organ kept (``mask.fill_background: false``);
* ``fullfov``: no crop, the whole volume resampled to ``mask.size`` (the ROI still known, so
  an ``roi`` channel and the CAM's share inside the ROI mean the same in every variant).

Each variant's manifest is the default manifest with its own mask outputs swapped in
(``variant_cases``): the splits are the default run's, case for case. The summary compares the
variants' test AUCs with a paired bootstrap (the same resampled cases for every variant) and
puts explain's faithfulness numbers beside them. Pure functions first; file I/O at the end.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from radflow import paths
from radflow.io import atomic_path, sha256_file, write_json, write_table

REFERENCE = "masked"
# variant -> what it changes in the configured mask settings
VARIANT_MASK: dict[str, dict[str, Any]] = {
    "masked": {},
    "unmasked": {"fill_background": False},
    "fullfov": {"crop": False, "fill_background": False},
}
assert tuple(VARIANT_MASK) == paths.ABLATION_VARIANTS


def variant_mask_settings(variant: str, mask: Mapping[str, Any]) -> dict[str, Any]:
    """The mask settings of ``variant`` from the configured ``mask`` section."""
    if variant not in VARIANT_MASK:
        raise ValueError(f"unknown ablation variant {variant!r}: one of {tuple(VARIANT_MASK)}")
    if not mask.get("enabled", True):
        raise ValueError("the mask ablation compares ROI masks: it needs mask.enabled true")
    return {**mask, **VARIANT_MASK[variant]}


# --------------------------------------------------------------------------- manifests


def variant_cases(
    cases: pd.DataFrame, variant: str, statuses: Mapping[str, Mapping[str, Any]], root: Path
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(cases, excluded): the default manifest's cases with ``variant``'s mask outputs.

    Split, fold, label and image stay the default's. A case whose variant mask failed or is
    unusable leaves this variant with its reason (the summary pairs on the cases all have).
    """
    from radflow import manifest

    rows, excluded = [], []
    for r in cases.to_dict("records"):
        st = statuses[r["case_id"]]
        if st.get("status", "ok") != "ok" or not st.get("usable"):
            excluded.append(
                {
                    "id": r["case_id"],
                    "subject_id": r["subject_id"],
                    "stage": st.get("stage", "mask"),
                    "reason_code": st.get("reason_code", "ROI"),
                    "reason": st.get("reason", ""),
                }
            )
            continue
        files = {
            "masked": paths.in_variant(paths.MASKED, variant).format(case=r["case_id"]),
            "roi": paths.in_variant(paths.ROI, variant).format(case=r["case_id"]),
        }
        r.update(files)
        r.update({f"sha256_{k}": sha256_file(root / v) for k, v in files.items()})
        for axis, n, s in zip("xyz", st["shape"], st["spacing_mm"], strict=True):
            r[f"masked_n{axis}"], r[f"masked_s{axis}_mm"] = n, s
        r["roi_volume_ml"] = st["roi_ml"]
        rows.append(r)
    out = pd.DataFrame(rows, columns=cases.columns)
    if out.empty:
        raise ValueError(f"ablation variant {variant}: no usable case (see its excluded.csv)")
    excl = pd.DataFrame(excluded, columns=manifest.EXCLUDED_COLUMNS)
    return manifest.validate(out), excl


# --------------------------------------------------------------------------- statistics


def _auc(labels: np.ndarray, scores: np.ndarray) -> float:
    from sklearn.metrics import roc_auc_score

    return float(roc_auc_score(labels, scores))


def paired_bootstrap(
    labels: Sequence[int],
    scores: Mapping[str, Sequence[float]],
    reference: str = REFERENCE,
    n_boot: int = 1000,
    seed: int = 0,
) -> dict[str, dict[str, Any]]:
    """Per variant: AUC with a 95% bootstrap CI, and the paired AUC difference vs ``reference``.

    Every resample draws the same cases for every variant (a paired bootstrap), so the
    difference's CI reflects the models, not which cases happened to be drawn. Resamples
    holding one class only are redrawn-free skipped (for all variants alike).
    """
    y = np.asarray(labels, dtype=int)
    s = {k: np.asarray(v, dtype=float) for k, v in scores.items()}
    if reference not in s:
        raise ValueError(f"the reference variant {reference!r} has no scores")
    if any(len(v) != len(y) for v in s.values()):
        raise ValueError("every variant needs a score for every case (paired)")
    if len(np.unique(y)) < 2:
        raise ValueError("the test cases hold one class only: no AUC")
    rng = np.random.default_rng(seed)
    boots: dict[str, list[float]] = {k: [] for k in s}
    for _ in range(n_boot):
        idx = rng.integers(0, len(y), len(y))
        if len(np.unique(y[idx])) < 2:
            continue
        for k, v in s.items():
            boots[k].append(_auc(y[idx], v[idx]))

    def ci(values: np.ndarray) -> list[float] | None:
        if not len(values):
            return None
        return [float(np.percentile(values, 2.5)), float(np.percentile(values, 97.5))]

    ref_boot = np.asarray(boots[reference])
    out: dict[str, dict[str, Any]] = {}
    for k, v in s.items():
        b = np.asarray(boots[k])
        res: dict[str, Any] = {"auc": _auc(y, v), "auc_95ci": ci(b), "n_boot": len(b)}
        if k != reference:
            d = b - ref_boot
            dci = ci(d)
            res["difference_vs_" + reference] = {
                "auc_difference": res["auc"] - _auc(y, s[reference]),
                "ci95": dci,
                "ci_excludes_zero": dci is not None and (dci[0] > 0 or dci[1] < 0),
                # two-sided bootstrap p: how often the resampled difference crosses zero
                "p_bootstrap": float(min(1.0, 2 * min((d <= 0).mean(), (d >= 0).mean())))
                if len(d)
                else None,
            }
        out[k] = res
    return out


def _mean(values: Sequence[float]) -> float | None:
    v = [float(x) for x in values if x is not None and not np.isnan(float(x))]
    return float(np.mean(v)) if v else None


def explanation_numbers(
    faithfulness: Mapping[str, Any] | None, case_infos: Sequence[Mapping[str, Any]]
) -> dict[str, Any]:
    """Pointing game, CAM mass in the lesion (and vs chance) and in the ROI, from explain's
    ``faithfulness.json`` and per-case JSONs (true positives with a known lesion)."""
    tps = [i for i in case_infos if i.get("group") == "TP"]
    out: dict[str, Any] = {
        "cam_mass_in_roi_tp": _mean([i.get("mass_in_roi") for i in tps]),
        "pointing_game": None,
        "pointing_game_in_roi": None,
        "cam_mass_in_lesion": None,
        "lesion_fraction_of_roi": None,
        "cam_mass_in_lesion_vs_chance": None,
    }
    if not faithfulness or not faithfulness.get("pointing_game", {}).get("n"):
        return out  # no lesion_reference (or no true positive with a lesion)
    pg = faithfulness["pointing_game"]
    mass = faithfulness["cam_mass_in_lesion"]["mean"]
    chance = faithfulness["lesion_fraction_of_roi"]["mean"]
    # explain's own per-case mean of mass / lesion share (the figure faithfulness.json, the
    # review page and the bench report); the ratio of the two means only for older files
    over = (faithfulness.get("cam_mass_over_chance") or {}).get("mean")
    if over is None and mass is not None and chance:
        over = mass / chance
    pr = faithfulness.get("pointing_game_in_roi")  # absent in faithfulness.json before it
    out.update(
        pointing_game={"hit_rate": pg["hit_rate"], "hits": pg["hits"], "n": pg["n"]},
        pointing_game_in_roi=None
        if not pr
        else {"hit_rate": pr["hit_rate"], "hits": pr["hits"], "n": pr["n"]},
        cam_mass_in_lesion=mass,
        lesion_fraction_of_roi=chance,
        cam_mass_in_lesion_vs_chance=over,
    )
    return out


def summarise(
    predictions: Mapping[str, pd.DataFrame],
    explained: Mapping[str, tuple[Mapping[str, Any] | None, Sequence[Mapping[str, Any]]]],
    n_boot: int = 1000,
    seed: int = 0,
) -> dict[str, Any]:
    """The ablation's summary from each variant's predictions and explain outputs."""
    if set(predictions) != set(paths.ABLATION_VARIANTS):
        raise ValueError(f"predictions of every variant needed: {paths.ABLATION_VARIANTS}")
    splits = {v: dict(zip(p["case_id"], p["split"], strict=True)) for v, p in predictions.items()}
    identical = all(s == splits[REFERENCE] for s in splits.values())
    tests = [set(p.loc[p["split"] == "test", "case_id"]) for p in predictions.values()]
    common = sorted(set.intersection(*tests))
    if not common:
        raise ValueError("the variants share no test case")
    table = {v: p.set_index("case_id").loc[common] for v, p in predictions.items()}
    labels = table[REFERENCE]["label"].to_numpy(int)
    for v, t in table.items():
        if not np.array_equal(t["label"].to_numpy(int), labels):
            raise ValueError(f"variant {v} has other labels than {REFERENCE} for the same cases")
    stats = paired_bootstrap(
        labels, {v: t["probability"].to_numpy() for v, t in table.items()}, REFERENCE, n_boot, seed
    )
    return {
        "reference": REFERENCE,
        "splits_identical": identical,
        "n_test": len(common),
        "n_test_positive": int(labels.sum()),
        "bootstrap": {"n": n_boot, "seed": seed, "paired": True},
        "variants": {
            v: {
                "mask": VARIANT_MASK[v],
                "n_cases": len(predictions[v]),
                **stats[v],
                **explanation_numbers(*explained[v]),
            }
            for v in paths.ABLATION_VARIANTS
        },
    }


# --------------------------------------------------------------------------- picture


def summary_png(summary: Mapping[str, Any], path: str | os.PathLike) -> None:
    """Test AUC with its 95% CI per variant, and the paired difference vs the reference."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(summary["variants"])
    rows = [summary["variants"][v] for v in names]
    fig, (a, b) = plt.subplots(1, 2, figsize=(9, 3.6))
    x = np.arange(len(names))
    auc = np.array([r["auc"] for r in rows])
    ci = [r["auc_95ci"] or [r["auc"], r["auc"]] for r in rows]
    err = np.array(
        [
            [m - c[0] for m, c in zip(auc, ci, strict=True)],
            [c[1] - m for m, c in zip(auc, ci, strict=True)],
        ]
    )
    a.errorbar(x, auc, yerr=np.clip(err, 0, None), fmt="o", capsize=6, color="tab:blue")
    a.axhline(0.5, color="grey", lw=0.8, ls="--")
    a.set_xticks(x, names)
    a.set_ylim(0, 1.05)
    a.set_ylabel("test AUC (95% CI)")
    a.set_title(f"test AUC, n={summary['n_test']}", fontsize=10)
    key = f"difference_vs_{summary['reference']}"
    others = [v for v in names if key in summary["variants"][v]]
    for i, v in enumerate(others):
        d = summary["variants"][v][key]
        lo, hi = d["ci95"] or [d["auc_difference"]] * 2
        b.errorbar(
            [i],
            [d["auc_difference"]],
            yerr=[[max(0, d["auc_difference"] - lo)], [max(0, hi - d["auc_difference"])]],
            fmt="o",
            capsize=6,
            color="tab:red" if d["ci_excludes_zero"] else "tab:grey",
        )
    b.axhline(0, color="black", lw=0.8)
    b.set_xticks(range(len(others)), [f"{v} - {summary['reference']}" for v in others])
    b.set_xlim(-0.5, len(others) - 0.5)
    b.set_ylabel("AUC difference (paired 95% CI)")
    b.set_title("paired bootstrap (red: CI excludes 0)", fontsize=10)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=110, format="png")
    plt.close(fig)


# --------------------------------------------------------------------------- entry points


def variant_manifest(
    cases_path: str | os.PathLike,
    variant: str,
    out_dir: str | os.PathLike,
    root: str | os.PathLike = ".",
) -> pd.DataFrame:
    """``variant``'s cases.csv/.parquet and excluded.csv from the default manifest."""
    from radflow import manifest

    root = Path(root)
    cases = manifest.read(cases_path)
    statuses = {
        c: json.loads(
            (root / paths.in_variant(paths.MASK_STATUS, variant).format(case=c)).read_text()
        )
        for c in cases["case_id"]
    }
    out, excl = variant_cases(cases, variant, statuses, root)
    out_dir = Path(out_dir)
    write_table(
        out, out_dir / Path(paths.CASES_CSV).name, str(out_dir / Path(paths.CASES_PARQUET).name)
    )
    write_table(excl, out_dir / Path(paths.EXCLUDED).name)
    return out


def ablation(
    root: str | os.PathLike = ".",
    out_json: str | os.PathLike = paths.ABLATION_SUMMARY,
    out_png: str | os.PathLike = paths.ABLATION_PNG,
    n_boot: int = 1000,
    seed: int = 0,
) -> dict[str, Any]:
    """Read every variant's predictions and explain outputs under ``root``; write the summary
    JSON and its picture."""
    root = Path(root)
    preds, explained = {}, {}
    for v in paths.ABLATION_VARIANTS:
        preds[v] = pd.read_csv(root / paths.in_variant(paths.PREDICTIONS, v))
        ex = root / paths.in_variant(paths.EXPLAIN_DIR, v)
        faith = ex / "faithfulness.json"
        infos = [json.loads(p.read_text()) for p in sorted(ex.glob("case-*.json"))]
        explained[v] = (json.loads(faith.read_text()) if faith.exists() else None, infos)
    summary = summarise(preds, explained, n_boot, seed)
    write_json(out_json, summary)
    summary_png(summary, out_png)
    return summary

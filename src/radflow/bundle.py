"""bundle: the trained model as a self-describing folder, ``results/model/``.

* ``weights.pt``: the network's state dict (``torch.load(weights_only=True)``);
* ``model.json``: everything inference needs and nothing it must guess -- architecture,
  channels, input grid, intensity rule and window, the ingest/convert/segment/mask settings the
  training cases were made with (``preprocessing``), class names, the decision threshold chosen
  on validation, the explain settings, radflow version, config hash, the training manifest's
  sha256 and cohort summary, evaluation metrics with CIs, faithfulness numbers, and the sha256
  of every other bundle file (``files``) plus of its own content (``model_json_sha256``);
* ``MODEL_CARD.md``: intended use, data, metrics, faithfulness, limitations.

``verify`` refuses, with one line saying why, a bundle that is missing, corrupt, tampered with
(a file that does not match its recorded sha256) or of another ``BUNDLE_FORMAT``.
``segmenter`` records which segmentation the training masks came from (backend settings and,
for TotalSegmentator, the sha256 of its weights as the segment groups recorded them);
``segmenter_mismatch`` says why other weights are not those, so predict refuses to run a model
on another segmenter's masks. ``preprocessing(config)`` is the one reading of which config keys
shape the model's input: the bundle records it, and predict compares a config against it
(``conflicts``).
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import radflow
from radflow.io import sha256_file, write_json, write_text
from radflow.source import InputSpec

# bumped whenever a reader of format N could misread a newer bundle (2: ``segmenter``, the
# segmentation weights' sha256, which a reader of format 1 would not check)
BUNDLE_FORMAT = 2
WEIGHTS = "weights.pt"
MODEL_JSON = "model.json"
MODEL_CARD = "MODEL_CARD.md"
CLASS_NAMES = ("negative", "positive")

# Keys of the preprocessing sections that change how a job runs, never what it makes.
RUNTIME_KEYS = {
    "ingest": ("threads",),
    "convert": ("threads",),
    # allow_phantom only guards the workflow's start: it does not change a mask
    "segment": ("threads", "batches", "device", "weights_dir", "precomputed", "allow_phantom"),
    "mask": ("threads",),
    "qc": ("reference",),  # the training cohort's reference masks
}


class BundleError(ValueError):
    """A bundle that cannot be used; the message is one line saying why."""


# --------------------------------------------------------------------------- preprocessing


def preprocessing(config: Mapping[str, Any]) -> dict[str, Any]:
    """The settings of a (workflow) config that shape a model's input: selection, convert,
    segment and mask, without the keys that only schedule work (``RUNTIME_KEYS``)."""

    def strip(name: str) -> dict[str, Any]:
        return {k: v for k, v in dict(config[name]).items() if k not in RUNTIME_KEYS[name]}

    ingest = strip("ingest")
    return {
        # how intensities are stored (HU for CT): a NIfTI cohort's volumes are read by it
        "input": {"modality": InputSpec.from_dict(config.get("input")).modality},
        "ingest": {"selection": ingest["selection"], "max_image_mb": ingest["max_image_mb"]},
        "convert": strip("convert"),
        "segment": strip("segment"),
        "mask": strip("mask"),
        # which masks are usable (plausibility ranges, implausible: exclude|flag)
        "qc": strip("qc"),
    }


def _flat(d: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(d, Mapping):
        out: dict[str, Any] = {}
        for k, v in d.items():
            out.update(_flat(v, f"{prefix}{k}."))
        return out
    return {prefix[:-1]: list(d) if isinstance(d, tuple) else d}


def recorded_preprocessing(recorded: Mapping[str, Any]) -> dict[str, Any]:
    """A bundle's preprocessing; a bundle from before NIfTI cohorts (no ``input``) was made
    from a DICOM CT cohort."""
    return {"input": {"modality": "CT"}, **recorded}


def conflicts(config: Mapping[str, Any], recorded: Mapping[str, Any]) -> list[str]:
    """Each preprocessing key where ``config`` differs from the bundle's ``recorded`` settings,
    as ``key: config X, bundle Y``."""
    recorded = recorded_preprocessing(recorded)
    # a section an older bundle did not record (qc) is not compared
    mine = _flat({k: v for k, v in preprocessing(config).items() if k in recorded})
    theirs = _flat(recorded)
    return [
        f"{k}: config {json.dumps(mine.get(k))}, bundle {json.dumps(theirs.get(k))}"
        for k in sorted(set(mine) | set(theirs))
        if mine.get(k) != theirs.get(k)
    ]


# --------------------------------------------------------------------------- segmenter


def segmenter(
    segment_settings: Mapping[str, Any],
    records: Sequence[str | os.PathLike],
    case_ids: Iterable[str],
) -> dict[str, Any]:
    """The identity of the segmentation the training masks (of ``case_ids``) came from: the
    backend's settings (preprocessing's ``segment``) and, for TotalSegmentator, the sha256 of
    every weights file per model folder as the segment group ``records`` covering those cases
    recorded it (``weights_sha256``: read, never hashed again). Precomputed masks and backend
    none record ``weights_sha256`` None. Masks from more than one set of weights are refused."""
    settings = dict(segment_settings)
    backend = settings.get("backend")
    out: dict[str, Any] = {"backend": backend, "settings": settings, "weights_sha256": None}
    if backend != "totalsegmentator":
        return out
    wanted = set(case_ids)
    seen: dict[str, list[str]] = {}  # the digests (canonical JSON) -> the groups that used them
    for path in records:
        rec = json.loads(Path(path).read_text())
        if wanted & set(rec.get("cases") or {}):
            key = json.dumps(rec.get("weights_sha256") or {}, sort_keys=True)
            seen.setdefault(key, []).append(Path(path).stem)
    if not seen:
        raise BundleError(
            "no segmentation group record (results/seg/groups) covers the training cases: "
            "the segmentation weights their masks came from are unknown"
        )
    if len(seen) > 1:
        groups = "; ".join(", ".join(sorted(g)[:3]) for g in seen.values())
        raise BundleError(
            f"the training masks came from {len(seen)} different sets of segmentation weights "
            f"(groups {groups}): resegment with one (snakemake --forcerun segment_all)"
        )
    digests = json.loads(next(iter(seen)))
    if not digests:
        raise BundleError(
            "the segmentation group records of the training cases hold no weights sha256: "
            "resegment them with this radflow (snakemake --forcerun segment_all)"
        )
    out["weights_sha256"] = digests
    return out


def segmenter_mismatch(
    recorded: Mapping[str, Any] | None,
    used: Mapping[str, Mapping[str, str]] | None,
    where: str,
) -> str:
    """Why the segmentation weights ``used`` (per model folder, file -> sha256, as
    ``segment.model_digests`` or a group record gives them; empty or None: no weights, the
    precomputed or none backend) in folder ``where`` are not those the bundle's masks came
    from (``recorded``: model.json's ``segmenter``), in one line; "" when they are."""
    if recorded is None:
        return "the model bundle records no segmenter (segmentation weights): re-export it"
    want = recorded.get("weights_sha256") or {}
    used = used or {}
    backend = recorded.get("backend")
    if not want:
        if used:
            return (
                f"the model's training masks were not made with segmentation weights (segment."
                f"backend {backend}), but predict segments with the weights in {where}"
            )
        return ""
    if not used:
        return (
            f"the model's training masks came from TotalSegmentator weights "
            f"({', '.join(sorted(want))}), but predict makes its masks without them"
        )
    lead = "segmentation weights differ from the bundle's (a model runs on its segmenter's masks)"
    for folder in sorted(set(want) | set(used)):
        mine, theirs = used.get(folder), want.get(folder)
        if theirs is None:
            return f"{lead}: {where}/{folder} is not a model folder the training masks came from"
        if mine is None:
            return f"{lead}: {where} has no {folder}, which the training masks came from"
        for name in sorted(set(mine) | set(theirs)):
            if mine.get(name) != theirs.get(name):
                return (
                    f"{lead}: {where}/{folder}/{name} has sha256 {mine.get(name) or '(no file)'}"
                    f", the bundle's {theirs.get(name) or '(no file)'}"
                )
    return ""


# --------------------------------------------------------------------------- writing


def _self_hash(meta: Mapping[str, Any]) -> str:
    body = {k: v for k, v in meta.items() if k != "model_json_sha256"}
    text = json.dumps(body, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(text.encode()).hexdigest()


def _grid(cases: Any) -> dict[str, Any]:
    """The masked volumes' grid (shape and spacing) the model was trained on."""
    shapes = cases[["masked_nx", "masked_ny", "masked_nz"]].drop_duplicates().to_numpy().tolist()
    spacing = cases[["masked_sx_mm", "masked_sy_mm", "masked_sz_mm"]].median().round(4).tolist()
    return {
        "shape": shapes[0] if len(shapes) == 1 else None,
        "shapes_seen": shapes,
        "median_spacing_mm": spacing,
        "layout": "stored (C, X, Y, Z) RAS int16; network input float (B, C, Z, Y, X)",
    }


def _cohort(cases: Any) -> dict[str, Any]:
    by = cases.groupby(["split", "label"]).size()
    return {
        "n_cases": int(len(cases)),
        "n_subjects": int(cases["subject_id"].nunique()),
        "by_split_and_label": {f"{s}/{lab}": int(n) for (s, lab), n in by.items()},
        "manufacturers": sorted(str(m) for m in cases["manufacturer"].dropna().unique()),
        "kernels": sorted(str(k) for k in cases["kernel"].dropna().unique()),
    }


def bundle(
    checkpoint: str | os.PathLike,
    metrics: str | os.PathLike,
    manifest_path: str | os.PathLike,
    out_dir: str | os.PathLike,
    preprocessing_settings: Mapping[str, Any],
    explain_settings: Mapping[str, Any],
    faithfulness: str | os.PathLike | None = None,
    segment_weights_dir: str | None = None,
    segment_records: Sequence[str | os.PathLike] = (),
) -> dict[str, Any]:
    """Write the bundle of a trained, evaluated model; returns its ``model.json`` content.

    ``segment_records``: the segment group records (``results/seg/groups/*.json``) of the
    training cases, whose weights digests become the bundle's ``segmenter`` (``segmenter``).

    ``model.json`` is written last: it holds the other files' hashes, so a bundle whose
    writing was interrupted is refused by ``verify`` rather than half-trusted.
    """
    import torch

    from radflow import manifest
    from radflow.inputs import InputSpec
    from radflow.model import save_atomic

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    ck = torch.load(checkpoint, map_location="cpu", weights_only=True)
    spec = InputSpec.from_checkpoint(ck)
    save_atomic(out / WEIGHTS, ck["model"])
    m = json.loads(Path(metrics).read_text())
    cases = manifest.read(manifest_path)
    hashes = cases["config_hash"].unique().tolist()
    seg = segmenter(preprocessing_settings["segment"], segment_records, cases["case_id"])
    faith = None
    if faithfulness is not None and Path(faithfulness).exists():
        f = json.loads(Path(faithfulness).read_text())
        faith = {k: v for k, v in f.items() if k != "per_case"}
    meta: dict[str, Any] = {
        "bundle_format": BUNDLE_FORMAT,
        "radflow_version": radflow.__version__,
        "torch_version": torch.__version__,
        "architecture": ck["arch"],
        "n_classes": int(ck["n_classes"]),
        "class_names": list(CLASS_NAMES[: int(ck["n_classes"])]),
        "positive_class": 1,
        "checkpoint_epoch": int(ck["epoch"]),
        "checkpoint_val_auc": float(ck["val_auc"]),
        "training_settings": json.loads(ck.get("settings") or "{}"),
        "inputs": spec.to_checkpoint(),
        "input_grid": _grid(cases),
        "preprocessing": dict(preprocessing_settings),
        "segment_weights_dir": segment_weights_dir,
        "segmenter": seg,
        "explain": dict(explain_settings),
        "threshold": float(m["threshold"]),
        "threshold_source": m.get("threshold_source", "validation split (Youden's J)"),
        "metrics": {"test": m.get("test"), "validation": m.get("validation")},
        "faithfulness": faith,
        "config_hash": hashes[0] if len(hashes) == 1 else hashes,
        "training_manifest_sha256": sha256_file(manifest_path),
        "cohort": _cohort(cases),
    }
    write_text(out / MODEL_CARD, model_card(meta))
    meta["files"] = {name: sha256_file(out / name) for name in (WEIGHTS, MODEL_CARD)}
    meta["model_json_sha256"] = _self_hash(meta)
    write_json(out / MODEL_JSON, meta)
    return meta


def _fmt(v: Any, digits: int = 3) -> str:
    return "n/a" if v is None or (isinstance(v, float) and v != v) else f"{v:.{digits}f}"


def _weights(seg: Mapping[str, Any]) -> str:
    """The segmentation weights of the card: model folders and a short digest of each file."""
    digests = seg.get("weights_sha256")
    if not digests:
        return "none (masks not made by radflow's segmentation)"
    return "; ".join(
        f"`{folder}` ({', '.join(f'{n} {d[:12]}' for n, d in sorted(files.items()))})"
        for folder, files in sorted(digests.items())
    )


def model_card(meta: Mapping[str, Any]) -> str:
    """MODEL_CARD.md: intended use, data, metrics, faithfulness, limitations."""
    test = meta["metrics"].get("test") or {}
    ci = test.get("auc_95ci") or [None, None]
    pre = meta["preprocessing"]
    faith = meta.get("faithfulness") or {}
    pg = faith.get("pointing_game") or {}
    rand = ((faith.get("randomised_model_correlation") or {}).get("pearson") or {}).get("mean")
    split = ", ".join(f"{k}: {v}" for k, v in meta["cohort"]["by_split_and_label"].items())
    return f"""# Model card: radflow {meta["architecture"]} classifier

## Intended use
Research use only: a binary classifier ({" / ".join(meta["class_names"])}) of CT volumes made
by radflow's preprocessing, to study and explain it. Not a medical device; not for diagnosis.
Apply it only through `radflow predict` / `snakemake predict_all`, which re-create the input
exactly as recorded in `model.json` (`preprocessing`).

## Data
- training cohort: {meta["cohort"]["n_cases"]} cases of {meta["cohort"]["n_subjects"]} subjects
  (split/label: {split})
- scanners: {", ".join(meta["cohort"]["manufacturers"]) or "n/a"}; kernels:
  {", ".join(meta["cohort"]["kernels"]) or "n/a"}
- training manifest sha256: `{meta["training_manifest_sha256"]}`; config hash
  `{meta["config_hash"]}`
- input: channels {meta["inputs"]["channels"]}, intensity rule
  `{meta["inputs"]["intensity_rule"]}` window {meta["inputs"]["hu_window"]} HU, grid
  {meta["input_grid"]["shape"]} at {meta["input_grid"]["median_spacing_mm"]} mm; ROI
  {pre["mask"].get("rois")}, convert spacing {pre["convert"].get("spacing_mm")} mm,
  segmentation {pre["segment"].get("backend")} task {pre["segment"].get("task")}, weights
  {_weights(meta["segmenter"])}

## Metrics (held-out test split)
- AUC {_fmt(test.get("auc"))} (95% bootstrap CI {_fmt(ci[0])}-{_fmt(ci[1])}), n = {test.get("n")}
- at the threshold {_fmt(meta["threshold"])} ({meta["threshold_source"]}): sensitivity
  {_fmt(test.get("sensitivity"))}, specificity {_fmt(test.get("specificity"))}, balanced accuracy
  {_fmt(test.get("balanced_accuracy"))}

## Faithfulness of the Grad-CAM explanations
- method {meta["explain"].get("method")} at `{meta["explain"].get("target_layer")}`
- pointing game (true positives with a lesion mask): {pg.get("hits", "n/a")}/{pg.get("n", "n/a")}
  (hit rate {_fmt(pg.get("hit_rate"))})
- mean Pearson r of trained vs randomised-model CAM: {_fmt(rand)} (should be low)

## Limitations
- Trained on {meta["cohort"]["n_cases"]} cases: the CI above is wide on a small test split;
  expect lower performance on scanners, kernels and populations not listed under Data.
- A study is refused, not guessed at, when its series fails selection, conversion,
  segmentation or mask QC (the reason is recorded per case).
- The threshold was chosen on the validation split; recalibrate it for a new population.
"""


# --------------------------------------------------------------------------- reading


def verify(bundle_dir: str | os.PathLike) -> dict[str, Any]:
    """``model.json`` of a bundle that is complete, untampered and of this format, else a
    ``BundleError`` with one line saying why."""
    d = Path(bundle_dir)
    path = d / MODEL_JSON
    if not path.is_file():
        raise BundleError(
            f"no model bundle at {d}: {MODEL_JSON} is missing "
            "(run `snakemake model` after training, or set predict.model)"
        )
    try:
        meta = json.loads(path.read_text())
        if not isinstance(meta, dict):
            raise ValueError("not an object")
    except (ValueError, UnicodeDecodeError) as exc:
        raise BundleError(
            f"corrupt model bundle {d}: {MODEL_JSON} is not valid JSON ({exc})"
        ) from None
    fmt = meta.get("bundle_format")
    if fmt != BUNDLE_FORMAT:
        raise BundleError(
            f"incompatible model bundle {d}: bundle format {fmt!r} (radflow "
            f"{meta.get('radflow_version', '?')}); radflow {radflow.__version__} reads format "
            f"{BUNDLE_FORMAT}: re-export the bundle with this radflow"
        )
    if meta.get("model_json_sha256") != _self_hash(meta):
        raise BundleError(f"tampered model bundle {d}: {MODEL_JSON} does not match its sha256")
    for name, digest in (meta.get("files") or {}).items():
        f = d / name
        if not f.is_file():
            raise BundleError(f"incomplete model bundle {d}: {name} is missing")
        if sha256_file(f) != digest:
            raise BundleError(f"tampered model bundle {d}: {name} does not match its sha256")
    if WEIGHTS not in (meta.get("files") or {}):
        raise BundleError(f"corrupt model bundle {d}: {MODEL_JSON} records no {WEIGHTS}")
    return meta


def load(bundle_dir: str | os.PathLike, device: Any = "cpu") -> tuple[Any, dict[str, Any], dict]:
    """(model in eval mode on ``device``, checkpoint-like metadata, model.json) of a verified
    bundle. The checkpoint-like dict has the keys ``model.load_checkpoint`` gives (``arch``,
    ``channels``, ``hu_window``, ``intensity_rule``, ``n_classes``, ``epoch``), so explain's
    functions take it as they take a checkpoint's."""
    import torch

    from radflow.model import build_model

    meta = verify(bundle_dir)
    ck = {
        "arch": meta["architecture"],
        **meta["inputs"],
        "n_classes": meta["n_classes"],
        "epoch": meta["checkpoint_epoch"],
    }
    try:
        state = torch.load(Path(bundle_dir) / WEIGHTS, map_location=device, weights_only=True)
        model = build_model(ck["arch"], len(ck["channels"]), ck["n_classes"], "none")
        model.load_state_dict(state)
    except Exception as exc:  # noqa: BLE001 - a hash-valid but unloadable file: say so in a line
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise BundleError(
            f"corrupt model bundle {bundle_dir}: {WEIGHTS} does not load ({first})"
        ) from None
    return model.to(device).eval(), ck, meta

"""The ``radflow`` command: one subcommand per workflow stage (the rules call these).

Each subcommand's parser sits beside its handler. A handler turns arguments into the stage's
settings and calls the stage's entry point (``radflow.<stage>.<stage>()``); it holds no logic
and restates no default (settings come as JSON from the workflow; the dataclasses' defaults are
the schema's, ``workflow/schemas/config.schema.yaml``).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from collections.abc import Callable, Sequence

import radflow

EXIT_REFUSED = 3
SALT_ENV = "RADFLOW_SALT"

Sub = "argparse._SubParsersAction[argparse.ArgumentParser]"
COMMANDS: list[Callable] = []


def command(add: Callable) -> Callable:
    """Register a function that adds one subcommand's parser."""
    COMMANDS.append(add)
    return add


def _json_arg(text: str) -> dict:
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        raise argparse.ArgumentTypeError(f"not valid JSON: {exc}") from exc
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError("expected a JSON object")
    return value


def _threads(n: int) -> int:
    """Bound numeric libraries to the job's threads (Snakemake gives us ``threads``)."""
    n = max(1, int(n))
    for var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ.setdefault(var, str(n))
    return n


def _salt(value: str | None) -> str:
    """``--salt``, else the environment (the workflow passes it there: never on a command
    line, which Snakemake records in .snakemake/ and SLURM prints in its logs)."""
    salt = value or os.environ.get(SALT_ENV, "")
    if not salt:
        raise ValueError(f"no pseudonym salt: give --salt or set {SALT_ENV} (ids.salt)")
    return salt


_MAX_MB = (
    "config ingest.max_image_mb: most MB of pixel data one file, or one series as int16, may "
    "claim; more is refused before reading (default: the schema's)"
)


def _budget(args: argparse.Namespace) -> dict:
    return {} if args.max_image_mb is None else {"max_image_mb": args.max_image_mb}


_INPUT = (
    "config input as JSON: format dicom|nifti, modality CT|MR|other, volume_index "
    '(default: dicom, or nifti for a .csv sheet / a .nii(.gz) volume), e.g. {"format": "nifti"}'
)


def _input(args: argparse.Namespace, path: str):  # noqa: ANN202 - radflow.source.InputSpec
    from radflow.source import InputSpec

    return InputSpec.resolve(args.input, path)


def _settings(p: argparse.ArgumentParser, what: str) -> None:
    p.add_argument(
        "--settings", type=_json_arg, default={}, help=f"{what} settings as JSON (config key)"
    )


def _threads_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--threads", type=int, default=1, help="threads the job may use")


# --------------------------------------------------------------------------- demo


@command
def _add_demo_data(sub: Sub) -> None:
    d = sub.add_parser("demo-data", help="write the synthetic demo DICOM cohort")
    d.add_argument("out_dir")
    _settings(d, "demo cohort (radflow.demo.DemoSettings fields)")
    _threads_arg(d)
    d.set_defaults(func=cmd_demo_data)


def cmd_demo_data(args: argparse.Namespace) -> int:
    """Write the synthetic demo cohort."""
    from radflow.demo import DemoSettings, make_cohort

    settings = DemoSettings(**args.settings)
    out = make_cohort(args.out_dir, settings, workers=_threads(args.threads))
    print(f"demo cohort written to {out} ({settings.n_subjects} subjects)")
    return 0


@command
def _add_train_phantom_model(sub: Sub) -> None:
    t = sub.add_parser("train-phantom-model", help="train the shipped phantom nnU-Net model")
    t.add_argument("out_dir")
    _settings(t, "phantom training (radflow.demo.phantom_model.train keyword arguments)")
    _threads_arg(t)
    t.set_defaults(func=cmd_train_phantom_model)


def cmd_train_phantom_model(args: argparse.Namespace) -> int:
    """Train the phantom nnU-Net model shipped under resources/."""
    from radflow.demo import phantom_model

    dice = phantom_model.train(args.out_dir, threads=_threads(args.threads), **args.settings)
    print(f"validation Dice: {dice}")
    return 0


# --------------------------------------------------------------------------- ingest


@command
def _add_ingest(sub: Sub) -> None:
    i = sub.add_parser("ingest", help="index a raw DICOM tree (or a NIfTI sheet) and select")
    i.add_argument("raw_dir", help="the raw DICOM tree, or the NIfTI cohort sheet (--input)")
    i.add_argument("--input", type=_json_arg, default={}, help=_INPUT)
    i.add_argument("out_dir", help="inventory folder (series.csv/.parquet, rejected_files.csv)")
    i.add_argument("--private-dir", required=True, help="where raw identifiers may be written")
    i.add_argument("--selection", type=_json_arg, default={}, help="selection rules as JSON")
    i.add_argument("--labels", type=_json_arg, default={}, help="labels settings as JSON")
    i.add_argument("--salt", default=None, help=f"pseudonym key (default: ${SALT_ENV})")
    i.add_argument("--max-image-mb", type=float, default=None, help=_MAX_MB)
    _threads_arg(i)
    i.set_defaults(func=cmd_ingest)


def cmd_ingest(args: argparse.Namespace) -> int:
    """Index a raw DICOM tree and select one series per study."""
    from radflow import ingest
    from radflow.labels import LabelSpec

    inv = ingest.ingest(
        args.raw_dir,
        args.out_dir,
        args.private_dir,
        ingest.SelectionRules.from_dict(args.selection),
        LabelSpec.from_dict(args.labels),
        _salt(args.salt),
        threads=_threads(args.threads),
        source=_input(args, args.raw_dir),
        **_budget(args),
    )
    print(ingest.summary(inv))
    return 0


# --------------------------------------------------------------------------- convert


@command
def _add_convert(sub: Sub) -> None:
    c = sub.add_parser("convert", help="convert one DICOM series (or NIfTI volume) to NIfTI")
    c.add_argument("source", help="series folder, a .json/.txt list of its files, or a .nii.gz")
    c.add_argument("--input", type=_json_arg, default={}, help=_INPUT)
    c.add_argument("out", help="output .nii.gz")
    c.add_argument("--sidecar", default=None, help="JSON sidecar path (default beside OUT)")
    _settings(c, "convert")
    c.add_argument("--case-id", default="")
    c.add_argument("--series-id", default="", help="pseudonymous series id")
    c.add_argument("--inventory", default=None, help="or: series.csv to read it from")
    c.add_argument("--salt", default=None, help="or: key to hash the source series UID with")
    c.add_argument("--series-uid", default=None, help="pick one series from a mixed folder")
    c.add_argument("--max-image-mb", type=float, default=None, help=_MAX_MB)
    c.add_argument(
        "--record-failure",
        action="store_true",
        help="a series that cannot be converted gets a failed record as its sidecar and the "
        "command succeeds (the workflow: the case fails alone)",
    )
    _threads_arg(c)
    c.set_defaults(func=cmd_convert)


def cmd_convert(args: argparse.Namespace) -> int:
    """Convert one series to RAS+ int16 NIfTI with a sidecar."""
    from radflow import convert, ids, paths, status

    settings = convert.ConvertSettings.from_dict(args.settings)
    series_id = args.series_id
    if args.inventory and not series_id:
        series_id = ids.series_id_of(args.inventory, args.case_id)
    sidecar = args.sidecar or paths.sidecar_of(args.out)
    threads = _threads(args.threads)
    if args.record_failure:
        sc = convert.convert_case(
            args.source,
            args.out,
            settings,
            sidecar,
            args.case_id,
            series_id,
            threads,
            input_spec=_input(args, args.source),
            **_budget(args),
        )
        if sc.get("status") == "failed":
            print(f"radflow convert: refused [{sc['reason_code']}] {sc['reason']}", file=sys.stderr)
            return 0
    else:
        try:
            sc = convert.convert(
                args.source,
                args.out,
                settings,
                sidecar_path=sidecar,
                case_id=args.case_id,
                series_id=series_id,
                salt=args.salt or os.environ.get(SALT_ENV, ""),
                series_uid=args.series_uid,
                threads=threads,
                input_spec=_input(args, args.source),
                **_budget(args),
            )
        except status.CaseFailedError as exc:
            print(f"radflow convert: refused {exc}", file=sys.stderr)
            return EXIT_REFUSED
    g = sc["geometry"]
    print(
        f"wrote {args.out}: shape {g['shape']} spacing {g['spacing_mm']} mm "
        f"{g['orientation']} resampled={g['resampled']} in {sc['qc']['seconds']} s"
    )
    return 0


# --------------------------------------------------------------------------- segment


@command
def _add_segment(sub: Sub) -> None:
    s = sub.add_parser(
        "segment",
        help="organ label maps for a group of images in one process (TotalSegmentator)",
    )
    s.add_argument(
        "inputs",
        nargs="+",
        help="each case's convert sidecar results/nifti/{case}.json (a failed conversion is "
        "carried over) or its image .nii.gz",
    )
    s.add_argument("--seg-dir", required=True, help="folder for {case}.nii.gz and {case}.json")
    s.add_argument("--record", required=True, help="the group's record (JSON), written last")
    _settings(s, "segment")
    s.add_argument("--precomputed", default=None, help="mask path template (backend precomputed)")
    s.add_argument("--id-map", default=None, help="private id map to fill templates from")
    _threads_arg(s)
    s.set_defaults(func=cmd_segment)


def cmd_segment(args: argparse.Namespace) -> int:
    """Segment a group of images (a failed case fails alone)."""
    from radflow import segment

    settings = segment.SegmentSettings.from_dict(args.settings)
    try:
        rec = segment.segment(
            args.inputs,
            args.seg_dir,
            args.record,
            settings,
            threads=_threads(args.threads),
            precomputed=args.precomputed,
            id_map=args.id_map,
        )
    except segment.WeightsMissingError as exc:
        print(f"radflow segment: error: {exc}", file=sys.stderr)
        return 2
    print(f"segmented {rec['n_ok']} of {len(rec['cases'])} cases in {rec['seconds']} s")
    return 0


# --------------------------------------------------------------------------- mask


@command
def _add_mask(sub: Sub) -> None:
    m = sub.add_parser("mask", help="mask, crop and resample one case, with QC")
    m.add_argument("image")
    m.add_argument("seg", help="label map, or 'none' (segment.backend none, mask.enabled false)")
    m.add_argument("out", help="masked volume .nii.gz (int16)")
    m.add_argument("--roi-out", required=True, help="ROI mask on the masked grid (uint8)")
    m.add_argument("--status", required=True, help="status JSON (usable, reason, ROI volume)")
    m.add_argument("--names", default=None, help="label-name JSON of SEG (default beside it)")
    _settings(m, "mask")
    m.add_argument("--qc", default=None, help="tri-planar QC picture (PNG)")
    m.add_argument(
        "--qc-settings",
        type=_json_arg,
        default={},
        help="plausibility settings as JSON (config key qc: ranges, severity)",
    )
    m.add_argument("--seg-qc", default=None, help="per-ROI volume/Dice table (CSV)")
    m.add_argument("--reference", default=None, help="reference label map for Dice/IoU")
    m.add_argument("--reference-template", default=None, help="or its path template")
    m.add_argument("--id-map", default=None, help="private id map to fill the template from")
    m.add_argument("--reference-names", default=None, help="its label-name JSON")
    m.add_argument("--case-id", default="")
    m.add_argument(
        "--upstream", nargs="*", default=[], help="records of earlier stages (failures carry)"
    )
    _threads_arg(m)
    m.set_defaults(func=cmd_mask)


def cmd_mask(args: argparse.Namespace) -> int:
    """Mask, crop and resample one case; QC picture and segmentation table."""
    from radflow import mask, plausibility

    reference = args.reference or mask.reference_for(
        args.case_id, args.reference_template, args.id_map
    )
    status = mask.mask(
        args.image,
        None if args.seg == "none" else args.seg,
        args.out,
        mask.MaskSettings.from_dict(args.settings),
        args.roi_out,
        args.status,
        names_path=args.names,
        threads=_threads(args.threads),
        qc_png=args.qc,
        seg_qc=args.seg_qc,
        reference=reference,
        reference_names=args.reference_names,
        case_id=args.case_id,
        upstream=args.upstream,
        qc=plausibility.QcSettings.from_dict(args.qc_settings),
    )
    if status.get("status") == "failed":
        print(f"{args.case_id}: {status['stage']} failed: {status['reason']}")
        return 0
    state = "usable" if status["usable"] else f"excluded: {status['reason']}"
    if status["usable"] and status["flags"]:
        state += f" (flagged: {', '.join(status['flags'])})"
    print(f"wrote {args.out}: shape {status['shape']}, ROI {status['roi_ml']:.1f} mL, {state}")
    return 0


@command
def _add_qc_table(sub: Sub) -> None:
    q = sub.add_parser("qc-table", help="concatenate per-case segmentation QC tables")
    q.add_argument("out")
    q.add_argument("inputs", nargs="*")
    q.set_defaults(func=cmd_qc_table)


def cmd_qc_table(args: argparse.Namespace) -> int:
    """The cohort's segmentation QC table."""
    from radflow import qc

    df = qc.concat_seg_qc(args.inputs, args.out)
    print(f"{len(df)} rows ({df['case_id'].nunique()} cases) in {args.out}")
    return 0


# --------------------------------------------------------------------------- manifest


@command
def _add_manifest(sub: Sub) -> None:
    mf = sub.add_parser("manifest", help="write manifests/ (cases, exclusions, splits)")
    mf.add_argument("inventory", help="results/inventory/series.parquet")
    mf.add_argument("out_dir", help="manifests folder")
    mf.add_argument("--root", default=".", help="project folder the case paths are relative to")
    _settings(mf, "manifest")
    mf.add_argument("--config-hash", default="unknown-config", help="hash of the workflow config")
    mf.add_argument("--labels", type=_json_arg, default={}, help="labels settings as JSON")
    mf.add_argument("--id-map", default=None, help="private id map (raw keys for the labels)")
    mf.set_defaults(func=cmd_manifest)


def cmd_manifest(args: argparse.Namespace) -> int:
    """Write manifests/ from the inventory and the per-case records."""
    from radflow import manifest
    from radflow.labels import LabelSpec

    cases = manifest.manifest(
        args.inventory,
        args.root,
        args.out_dir,
        manifest.SplitSettings(**args.settings),
        args.config_hash,
        LabelSpec.from_dict(args.labels),
        args.id_map,
    )
    print(f"{len(cases)} cases in {cases['subject_id'].nunique()} subjects")
    print(manifest.summary(cases))
    return 0


# --------------------------------------------------------------------------- train


@command
def _add_train(sub: Sub) -> None:
    tr = sub.add_parser("train", help="fine-tune a 3D ResNet on the manifest")
    tr.add_argument("manifest", help="manifests/cases.parquet")
    tr.add_argument("out_dir", help="checkpoint folder (best.pt, last.pt, history.csv)")
    tr.add_argument("--root", default=".", help="project folder the manifest paths are under")
    _settings(tr, "train")
    _threads_arg(tr)
    tr.set_defaults(func=cmd_train)


def cmd_train(args: argparse.Namespace) -> int:
    """Fine-tune a 3D ResNet on a manifest (resumes from OUT_DIR/last.pt)."""
    from radflow import train

    settings = train.TrainSettings.from_dict(args.settings)
    summary = train.train(
        args.manifest, args.out_dir, settings, root=args.root, threads=_threads(args.threads)
    )
    print(json.dumps(summary))
    return 0


@command
def _add_cv_summary(sub: Sub) -> None:
    cv = sub.add_parser("cv-summary", help="mean +- sd of per-fold validation AUC")
    cv.add_argument("out")
    cv.add_argument("histories", nargs="+")
    cv.set_defaults(func=cmd_cv_summary)


def cmd_cv_summary(args: argparse.Namespace) -> int:
    """Per-fold best validation AUC and mean +- sd across folds."""
    from radflow import evaluate

    s = evaluate.cv_summary(args.histories, args.out)
    print(
        f"validation AUC {s['val_auc_mean']:.3f} +- {s['val_auc_sd']:.3f} "
        f"over {len(s['folds'])} folds"
    )
    return 0


# --------------------------------------------------------------------------- ablation


@command
def _add_ablation_manifest(sub: Sub) -> None:
    a = sub.add_parser(
        "ablation-manifest", help="a mask variant's manifest: the default cases, its masks"
    )
    a.add_argument("cases", help="the default manifests/cases.parquet (its splits are kept)")
    a.add_argument("variant", help="masked, unmasked or fullfov")
    a.add_argument("out_dir", help="the variant's manifests folder")
    a.add_argument("--root", default=".")
    a.set_defaults(func=cmd_ablation_manifest)


def cmd_ablation_manifest(args: argparse.Namespace) -> int:
    """The default manifest's cases with the variant's mask outputs swapped in."""
    from radflow import ablation

    cases = ablation.variant_manifest(args.cases, args.variant, args.out_dir, args.root)
    print(f"{args.variant}: {len(cases)} cases")
    return 0


@command
def _add_ablation(sub: Sub) -> None:
    a = sub.add_parser("ablation", help="summary of the mask ablation (paired bootstrap)")
    a.add_argument("out_json")
    a.add_argument("out_png")
    a.add_argument("--root", default=".")
    a.add_argument("--bootstrap", type=int, required=True, help="resamples (evaluate.bootstrap)")
    a.add_argument("--seed", type=int, required=True, help="seed of the resamples")
    a.set_defaults(func=cmd_ablation)


def cmd_ablation(args: argparse.Namespace) -> int:
    """Per-variant test AUC, paired AUC differences and faithfulness numbers."""
    from radflow import ablation

    s = ablation.ablation(args.root, args.out_json, args.out_png, args.bootstrap, args.seed)
    for name, v in s["variants"].items():
        print(f"{name}: test AUC {v['auc']:.3f} (95% CI {v['auc_95ci']})")
    return 0


# --------------------------------------------------------------------------- evaluate


@command
def _add_evaluate(sub: Sub) -> None:
    ev = sub.add_parser("evaluate", help="predictions and metrics of a checkpoint")
    ev.add_argument("checkpoint")
    ev.add_argument("manifest")
    ev.add_argument("out_dir")
    ev.add_argument("--root", default=".")
    ev.add_argument("--history", default=None, help="history.csv for the training curves")
    _settings(ev, "evaluate")
    ev.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    _threads_arg(ev)
    ev.set_defaults(func=cmd_evaluate)


def cmd_evaluate(args: argparse.Namespace) -> int:
    """Predictions and metrics (threshold from validation, applied to test)."""
    from radflow import evaluate

    res = evaluate.evaluate(
        args.checkpoint,
        args.manifest,
        args.out_dir,
        root=args.root,
        history=args.history,
        device=args.device,
        threads=_threads(args.threads),
        **args.settings,
    )
    t = res["test"]
    print(
        f"test AUC {t['auc']:.3f} (95% CI {t['auc_95ci']}), sensitivity {t['sensitivity']:.3f}, "
        f"specificity {t['specificity']:.3f} at threshold {res['threshold']:.3f} (from validation)"
    )
    return 0


# --------------------------------------------------------------------------- explain


@command
def _add_explain(sub: Sub) -> None:
    x = sub.add_parser("explain", help="Grad-CAM of the cases of some splits + review page")
    x.add_argument("checkpoint", help="results/train/best.pt")
    x.add_argument("manifest", help="manifests/cases.parquet")
    x.add_argument("out_dir", help="results/explain")
    x.add_argument("--predictions", required=True, help="results/eval/predictions.csv")
    x.add_argument("--metrics", default=None, help="results/eval/metrics.json (threshold)")
    x.add_argument("--splits", nargs="+", required=True, help="manifest splits to explain")
    x.add_argument("--root", default=".", help="project folder the manifest paths are under")
    x.add_argument("--lesion-template", default=None, help="lesion mask path template")
    x.add_argument("--id-map", default=None, help="private id map (template keys)")
    x.add_argument(
        "--fill-hu",
        type=float,
        required=True,
        help="the mask stage's background fill (mask.background_hu): a removed voxel's HU",
    )
    _settings(x, "explain")
    _threads_arg(x)
    x.set_defaults(func=cmd_explain)


def cmd_explain(args: argparse.Namespace) -> int:
    """Grad-CAM of the cases of some splits: volumes, pictures, numbers, review page."""
    from radflow import explain

    s = explain.explain(
        args.checkpoint,
        args.manifest,
        args.out_dir,
        args.predictions,
        explain.ExplainSettings.from_dict(args.settings),
        splits=args.splits,
        metrics=args.metrics,
        root=args.root,
        lesion_template=args.lesion_template,
        id_map=args.id_map,
        threads=_threads(args.threads),
        fill_hu=args.fill_hu,
    )
    pg = s["pointing_game"]
    rate = "n/a" if pg["hit_rate"] is None else f"{pg['hit_rate']:.2f}"
    dele = s["deletion_auc"]["all_cases"]["mean"]
    rand = s["random_deletion_auc"]["all_cases"]["mean"]
    print(
        f"{s['n_cases']} cases explained ({s['method']}); pointing game {pg['hits']}/{pg['n']} "
        f"true positives (hit rate {rate}); deletion AUC {dele} (random order {rand}); "
        f"r(trained, random CAM) mean {s['randomised_model_correlation']['pearson']['mean']}"
    )
    return 0


@command
def _add_explain_report(sub: Sub) -> None:
    xr = sub.add_parser("explain-report", help="faithfulness summary and review page")
    xr.add_argument("out_dir")
    xr.add_argument("case_jsons", nargs="*", help="per-case explain JSON files")
    xr.add_argument("--root", default=".")
    xr.add_argument("--metrics", default=None)
    xr.add_argument("--lesion-template", default=None, help="lesion mask path template")
    xr.add_argument("--id-map", default=None, help="private id map (template keys)")
    xr.set_defaults(func=cmd_explain_report)


def cmd_explain_report(args: argparse.Namespace) -> int:
    """Faithfulness summary and the offline review page over the explained cases."""
    from radflow import explain

    ids = [os.path.basename(p).removesuffix(".json") for p in args.case_jsons]
    lesions = explain.lesion_paths(ids, args.lesion_template, args.id_map, args.root)
    s = explain.report(
        args.case_jsons, args.out_dir, root=args.root, metrics=args.metrics, lesions=lesions
    )
    pg = s["pointing_game"]
    print(
        f"pointing game {pg['hits']}/{pg['n']} true positives; {s['n_cases']} cases in the viewer"
    )
    return 0


# --------------------------------------------------------------------------- bundle, predict


@command
def _add_bundle(sub: Sub) -> None:
    b = sub.add_parser("bundle", help="write the model bundle (results/model)")
    b.add_argument("checkpoint", help="results/train/best.pt")
    b.add_argument("metrics", help="results/eval/metrics.json (threshold, metrics)")
    b.add_argument("manifest", help="manifests/cases.parquet (the training cohort)")
    b.add_argument("out_dir", help="results/model")
    b.add_argument(
        "--preprocessing", type=_json_arg, required=True, help="preprocessing settings (JSON)"
    )
    b.add_argument("--explain", type=_json_arg, default={}, help="explain settings as JSON")
    b.add_argument("--faithfulness", default=None, help="results/explain/faithfulness.json")
    b.add_argument("--segment-weights", default=None, help="segmentation weights folder used")
    b.add_argument(
        "--segment-records",
        nargs="*",
        default=[],
        help="segment group records of the training cases (results/seg/groups/*.json)",
    )
    b.set_defaults(func=cmd_bundle)


def cmd_bundle(args: argparse.Namespace) -> int:
    """Write the self-describing model bundle."""
    from radflow import bundle

    meta = bundle.bundle(
        args.checkpoint,
        args.metrics,
        args.manifest,
        args.out_dir,
        args.preprocessing,
        args.explain,
        args.faithfulness,
        args.segment_weights,
        args.segment_records,
    )
    thr = meta["threshold"]
    print(f"model bundle written to {args.out_dir}: {meta['architecture']}, threshold {thr:.3f}")
    return 0


@command
def _add_predict(sub: Sub) -> None:
    p = sub.add_parser(
        "predict", help="one study (a DICOM folder or a NIfTI volume) through a model bundle"
    )
    p.add_argument("bundle", help="model bundle folder (results/model)")
    p.add_argument("input", help="one study: a DICOM folder or a .nii/.nii.gz volume")
    p.add_argument("--out", required=True, help="folder for prediction.json and cam.nii.gz")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    p.add_argument(
        "--segment-weights", default=None, help="segmentation weights (default: the bundle's)"
    )
    _threads_arg(p)
    p.set_defaults(func=cmd_predict)


def cmd_predict(args: argparse.Namespace) -> int:
    """One study: probability, prediction at the bundle's threshold, CAM on its grid."""
    from radflow import predict
    from radflow.status import CaseFailedError

    try:
        r = predict.predict_study(
            args.bundle,
            args.input,
            args.out,
            args.device,
            _threads(args.threads),
            args.segment_weights,
        )
    except CaseFailedError as exc:
        print(f"radflow predict: refused {exc}", file=sys.stderr)
        return EXIT_REFUSED
    p, thr = r["probability"], r["threshold"]
    print(f"probability {p:.6f} prediction {r['prediction']} (threshold {thr:.3f})")
    return 0


@command
def _add_predict_config(sub: Sub) -> None:
    p = sub.add_parser("predict-config", help="the predict cohort's config from a bundle")
    p.add_argument("bundle", help="model bundle folder's model.json or the folder")
    p.add_argument("out", help="results/private/predict/config/config.yaml")
    p.add_argument("--config", type=_json_arg, required=True, help="project config (JSON, no salt)")
    p.add_argument("--salt", default=None, help=f"pseudonym key (default: ${SALT_ENV})")
    p.add_argument("--segment-weights", default=None, help="segmentation weights folder")
    p.set_defaults(func=cmd_predict_config)


def cmd_predict_config(args: argparse.Namespace) -> int:
    """Check the project's config against the bundle and write the predict cohort's config."""
    from pathlib import Path

    from radflow import predict

    bundle = Path(args.bundle)
    bundle = bundle.parent if bundle.name == "model.json" else bundle
    salt = _salt(args.salt)
    predict.write_cohort_config(bundle, args.out, args.config, salt, args.segment_weights)
    print(f"predict cohort config written to {args.out}")
    return 0


@command
def _add_predict_cohort(sub: Sub) -> None:
    p = sub.add_parser("predict-cohort", help="predict and explain a predict cohort's cases")
    p.add_argument("bundle", help="model bundle folder (results/model)")
    p.add_argument("work", help="the predict cohort's project folder (results/private/predict)")
    p.add_argument("out_dir", help="results/predict")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    p.add_argument("--bootstrap", type=int, default=1000, help="AUC bootstrap resamples")
    _threads_arg(p)
    p.set_defaults(func=cmd_predict_cohort)


def cmd_predict_cohort(args: argparse.Namespace) -> int:
    """predictions.csv, excluded.csv, metrics.json and the review page of a predict cohort."""
    from radflow import predict

    r = predict.predict(
        args.bundle, args.work, args.out_dir, args.device, _threads(args.threads), args.bootstrap
    )
    ev = r["external_validation"]
    auc = "n/a (no labels)" if ev is None else f"{ev['auc']:.3f}"
    print(f"{r['n_cases']} cases predicted, {r['n_excluded']} excluded; AUC {auc}")
    return 0


@command
def _add_export_onnx(sub: Sub) -> None:
    p = sub.add_parser(
        "export-onnx", help="a model bundle's network as ONNX, for serving (radflow[onnx])"
    )
    p.add_argument("bundle", help="model bundle folder (results/model)")
    p.add_argument("out", help="the ONNX file to write (e.g. model.onnx)")
    p.set_defaults(func=cmd_export_onnx)


def cmd_export_onnx(args: argparse.Namespace) -> int:
    """Export a verified bundle's network to ONNX, its model.json hash in the metadata."""
    from radflow.export import export_onnx

    info = export_onnx(args.bundle, args.out)
    print(f"ONNX model written to {args.out} (bundle {info['radflow_model_json_sha256'][:12]})")
    return 0


# --------------------------------------------------------------------------- entry


def build_parser() -> argparse.ArgumentParser:
    """The argument parser with every subcommand."""
    p = argparse.ArgumentParser(prog="radflow", description=__doc__)
    p.add_argument("--version", action="version", version=f"radflow {radflow.__version__}")
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = p.add_subparsers(dest="command", required=True)
    for add in COMMANDS:
        add(sub)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``radflow`` command."""
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.WARNING,
        format="%(levelname)s %(name)s: %(message)s",
    )
    try:
        return int(args.func(args) or 0)
    except (FileNotFoundError, ValueError) as exc:
        print(f"radflow {args.command}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())

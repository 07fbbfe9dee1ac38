"""The ``radflow`` command: one subcommand per workflow stage (rules call these)."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from collections.abc import Sequence

import radflow

EXIT_REFUSED = 3


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


def cmd_demo_data(args: argparse.Namespace) -> int:
    """Write the synthetic demo cohort."""
    from radflow.demo import DemoSettings, make_cohort

    settings = DemoSettings(
        n_subjects=args.subjects,
        n_unlabeled=args.unlabeled,
        seed=args.seed,
        matrix=args.matrix,
        lesion_radius_mm=args.lesion_radius_mm,
        lesion_contrast_hu=args.lesion_contrast_hu,
    )
    out = make_cohort(args.out_dir, settings, workers=_threads(args.threads))
    print(f"demo cohort written to {out} ({settings.n_subjects} subjects)")
    return 0


def cmd_ingest(args: argparse.Namespace) -> int:
    """Index a raw DICOM tree and select one series per study."""
    from radflow import ingest

    rules = ingest.SelectionRules.from_dict(args.selection)
    labels = ingest.LabelSpec(path=args.labels, key=args.label_key, column=args.label_column)
    inv = ingest.run(
        args.raw_dir,
        args.out_dir,
        args.private_dir,
        rules,
        labels,
        args.salt,
        threads=_threads(args.threads),
    )
    n_sel = int(inv["selected"].sum())
    print(
        f"{len(inv)} series in {inv['study_id'].nunique()} studies of "
        f"{inv['subject_id'].nunique()} subjects; {n_sel} selected as cases"
    )
    print(inv.groupby("reason_code").size().to_string())
    return 0


def cmd_convert(args: argparse.Namespace) -> int:
    """Convert one series to RAS+ int16 NIfTI with a sidecar."""
    from radflow import convert, ids

    settings = convert.ConvertSettings.from_dict(args.settings)
    series_id = args.series_id
    if args.inventory and not series_id:
        series_id = ids.series_id_of(args.inventory, args.case_id)
    try:
        sc = convert.convert(
            args.source,
            args.out,
            settings,
            sidecar_path=args.sidecar,
            case_id=args.case_id,
            series_id=series_id,
            salt=args.salt,
            series_uid=args.series_uid,
            threads=_threads(args.threads),
        )
    except convert.ConversionRefusedError as exc:
        print(f"radflow convert: refused {exc}", file=sys.stderr)
        return EXIT_REFUSED
    g = sc["geometry"]
    print(
        f"wrote {args.out}: shape {g['shape']} spacing {g['spacing_mm']} mm "
        f"{g['orientation']} resampled={g['resampled']} in {sc['qc']['seconds']} s"
    )
    return 0


def cmd_segment(args: argparse.Namespace) -> int:
    """Segment one image (TotalSegmentator offline, or a precomputed mask)."""
    from radflow import segment

    settings = segment.SegmentSettings.from_dict(args.settings)
    try:
        info = segment.run(
            args.image,
            args.out,
            settings,
            names_path=args.names,
            precomputed=args.precomputed,
            threads=_threads(args.threads),
        )
    except segment.WeightsMissingError as exc:
        print(f"radflow segment: error: {exc}", file=sys.stderr)
        return 2
    print(f"wrote {args.out}: {len(info['present'])} labels present in {info['seconds']} s")
    return 0


def cmd_segment_batch(args: argparse.Namespace) -> int:
    """Segment many images in one process (segment.batches)."""
    from radflow import segment

    settings = segment.SegmentSettings.from_dict(args.settings)
    try:
        s = segment.run_batch(args.images, args.out_dir, settings, threads=_threads(args.threads))
    except segment.WeightsMissingError as exc:
        print(f"radflow segment-batch: error: {exc}", file=sys.stderr)
        return 2
    print(
        f"segmented {len(s['segmented'])} of {s['cases']} images in {s['seconds']} s"
        + (f"; failed: {', '.join(sorted(s['failed']))}" if s["failed"] else "")
    )
    return 0


def cmd_mask(args: argparse.Namespace) -> int:
    """Mask, crop and resample one case; QC picture and segmentation table."""
    from radflow import mask

    settings = mask.MaskSettings.from_dict(args.settings)
    if args.batch_dir:  # segment.batches: the label map comes out of its batch's folder first
        from radflow import segment

        names = args.names or mask.names_path_of(args.seg)
        try:
            segment.collect(args.batch_dir, args.case_id, args.seg, names)
        except (RuntimeError, FileNotFoundError) as exc:
            print(f"radflow mask: error: {exc}", file=sys.stderr)
            return 1
    status = mask.run(
        args.image,
        args.seg,
        args.out,
        settings,
        args.roi_out,
        args.status,
        names_path=args.names,
        threads=_threads(args.threads),
        qc_png=args.qc,
        seg_qc=args.seg_qc,
        reference=args.reference,
        reference_names=args.reference_names,
        case_id=args.case_id,
    )
    state = "usable" if status["usable"] else f"excluded: {status['reason']}"
    print(f"wrote {args.out}: shape {status['shape']}, ROI {status['roi_ml']:.1f} mL, {state}")
    return 0


def cmd_qc_table(args: argparse.Namespace) -> int:
    """Concatenate per-case segmentation QC tables."""
    import pandas as pd

    from radflow.io import write_table

    frames = [pd.read_csv(p) for p in args.inputs]
    df = pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()
    write_table(df, args.out)
    if "dice" in df and df["dice"].notna().any():
        print(df.groupby("roi")[["volume_ml", "dice", "iou"]].describe().T.to_string())
    return 0


def cmd_manifest(args: argparse.Namespace) -> int:
    """Write manifests/ from the inventory and the per-case outputs."""
    from radflow import manifest
    from radflow.ingest import LabelSpec

    s = manifest.SplitSettings(**args.settings)
    labels = LabelSpec(path=args.labels, key=args.label_key, column=args.label_column)
    cases = manifest.run(
        args.inventory, args.root, args.out_dir, s, args.config_hash, labels, args.id_map
    )
    print(f"{len(cases)} cases in {cases['subject_id'].nunique()} subjects")
    print(manifest.summary(cases))
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    """Fine-tune a 3D ResNet on a manifest (resumes from OUT_DIR/last.pt)."""
    from radflow import train

    settings = train.TrainSettings.from_dict(args.settings)
    summary = train.train(
        args.manifest, args.out_dir, settings, root=args.root, threads=_threads(args.threads)
    )
    print(json.dumps(summary))
    return 0


def cmd_cv_summary(args: argparse.Namespace) -> int:
    """Per-fold best validation AUC and mean +- sd across folds."""
    import pandas as pd

    from radflow.io import write_json

    folds = []
    for path in args.histories:
        h = pd.read_csv(path)
        best = h.loc[h["val_auc"].idxmax()] if h["val_auc"].notna().any() else h.iloc[-1]
        folds.append(
            {"history": path, "best_epoch": int(best["epoch"]), "val_auc": float(best["val_auc"])}
        )
    aucs = [f["val_auc"] for f in folds]
    summary = {
        "folds": folds,
        "val_auc_mean": float(pd.Series(aucs).mean()),
        "val_auc_sd": float(pd.Series(aucs).std(ddof=1)) if len(aucs) > 1 else 0.0,
    }
    write_json(args.out, summary)
    print(
        f"validation AUC {summary['val_auc_mean']:.3f} +- {summary['val_auc_sd']:.3f} "
        f"over {len(folds)} folds"
    )
    return 0


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
        n_boot=args.bootstrap,
    )
    t = res["test"]
    print(
        f"test AUC {t['auc']:.3f} (95% CI {t['auc_95ci']}), sensitivity {t['sensitivity']:.3f}, "
        f"specificity {t['specificity']:.3f} at threshold {res['threshold']:.3f} (from validation)"
    )
    return 0


def cmd_explain(args: argparse.Namespace) -> int:
    """Grad-CAM of the cases of some splits: volumes, pictures, numbers, review page."""
    from radflow import explain

    settings = explain.ExplainSettings.from_dict(args.settings)
    s = explain.explain(
        args.checkpoint,
        args.manifest,
        args.out_dir,
        args.predictions,
        settings,
        splits=args.splits,
        metrics=args.metrics,
        root=args.root,
        lesion_template=args.lesion_template,
        id_map=args.id_map,
        threads=_threads(args.threads),
    )
    pg = s["pointing_game"]
    rate = "n/a" if pg["hit_rate"] is None else f"{pg['hit_rate']:.2f}"
    print(
        f"{s['n_cases']} cases explained; pointing game {pg['hits']}/{pg['n']} true positives "
        f"(hit rate {rate}); r(trained, random CAM) mean "
        f"{s['randomised_model_correlation']['pearson']['mean']}"
    )
    return 0


def cmd_explain_report(args: argparse.Namespace) -> int:
    """Faithfulness summary and the offline review page over the explained cases."""
    from radflow import explain

    s = explain.report(args.case_jsons, args.out_dir, root=args.root, metrics=args.metrics)
    pg = s["pointing_game"]
    print(
        f"pointing game {pg['hits']}/{pg['n']} true positives; {s['n_cases']} cases in the viewer"
    )
    return 0


def cmd_train_phantom_model(args: argparse.Namespace) -> int:
    """Train the phantom nnU-Net model shipped under resources/."""
    from radflow import phantom_model

    dice = phantom_model.train(
        args.out_dir,
        iterations=args.iterations,
        n_train=args.n_train,
        n_val=args.n_val,
        seed=args.seed,
        threads=_threads(args.threads),
    )
    print(f"validation Dice: {dice}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    """The argument parser with every subcommand."""
    p = argparse.ArgumentParser(prog="radflow", description=__doc__)
    p.add_argument("--version", action="version", version=f"radflow {radflow.__version__}")
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = p.add_subparsers(dest="command", required=True)

    d = sub.add_parser("demo-data", help="write the synthetic demo DICOM cohort")
    d.add_argument("out_dir")
    d.add_argument("--subjects", type=int, default=25)
    d.add_argument("--unlabeled", type=int, default=1, help="subjects left out of the labels sheet")
    d.add_argument("--seed", type=int, default=42)
    d.add_argument("--matrix", type=int, default=96, help="in-plane matrix of the image series")
    d.add_argument("--lesion-radius-mm", type=float, default=16.0)
    d.add_argument("--lesion-contrast-hu", type=float, default=-80.0)
    d.add_argument("--threads", type=int, default=1)
    d.set_defaults(func=cmd_demo_data)

    i = sub.add_parser("ingest", help="index a raw DICOM tree and select series")
    i.add_argument("raw_dir")
    i.add_argument("out_dir", help="inventory folder (series.csv/.parquet, rejected_files.csv)")
    i.add_argument("--private-dir", required=True, help="where raw identifiers may be written")
    i.add_argument("--labels", default=None, help="labels sheet (CSV)")
    i.add_argument("--label-key", default="PatientID")
    i.add_argument("--label-column", default="label")
    i.add_argument("--selection", type=_json_arg, default={}, help="selection rules as JSON")
    i.add_argument("--salt", required=True, help="key for the pseudonym hashes (ids.salt)")
    i.add_argument("--threads", type=int, default=1)
    i.set_defaults(func=cmd_ingest)

    c = sub.add_parser("convert", help="convert one DICOM series to NIfTI")
    c.add_argument("source", help="series folder, or a .txt list of its files")
    c.add_argument("out", help="output .nii.gz")
    c.add_argument("--sidecar", default=None, help="JSON sidecar path (default beside OUT)")
    c.add_argument("--settings", type=_json_arg, default={}, help="convert settings as JSON")
    c.add_argument("--case-id", default="")
    c.add_argument("--series-id", default="", help="pseudonymous series id (from the inventory)")
    c.add_argument(
        "--inventory",
        default=None,
        help="or: the inventory (series.csv) to read --case-id's series id from",
    )
    c.add_argument("--salt", default="", help="or: key to hash the source series UID with")
    c.add_argument("--series-uid", default=None, help="pick one series from a mixed folder")
    c.add_argument("--threads", type=int, default=1)
    c.set_defaults(func=cmd_convert)

    s = sub.add_parser("segment", help="organ label map for one image (TotalSegmentator)")
    s.add_argument("image")
    s.add_argument("out", help="label map .nii.gz (uint8, on the image grid)")
    s.add_argument("--names", default=None, help="label-name JSON (default beside OUT)")
    s.add_argument("--settings", type=_json_arg, default={}, help="segment settings as JSON")
    s.add_argument("--precomputed", default=None, help="user mask (backend: precomputed)")
    s.add_argument("--threads", type=int, default=1)
    s.set_defaults(func=cmd_segment)

    sb = sub.add_parser(
        "segment-batch", help="segment many images in one process (TotalSegmentator loads once)"
    )
    sb.add_argument("images", nargs="+", help="converted images results/nifti/{case}.nii.gz")
    sb.add_argument("--out-dir", required=True, help="folder for {case}.nii.gz and {case}.json")
    sb.add_argument("--settings", type=_json_arg, default={}, help="segment settings as JSON")
    sb.add_argument("--threads", type=int, default=1)
    sb.set_defaults(func=cmd_segment_batch)

    m = sub.add_parser("mask", help="mask, crop and resample one case, with QC")
    m.add_argument("image")
    m.add_argument("seg")
    m.add_argument("out", help="masked volume .nii.gz (int16)")
    m.add_argument("--roi-out", required=True, help="ROI mask on the masked grid (uint8)")
    m.add_argument("--status", required=True, help="status JSON (usable, reason, ROI volume)")
    m.add_argument("--names", default=None, help="label-name JSON of SEG (default beside it)")
    m.add_argument("--settings", type=_json_arg, default={}, help="mask settings as JSON")
    m.add_argument("--qc", default=None, help="tri-planar QC picture (PNG)")
    m.add_argument("--seg-qc", default=None, help="per-ROI volume/Dice table (CSV)")
    m.add_argument("--reference", default=None, help="reference label map for Dice/IoU")
    m.add_argument("--reference-names", default=None, help="its label-name JSON")
    m.add_argument("--case-id", default="")
    m.add_argument(
        "--batch-dir",
        default=None,
        help="segmentation batch folder: copy the case's label map (and names) out of it to "
        "SEG first, or fail with the error the batch recorded for the case (needs --case-id)",
    )
    m.add_argument("--threads", type=int, default=1)
    m.set_defaults(func=cmd_mask)

    q = sub.add_parser("qc-table", help="concatenate per-case segmentation QC tables")
    q.add_argument("out")
    q.add_argument("inputs", nargs="*")
    q.set_defaults(func=cmd_qc_table)

    mf = sub.add_parser("manifest", help="write manifests/ (cases, exclusions, splits)")
    mf.add_argument("inventory", help="results/inventory/series.parquet")
    mf.add_argument("out_dir", help="manifests folder")
    mf.add_argument("--root", default=".", help="project folder the case paths are relative to")
    mf.add_argument("--settings", type=_json_arg, default={}, help="split settings as JSON")
    mf.add_argument("--config-hash", default="unknown-config", help="hash of the workflow config")
    mf.add_argument("--labels", default=None, help="labels sheet (CSV), joined here")
    mf.add_argument("--label-key", default="PatientID")
    mf.add_argument("--label-column", default="label")
    mf.add_argument("--id-map", default=None, help="results/private/id_map.csv (raw keys)")
    mf.set_defaults(func=cmd_manifest)

    tr = sub.add_parser("train", help="fine-tune a 3D ResNet on the manifest")
    tr.add_argument("manifest", help="manifests/cases.parquet")
    tr.add_argument("out_dir", help="checkpoint folder (best.pt, last.pt, history.csv)")
    tr.add_argument("--root", default=".", help="project folder the manifest paths are under")
    tr.add_argument("--settings", type=_json_arg, default={}, help="train settings as JSON")
    tr.add_argument("--threads", type=int, default=1)
    tr.set_defaults(func=cmd_train)

    cv = sub.add_parser("cv-summary", help="mean +- sd of per-fold validation AUC")
    cv.add_argument("out")
    cv.add_argument("histories", nargs="+")
    cv.set_defaults(func=cmd_cv_summary)

    ev = sub.add_parser("evaluate", help="predictions and metrics of a checkpoint")
    ev.add_argument("checkpoint")
    ev.add_argument("manifest")
    ev.add_argument("out_dir")
    ev.add_argument("--root", default=".")
    ev.add_argument("--history", default=None, help="history.csv for the training curves")
    ev.add_argument("--device", default="auto")
    ev.add_argument("--bootstrap", type=int, default=1000, help="bootstrap resamples for the CI")
    ev.add_argument("--threads", type=int, default=1)
    ev.set_defaults(func=cmd_evaluate)

    x = sub.add_parser("explain", help="Grad-CAM of the cases of some splits + review page")
    x.add_argument("checkpoint", help="results/train/best.pt")
    x.add_argument("manifest", help="manifests/cases.parquet")
    x.add_argument("out_dir", help="results/explain")
    x.add_argument("--predictions", required=True, help="results/eval/predictions.csv")
    x.add_argument("--metrics", default=None, help="results/eval/metrics.json (threshold)")
    x.add_argument("--splits", nargs="+", default=["val", "test"])
    x.add_argument("--root", default=".", help="project folder the manifest paths are under")
    x.add_argument("--lesion-template", default=None, help="lesion mask path template")
    x.add_argument("--id-map", default=None, help="results/private/id_map.csv (template keys)")
    x.add_argument("--settings", type=_json_arg, default={}, help="explain settings as JSON")
    x.add_argument("--threads", type=int, default=1)
    x.set_defaults(func=cmd_explain)

    xr = sub.add_parser("explain-report", help="faithfulness summary and review page")
    xr.add_argument("out_dir")
    xr.add_argument("case_jsons", nargs="*", help="per-case explain JSON files")
    xr.add_argument("--root", default=".")
    xr.add_argument("--metrics", default=None)
    xr.set_defaults(func=cmd_explain_report)

    t = sub.add_parser("train-phantom-model", help="train the shipped phantom nnU-Net model")
    t.add_argument("out_dir")
    t.add_argument("--iterations", type=int, default=1200)
    t.add_argument("--n-train", type=int, default=24)
    t.add_argument("--n-val", type=int, default=4)
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--threads", type=int, default=2)
    t.set_defaults(func=cmd_train_phantom_model)
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

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
    from radflow import convert

    settings = convert.ConvertSettings.from_dict(args.settings)
    try:
        sc = convert.convert(
            args.source,
            args.out,
            settings,
            sidecar_path=args.sidecar,
            case_id=args.case_id,
            series_id=args.series_id,
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
    d.add_argument("--lesion-radius-mm", type=float, default=12.0)
    d.add_argument("--lesion-contrast-hu", type=float, default=-60.0)
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
    c.add_argument("--salt", default="", help="or: key to hash the source series UID with")
    c.add_argument("--series-uid", default=None, help="pick one series from a mixed folder")
    c.add_argument("--threads", type=int, default=1)
    c.set_defaults(func=cmd_convert)
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

"""Benchmark: radflow convert vs dcm2niix on one 512x512x300 axial CT series.

Both tools turn the same DICOM folder into a gzipped NIfTI in the same run; each run is a fresh
process, so peak RSS is that process's own. Prints the median wall time of each, the ratio and
the peak RSS relative to the int16 volume. With ``--geometry``, radflow alone converts three
series of the same size in the same run instead: a regular one, the same slices at irregular
steps (resampled along the stack) and the regular one as one enhanced multi-frame object, and
prints each one's ratio to the regular series (target <= 1.5). Usage:

    python bench/convert_speed.py [--repeats 3] [--threads 1] [--workdir /tmp/radflow-bench]
    python bench/convert_speed.py --geometry [--rows 512 --slices 300]
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

import nibabel as nib
import numpy as np

import _results
from radflow.demo import VENDORS, Phantom, SeriesSpec, StudySpec, SubjectSpec, write_series
from radflow.demo.enhanced import write_enhanced

# irregular steps (mm) averaging 1.0 with 1.25 mm slices, so every gap is covered
IRREGULAR_STEPS = (0.8, 1.2, 0.9, 1.1, 1.0, 0.85, 1.15)

MEASURE = (
    "import resource, subprocess, sys, time\n"
    "t = time.perf_counter()\n"
    "p = subprocess.run(sys.argv[1:], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)\n"
    "rc = p.returncode\n"
    "dt = time.perf_counter() - t\n"
    "print(dt, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024, rc)\n"
)


def make_series(folder: Path, rows: int, slices: int, irregular: bool = False) -> list[Path]:
    if folder.exists() and len(list(folder.iterdir())) == slices:
        return sorted(folder.iterdir())
    shutil.rmtree(folder, ignore_errors=True)
    offsets = None
    if irregular:
        steps = np.resize(np.array(IRREGULAR_STEPS), slices - 1)
        offsets = np.concatenate([[0.0], np.cumsum(steps)])
        offsets = tuple(np.round(offsets - offsets.mean(), 3))
    spec = SeriesSpec(
        number=2,
        description="bench",
        kernel="B30f",
        rows=rows,
        cols=rows,
        pixel_spacing=(0.78, 0.78),
        thickness=1.25 if irregular else 1.0,
        n_slices=slices,
        center=(0.0, 0.0, -50.0),
        intercept=-1024.0,
        noise_hu=12.0,
        offsets_mm=offsets,
    )
    subj = SubjectSpec(0, "BENCH", "BENCH^CASE", "19700101", "O", 0, True, Phantom())
    study = StudySpec(0, "ACC0", "20200101", VENDORS[0], (spec,))
    return write_series(
        folder,
        Phantom(),
        spec,
        subj,
        study,
        "1.2.826.0.1.3680043.8.498.1",
        "1.2.826.0.1.3680043.8.498.1.2",
        1,
    )


def timed(cmd: list[str]) -> tuple[float, int]:
    out = subprocess.run(
        [sys.executable, "-c", MEASURE, *cmd], capture_output=True, text=True, check=True
    )
    dt, rss, rc = out.stdout.split()
    if rc != "0":
        raise RuntimeError(f"{cmd[0]} failed: {out.stderr[-2000:]}")
    return float(dt), int(rss)


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--rows", type=int, default=512)
    ap.add_argument("--slices", type=int, default=300)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1, help="radflow convert --threads")
    ap.add_argument("--workdir", default="/tmp/radflow-bench")
    ap.add_argument(
        "--dicom2nifti", action="store_true", help="also time dicom2nifti.dicom_series_to_nifti"
    )
    ap.add_argument(
        "--geometry",
        action="store_true",
        help="time irregular spacing and enhanced multi-frame against a regular series",
    )
    _results.add_argument(ap)
    args = ap.parse_args()
    _results.start("convert_speed", args)
    if args.geometry:
        geometry_bench(args)
        return

    work = Path(args.workdir)
    series = work / "series"
    t = time.perf_counter()
    make_series(series, args.rows, args.slices)
    print(
        f"series: {args.rows}x{args.rows}x{args.slices} in {series} "
        f"(made in {time.perf_counter() - t:.1f} s)"
    )
    bin_dir = Path(sys.executable).parent
    out_dir = work / "out"
    shutil.rmtree(out_dir, ignore_errors=True)
    out_dir.mkdir(parents=True)
    tools = {
        "radflow": [
            str(bin_dir / "radflow"),
            "convert",
            str(series),
            str(out_dir / "radflow.nii.gz"),
            "--settings",
            json.dumps({"spacing_mm": None}),
            "--threads",
            str(args.threads),
        ],
        "dcm2niix": [
            str(bin_dir / "dcm2niix"),
            "-z",
            "y",
            "-f",
            "dcm2niix",
            "-o",
            str(out_dir),
            str(series),
        ],
    }
    if args.dicom2nifti:
        code = (
            "import sys, dicom2nifti; "
            "dicom2nifti.dicom_series_to_nifti(sys.argv[1], sys.argv[2], reorient_nifti=True)"
        )
        tools["dicom2nifti"] = [
            sys.executable,
            "-c",
            code,
            str(series),
            str(out_dir / "d2n.nii.gz"),
        ]
    results: dict[str, list[tuple[float, int]]] = {k: [] for k in tools}
    for _ in range(args.repeats):  # interleaved, so drift affects every tool alike
        for name, cmd in tools.items():
            results[name].append(timed(cmd))
    vol_bytes = args.rows * args.rows * args.slices * 2
    print(
        f"int16 volume: {vol_bytes / 2**20:.0f} MiB; repeats: {args.repeats}; "
        f"radflow threads: {args.threads}"
    )
    med = {}
    for name, runs in results.items():
        med[name] = statistics.median(r[0] for r in runs)
        rss = max(r[1] for r in runs)
        print(
            f"{name:12s} median {med[name]:6.2f} s   peak RSS {rss / 2**20:7.0f} MiB "
            f"({rss / vol_bytes:.2f}x volume)"
        )
    print(
        f"ratio radflow / dcm2niix wall time: {med['radflow'] / med['dcm2niix']:.2f} "
        "(target <= 1.0)"
    )
    a = nib.load(out_dir / "radflow.nii.gz")
    b = nib.load(out_dir / "dcm2niix.nii.gz")
    ca, cb = nib.as_closest_canonical(a), nib.as_closest_canonical(b)  # compare in world space
    same_vox = np.array_equal(np.asarray(ca.dataobj), np.asarray(cb.dataobj))
    max_mm = np.abs(ca.affine - cb.affine).max()
    print(
        f"radflow: {a.get_data_dtype()} {''.join(nib.aff2axcodes(a.affine))}; dcm2niix: "
        f"{b.get_data_dtype()} {''.join(nib.aff2axcodes(b.affine))}; in RAS: identical voxels "
        f"{same_vox}, affines differ by at most {max_mm:.4f} mm"
    )
    for name in tools:
        f = out_dir / f"{'d2n' if name == 'dicom2nifti' else name}.nii.gz"
        print(f"{name:12s} file {f.stat().st_size / 2**20:6.1f} MiB")


def radflow_cmd(source: Path, out: Path, threads: int) -> list[str]:
    return [
        str(Path(sys.executable).parent / "radflow"),
        "convert",
        str(source),
        str(out),
        "--settings",
        json.dumps({"spacing_mm": None}),
        "--threads",
        str(threads),
    ]


def geometry_bench(args: argparse.Namespace) -> None:
    """Irregular spacing and enhanced multi-frame vs a regular series of the same size."""
    work = Path(args.workdir) / "geometry"
    t = time.perf_counter()
    regular = make_series(work / "regular", args.rows, args.slices)
    make_series(work / "irregular", args.rows, args.slices, irregular=True)
    mf = work / "multiframe" / "enhanced.dcm"
    if not mf.exists():
        write_enhanced(regular, mf)
    print(
        f"series: {args.rows}x{args.rows}x{args.slices} regular, irregular steps "
        f"{min(IRREGULAR_STEPS)}-{max(IRREGULAR_STEPS)} mm, enhanced multi-frame (1 file) "
        f"(made in {time.perf_counter() - t:.1f} s)"
    )
    out_dir = work / "out"
    shutil.rmtree(out_dir, ignore_errors=True)
    out_dir.mkdir(parents=True)
    sources = {k: work / k for k in ("regular", "irregular")} | {"multiframe": mf.parent}
    runs: dict[str, list[tuple[float, int]]] = {k: [] for k in sources}
    for _ in range(args.repeats):  # interleaved, so drift affects every series alike
        for name, src in sources.items():
            runs[name].append(timed(radflow_cmd(src, out_dir / f"{name}.nii.gz", args.threads)))
    print(f"repeats: {args.repeats}; radflow threads: {args.threads}")
    med = {k: statistics.median(r[0] for r in v) for k, v in runs.items()}
    rss = {k: max(r[1] for r in v) for k, v in runs.items()}
    for name in sources:
        sc = json.loads((out_dir / f"{name}.json").read_text())
        print(
            f"{name:11s} median {med[name]:6.2f} s   peak RSS {rss[name] / 2**20:6.0f} MiB   "
            f"ratio to regular {med[name] / med['regular']:.2f}   "
            f"output {'x'.join(map(str, sc['geometry']['shape']))}"
        )
    a = nib.load(out_dir / "regular.nii.gz")
    b = nib.load(out_dir / "multiframe.nii.gz")
    same = np.array_equal(np.asarray(a.dataobj), np.asarray(b.dataobj))
    print(
        f"multi-frame vs regular: identical voxels {same}, affines differ by at most "
        f"{np.abs(a.affine - b.affine).max():.4f} mm (target for both ratios <= 1.5)"
    )
    print(
        json.dumps(
            {
                "median_wall_s": {k: round(v, 3) for k, v in med.items()},
                "peak_rss_mib": {k: round(v / 2**20) for k, v in rss.items()},
                "ratio_irregular": round(med["irregular"] / med["regular"], 3),
                "ratio_multiframe": round(med["multiframe"] / med["regular"], 3),
                "target": 1.5,
            }
        )
    )


if __name__ == "__main__":
    main()
    _results.finish()

"""Benchmark: radflow's NIfTI conversion vs a plain nibabel load + reorient + resample + save.

Writes N synthetic CT volumes (int16 HU, LPS affine; every third one oblique) and converts the
same files both ways in this process, each to a gzipped NIfTI on a ``--spacing`` mm grid:

* radflow: ``radflow.nifti_input.convert_nifti`` (header checks, NaN and HU checks, RAS+
  reorientation, radflow's slab resampler, ISA-L gzip, sidecar with the source's sha256);
* plain: ``nib.load``, ``nib.as_closest_canonical``, ``nibabel.processing.resample_to_output``
  (order 1), ``nib.save``.

Prints the total wall time of each, their ratio, and how far the two outputs' world grids and
voxels agree. Usage:

    python bench/nifti_convert.py [--n 8] [--size 256] [--slices 120] [--spacing 1.5]
"""

from __future__ import annotations

import argparse
import json
import shutil
import time
from pathlib import Path

import nibabel as nib
import numpy as np
from nibabel.processing import resample_to_output

import _results
from radflow.convert import ConvertSettings
from radflow.nifti_input import convert_nifti
from radflow.source import InputSpec


def affine_of(i: int, size: int) -> np.ndarray:
    """LPS, 0.8 x 0.8 x 1.25 mm; every third volume turned 15 deg about z (oblique)."""
    aff = np.diag([-0.8, -0.8, 1.25, 1.0])
    if i % 3 == 2:
        c, s = np.cos(np.radians(15)), np.sin(np.radians(15))
        aff[:3, :3] = np.array([[c, -s, 0], [s, c, 0], [0, 0, 1]]) @ aff[:3, :3]
    aff[:3, 3] = [0.4 * size, 0.4 * size, -75.0]
    return aff


def make_inputs(folder: Path, n: int, size: int, slices: int) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    out = []
    for i in range(n):
        p = folder / f"vol{i}.nii.gz"
        out.append(p)
        if p.exists():
            continue
        x, y, z = np.ogrid[:size, :size, :slices]
        r = ((x - size / 2) / (0.4 * size)) ** 2 + ((y - size / 2) / (0.3 * size)) ** 2
        v = np.where(r < 1, 40, -1000) + rng.normal(0, 12, (size, size, slices))
        v[(r < 0.2) & (z > slices / 3) & (z < 2 * slices / 3)] = 70
        img = nib.Nifti1Image(np.rint(v).astype(np.int16), affine_of(i, size))
        img.set_qform(img.affine, code=1)
        img.set_sform(img.affine, code=1)
        nib.save(img, str(p))
    return out


def plain(src: Path, dst: Path, spacing: float) -> None:
    img = nib.as_closest_canonical(nib.load(str(src)))
    out = resample_to_output(img, (spacing,) * 3, order=1, cval=-1024)
    nib.save(out, str(dst))


def agreement(a: Path, b: Path) -> tuple[float, float]:
    """(largest voxel-centre offset between the grids in mm when shapes match, else nan;
    median absolute HU difference over the voxels both cover)."""
    ia, ib = nib.load(str(a)), nib.load(str(b))
    va = np.asanyarray(ia.dataobj).astype(np.float32)
    vb = np.asanyarray(ib.dataobj).astype(np.float32)
    # sample b at a's voxel centres (nearest voxel)
    ijk = np.indices(va.shape).reshape(3, -1).T
    xyz = ia.affine[:3, :3] @ ijk.T + ia.affine[:3, 3:4]
    ib_ijk = np.rint(np.linalg.inv(ib.affine)[:3, :3] @ xyz + np.linalg.inv(ib.affine)[:3, 3:4])
    ok = np.all((ib_ijk >= 0) & (ib_ijk < np.array(vb.shape)[:, None]), axis=0)
    idx = ib_ijk[:, ok].astype(int)
    diff = np.abs(va.reshape(-1)[ok] - vb[idx[0], idx[1], idx[2]])
    offset = float(np.abs(ia.affine - ib.affine).max()) if va.shape == vb.shape else float("nan")
    return offset, float(np.median(diff))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=8)
    ap.add_argument("--size", type=int, default=256)
    ap.add_argument("--slices", type=int, default=120)
    ap.add_argument("--spacing", type=float, default=1.5)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--workdir", default="/tmp/radflow-bench-nifti")
    _results.add_argument(ap)
    args = ap.parse_args()
    _results.start("nifti_convert", args)
    work = Path(args.workdir)
    files = make_inputs(work / "in", args.n, args.size, args.slices)
    for sub in ("radflow", "plain"):
        shutil.rmtree(work / sub, ignore_errors=True)
        (work / sub).mkdir(parents=True)
    settings = ConvertSettings(spacing_mm=(args.spacing,) * 3)
    spec = InputSpec(format="nifti", sheet="bench")
    t = time.perf_counter()
    for f in files:
        out = work / "radflow" / f.name
        convert_nifti(f, out, settings, spec, out.with_suffix("").with_suffix(".json"),
                      threads=args.threads)  # fmt: skip
    t_radflow = time.perf_counter() - t
    t = time.perf_counter()
    for f in files:
        plain(f, work / "plain" / f.name, args.spacing)
    t_plain = time.perf_counter() - t
    agree = [agreement(work / "radflow" / f.name, work / "plain" / f.name) for f in files]
    shape = f"{args.size}x{args.size}x{args.slices}"
    print(f"{args.n} volumes {shape} int16 -> {args.spacing:g} mm, threads {args.threads}")
    print(f"radflow convert_nifti: {t_radflow:.2f} s ({t_radflow / args.n:.3f} s/volume)")
    print(f"plain nibabel:         {t_plain:.2f} s ({t_plain / args.n:.3f} s/volume)")
    print(f"ratio radflow / plain nibabel: {t_radflow / t_plain:.2f}")
    print(f"median |HU difference| per volume: {[round(a[1], 1) for a in agree]}")
    print(
        json.dumps(
            {
                "n": args.n,
                "shape": shape,
                "spacing_mm": args.spacing,
                "radflow_s": round(t_radflow, 3),
                "plain_nibabel_s": round(t_plain, 3),
                "ratio": round(t_radflow / t_plain, 3),
                "median_abs_hu_diff": [round(a[1], 2) for a in agree],
            }
        )
    )
    _results.finish()


if __name__ == "__main__":
    main()

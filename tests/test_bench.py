"""The convert benchmark stays runnable, and radflow agrees with dcm2niix in world space."""

import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_convert_bench_small_matches_dcm2niix(tmp_path):
    out = subprocess.run(
        [
            sys.executable,
            str(REPO / "bench" / "convert_speed.py"),
            "--rows",
            "64",
            "--slices",
            "24",
            "--repeats",
            "1",
            "--workdir",
            str(tmp_path),
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert out.returncode == 0, out.stderr[-2000:]
    assert "ratio radflow / dcm2niix" in out.stdout
    assert "identical voxels True, affines differ by at most 0.0000 mm" in out.stdout


def test_dag_scale_bench_plans_every_case(tmp_path):
    """The DAG bench's synthetic inventory drives the real Snakefile: 3 jobs per case."""
    out = subprocess.run(
        [
            sys.executable,
            str(REPO / "bench" / "dag_scale.py"),
            "--cases",
            "7",
            "--array-limit",
            "4",
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]
    import json

    (r,) = json.loads(out.stdout.strip().splitlines()[-1])
    assert r["jobs"]["convert"] == r["jobs"]["segment"] == r["jobs"]["mask"] == 7
    # arrays of 4: 2 sbatch calls per per-case rule, plus one per aggregate rule
    singles = r["jobs"]["total"] - 21 - r["jobs"]["all"]
    assert r["sbatch_arrays"] == 6 + singles and r["sbatch_plain"] == 21 + singles

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

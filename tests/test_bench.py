"""The benchmarks stay runnable: convert (radflow agrees with dcm2niix in world space), the DAG
scale bench and its peer, segmentation batch priority, model reuse."""

import json
import re
import subprocess
import sys
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
# config.yaml's segment.batches: the bench's workdirs use it with --cases-per-batch 0
BATCHES = yaml.safe_load((REPO / "config" / "config.yaml").read_text())["segment"]["batches"]


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


def test_convert_speed_geometry_bench_runs(tmp_path):
    """Irregular spacing and multi-frame are timed against a regular series, with ratios."""
    out = subprocess.run(
        [
            sys.executable,
            str(REPO / "bench" / "convert_speed.py"),
            "--geometry",
            "--rows",
            "32",
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
    assert "ratio to regular" in out.stdout
    assert "identical voxels True, affines differ by at most 0.0000 mm" in out.stdout
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert set(result["median_wall_s"]) == {"regular", "irregular", "multiframe"}


def test_dag_scale_bench_plans_every_case(tmp_path):
    """The DAG bench's synthetic inventory drives the real Snakefile: with segmentation in
    groups, 2 jobs per case (convert, mask) plus the groups."""
    out = subprocess.run(
        [
            sys.executable,
            str(REPO / "bench" / "dag_scale.py"),
            "--cases",
            "7",
            "--array-limit",
            "4",
            "--cases-per-batch",
            "0",
            "--completed",
            "--stub-scontrol",
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]
    import json

    (r,) = json.loads(out.stdout.strip().splitlines()[-1])
    jobs = r["jobs"]
    # one plan (-n --quiet) and one listing (plain -n) per N, each checked in dry_run to have
    # read the ingest checkpoint
    assert len(r["all_plan_seconds"]) == len(r["all_listing_seconds"]) == 1
    assert jobs["convert"] == jobs["mask"] == 7
    assert 2 <= BATCHES <= 7  # every batch gets a case (case i goes to batch i mod BATCHES)
    assert jobs["segment"] == BATCHES  # one group job per group, never one per case
    assert "segment_batch" not in jobs
    singles = jobs["total"] - 14 - jobs["segment"] - jobs["all"]
    # arrays of 4: 2 sbatch calls each for convert and mask, one per 4 segmentation batches,
    # plus one per aggregate rule
    assert r["sbatch_arrays"] == 2 + -(-BATCHES // 4) + 2 + singles
    assert r["sbatch_plain"] == 7 + BATCHES + 7 + singles
    # --completed: the cohort made finished has nothing to do (checked in the bench), and a
    # mask setting changed reruns every mask and what follows, nothing upstream
    assert r["rerun_jobs"] == {
        "mask": 7,
        **{k: jobs[k] for k in jobs if k not in ("convert", "segment", "mask", "total")},
        "total": jobs["total"] - 7 - BATCHES,
    }
    assert len(r["all_done_seconds"]) == len(r["all_rerun_seconds"]) == 1
    # the peer (a bare Snakefile) plans the same per-case jobs and batches, and its dry runs
    # read the same checkpoint (dry_run raises otherwise)
    peer = r["peer_jobs"]
    assert {k: peer[k] for k in ("convert", "segment", "mask")} == {
        k: jobs[k] for k in ("convert", "segment", "mask")
    }


def test_largest_segmentation_group_goes_first(tmp_path):
    """segment jobs carry their group's size as priority: the scheduler starts the longest
    group first instead of letting it set the tail. Conversions carry none (a priority function
    is one more call per case while the DAG is built, and conversions take seconds)."""
    import re

    sys.path.insert(0, str(REPO / "bench"))
    from dag_scale import make_workdir
    from radflow.segment import group_of

    work = make_workdir(tmp_path, 23)
    out = subprocess.run(
        [sys.executable, "-m", "snakemake", "-n", "--snakefile", str(REPO / "Snakefile")]
        + ["--directory", str(work), "--configfile", str(work / "config.yaml"), "--cores", "2"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]
    sizes: dict[str, int] = {}
    for i in range(23):
        g = group_of(f"case-{i:012x}", BATCHES)
        sizes[g] = sizes.get(g, 0) + 1
    assert len(set(sizes.values())) > 1  # uneven groups, or the test proves nothing
    seen = {"convert": 0, "segment": 0}
    for block in re.split(r"\n(?=(?:local)?rule )", out.stdout):
        rule = re.match(r"(?:local)?rule (\w+):", block)
        if not rule or rule.group(1) not in seen:
            continue
        prio = re.search(r"priority: (\d+)", block)
        if rule.group(1) == "convert":
            want = 0
        else:
            want = sizes[re.search(r"wildcards: group=(\d+)", block).group(1)]
        assert (int(prio.group(1)) if prio else 0) == want, block  # 0 is not printed
        seen[rule.group(1)] += 1
    assert seen == {"convert": 23, "segment": len(sizes)}


def test_model_reuse_bench_runs():
    """The model-reuse bench stays runnable and prints both modes (its figures go to the bench
    result files; that a group loads each model once is tested in test_segment)."""
    import re

    out = subprocess.run(
        [sys.executable, str(REPO / "bench" / "model_reuse.py"), "--images", "2"]
        + ["--max-features", "64"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]
    assert re.search(r"after the first: fresh [\d.]+ s, kept [\d.]+ s", out.stdout), out.stdout
    assert re.search(r"checkpoint \d+ MiB, [\d.]+ M parameters", out.stdout), out.stdout


def test_review_page_bench_opens_a_small_page(tmp_path):
    """The review-page bench writes a page and times it in headless Chromium (skips without)."""
    import os
    import shutil

    exe = os.environ.get("RADFLOW_CHROMIUM") or shutil.which("chromium")
    if exe is None:
        import pytest

        if os.environ.get("CI"):
            pytest.fail("chromium missing; CI must install it")
        pytest.skip("the review-page bench needs chromium")
    out = subprocess.run(
        [
            sys.executable,
            str(REPO / "bench" / "review_page.py"),
            "--cases",
            "3",
            "--size",
            "16",
            "--repeats",
            "1",
            "--chromium",
            exe,
            "--results",
            "",
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]
    assert "wrote a page of 3 cases" in out.stdout
    assert re.search(r"median over 1 opens: dom [0-9.]+ s, first case drawn [0-9.]+ s", out.stdout)


def test_faithfulness_bench_runs_end_to_end(tmp_path):
    """The CAM faithfulness bench at its smallest: phantom cohort, mask, train, evaluate,
    explain with two methods; it prints the per-method table and the target line."""
    out = subprocess.run(
        [
            sys.executable,
            str(REPO / "bench" / "faithfulness.py"),
            *("--subjects", "8", "--seeds", "0", "--epochs", "1", "--steps", "2"),
            *("--methods", "gradcam", "layercam", "--device", "cpu"),
            *("--variants", "masked", "fullfov"),
            *("--workdir", str(tmp_path)),
        ],
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]
    import json

    import nibabel as nib
    import numpy as np

    res = json.loads(out.stdout.strip().splitlines()[-1])
    assert set(res["per_variant"]) == {"masked", "fullfov"}
    assert set(res["per_variant"]["fullfov"]["0"]) == {"gradcam", "layercam"}
    assert "target pointing game >= 0.9 on every seed" in out.stdout
    for v in ("masked", "fullfov"):
        assert (tmp_path / v / "seed0" / "faithfulness.json").exists()
    # the variants differ where they should: fullfov is not cropped to the organ
    masked = nib.load(next((tmp_path / "masked/results/masked").glob("case-*_roi.nii.gz")))
    full = nib.load(next((tmp_path / "fullfov/results/masked").glob("case-*_roi.nii.gz")))
    assert np.asanyarray(full.dataobj).mean() < np.asanyarray(masked.dataobj).mean()


def test_predict_speed_bench_runs_every_mode(workflow_run, demo_cohort, tmp_path):
    """The predict bench on two studies (warm API, separate processes, predict_all), on a copy
    of the tests' demo project (it replaces results/predict)."""
    import shutil

    work, proc, _ = workflow_run
    assert proc.returncode == 0, proc.stderr[-3000:]
    project = tmp_path / "project"
    shutil.copytree(work, project, symlinks=True)
    out = subprocess.run(
        [sys.executable, str(REPO / "bench" / "predict_speed.py"), "--project", str(project)]
        + ["--raw", str(demo_cohort / "raw"), "--studies", "2", "--repeats", "1"],
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-3000:]
    assert re.search(r"speed-up of the warm API: [\d.]+x", out.stdout), out.stdout
    n = re.search(r"predict_all over 2 studies \((\d+) predicted\)", out.stdout)
    assert n and int(n.group(1)) >= 1, out.stdout

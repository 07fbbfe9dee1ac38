"""Fault injection: a killed run recovers with a plain rerun, one bad case fails alone, and
hostile values in config paths never reach a shell as code.

* kill -9 of Snakemake and every job it runs, during convert, a segmentation group, mask and
  train in turn, each followed by a plain ``snakemake`` that is killed at the next stage; the
  last rerun finishes, and its volumes, manifests and model equal an uninterrupted run's;
* after the kill during convert, a changed convert setting reruns every conversion (no output
  made without provenance survives into a run with other settings);
* a corrupt case at convert, at segment and at mask: each is excluded with its stage and
  reason, the rest of the cohort is trained on, with shell metacharacters in the raw folder,
  the labels sheet, its label column, the weights folder and the reference templates (one
  run, module-scoped, that the convert failure's own test reads too).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pandas as pd
import pytest
import yaml

from .conftest import BIN, REPO, snakemake, workdir

pytestmark = pytest.mark.slow


def _start(work: Path) -> subprocess.Popen:
    env = {**os.environ, "PATH": BIN + os.pathsep + os.environ.get("PATH", "")}
    cmd = [f"{BIN}/snakemake", "-s", str(REPO / "Snakefile"), "-d", str(work), "--cores", "2"]
    return subprocess.Popen(
        cmd,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,  # its own process group: the kill takes every job with it
    )


def _kill_when(work: Path, ready, what: str, timeout: float = 600) -> None:
    """Run snakemake in ``work`` and kill -9 it and all its children once ``ready()``."""
    proc = _start(work)
    t0 = time.monotonic()
    try:
        while not ready():
            if proc.poll() is not None:
                pytest.fail(f"the run ended (rc {proc.returncode}) before {what} started")
            if time.monotonic() - t0 > timeout:
                pytest.fail(f"{what} never started")
            time.sleep(0.05)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _volumes(work: Path) -> dict[str, str]:
    out = {}
    for sub in ("nifti", "seg", "masked"):
        for p in sorted((work / "results" / sub).glob("case-*.nii.gz")):
            out[f"{sub}/{p.name}"] = _sha(p)
    return out


def test_kill_at_each_stage_then_a_plain_rerun_matches_an_uninterrupted_run(
    workflow_run, demo_cohort, tmp_path
):
    ref, ref_proc, _ = workflow_run
    assert ref_proc.returncode == 0, ref_proc.stderr[-3000:]
    work = workdir(tmp_path / "killed", demo_cohort)
    res = work / "results"
    n_cases = len(list((ref / "results" / "masked").glob("case-*.json")))

    # convert: a few conversions started
    _kill_when(work, lambda: len(list((work / "logs/convert").glob("*.log"))) >= 3, "convert")
    # a changed convert setting now plans every conversion, finished ones included
    changed = work / "changed.yaml"
    cfg = yaml.safe_load((work / "config" / "config.yaml").read_text())
    changed.write_text(yaml.safe_dump({"convert": {**cfg["convert"], "hu_clip": [-1000, 3000]}}))
    plan = snakemake(work, "-n", "--quiet", "rules", "--configfile", str(changed))
    assert plan.returncode == 0, plan.stderr[-2000:]
    planned = dict(
        line.split()
        for line in plan.stdout.splitlines()
        if len(line.split()) == 2 and line.split()[1].isdigit()
    )
    assert int(planned.get("convert", 0)) == n_cases, plan.stdout

    # segmentation: a group has written label maps but not its record
    def segmenting():
        done = list((res / "seg").glob("case-*.nii.gz"))
        return bool(done) and not list((res / "seg" / "groups").glob("*.json"))

    _kill_when(work, segmenting, "a segmentation group")
    # mask: some cases masked, others not
    _kill_when(work, lambda: len(list((work / "logs/mask").glob("*.log"))) >= 3, "mask")
    # train: the first epoch's checkpoint written, the second epoch running
    _kill_when(work, lambda: (res / "train" / "last.pt").exists(), "train")

    final = snakemake(work)
    assert final.returncode == 0, final.stderr[-3000:]
    assert "Nothing to be done" in snakemake(work, "-n").stdout
    assert not [p for p in res.rglob("*.part")], "orphan temporary files after the kills"
    assert _volumes(work) == _volumes(ref)
    a = pd.read_csv(work / "manifests" / "cases.csv")
    b = pd.read_csv(ref / "manifests" / "cases.csv")
    pd.testing.assert_frame_equal(a, b)
    hist = [pd.read_csv(w / "results/train/history.csv") for w in (work, ref)]
    cols = ["epoch", "loss", "val_loss", "val_auc"]
    pd.testing.assert_frame_equal(hist[0][cols], hist[1][cols])
    metrics = [json.loads((w / "results/eval/metrics.json").read_text()) for w in (work, ref)]
    assert metrics[0]["test"] == metrics[1]["test"]


HOSTILE = "co'hort $(touch PWNED) `touch PWNED2`;x"


@pytest.fixture(scope="module")
def corrupt_run(demo_cohort, tmp_path_factory):
    """One run of the workflow on a copy of the cohort under hostile names, with a case
    damaged at convert (an instance truncated after indexing, as a copy job might do), one at
    segment and one at mask: the step processes and the three victims' case ids."""
    tmp_path = tmp_path_factory.mktemp("corrupt")
    root = tmp_path / HOSTILE
    shutil.copytree(demo_cohort, root)
    weights = tmp_path / "weights $(touch PWNED3)'"
    shutil.copytree(REPO / "resources" / "totalseg_phantom", weights)
    sheet = pd.read_csv(root / "labels.csv", dtype=str).rename(columns={"label": "lab'el;$(x)"})
    sheet.to_csv(root / "labels.csv", index=False)
    work = workdir(tmp_path / "wf", root)
    cfg = yaml.safe_load((work / "config" / "config.yaml").read_text())
    cfg["labels"]["column"] = "lab'el;$(x)"
    cfg["segment"]["weights_dir"] = str(weights)
    cfg["ids"]["salt"] = "salt'$(touch PWNED4)"
    (work / "config" / "config.yaml").write_text(yaml.safe_dump(cfg))

    steps = {"ingest": snakemake(work, "--until", "ingest")}
    assert steps["ingest"].returncode == 0, steps["ingest"].stderr[-3000:]
    lists = sorted((work / "results/private/series").glob("*.json"))
    at_convert, at_segment, at_mask = (p.stem for p in lists[:3])
    victim = Path(json.loads((lists[0]).read_text())[3])
    with open(victim, "r+b") as fh:
        fh.truncate(victim.stat().st_size // 3)
    steps["convert"] = snakemake(work, "convert_all")
    (work / f"results/nifti/{at_segment}.nii.gz").write_bytes(b"\x1f\x8b not a volume")
    steps["segment"] = snakemake(work, "segment_all")
    seg = work / f"results/seg/{at_mask}.nii.gz"
    seg.write_bytes(seg.read_bytes()[:200])
    steps["all"] = snakemake(work)
    cases = [p.stem for p in lists]
    return tmp_path, work, steps, cases, (at_convert, at_segment, at_mask)


def test_a_corrupt_case_in_each_stage_fails_alone(corrupt_run):
    tmp_path, work, steps, all_cases, victims = corrupt_run
    for step, proc in steps.items():
        assert proc.returncode == 0, (step, proc.stderr[-3000:])
    at_convert, at_segment, at_mask = victims

    excluded = pd.read_csv(work / "manifests/excluded.csv").set_index("id")
    assert excluded.loc[at_convert, "stage"] == "convert"
    assert excluded.loc[at_segment, "stage"] == "segment"
    assert excluded.loc[at_mask, "stage"] == "mask"
    cases = pd.read_csv(work / "manifests/cases.csv")
    assert not {at_convert, at_segment, at_mask} & set(cases["case_id"])
    assert len(cases) >= len(all_cases) - 5  # the rest (an unlabelled subject aside) went on
    assert json.loads((work / "results/eval/metrics.json").read_text())["test"]["n"] >= 1
    for name in ("PWNED", "PWNED2", "PWNED3", "PWNED4"):
        assert not list(tmp_path.rglob(name)) and not list(REPO.glob(name)), name
    # the salt is on no command line: not in Snakemake's records or logs, nor in ours
    for folder in (work / ".snakemake", work / "logs"):
        for p in folder.rglob("*"):
            if p.is_file():
                assert b"PWNED4" not in p.read_bytes(), p


def test_failing_case_does_not_stop_the_cohort(corrupt_run):
    """A series damaged after indexing fails its conversion alone: its record says why, and
    the manifest lists it as excluded at convert while every other case goes on."""
    _, work, steps, all_cases, (victim_case, *_) = corrupt_run
    assert steps["convert"].returncode == 0, steps["convert"].stderr[-3000:]
    # every other case was converted (the segment victim's volume was damaged after that)
    done = {p.name[: -len(".nii.gz")] for p in (work / "results/nifti").glob("*.nii.gz")}
    assert done == set(all_cases) - {victim_case}
    record = json.loads((work / f"results/nifti/{victim_case}.json").read_text())
    assert record["status"] == "failed" and record["stage"] == "convert"
    assert record["reason_code"] in ("TRUNCATED", "UNREADABLE_INSTANCE"), record
    assert "refused [" in (work / f"logs/convert/{victim_case}.log").read_text()
    assert not list((work / "results/nifti").glob(".*.part"))
    status = json.loads((work / f"results/masked/{victim_case}.json").read_text())
    assert status["status"] == "failed" and status["stage"] == "convert"
    assert steps["all"].returncode == 0, steps["all"].stderr[-3000:]
    excluded = pd.read_csv(work / "manifests/excluded.csv")
    row = excluded[excluded["id"] == victim_case]
    assert row["stage"].tolist() == ["convert"], excluded
    cases = pd.read_csv(work / "manifests/cases.csv")
    assert victim_case not in set(cases["case_id"]) and len(cases) >= 8

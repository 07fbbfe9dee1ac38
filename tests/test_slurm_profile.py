"""Cluster scheduling: the SLURM profile covers the rules, and `--resources gpu=1` serialises.

The profile end to end through a real SLURM is ci/slurm-test.sh (`make test-slurm`); these
tests are the cheap part that runs everywhere.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from .conftest import REPO, SALT

BIN = Path(sys.executable).parent
PROFILE = REPO / "profiles" / "slurm" / "config.yaml"
GPU_RULES = {"segment", "train", "train_fold", "evaluate"}
PLANNED_RULES = {"explain"}  # named in the profile ahead of its rule (Grad-CAM, DESIGN.md)


def _config(work: Path, raw: Path, labels: Path | None, **segment) -> Path:
    cfg = yaml.safe_load((REPO / "config" / "config.yaml").read_text())
    cfg["raw_dir"] = str(raw)
    cfg["labels"]["path"] = str(labels) if labels else None
    cfg["ids"]["salt"] = SALT
    cfg["convert"].update({"threads": 1, "spacing_mm": [4.0, 4.0, 4.0]})
    cfg["segment"]["weights_dir"] = str(REPO / "resources" / "totalseg_phantom")
    cfg["segment"]["allow_phantom"] = True  # some raw trees here are empty folders, not the demo
    cfg["segment"]["batches"] = 0  # one segment job per case: the GPU jobs counted here
    cfg["segment"].update(segment)
    (work / "config").mkdir(parents=True)
    (work / "config" / "config.yaml").write_text(yaml.safe_dump(cfg))
    return work


def _snakemake(work: Path, *args: str, path: str | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, "PATH": path or f"{BIN}{os.pathsep}{os.environ['PATH']}"}
    cmd = [str(BIN / "snakemake"), "-s", str(REPO / "Snakefile"), "-d", str(work), *args]
    return subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=REPO, timeout=600)


def _profile() -> dict:
    return yaml.safe_load(PROFILE.read_text())


def _rule_blocks() -> dict[str, str]:
    """Rule name -> its text in workflow/rules/*.smk (snakefmt keeps one rule per block; a rule
    defined in both branches of a config `if` keeps its last, per-case, definition)."""
    blocks = {}
    for smk in sorted((REPO / "workflow" / "rules").glob("*.smk")):
        parts = re.split(r"^\s*(?:rule|checkpoint) (\w+):", smk.read_text(), flags=re.M)
        blocks.update(zip(parts[1::2], parts[2::2], strict=True))
    return blocks


def _job_rules() -> set[str]:
    """Rules that submit a job: all but the target rules (`all`, `<stage>_all`)."""
    proc = _snakemake(REPO, "--list-rules")
    assert proc.returncode == 0, proc.stderr[-2000:]
    names = set(proc.stdout.split())
    assert {"ingest", "convert", "mask", "manifest", "train", "evaluate"} <= names
    assert "segment" in names and "segment_batch" not in names  # always group jobs
    names |= set(_rule_blocks())  # and the rules of the other config branch (segment per case)
    return {n for n in names if n != "all" and not n.endswith("_all")}


def test_profile_keeps_the_default_profiles_safety_settings():
    prof = _profile()
    default = yaml.safe_load((REPO / "profiles" / "default" / "config.yaml").read_text())
    assert prof["executor"] == "slurm"
    for key in ("keep-going", "rerun-incomplete", "printshellcmds"):
        assert prof[key] == default[key], key
    assert prof["printshellcmds"] is False  # commands carry the salt


def test_profile_gives_every_job_rule_a_runtime_and_memory():
    prof, blocks, rules = _profile(), _rule_blocks(), _job_rules()
    per_rule = prof["set-resources"]
    assert set(per_rule) <= rules | PLANNED_RULES, "profile names a rule the workflow lacks"
    for rule in rules:
        assert per_rule.get(rule, {}).get("runtime"), f"{rule}: no runtime in profiles/slurm"
        declared = "mem_mb=" in blocks[rule]
        assert declared or per_rule[rule].get("mem_mb"), f"{rule}: no mem_mb anywhere"
        assert not (declared and "mem_mb" in per_rule[rule]), f"{rule}: mem_mb in two places"
    # cluster figures live in set-resources: a site profile or --default-resources replaces
    # default-resources whole without losing them
    assert set(prof["default-resources"]) == {"runtime", "mem_mb"}


def test_gpu_comes_from_the_rules_not_the_profile():
    blocks = _rule_blocks()
    for rule in GPU_RULES | (PLANNED_RULES & set(blocks)):
        assert re.search(r"\bgpu=", blocks[rule]), f"{rule} declares no gpu resource"
    for rule, res in _profile()["set-resources"].items():
        assert not {"gpu", "gres", "gpus"} & set(res), f"{rule}: GPU set in the profile"


def test_snakemake_reads_the_profile_with_partition_and_account_from_the_command_line(
    tmp_path,
):
    (tmp_path / "raw").mkdir()
    sheet = tmp_path / "labels.csv"  # a sheet: without one the default target stops before train
    sheet.write_text("PatientID,label\n")
    work = _config(tmp_path / "wf", tmp_path / "raw", sheet)
    proc = _snakemake(
        work,
        "-n",
        "--profile",
        str(REPO / "profiles" / "slurm"),
        "--default-resources",
        "slurm_partition=cpu",
        "slurm_account=proj",
    )
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-3000:]
    ingest = re.search(r"checkpoint ingest:.*?resources: ([^\n]*)", out, re.S).group(1)
    train = re.search(r"rule train:.*?resources: ([^\n]*)", out, re.S).group(1)
    assert "slurm_partition=cpu" in ingest and "slurm_account=proj" in ingest
    assert "runtime=240" in ingest  # set-resources survive --default-resources
    assert "runtime=1440" in train and "mem_mb=16000" in train


STUB = """#!{python}
# radflow with segment replaced by a 3 s sleep that records when it ran
import json, os, sys, time

args = sys.argv[1:]
if args[0] != "segment":
    os.execv({radflow!r}, [{radflow!r}, *args])
with open({record!r}, "a") as fh:
    fh.write(f"{{time.time()}} start\\n")
time.sleep(3)
with open(args[args.index("--record") + 1], "w") as fh:
    json.dump({{"cases": {{}}}}, fh)
with open({record!r}, "a") as fh:
    fh.write(f"{{time.time()}} end\\n")
"""


def _most_at_once(record: Path) -> int:
    now = most = 0
    events = sorted((float(t), kind) for t, kind in map(str.split, record.read_text().splitlines()))
    for _t, kind in events:  # at equal times "end" sorts before "start"
        now += 1 if kind == "start" else -1
        most = max(most, now)
    return most


@pytest.mark.slow
def test_resources_gpu_1_never_runs_two_gpu_jobs_at_once(demo_cohort, tmp_path):
    """The real rules and scheduler; only segmentation's work is a stub (a 3 s sleep)."""
    work = _config(tmp_path / "wf", demo_cohort / "raw", demo_cohort / "labels.csv", device="auto")
    stub_dir, record = tmp_path / "stub", tmp_path / "segment_runs.txt"
    stub_dir.mkdir()
    stub = stub_dir / "radflow"
    stub.write_text(
        STUB.format(python=sys.executable, radflow=str(BIN / "radflow"), record=str(record))
    )
    stub.chmod(0o755)
    path = os.pathsep.join([str(stub_dir), str(BIN), os.environ["PATH"]])
    first = _snakemake(work, "--cores", "2", "--until", "ingest", path=path)
    assert first.returncode == 0, first.stderr[-2000:]
    cases = sorted(p.stem for p in (work / "results/private/series").glob("*.json"))[:4]
    targets = [f"results/seg/groups/{c}.json" for c in cases]  # a group per case

    # device auto: segment declares gpu=1; two cores would otherwise run two at once
    proc = _snakemake(work, *targets, "--cores", "2", "--resources", "gpu=1", path=path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert len(record.read_text().split("start")) - 1 == len(cases)
    assert _most_at_once(record) == 1

    # control: with room for two GPU jobs the same jobs do overlap, so the above is the limit
    record.unlink()
    again = _snakemake(
        work, *targets, "--cores", "2", "--resources", "gpu=2", "--forcerun", "segment", path=path
    )
    assert again.returncode == 0, again.stderr[-3000:]
    assert _most_at_once(record) == 2

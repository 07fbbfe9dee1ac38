"""How the workflow's DAG scales: time and peak memory of ``snakemake -n`` for N cases.

A synthetic inventory of N selected series (no DICOM files: the ingest checkpoint's outputs are
written directly, as ingest would after indexing a cohort) is laid out in a scratch folder and
``snakemake -n`` builds the whole DAG for it: convert and mask per case, the segmentation groups
(config.yaml's segment.batches; with 0, a group per case), then the aggregate rules.

Two dry runs per N:
- plan: ``snakemake -n --quiet`` builds the DAG (including its update after the ingest
  checkpoint) and stops: what every run pays before its first job starts;
- listing: plain ``snakemake -n``, as a user types it: Snakemake also walks the scheduler
  through every job, formats it (shell command three times, resources, files) and prints it
  (here to a file, tens of MB at 10,000 cases); about three fifths on top of the plan at 10,000
  cases. A real run pays that per job as it submits it.
With ``--completed``, two more on the same cohort as a finished run leaves it (every job's files
present and its provenance recorded, made with ``snakemake --touch``, see
``complete_cohort``): ``snakemake -n`` with nothing to do, and after a mask setting changed
(every mask and what follows to rerun; the bench checks that, and that no conversion or
segmentation is in it). These are the dry runs of a project's later life, where Snakemake also
reads every output's time and provenance record.
Printed per N: wall time of both, peak RSS of the snakemake process, the job count, and the
number of sbatch calls on SLURM one job at a time and with the per-case rules submitted as job
arrays (profiles/slurm; a lower bound, see ``array_submissions``).

The peer, measured in the same run on the same inventory: a bare Snakefile (``PEER_SNAKEFILE``)
with the same jobs -- the ingest checkpoint, a conversion and a mask per case, the same
segmentation batches -- and nothing else: no logs, benchmarks, params, resources or report
flags, one output a job, file patterns where radflow's convert has an input function and an
edge to the inventory, and ``all`` asking for the masks directly rather than through the
aggregate rules. Its times are Snakemake's own floor for this many jobs on this machine;
radflow / peer is what radflow's rules add, and it moves less with the speed of the (shared,
virtual) machine than the seconds do.

    python bench/dag_scale.py --cases 1000 10000
    python bench/dag_scale.py --cases 1000 10000 --stub-scontrol
    python bench/dag_scale.py --cases 1000 10000 --stub-scontrol --repeat 2 --completed

``--stub-scontrol`` puts an ``scontrol`` that fails at once first on PATH. On a host with
slurm-wlm installed but no controller running (this CI machine), the SLURM executor plugin waits
about 9 s on ``scontrol show config`` when it is imported -- at every ``snakemake`` start, SLURM
or not; on a workstation without SLURM or on a cluster with a live controller it returns at once.

Targets (issue 7): at 10,000 cases <= 60 s and <= 2 GB on 2 cores.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pandas as pd
import psutil
import yaml

import _results

REPO = Path(__file__).resolve().parents[1]
ARRAY_RULES = ("convert", "segment", "mask")  # profiles/slurm


def make_workdir(root: Path, n: int, per_batch: int = 0) -> Path:
    """A scratch project whose ingest checkpoint already lists ``n`` selected cases; with
    ``per_batch``, segment.batches = n / per_batch (else config.yaml's, the demo's 2)."""
    work = root / f"cases{n}"
    raw = work / "raw"
    raw.mkdir(parents=True)
    cfg = yaml.safe_load((REPO / "config" / "config.yaml").read_text())
    cfg.update(raw_dir=str(raw))
    # a sheet (empty: the bench never trains), so the DAG keeps train, evaluate and explain:
    # without one the default target ends at the manifests
    (work / "labels.csv").write_text("PatientID,label\n")
    cfg["labels"]["path"] = str(work / "labels.csv")
    cfg["qc"]["reference"] = None
    cfg["explain"]["lesion_reference"] = None
    cfg["segment"]["weights_dir"] = str(REPO / "resources" / "totalseg_phantom")
    cfg["segment"]["allow_phantom"] = True  # a scratch raw tree, not the demo: never segmented
    if per_batch:
        cfg["segment"]["batches"] = max(1, round(n / per_batch))
    (work / "config.yaml").write_text(yaml.safe_dump(cfg))
    time.sleep(0.01)  # outputs strictly newer than the raw folder
    ids = [f"{i:012x}" for i in range(n)]
    inv = pd.DataFrame(
        {
            "case_id": [f"case-{h}" for h in ids],
            "series_id": [f"ser-{h}" for h in ids],
            "selected": True,
        }
    )
    (work / "results" / "inventory").mkdir(parents=True)
    priv = work / "results" / "private"
    (priv / "series").mkdir(parents=True)
    inv.to_parquet(work / "results" / "inventory" / "series.parquet")
    inv.to_csv(work / "results" / "inventory" / "series.csv", index=False)
    (work / "results" / "inventory" / "rejected_files.csv").write_text("file_id,reason\n")
    (priv / "rejected_files.csv").write_text("path,reason\n")
    id_map = inv[["case_id", "series_id"]].assign(
        subject_id=[f"sub-{h}" for h in ids],
        study_id=[f"stu-{h}" for h in ids],
        StudyInstanceUID=[f"1.2.3.{i}" for i in range(n)],
        SeriesInstanceUID=[f"1.2.3.{i}.1" for i in range(n)],
    )
    id_map.to_csv(priv / "id_map.csv", index=False)
    id_map.to_parquet(priv / "id_map.parquet", index=False)
    for h in ids:
        (priv / "series" / f"case-{h}.json").write_text(json.dumps([f"{raw}/{h}.dcm"]))
    (work / "peer.smk").write_text(PEER_SNAKEFILE.format(batches=cfg["segment"]["batches"]))
    return work


# The peer: the DAG radflow builds, written as plainly as Snakemake allows. It reads the same
# inventory and per-case file lists as radflow's rules (make_workdir) and writes under peer/.
PEER_SNAKEFILE = """
import csv

BATCHES = {batches}
_groups = {{}}


def group(case):  # radflow.segment.group_of, not imported: its module loads nibabel and numpy
    return str(int(case.removeprefix("case-"), 16) % BATCHES) if BATCHES else case


def groups():
    if not _groups:
        with open(checkpoints.ingest.get().output[0]) as f:
            for row in csv.DictReader(f):
                if row["selected"] == "True":
                    _groups.setdefault(group(row["case_id"]), []).append(row["case_id"])
    return _groups


rule all:
    input:
        lambda wc: [f"peer/masked/{{c}}.json" for g in groups().values() for c in g],


checkpoint ingest:
    input:
        "raw",
    output:
        "results/inventory/series.csv",
    shell:
        "touch {{output}}"


rule convert:
    input:
        "results/private/series/{{case}}.json",
    output:
        "peer/nifti/{{case}}.json",
    shell:
        "touch {{output}}"


rule segment:
    input:
        lambda wc: expand("peer/nifti/{{case}}.json", case=groups()[wc.group]),
    output:
        "peer/seg/groups/{{group}}.json",
    shell:
        "touch {{output}}"


rule mask:
    input:
        image="peer/nifti/{{case}}.json",
        seg=lambda wc: f"peer/seg/groups/{{group(wc.case)}}.json",
    output:
        "peer/masked/{{case}}.json",
    shell:
        "touch {{output}}"
"""


def dry_run(
    work: Path,
    extra: list[str],
    env: dict[str, str] | None = None,
    listing: bool = True,
    peer: bool = False,
    configfiles: list[Path] | None = None,
) -> dict:
    """``snakemake -n`` in ``work``: seconds, peak RSS (MiB), jobs per rule and the printed text.
    With ``listing``, plain ``snakemake -n`` as a user types it: every job formatted and printed
    (to a file here, as a terminal would take it); without, ``-n --quiet``: the DAG is built and
    no more. With ``peer``, of the bare Snakefile (PEER_SNAKEFILE) instead of radflow's."""
    configs = configfiles or [work / "config.yaml"]
    snakefile = (
        ["--snakefile", str(work / "peer.smk")]
        if peer
        else ["--snakefile", str(REPO / "Snakefile"), "--configfile", *map(str, configs)]
    )
    cmd = [
        sys.executable,
        "-m",
        "snakemake",
        "-n",
        *snakefile,
        "--directory",
        str(work),
        "--cores",
        "2",
        *([] if listing else ["--quiet"]),
        *extra,
    ]
    # the listing is tens of MB at 10,000 cases: to a file, never a pipe nobody reads yet
    with tempfile.TemporaryFile("w+") as out:
        t0 = time.perf_counter()
        proc = psutil.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, text=True, env=env)
        peak = 0
        while proc.poll() is None:
            try:
                rss = sum(p.memory_info().rss for p in [proc, *proc.children(recursive=True)])
                peak = max(peak, rss)
            except psutil.Error:
                pass
            time.sleep(0.05)
        seconds = time.perf_counter() - t0
        out.seek(0)
        text = out.read()
    if proc.returncode != 0:
        raise RuntimeError(f"snakemake -n failed:\n{text[-3000:]}")
    if "Updating checkpoint dependencies" not in text:  # the per-case jobs were never planned
        raise RuntimeError(f"snakemake -n did not read the ingest checkpoint:\n{text[-3000:]}")
    return {"seconds": seconds, "peak_mib": peak / 2**20, "jobs": job_stats(text), "text": text}


def job_stats(text: str) -> dict[str, int]:
    """Jobs per rule and ``total`` from the last "Job stats" table of a dry run ({} if none:
    nothing to be done)."""
    jobs: dict[str, int] = {}
    if "Job stats:" not in text:
        return jobs
    for line in text.rsplit("Job stats:", 1)[1].splitlines()[3:]:
        m = re.match(r"^(\w+)\s+(\d+)\s*$", line.strip())
        if not m:
            break
        jobs[m.group(1)] = int(m.group(2))
    return jobs


# Snakemake's touch executor sleeps 0.1 s per job before touching its outputs (so that their
# times differ); 20,000 jobs would spend over half an hour asleep. A job is touched only after
# the jobs it depends on have finished, so without the sleep every output is still no older
# than its inputs (an equal time is not "newer"; Snakemake's own output-time check after each
# job would fail the touch run otherwise).
TOUCH = (
    "import sys; import snakemake.executors.touch as t; t.Executor.SLEEPING_TIME = 0; "
    "from snakemake.cli import main; sys.exit(main())"
)


def complete_cohort(work: Path, listing: str, env: dict[str, str] | None) -> float:
    """Make ``work`` look like a project whose run has finished: every file that the jobs of
    ``listing`` (a fresh ``snakemake -n``) write is created empty, then ``snakemake --touch
    --forceall`` marks all of them done through Snakemake's own bookkeeping, which records each
    job's provenance (code, params, input list, environment) in .snakemake/metadata as a real
    run does. Outputs without a suffix are folders (radflow's directory() output,
    results/explain); a file or folder of the wrong kind stops the
    touch run with Snakemake's error, as does a missed one. Returns the seconds this took."""
    t0 = time.perf_counter()
    n = 0
    for block in re.split(r"\n(?=(?:local)?(?:rule|checkpoint) \w+:)", listing):
        for key in ("output", "log", "benchmark"):
            m = re.search(rf"^\s+{key}: (.*)$", block, re.M)
            for name in m.group(1).split(", ") if m else []:
                path = work / name.split(" (")[0]
                if "." in path.name:
                    path.parent.mkdir(parents=True, exist_ok=True)
                    path.touch()
                else:
                    path.mkdir(parents=True, exist_ok=True)
                n += 1
    if n == 0:
        raise RuntimeError("no job files found in the dry run's listing")
    cmd = [sys.executable, "-c", TOUCH, "--touch", "--forceall", "--quiet", "--cores", "100000"]
    cmd += ["--snakefile", str(REPO / "Snakefile"), "--configfile", str(work / "config.yaml")]
    cmd += ["--directory", str(work)]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    text = proc.stdout + proc.stderr
    # a job file the listing's parse missed: the touch executor only warns and goes on
    if proc.returncode != 0 or "Output files not touched because they don't exist" in text:
        raise RuntimeError(f"snakemake --touch failed:\n{text[-3000:]}")
    return time.perf_counter() - t0


def rerun_config(work: Path) -> Path:
    """A second config file that changes one mask setting (mask.margin_mm): a params change
    that must rerun every mask and what follows, and no conversion or segmentation."""
    cfg = yaml.safe_load((work / "config.yaml").read_text())
    changed = work / "rerun.yaml"
    changed.write_text(yaml.safe_dump({"mask": {"margin_mm": cfg["mask"]["margin_mm"] + 1}}))
    return changed


# Rules that run on the submit host.
LOCAL_RULES = {"all"}


def array_submissions(jobs: dict[str, int], limit: int) -> int:
    """sbatch calls with the per-case rules submitted as SLURM job arrays of up to ``limit``
    tasks (profiles/slurm: slurm-array-jobs), the other rules one each; local rules run on the
    submit host. A lower bound: the plugin submits the jobs ready at that moment, so a rule
    whose inputs finish in waves takes one call per wave."""
    local = LOCAL_RULES
    arrays = [r for r in ARRAY_RULES if r not in local]
    per_case = sum(-(-jobs.get(r, 0) // limit) for r in arrays)
    rest = jobs.get("total", 0) - sum(jobs.get(r, 0) for r in set(arrays) | local)
    return per_case + rest


def summarise(runs: dict[str, list[dict]]) -> dict[str, object]:
    """Per kind of dry run: the fastest time (on a shared or virtual machine other load only
    ever adds time), every time rounded, and the highest peak RSS."""
    out: dict[str, object] = {}
    for key, xs in runs.items():
        out[f"{key}_seconds"] = min(x["seconds"] for x in xs)
        out[f"all_{key}_seconds"] = [round(x["seconds"], 1) for x in xs]
        out[f"{key}_peak_mib"] = max(x["peak_mib"] for x in xs)
    return out


def seconds(r: dict, key: str) -> str:
    """``r``'s fastest time of ``key`` for printing, with all of them when there were more."""
    text = f"{r[f'{key}_seconds']:6.1f} s"
    times = r[f"all_{key}_seconds"]
    return text + (f" (fastest of {', '.join(map(str, times))})" if len(times) > 1 else "")


def per_rule(jobs: dict[str, int]) -> str:
    return ", ".join(f"{k} {v}" for k, v in jobs.items() if k != "total")


def completed_runs(
    work: Path, listing: str, fresh: dict[str, int], env: dict[str, str] | None, repeat: int
) -> dict[str, object]:
    """The cohort of ``work`` made finished (complete_cohort), then two plain ``snakemake -n``:
    nothing to do, and a mask setting changed. Checks, in every repeat, that the first finds
    nothing to do and that the second plans exactly the jobs of ``fresh`` (the fresh cohort's
    jobs per rule) from mask on: every mask and every rule after it, no conversion or
    segmentation."""
    n = sum(1 for _ in (work / "results" / "private" / "series").iterdir())
    upstream = ("convert", "segment")
    expected = {k: v for k, v in fresh.items() if k not in (*upstream, "total")}
    if expected.get("mask") != n:
        raise RuntimeError(f"the fresh dry run planned {expected.get('mask')} masks for {n} cases")
    expected["total"] = sum(expected.values())
    touch_seconds = complete_cohort(work, listing, env)
    changed = rerun_config(work)
    runs: dict[str, list] = {"done": [], "rerun": []}
    for _ in range(repeat):
        done = dry_run(work, [], env)
        if done["jobs"] or "Nothing to be done" not in done["text"]:
            raise RuntimeError(f"the finished cohort still has jobs to run: {done['jobs']}")
        rerun = dry_run(work, [], env, configfiles=[work / "config.yaml", changed])
        if rerun["jobs"] != expected:
            raise RuntimeError(
                f"a mask setting changed: expected the jobs {expected} (every mask and what "
                f"follows, no conversion or segmentation), got {rerun['jobs']}"
            )
        for run in (done, rerun):
            del run["text"]
        runs["done"].append(done)
        runs["rerun"].append(rerun)
    out = {"touch_seconds": touch_seconds, **summarise(runs), "rerun_jobs": rerun["jobs"]}
    print(
        f"{n:>6} cases, finished (made with snakemake --touch in {touch_seconds:.0f} s): "
        f"snakemake -n with nothing to do {seconds(out, 'done')}, "
        f"peak RSS {out['done_peak_mib']:.0f} MiB; after a mask setting changed "
        f"{seconds(out, 'rerun')}, peak RSS {out['rerun_peak_mib']:.0f} MiB, "
        f"{rerun['jobs'].get('total', 0)} jobs ({per_rule(rerun['jobs'])})",
        flush=True,
    )
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cases", type=int, nargs="+", default=[1000, 10000])
    ap.add_argument("--array-limit", type=int, default=1000, help="tasks per SLURM array")
    ap.add_argument("--keep", action="store_true", help="keep the scratch folders")
    ap.add_argument(
        "--repeat",
        type=int,
        default=1,
        help="dry runs per N; the fastest is reported (on a shared or virtual machine other "
        "load only ever adds time), all of them are printed",
    )
    ap.add_argument(
        "--cases-per-batch",
        type=int,
        default=100,
        help="segment.batches = cases / this (0: config.yaml's batches, the demo's 2). Snakemake "
        "checks every job that needs a batch's folder against that batch's whole input list, so "
        "a few huge batches cost O(cases^2 / batches) at DAG time",
    )
    ap.add_argument(
        "--stub-scontrol",
        action="store_true",
        help="an scontrol that fails at once first on PATH (see the module docstring)",
    )
    ap.add_argument(
        "--completed",
        action="store_true",
        help="then also time snakemake -n on the same cohort as a finished run leaves it: "
        "with nothing to do, and after a mask setting changed (every mask and what follows "
        "to rerun)",
    )
    _results.add_argument(ap)
    args = ap.parse_args()
    _results.start("dag_scale", args)
    if args.repeat < 1:
        ap.error("--repeat must be at least 1")
    root = Path(tempfile.mkdtemp(prefix="radflow-dag-"))
    env = None
    if args.stub_scontrol:
        stub = root / "bin" / "scontrol"
        stub.parent.mkdir()
        stub.write_text("#!/bin/sh\nexit 1\n")
        stub.chmod(0o755)
        env = {**os.environ, "PATH": f"{stub.parent}{os.pathsep}{os.environ.get('PATH', '')}"}
    results = []
    try:
        for n in args.cases:
            work = make_workdir(root, n, args.cases_per_batch)
            runs: dict[str, list] = {
                k: [] for k in ("plan", "listing", "peer_plan", "peer_listing")
            }
            for _ in range(args.repeat):  # interleaved: a slow spell of the machine hits both
                for peer in (False, True):
                    for listing in (False, True):
                        key = ("peer_" if peer else "") + ("listing" if listing else "plan")
                        run = dry_run(work, [], env, listing=listing, peer=peer)
                        if key == "listing":
                            listing_text = run["text"]
                        del run["text"]
                        runs[key].append(run)
            r = {"cases": n, **summarise(runs)}
            r["peak_mib"] = max(r["plan_peak_mib"], r["listing_peak_mib"])
            r["peer_peak_mib"] = max(r["peer_plan_peak_mib"], r["peer_listing_peak_mib"])
            r["jobs"] = runs["listing"][0]["jobs"]
            r["peer_jobs"] = runs["peer_listing"][0]["jobs"]
            r["plan_vs_peer"] = r["plan_seconds"] / r["peer_plan_seconds"]
            r["listing_vs_peer"] = r["listing_seconds"] / r["peer_listing_seconds"]
            local = sum(r["jobs"].get(k, 0) for k in LOCAL_RULES)
            r["sbatch_plain"] = r["jobs"].get("total", 0) - local
            r["sbatch_arrays"] = array_submissions(r["jobs"], args.array_limit)
            results.append(r)
            print(
                f"{n:>6} cases: plan (snakemake -n --quiet) {seconds(r, 'plan')}"
                f", with the job listing (snakemake -n) {seconds(r, 'listing')}"
                f"; peak RSS {r['peak_mib']:7.0f} MiB, {r['jobs'].get('total', 0)} jobs "
                f"({per_rule(r['jobs'])}); "
                f"sbatch calls on SLURM: {r['sbatch_plain']} one per job, "
                f"at least {r['sbatch_arrays']} with per-case job arrays of {args.array_limit}",
                flush=True,
            )
            print(
                f"{'':>6}        peer (bare Snakefile, {r['peer_jobs'].get('total', 0)} jobs): "
                f"plan {r['peer_plan_seconds']:6.1f} s, "
                f"listing {r['peer_listing_seconds']:6.1f} s, "
                f"peak RSS {r['peer_peak_mib']:.0f} MiB; radflow / peer: plan "
                f"{r['plan_vs_peer']:.2f}x, listing {r['listing_vs_peer']:.2f}x, memory "
                f"{r['peak_mib'] / r['peer_peak_mib']:.2f}x",
                flush=True,
            )
            if args.completed:
                r.update(completed_runs(work, listing_text, r["jobs"], env, args.repeat))
            del listing_text
            if not args.keep:
                shutil.rmtree(work, ignore_errors=True)
        if len(results) > 1:
            a, b = results[0], results[-1]
            scale = b["cases"] / a["cases"]
            print(
                f"for {scale:.0f}x the cases: plan time "
                f"{b['plan_seconds'] / a['plan_seconds']:.1f}x, listing time "
                f"{b['listing_seconds'] / a['listing_seconds']:.1f}x, memory "
                f"{b['peak_mib'] / a['peak_mib']:.1f}x (targets at 10,000: <= 60 s, <= 2048 MiB); "
                f"the peer: plan {b['peer_plan_seconds'] / a['peer_plan_seconds']:.1f}x, listing "
                f"{b['peer_listing_seconds'] / a['peer_listing_seconds']:.1f}x"
            )
        print(json.dumps(results))
    finally:
        if not args.keep:
            shutil.rmtree(root, ignore_errors=True)
    return 0


if __name__ == "__main__":
    rc = main()
    _results.finish()
    sys.exit(rc)

#!/usr/bin/env bash
# Runs the real radflow workflow through a real, single-node SLURM cluster on this machine:
# installs Debian's slurm-wlm and munge (apt) if missing, starts munged, slurmctld and slurmd
# for localhost, runs snakemake --profile profiles/slurm on a small demo cohort from ingest to
# evaluate and explain with batched segmentation as in the demo (3 batches for 13 cases), then
# once more up to the masked volumes with a segment job per case (segment.batches: 0), and
# checks the outputs and that every job went through SLURM, per-case rules as job arrays.
#
# Needs root on a throwaway Debian 12 machine (CI, a VM, a container): it writes
# /etc/slurm/slurm.conf (refusing to replace one it did not write) and starts daemons.
# Rerunnable: it stops the daemons it started before (pid files), keeps the apt packages and
# the demo cohort, and reruns the workflow from scratch.
#
#   sudo env PATH="$PWD/.venv/bin:$PATH" bash ci/slurm-test.sh        (or: make test-slurm)
#
# Environment: RADFLOW_SLURM_WORK (default /tmp/radflow-slurm-test) holds the cohort, the
# workflow's working directory and the daemons' state and logs; KEEP_SLURM=1 leaves the
# daemons running afterwards (squeue, scontrol show job ... to look around).
set -euo pipefail

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
WORK=${RADFLOW_SLURM_WORK:-/tmp/radflow-slurm-test}
STATE=$WORK/slurm               # daemon state, pid files, logs, job completion records
RUN=$WORK/run                   # the workflow's working directory (-d): batched segmentation
RUN_CASE=$WORK/run-per-case     # the same cohort with a segment job per case, up to mask
COHORT=$WORK/cohort
CONF=/etc/slurm/slurm.conf
MARK="# written by radflow ci/slurm-test.sh"
PARTITION=radflow-ci
PREFIX=radflowci                # SLURM job names start with it (--slurm-jobname-prefix)
SALT=slurm-ci-salt-$RANDOM$RANDOM  # must never show up in a SLURM log
WORKFLOW_TIMEOUT=${WORKFLOW_TIMEOUT:-2400}  # seconds; then SIGTERM, and SIGKILL 60 s later
# (snakemake waits for its running jobs on SIGTERM; a status query that never answers would
# make it wait for ever)

log() { printf '\n== %s\n' "$*"; }
die() { printf 'slurm-test: %s\n' "$*" >&2; exit 1; }

[[ $(id -u) == 0 ]] || die "run as root (it installs packages and starts SLURM daemons)"
command -v snakemake >/dev/null && command -v radflow >/dev/null ||
    die "snakemake and radflow not on PATH: make install, then PATH=\$PWD/.venv/bin:\$PATH"
python - <<'PY' || die "snakemake-executor-plugin-slurm missing: make install (dev extra)"
import snakemake_executor_plugin_slurm, snakemake_executor_plugin_slurm_jobstep  # noqa: F401
PY

# ------------------------------------------------------------------ packages
if ! command -v slurmctld >/dev/null || ! command -v slurmd >/dev/null ||
    ! command -v munged >/dev/null; then
    log "installing slurm-wlm and munge (apt)"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends slurm-wlm munge >/dev/null
fi
slurmctld -V

# ------------------------------------------------------------------ stop what a previous run left
stop_daemons() {
    local name pid
    for name in slurmd slurmctld; do
        [[ -s $STATE/$name.pid ]] || continue
        pid=$(cat "$STATE/$name.pid")
        if kill -0 "$pid" 2>/dev/null; then
            kill "$pid"
            for _ in $(seq 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.2; done
        fi
        rm -f "$STATE/$name.pid"
    done
}
stop_daemons
rm -rf "$STATE" "$RUN" "$RUN_CASE"
mkdir -p "$STATE/ctld" "$STATE/d"

# ------------------------------------------------------------------ munge
if [[ ! -s /etc/munge/munge.key ]]; then
    log "creating a munge key"
    mungekey --create --force
fi
chown munge:munge /etc/munge/munge.key
chmod 400 /etc/munge/munge.key
if ! munge -n </dev/null 2>/dev/null | unmunge >/dev/null 2>&1; then
    log "starting munged"
    install -d -o munge -g munge -m 755 /run/munge
    runuser -u munge -- /usr/sbin/munged
    for _ in $(seq 50); do
        munge -n </dev/null 2>/dev/null | unmunge >/dev/null 2>&1 && break
        sleep 0.2
    done
fi
munge -n </dev/null | unmunge >/dev/null || die "munged does not answer"

# ------------------------------------------------------------------ slurm.conf for this host
# One node with this machine's CPUs and memory as slurmd itself measures them (a node that
# claims more than it has is drained). No GPU (no GRES): the GPU rules run with device cpu,
# which makes them declare gpu=0 (see the config below and README). No slurmdbd: sacct has
# nothing to read, so the plugin checks job states with squeue, which sees finished jobs for
# MinJobAge seconds; job completions are also written to a text file for the checks below.
if [[ -e $CONF ]] && ! grep -qF "$MARK" "$CONF"; then
    die "$CONF exists and was not written by this script: not touching a real cluster's config"
fi
HOST=$(hostname -s)
NODE=$(slurmd -C | head -1 | sed "s/^NodeName=[^ ]*/NodeName=$HOST NodeAddr=127.0.0.1/")
MEM=$(sed -n 's/.*RealMemory=\([0-9]*\).*/\1/p' <<<"$NODE")
(( MEM >= 16000 )) || die "the train rule asks for 16000 MB; this machine has $MEM MB"
mkdir -p /etc/slurm
cat >"$CONF" <<CONF
$MARK (localhost test cluster)
ClusterName=radflow-ci
SlurmctldHost=$HOST(127.0.0.1)
SlurmUser=root
AuthType=auth/munge
CredType=cred/munge
MpiDefault=none
# no cgroups in containers and CI sandboxes
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/filetxt
JobCompLoc=$STATE/jobcomp.log
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
ReturnToService=2
MinJobAge=3600
StateSaveLocation=$STATE/ctld
SlurmdSpoolDir=$STATE/d
SlurmctldPidFile=$STATE/slurmctld.pid
SlurmdPidFile=$STATE/slurmd.pid
SlurmctldLogFile=$STATE/slurmctld.log
SlurmdLogFile=$STATE/slurmd.log
$NODE State=UNKNOWN
PartitionName=$PARTITION Nodes=$HOST Default=YES MaxTime=INFINITE State=UP
CONF

log "starting slurmctld and slurmd"
slurmctld -c
slurmd -N "$HOST"
[[ ${KEEP_SLURM:-0} == 1 ]] || trap stop_daemons EXIT
for i in $(seq 60); do
    state=$(sinfo -h -N -p "$PARTITION" -o %T 2>/dev/null || true)
    [[ $state == idle ]] && break
    (( i == 60 )) && { tail -20 "$STATE"/slurm*.log; die "node not idle after 60 s: '$state'"; }
    sleep 1
done
sinfo

# ------------------------------------------------------------------ a small cohort and its config
# The test suite's small cohort (tests/conftest.py SMALL): 10 subjects, 32x32 pixels.
if [[ ! -e $COHORT/.complete ]]; then
    log "writing the demo cohort"
    rm -rf "$COHORT"
    radflow demo-data "$COHORT" --settings '{"n_subjects": 10, "n_unlabeled": 1, "seed": 7, "matrix": 32}' --threads 2
    touch "$COHORT/.complete"
fi
write_config() {  # write_config RUN_DIR SEGMENT_BATCHES
    mkdir -p "$1/config"
    python - "$REPO" "$COHORT" "$1" "$SALT" "$2" <<'PY'
import sys
from pathlib import Path

import yaml

repo, cohort, run, salt, batches = sys.argv[1:]
cfg = yaml.safe_load(Path(repo, "config", "config.yaml").read_text())
cfg["raw_dir"] = f"{cohort}/raw"
cfg["labels"]["path"] = f"{cohort}/labels.csv"
cfg["ids"]["salt"] = salt
cfg["convert"].update({"threads": 1, "spacing_mm": [4.0, 4.0, 4.0]})
cfg["segment"]["weights_dir"] = f"{repo}/resources/totalseg_phantom"
cfg["qc"]["reference"] = f"{cohort}/ground_truth/{{StudyInstanceUID}}/organs.nii.gz"
# no GPU on this cluster: device cpu makes segment, train, evaluate and explain declare gpu=0
cfg["segment"]["device"] = "cpu"
# segment.batches: batched segmentation as in the demo (a job per batch), or 0: a job per case
cfg["segment"]["batches"] = int(batches)
cfg["explain"].update(
    device="cpu", lesion_reference=f"{cohort}/ground_truth/{{StudyInstanceUID}}/lesion.nii.gz"
)
cfg["train"].update({"epochs": 2, "device": "cpu", "threads": 2})
cfg["evaluate"]["bootstrap"] = 100
Path(run, "config", "config.yaml").write_text(yaml.safe_dump(cfg))
PY
}

# A site profile as README describes it: partition (and account, which this cluster without
# slurmdbd has none of) through default-resources; executor settings for this test cluster.
cat >"$WORK/site.yaml" <<SITE
default-resources:
  slurm_partition: $PARTITION
  runtime: 60
  mem_mb: 2000
slurm-status-command: squeue          # no slurmdbd: sacct has no jobs to report
slurm-init-seconds-before-status-checks: 5
slurm-jobname-prefix: $PREFIX
slurm-keep-successful-logs: true      # kept for the checks below
jobs: 20
SITE

# ------------------------------------------------------------------ the workflow, through SLURM
workflow() {  # workflow RUN_DIR LOG [TARGET...]: snakemake through SLURM; sets rc and wall
    local dir=$1 out=$2 start
    shift 2
    start=$(date +%s)
    set +e
    timeout -k 60 "$WORKFLOW_TIMEOUT" snakemake -s "$REPO/Snakefile" -d "$dir" \
        --profile "$REPO/profiles/slurm" --profile "$WORK/site.yaml" "$@" >"$out" 2>&1
    rc=$?
    set -e
    wall=$(( $(date +%s) - start ))
    tail -25 "$out"
}

job_table() {  # job_table RUN_DIR: one line per Snakemake job that went to SLURM
    python - "$1" "$STATE/jobcomp.log" "$PREFIX" <<'PY'
# One line per Snakemake job submitted to SLURM (its SLURM log) joined with SLURM's own
# completion record: rule, SLURM job id, state, partition, time limit, memory.
import re
import subprocess
import sys
from pathlib import Path

run, jobcomp, prefix = sys.argv[1:]
records = {}
for line in Path(jobcomp).read_text().splitlines():
    rec = dict(re.findall(r"(\w+)=(\S*)", line))
    records[rec["JobId"]] = rec
def job_id(stem):
    """A job array task's log is named ARRAYID_TASK: scontrol knows its own job id."""
    if "_" not in stem:
        return stem
    out = subprocess.run(["scontrol", "show", "job", stem], capture_output=True, text=True)
    m = re.search(r"\bJobId=(\d+)", out.stdout)
    return m.group(1) if m else stem


for path in sorted(Path(run, ".snakemake", "slurm_logs").glob("rule_*/**/*.log")):
    rule = path.relative_to(Path(run, ".snakemake", "slurm_logs")).parts[0][len("rule_") :]
    rec = records.get(job_id(path.stem), {})
    mem = re.search(r"mem=(\d+)M", rec.get("Tres", ""))
    print(rule, path.stem, rec.get("JobState", "NO_RECORD"), rec.get("Partition", "-"),
          rec.get("TimeLimit", "-"), mem.group(1) if mem else "-",
          "prefixed" if rec.get("Name", "").startswith(prefix + "_") else "unprefixed")
PY
}

passed=0 failed=0
check() {  # check "what" command...
    local what=$1; shift
    if "$@"; then passed=$((passed + 1)); echo "ok    $what"
    else failed=$((failed + 1)); echo "FAIL  $what"; fi
}
files_exist() {  # files_exist RUN_DIR FILE...
    local dir=$1 f; shift
    for f; do [[ -s $dir/$f ]] || { echo "  missing $dir/$f"; return 1; }; done
}
rule_count() { awk -v r="$1" '$1 == r' "$2" | wc -l; }
went_as_arrays() {  # went_as_arrays JOBS_TXT RULE...: fewer sbatch calls than jobs
    # (profiles/slurm: slurm-array-jobs) the plugin submits, per rule, the jobs ready at that
    # moment as one array (a lone ready job goes alone); convert, all ready after ingest, in one
    local table=$1 rule stems calls; shift
    for rule; do
        stems=$(awk -v r="$rule" '$1 == r { print $2 }' "$table")
        calls=$(cut -d_ -f1 <<<"$stems" | sort -u | wc -l)
        echo "  $rule: $(wc -l <<<"$stems") jobs in $calls sbatch call(s)"
        (( calls < $(wc -l <<<"$stems") )) || return 1
        [[ $rule != convert ]] || (( calls == 1 )) || return 1
    done
}
all_completed() {  # every job COMPLETED under our job name, in our partition
    awk -v p="$PARTITION" '$3 != "COMPLETED" || $4 != p || $7 != "prefixed" { print "  " $0; bad = 1 }
        END { exit bad }' "$1"
}
salt_only_in_config() {  # the salt is in the config (the search works) and in no log
    local dir=$1 out=$2
    grep -qF -- "$SALT" "$dir/config/config.yaml" &&
        ! grep -rlF -- "$SALT" "$dir/.snakemake/slurm_logs" "$dir/logs" "$out"
}

# 1. Segmentation in batches, as in the demo (3 for 13 cases), from ingest to explain.
log "snakemake --profile profiles/slurm (through SLURM): batched segmentation (3 batches)"
write_config "$RUN" 3
workflow "$RUN" "$WORK/snakemake.log"
job_table "$RUN" >"$WORK/jobs.txt"
cat "$WORK/jobs.txt"
njobs=$(wc -l <"$WORK/jobs.txt")
ncases=$( (ls "$RUN"/results/masked/case-*_roi.nii.gz 2>/dev/null || true) | wc -l)
nbatches=$( (ls "$RUN"/results/seg/groups/*.json 2>/dev/null || true) | wc -l)
log "checks: batched segmentation ($ncases cases, $nbatches batches)"
check "snakemake exited 0 (rc=$rc after ${wall}s)" test "$rc" = 0
wall_batched=$wall
check "final outputs exist" files_exist "$RUN" results/inventory/series.parquet \
    manifests/cases.parquet manifests/datalist.json results/qc/segmentation.csv \
    results/train/best.pt results/eval/metrics.json results/eval/predictions.csv \
    results/explain/index.html results/explain/faithfulness.json
every_rule_ran_in_slurm() {
    local rule n want
    (( nbatches >= 2 )) || { echo "  $nbatches segmentation group record(s)"; return 1; }
    for rule in ingest convert segment mask qc_table manifest train evaluate explain; do
        n=$(rule_count $rule "$WORK/jobs.txt")
        case $rule in convert|mask) want=$ncases ;; segment) want=$nbatches ;; *) want=1 ;; esac
        (( n == want )) || { echo "  $rule: $n SLURM jobs, expected $want"; return 1; }
    done
    # one segment job per group; each case's label map written by its group
    files_exist "$RUN" $(cd "$RUN" && ls results/masked/case-*_roi.nii.gz |
            sed 's,results/masked/\(.*\)_roi.nii.gz,results/seg/\1.nii.gz,')
}
check "every rule ran as SLURM jobs ($njobs jobs, $ncases cases, $nbatches batches)" \
    every_rule_ran_in_slurm
check "per-case jobs went to SLURM as job arrays" went_as_arrays "$WORK/jobs.txt" convert mask
check "SLURM recorded every job COMPLETED under our job name, in $PARTITION" \
    all_completed "$WORK/jobs.txt"
check "profile resources reached sbatch (train: 16000 MB, 1440 min)" \
    grep -qE '^train [0-9]+ COMPLETED [^ ]+ 1440 16000 ' "$WORK/jobs.txt"
check "no SLURM log, job log or snakemake output carries the salt" \
    salt_only_in_config "$RUN" "$WORK/snakemake.log"
check "a rerun has nothing to do" bash -c 'snakemake -s "$0/Snakefile" -d "$1" \
    --profile "$0/profiles/slurm" --profile "$2/site.yaml" -n 2>&1 | grep -q "Nothing to be done"' \
    "$REPO" "$RUN" "$WORK"

# 2. segment.batches 0 (a segment job per case, as with the precomputed backend), up to the
# masked volumes: the per-case segment jobs go as job arrays too.
log "snakemake --profile profiles/slurm mask_all (through SLURM): a segment job per case"
write_config "$RUN_CASE" 0
workflow "$RUN_CASE" "$WORK/snakemake-per-case.log" mask_all
job_table "$RUN_CASE" >"$WORK/jobs-per-case.txt"
cat "$WORK/jobs-per-case.txt"
ncases_pc=$( (ls "$RUN_CASE"/results/masked/case-*_roi.nii.gz 2>/dev/null || true) | wc -l)
log "checks: a segment job per case ($ncases_pc cases)"
check "snakemake mask_all exited 0 (rc=$rc after ${wall}s)" test "$rc" = 0
per_case_segment_jobs() {
    (( ncases_pc == ncases )) || { echo "  $ncases_pc cases masked, $ncases in the batched run"; return 1; }
    local rule n
    for rule in convert segment mask; do
        n=$(rule_count $rule "$WORK/jobs-per-case.txt")
        (( n == ncases_pc )) || { echo "  $rule: $n SLURM jobs, expected $ncases_pc"; return 1; }
    done
    true
}
check "convert, segment and mask ran once per case as SLURM jobs" per_case_segment_jobs
check "per-case jobs went to SLURM as job arrays" \
    went_as_arrays "$WORK/jobs-per-case.txt" convert segment mask
check "SLURM recorded every job COMPLETED under our job name, in $PARTITION" \
    all_completed "$WORK/jobs-per-case.txt"
check "no SLURM log, job log or snakemake output carries the salt" \
    salt_only_in_config "$RUN_CASE" "$WORK/snakemake-per-case.log"

echo
echo "wall time through SLURM: ${wall_batched}s for the whole workflow with batched segmentation ($njobs SLURM jobs)," \
    "${wall}s up to mask with a segment job per case ($(wc -l <"$WORK/jobs-per-case.txt") jobs)"
echo "slurm-test: $passed passed, $failed failed"
(( failed == 0 ))

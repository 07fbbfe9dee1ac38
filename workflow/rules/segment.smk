from radflow.segment import group_of


def segment_settings():
    s = without(config["segment"], "threads", "precomputed", "batches")
    s["weights_dir"] = resolve_resource(s["weights_dir"])
    return s


def segment_gpus():
    seg = config["segment"]
    return 0 if seg["backend"] == "precomputed" or seg["device"] == "cpu" else 1


BATCHES = int(config["segment"]["batches"] or 0)


@lru_cache(maxsize=4)
def _groups(path, mtime):
    """group -> its cases, grouped once per inventory version (not once per group job)."""
    out = {}
    for c in sorted(_inventory(path, mtime).index):
        out.setdefault(group_of(c, BATCHES), []).append(c)
    return out


def groups():
    path = ingest_output().parquet
    return _groups(path, os.path.getmtime(path))


def group_sidecars(wildcards):
    return [paths.SIDECAR.format(case=c) for c in groups().get(wildcards.group, [])]


def group_priority(wildcards):
    """Larger groups first (longest-job-first), so the biggest does not set the run's tail."""
    return len(groups().get(wildcards.group, []))


def segment_options():
    """The precomputed backend's template, filled per case in the job from the private id map
    (the template may name raw UIDs: never resolved into a path Snakemake records)."""
    seg = config["segment"]
    if seg["backend"] != "precomputed":
        return ""
    return " ".join(
        [
            opt("--precomputed", resolve_resource(seg["precomputed"])),
            opt("--id-map", paths.ID_MAP_PARQUET),
        ]
    )


# Segmentation is always a group job: one TotalSegmentator process segments the cases of a
# group (torch, nnU-Net and the model load once), each case's label map goes to
# results/seg/{case}.nii.gz and the group's record, written last, is the job's output.
# segment.batches N > 0: N stable groups by pseudonym hash; 0: a group per case. A case that
# fails is recorded as failed and the group goes on; a killed group is rerun and keeps the
# label maps it had finished.
rule segment:
    input:
        # with a group per case, a pattern: no input function call per case in the DAG
        sidecars=(
            group_sidecars if BATCHES else paths.SIDECAR.replace("{case}", "{group}")
        ),
        id_map=ancient(paths.ID_MAP_PARQUET),
    output:
        record=paths.SEG_GROUP,
    log:
        "logs/segment/{group}.log",
    benchmark:
        "benchmarks/segment/{group}.tsv"
    wildcard_constraints:
        group=r"\d+|" + CASE_PATTERN,
    priority: group_priority if BATCHES else 0
    conda:
        "../../envs/segment.yaml"
    threads: config["segment"]["threads"]
    resources:
        mem_mb=6000,
        gpu=segment_gpus(),
    params:
        settings=as_json(segment_settings()),
        options=segment_options(),
        seg_dir=os.path.dirname(paths.SEG),
    shell:
        "radflow segment {input.sidecars:q} --seg-dir {params.seg_dir:q} "
        "--record {output.record:q} --settings {params.settings:q} {params.options} "
        "--threads {threads} > {log:q} 2>&1"


rule segment_all:
    input:
        lambda wc: [paths.SEG_GROUP.format(group=g) for g in sorted(groups())],

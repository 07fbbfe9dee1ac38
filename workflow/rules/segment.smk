include: "helpers/segment.smk"


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
        settings=settings_input(
            "segment",
            {**segment_settings(), "precomputed": precomputed_template()},
        ),
    output:
        record=paths.SEG_GROUP,
    log:
        "logs/segment/{group}.log",
    benchmark:
        "benchmarks/segment/{group}.tsv"
    wildcard_constraints:
        group=rf"\d+|{CASE_PATTERN}",
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
        seg_dir=lambda wc, output: os.path.dirname(os.path.dirname(output.record)),
    shell:
        "radflow segment {input.sidecars:q} --seg-dir {params.seg_dir:q} "
        "--record {output.record:q} --settings {params.settings:q} {params.options} "
        "--threads {threads} > {log:q} 2>&1"


rule segment_all:
    input:
        lambda wc: [paths.SEG_GROUP.format(group=g) for g in sorted(groups())],

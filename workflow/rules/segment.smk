if segment_batches():

    # segment.batches > 0: one TotalSegmentator process per batch of cases (torch, nnU-Net and
    # the model load once per batch, not once per case). The batch folder is kept: the mask job
    # of each case takes its label map out of it (or fails that case alone with the batch's
    # error for it), so there is no per-case segment job at all -- a third fewer jobs in the
    # DAG, and none left to run on a cluster's submit host.
    rule segment_batch:
        input:
            batch_images,
        output:
            directory("results/seg/batches/{batch}"),
        log:
            "logs/segment/batch-{batch}.log",
        benchmark:
            "benchmarks/segment/batch-{batch}.tsv"
        wildcard_constraints:
            batch=r"\d+",
        priority: batch_priority
        conda:
            "../../envs/segment.yaml"
        threads: config["segment"]["threads"]
        resources:
            mem_mb=6000,
            gpu=segment_gpus(),
        params:
            settings=as_json(segment_settings()),
        shell:
            "radflow segment-batch {input:q} --out-dir {output:q} "
            "--settings {params.settings:q} --threads {threads} > {log} 2>&1"

else:

    rule segment:
        input:
            image="results/nifti/{case}.nii.gz",
            precomputed=precomputed_mask,
        output:
            seg="results/seg/{case}.nii.gz",
            names="results/seg/{case}.json",
        log:
            "logs/segment/{case}.log",
        benchmark:
            "benchmarks/segment/{case}.tsv"
        conda:
            "../../envs/segment.yaml"
        threads: config["segment"]["threads"]
        resources:
            mem_mb=6000,
            gpu=segment_gpus(),
        params:
            settings=as_json(segment_settings()),
            precomputed=lambda wc, input: opt("--precomputed", input.precomputed),
        shell:
            "radflow segment {input.image:q} {output.seg:q} --names {output.names:q} "
            "--settings {params.settings:q} {params.precomputed} --threads {threads} "
            "> {log} 2>&1"


rule segment_all:
    input:
        segmented,

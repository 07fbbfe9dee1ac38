if segment_batches():

    # segment.batches > 0: one TotalSegmentator process per batch of cases (torch, nnU-Net and
    # the model load once per batch, not once per case); a per-case local job then copies each
    # label map to its place, or fails that case alone with the batch's error for it.
    rule segment_batch:
        input:
            batch_images,
        output:
            temp(directory("results/seg/batches/{batch}")),
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

    rule segment:
        input:
            case_batch,
        output:
            seg="results/seg/{case}.nii.gz",
            names="results/seg/{case}.json",
        log:
            "logs/segment/{case}.log",
        localrule: True
        conda:
            "../../envs/segment.yaml"
        shell:
            "radflow segment-collect {input:q} {wildcards.case} {output.seg:q} "
            "--names {output.names:q} > {log} 2>&1"

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
        lambda wc: expand("results/seg/{case}.nii.gz", case=cases()),

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

rule mask:
    input:
        # the label map, or with segment.batches its batch's folder (mask then places the
        # label map at results/seg/{case}.nii.gz itself, see batch_seg_outputs)
        **mask_inputs(),
    output:
        **batch_seg_outputs(),
        masked="results/masked/{case}.nii.gz",
        roi="results/masked/{case}_roi.nii.gz",
        status="results/masked/{case}.json",
        qc=report(
            "results/qc/{case}.png",
            caption="../report/qc.rst",
            category="QC",
            subcategory="segmentation",
            labels={"case": "{case}"},
        ),
        seg_qc="results/qc/{case}_segmentation.csv",
    log:
        "logs/mask/{case}.log",
    benchmark:
        "benchmarks/mask/{case}.tsv"
    conda:
        "../../envs/mask.yaml"
    threads: config["mask"]["threads"]
    resources:
        mem_mb=3000,
    params:
        **mask_params(),
    shell:
        "radflow mask {input.image:q} results/seg/{wildcards.case}.nii.gz {output.masked:q} "
        + mask_options()
        + "--roi-out {output.roi:q} --status {output.status:q} "
        "--qc {output.qc:q} --seg-qc {output.seg_qc:q} "
        "--settings {params.settings:q} --case-id {wildcards.case} --threads {threads} "
        "> {log} 2>&1"


rule qc_table:
    input:
        lambda wc: expand("results/qc/{case}_segmentation.csv", case=cases()),
    output:
        "results/qc/segmentation.csv",
    log:
        "logs/qc_table.log",
    benchmark:
        "benchmarks/qc_table.tsv"
    conda:
        "../../envs/mask.yaml"
    threads: 1
    shell:
        "radflow qc-table {output:q} {input:q} > {log} 2>&1"


rule mask_all:
    input:
        masked,

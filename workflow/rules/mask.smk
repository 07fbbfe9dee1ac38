include: "helpers/mask.smk"


rule mask:
    input:
        sidecar=paths.SIDECAR,
        group=mask_seg_group(),
        settings=settings_input(
            "mask", {**without(config["mask"], "threads"), "qc": config["qc"]}
        ),
    output:
        status=paths.MASK_STATUS,
        qc=report(
            paths.QC_PNG,
            caption="../report/qc.rst",
            category="QC",
            subcategory="segmentation",
            labels={"case": "{case}"},
        ),
        seg_qc=paths.SEG_QC,
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
        settings=as_json(without(config["mask"], "threads")),
        image=paths.NIFTI,
        seg=paths.SEG if SEGMENTED else "none",
        masked=paths.MASKED,
        roi=paths.ROI,
        qc_settings=as_json(without(config["qc"], "reference")),
        options=mask_options(),
    shell:
        "radflow mask {params.image:q} {params.seg:q} {params.masked:q} "
        "--roi-out {params.roi:q} --status {output.status:q} --qc {output.qc:q} "
        "--seg-qc {output.seg_qc:q} --upstream {input.sidecar:q} "
        "--settings {params.settings:q} --qc-settings {params.qc_settings:q} "
        "--case-id {wildcards.case:q} {params.options} "
        "--threads {threads} > {log:q} 2>&1"


rule qc_table:
    input:
        per_case(paths.SEG_QC),
    output:
        paths.SEG_QC_TABLE,
    log:
        "logs/qc_table.log",
    benchmark:
        "benchmarks/qc_table.tsv"
    conda:
        "../../envs/mask.yaml"
    threads: 1
    shell:
        "radflow qc-table {output:q} {input:q} > {log:q} 2>&1"


rule mask_all:
    input:
        per_case(paths.MASK_STATUS),
        paths.SEG_QC_TABLE,

include: "helpers/ingest.smk"


checkpoint ingest:
    input:
        # the DICOM tree, or the NIfTI cohort sheet (config input; common.smk)
        raw=INPUT_LOCATION,
    output:
        csv=paths.INVENTORY_CSV,
        parquet=paths.INVENTORY_PARQUET,
        rejected=paths.REJECTED_FILES,
        id_map=paths.ID_MAP,
        id_map_parquet=paths.ID_MAP_PARQUET,
        rejected_private=paths.REJECTED_FILES_PRIVATE,
    log:
        "logs/ingest.log",
    benchmark:
        "benchmarks/ingest.tsv"
    conda:
        "../../envs/ingest.yaml"
    threads: config["ingest"]["threads"]
    resources:
        mem_mb=2000,
    params:
        selection=as_json(selection_rules()),
        # the salt reaches the job through the environment (common.smk); its fingerprint
        # reruns ingest when it changes
        salt=fingerprint(config["ids"]["salt"]),
        out=lambda wc, output: os.path.dirname(output.csv),
        private=lambda wc, output: os.path.dirname(output.id_map),
        max_mb=config["ingest"]["max_image_mb"],
        input=as_json(INPUT.stage_settings()),
        labels=as_json(ingest_labels()),
    shell:
        "radflow ingest {input.raw:q} {params.out:q} --private-dir {params.private:q} "
        "--input {params.input:q} --labels {params.labels:q} "
        "--selection {params.selection:q} --max-image-mb {params.max_mb:q} "
        "--threads {threads} > {log:q} 2>&1"

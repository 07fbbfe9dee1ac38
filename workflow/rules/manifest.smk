include: "helpers/manifest.smk"


rule manifest:
    input:
        inventory=paths.INVENTORY_PARQUET,
        # labels are joined here (through the private id map's raw keys), not at ingest:
        # a new sheet reruns the manifest onward, never the indexing of the raw tree
        id_map=paths.ID_MAP_PARQUET,
        labels=label_inputs(),
        # each case's mask record (it carries an earlier stage's failure) and QC picture
        cases=per_case(paths.MASK_STATUS, paths.QC_PNG),
        settings=settings_input(
            "manifest",
            {**config["manifest"], "labels": config["labels"], "hash": config_hash()},
        ),
    output:
        cases_csv=paths.CASES_CSV,
        cases_parquet=paths.CASES_PARQUET,
        excluded=paths.EXCLUDED,
        datalist=paths.DATALIST,
        splits=[paths.SPLIT_CSV.format(split=s) for s in paths.SPLITS],
    log:
        "logs/manifest.log",
    benchmark:
        "benchmarks/manifest.tsv"
    conda:
        "../../envs/manifest.yaml"
    threads: 1
    resources:
        mem_mb=2000,
    params:
        settings=as_json(config["manifest"]),
        config_hash=config_hash(),
        labels=as_json(config["labels"]),
        out=lambda wc, output: os.path.dirname(output.cases_csv),
    shell:
        "radflow manifest {input.inventory:q} {params.out:q} --root . "
        "--settings {params.settings:q} --config-hash {params.config_hash:q} "
        "--labels {params.labels:q} --id-map {input.id_map:q} > {log:q} 2>&1"


rule manifest_all:
    input:
        paths.INVENTORY_PARQUET,
        paths.SEG_QC_TABLE,
        MANIFESTS,

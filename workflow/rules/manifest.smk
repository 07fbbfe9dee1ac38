rule manifest:
    input:
        inventory="results/inventory/series.parquet",
        # labels are joined here (through the private id map's raw keys), not at ingest:
        # a new sheet reruns the manifest onward, never the indexing of the raw tree
        id_map="results/private/id_map.csv",
        labels=label_inputs(),
        cases=case_outputs,
    output:
        cases_csv="manifests/cases.csv",
        cases_parquet="manifests/cases.parquet",
        excluded="manifests/excluded.csv",
        datalist="manifests/datalist.json",
        splits=expand("manifests/split_{split}.csv", split=SPLITS),
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
        labels=label_args(),
    shell:
        "radflow manifest {input.inventory:q} manifests --root . "
        "--settings {params.settings:q} --config-hash {params.config_hash} "
        "{params.labels} --id-map {input.id_map:q} > {log} 2>&1"

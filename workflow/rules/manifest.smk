rule manifest:
    input:
        inventory="results/inventory/series.parquet",
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
    shell:
        "radflow manifest {input.inventory:q} manifests --root . "
        "--settings {params.settings:q} --config-hash {params.config_hash} > {log} 2>&1"

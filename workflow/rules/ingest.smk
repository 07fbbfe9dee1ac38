checkpoint ingest:
    input:
        raw=config["raw_dir"],
    output:
        csv="results/inventory/series.csv",
        parquet="results/inventory/series.parquet",
        rejected="results/inventory/rejected_files.csv",
        id_map="results/private/id_map.csv",
        rejected_private="results/private/rejected_files.csv",
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
        salt=config["ids"]["salt"],
    shell:
        "radflow ingest {input.raw:q} results/inventory --private-dir results/private "
        "--selection {params.selection:q} --salt {params.salt:q} "
        "--threads {threads} > {log} 2>&1"

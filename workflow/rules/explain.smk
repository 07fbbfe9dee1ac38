include: "helpers/explain.smk"


# One job for the cohort: the model is loaded once and every case of explain.splits gets its
# CAM volumes, picture and numbers in results/explain/, with the review page and the
# faithfulness summary (a job per case would pay a torch start-up per case, and a checkpoint
# on the manifest makes Snakemake's DAG update quadratic on large cohorts).
rule explain:
    input:
        checkpoint=paths.CHECKPOINT,
        manifest=paths.CASES_PARQUET,
        predictions=paths.PREDICTIONS,
        metrics=paths.METRICS,
        id_map=paths.ID_MAP_PARQUET,
        settings=settings_input("explain", without(config["explain"], "threads")),
    output:
        report(
            directory(paths.EXPLAIN_DIR),
            patterns=["{name}.{ext,(png|html)}"],
            caption="../report/explain.rst",
            category="Grad-CAM",
            subcategory=explain_subcategory,
            labels=explain_labels,
        ),
    log:
        "logs/explain.log",
    benchmark:
        "benchmarks/explain.tsv"
    conda:
        "../../envs/explain.yaml"
    threads: config["explain"]["threads"]
    resources:
        mem_mb=8000,
        gpu=0 if config["explain"]["device"] == "cpu" else 1,
    params:
        settings=as_json(
            without(config["explain"], "threads", "splits", "lesion_reference")
        ),
        splits=config["explain"]["splits"],
        fill_hu=config["mask"]["background_hu"],
        lesion=lambda wc: opt(
            "--lesion-template", config["explain"].get("lesion_reference")
        ),
    shell:
        "radflow explain {input.checkpoint:q} {input.manifest:q} {output:q} "
        "--predictions {input.predictions:q} --metrics {input.metrics:q} "
        "--splits {params.splits:q} --id-map {input.id_map:q} {params.lesion} --root . "
        "--fill-hu {params.fill_hu} "
        "--settings {params.settings:q} --threads {threads} > {log:q} 2>&1"


rule explain_all:
    input:
        paths.EXPLAIN_DIR,

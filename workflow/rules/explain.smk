# One job for the cohort: the model is loaded once and every case of explain.splits gets its
# CAM volumes, picture and numbers in results/explain/, with the review page and the
# faithfulness summary (a job per case would pay a torch start-up per case, and a checkpoint
# on the manifest makes Snakemake's DAG update quadratic on large cohorts).
rule explain:
    input:
        checkpoint="results/train/best.pt",
        manifest="manifests/cases.parquet",
        predictions="results/eval/predictions.csv",
        metrics="results/eval/metrics.json",
        id_map="results/private/id_map.csv",
    output:
        report(
            directory("results/explain"),
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
        splits=" ".join(config["explain"]["splits"]),
        lesion=lambda wc: opt("--lesion-template", lesion_template()),
    shell:
        "radflow explain {input.checkpoint:q} {input.manifest:q} {output:q} "
        "--predictions {input.predictions:q} --metrics {input.metrics:q} "
        "--splits {params.splits} --id-map {input.id_map:q} {params.lesion} --root . "
        "--settings {params.settings:q} --threads {threads} > {log} 2>&1"


rule explain_all:
    input:
        "results/explain",

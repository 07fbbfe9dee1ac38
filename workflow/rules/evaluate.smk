rule evaluate:
    input:
        checkpoint=paths.CHECKPOINT,
        history=paths.HISTORY,
        manifest=paths.CASES_PARQUET,
        settings=settings_input(
            "evaluate", {**config["evaluate"], "device": config["train"]["device"]}
        ),
    output:
        predictions=paths.PREDICTIONS,
        metrics=paths.METRICS,
        roc=report(
            f"{paths.EVAL_DIR}/roc.png",
            caption="../report/roc.rst",
            category="Evaluation",
            labels={"figure": "ROC"},
        ),
        confusion=report(
            f"{paths.EVAL_DIR}/confusion.png",
            caption="../report/confusion.rst",
            category="Evaluation",
            labels={"figure": "confusion matrix"},
        ),
        curves=report(
            f"{paths.EVAL_DIR}/training_curves.png",
            caption="../report/training_curves.rst",
            category="Training",
            labels={"figure": "training curves"},
        ),
    log:
        "logs/evaluate.log",
    benchmark:
        "benchmarks/evaluate.tsv"
    conda:
        "../../envs/evaluate.yaml"
    threads: config["train"]["threads"]
    resources:
        mem_mb=8000,
        gpu=0 if config["train"]["device"] == "cpu" else 1,
    params:
        settings=as_json(config["evaluate"]),
        device=config["train"]["device"],
        out=lambda wc, output: os.path.dirname(output.metrics),
    shell:
        "radflow evaluate {input.checkpoint:q} {input.manifest:q} {params.out:q} --root . "
        "--history {input.history:q} --device {params.device:q} "
        "--settings {params.settings:q} --threads {threads} > {log:q} 2>&1"

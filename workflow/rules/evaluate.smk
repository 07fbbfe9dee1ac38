rule evaluate:
    input:
        checkpoint="results/train/best.pt",
        history="results/train/history.csv",
        manifest="manifests/cases.parquet",
    output:
        predictions="results/eval/predictions.csv",
        metrics="results/eval/metrics.json",
        roc=report(
            "results/eval/roc.png",
            caption="../report/roc.rst",
            category="Evaluation",
            labels={"figure": "ROC"},
        ),
        confusion=report(
            "results/eval/confusion.png",
            caption="../report/confusion.rst",
            category="Evaluation",
            labels={"figure": "confusion matrix"},
        ),
        curves=report(
            "results/eval/training_curves.png",
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
        bootstrap=config["evaluate"]["bootstrap"],
        device=config["train"]["device"],
    shell:
        "radflow evaluate {input.checkpoint:q} {input.manifest:q} results/eval --root . "
        "--history {input.history:q} --device {params.device} "
        "--bootstrap {params.bootstrap} --threads {threads} > {log} 2>&1"

include: "helpers/train.smk"


rule train:
    input:
        manifest=paths.CASES_PARQUET,
        settings=settings_input("train", without(config["train"], "threads")),
    output:
        best=paths.CHECKPOINT,
        history=paths.HISTORY,
    log:
        "logs/train.log",
    benchmark:
        "benchmarks/train.tsv"
    conda:
        "../../envs/train.yaml"
    threads: config["train"]["threads"]
    resources:
        mem_mb=16000,
        gpu=0 if config["train"]["device"] == "cpu" else 1,
    params:
        settings=as_json(without(config["train"], "threads")),
        out=lambda wc, output: os.path.dirname(output.best),
    shell:
        # results/train/last.pt is not an output on purpose: a restarted job resumes from it
        "radflow train {input.manifest:q} {params.out:q} --root . "
        "--settings {params.settings:q} --threads {threads} > {log:q} 2>&1"


rule train_fold:
    input:
        manifest=paths.CASES_PARQUET,
    output:
        best=f"{paths.CV_DIR}/best.pt",
        history=f"{paths.CV_DIR}/history.csv",
    log:
        "logs/train_fold{fold}.log",
    benchmark:
        "benchmarks/train_fold{fold}.tsv"
    conda:
        "../../envs/train.yaml"
    threads: config["train"]["threads"]
    resources:
        mem_mb=16000,
        gpu=0 if config["train"]["device"] == "cpu" else 1,
    params:
        settings=lambda wc: as_json(
            {**without(config["train"], "threads"), "fold": int(wc.fold)}
        ),
        out=lambda wc, output: os.path.dirname(output.best),
    shell:
        "radflow train {input.manifest:q} {params.out:q} --root . "
        "--settings {params.settings:q} --threads {threads} > {log:q} 2>&1"


rule cv_summary:
    input:
        expand(
            f"{paths.CV_DIR}/history.csv",
            fold=range(config["manifest"]["folds"]),
        ),
    output:
        paths.CV_SUMMARY,
    log:
        "logs/cv_summary.log",
    benchmark:
        "benchmarks/cv_summary.tsv"
    conda:
        "../../envs/train.yaml"
    threads: 1
    shell:
        "radflow cv-summary {output:q} {input:q} > {log:q} 2>&1"

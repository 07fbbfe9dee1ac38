rule train:
    input:
        manifest="manifests/cases.parquet",
    output:
        best="results/train/best.pt",
        history="results/train/history.csv",
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
    shell:
        # results/train/last.pt is not an output on purpose: a restarted job resumes from it
        "radflow train {input.manifest:q} results/train --root . "
        "--settings {params.settings:q} --threads {threads} > {log} 2>&1"


rule train_fold:
    input:
        manifest="manifests/cases.parquet",
    output:
        best="results/cv/fold{fold}/best.pt",
        history="results/cv/fold{fold}/history.csv",
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
        out=lambda wc: f"results/cv/fold{wc.fold}",
    shell:
        "radflow train {input.manifest:q} {params.out} --root . "
        "--settings {params.settings:q} --threads {threads} > {log} 2>&1"


rule cv_summary:
    input:
        expand(
            "results/cv/fold{fold}/history.csv",
            fold=range(config["manifest"]["folds"]),
        ),
    output:
        "results/cv/summary.json",
    log:
        "logs/cv_summary.log",
    benchmark:
        "benchmarks/cv_summary.tsv"
    conda:
        "../../envs/train.yaml"
    threads: 1
    shell:
        "radflow cv-summary {output:q} {input:q} > {log} 2>&1"

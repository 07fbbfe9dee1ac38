include: "helpers/predict.smk"


# The new cohort runs through the workflow's own per-case rules (ingest, convert, segment,
# mask) in its own project folder, results/private/predict/, with a config made from the
# bundle's preprocessing (a config that disagrees with the bundle is an error): the same rules,
# never a copy of them, and the training cohort's files are never touched.
rule predict_cases:
    input:
        bundle=predict_bundle(),
        raw=predict_inputs(),
    output:
        config=paths.PREDICT_CONFIG,
        qc=paths.under(paths.PREDICT_WORK, paths.SEG_QC_TABLE),
    log:
        "logs/predict_cases.log",
    benchmark:
        "benchmarks/predict_cases.tsv"
    conda:
        "../../envs/predict.yaml"
    threads: config["predict"]["threads"]
    resources:
        mem_mb=6000,
    params:
        config=predict_config(),
        weights=os.path.abspath(resolve_resource(config["segment"]["weights_dir"])),
        # the running Snakemake, whatever the job's environment
        python=sys.executable,
        snakefile=workflow.main_snakefile,
        work=lambda wc, output: os.path.dirname(os.path.dirname(output.config)),
    shell:
        "radflow predict-config {input.bundle:q} {output.config:q} "
        "--config {params.config:q} --segment-weights {params.weights:q} > {log:q} 2>&1 && "
        "{params.python:q} -m snakemake -s {params.snakefile:q} -d {params.work:q} --cores {threads} "
        "mask_all >> {log:q} 2>&1"


rule predict:
    input:
        bundle=predict_bundle(),
        qc=paths.under(paths.PREDICT_WORK, paths.SEG_QC_TABLE),
    output:
        predictions=paths.PREDICTIONS_NEW,
        metrics=paths.PREDICT_METRICS,
        excluded=paths.PREDICT_EXCLUDED,
        explain=directory(paths.PREDICT_EXPLAIN),
    log:
        "logs/predict.log",
    benchmark:
        "benchmarks/predict.tsv"
    conda:
        "../../envs/predict.yaml"
    threads: config["predict"]["threads"]
    resources:
        mem_mb=8000,
        gpu=0 if config["predict"]["device"] == "cpu" else 1,
    params:
        model=lambda wc, input: os.path.dirname(input.bundle[0]),
        # results/private/predict/results/qc/segmentation.csv -> results/private/predict
        work=lambda wc, input: os.path.dirname(
            os.path.dirname(os.path.dirname(input.qc))
        ),
        out=lambda wc, output: os.path.dirname(output.predictions),
        device=config["predict"]["device"],
        bootstrap=config["evaluate"]["bootstrap"],
    shell:
        "radflow predict-cohort {params.model:q} {params.work:q} {params.out:q} "
        "--device {params.device:q} --bootstrap {params.bootstrap} "
        "--threads {threads} > {log:q} 2>&1"


rule predict_all:
    input:
        paths.PREDICTIONS_NEW,
        paths.PREDICT_METRICS,
        paths.PREDICT_EXPLAIN,

include: "helpers/ablation.smk"


# The mask ablation (`snakemake ablation_all`): each variant of radflow.ablation.VARIANT_MASK is
# masked from the shared conversions and label maps, takes the default manifest's cases and
# splits, and is trained, evaluated and explained with the same settings and seeds under
# results/ablation/{variant}/. Not part of `all`.


wildcard_constraints:
    variant="|".join(VARIANTS),


rule ablation_mask:
    input:
        sidecar=paths.SIDECAR,
        group=mask_seg_group(),
        settings=ablation_mask_settings_file,
    output:
        status=V(paths.MASK_STATUS),
    log:
        "logs/ablation/{variant}/mask/{case}.log",
    benchmark:
        "benchmarks/ablation/{variant}/mask/{case}.tsv"
    conda:
        "../../envs/mask.yaml"
    threads: config["mask"]["threads"]
    resources:
        mem_mb=3000,
    params:
        settings=ablation_mask_settings,
        image=paths.NIFTI,
        seg=paths.SEG,
        masked=V(paths.MASKED),
        roi=V(paths.ROI),
        # the same plausibility checks as the default run's mask: the same cases excluded
        qc_settings=as_json(without(config["qc"], "reference")),
    shell:
        "radflow mask {params.image:q} {params.seg:q} {params.masked:q} "
        "--roi-out {params.roi:q} --status {output.status:q} "
        "--upstream {input.sidecar:q} --settings {params.settings:q} "
        "--qc-settings {params.qc_settings:q} "
        "--case-id {wildcards.case:q} --threads {threads} > {log:q} 2>&1"


rule ablation_manifest:
    input:
        # the default manifest: its cases, labels and splits are every variant's
        cases=paths.CASES_PARQUET,
        masks=ablation_mask_records,
    output:
        cases_csv=V(paths.CASES_CSV),
        cases_parquet=V(paths.CASES_PARQUET),
        excluded=V(paths.EXCLUDED),
    log:
        "logs/ablation/{variant}/manifest.log",
    benchmark:
        "benchmarks/ablation/{variant}/manifest.tsv"
    conda:
        "../../envs/ablation.yaml"
    threads: 1
    params:
        out=lambda wc, output: os.path.dirname(output.cases_csv),
    shell:
        "radflow ablation-manifest {input.cases:q} {wildcards.variant:q} {params.out:q} "
        "--root . > {log:q} 2>&1"


rule ablation_train:
    input:
        manifest=V(paths.CASES_PARQUET),
        settings=settings_input("train", without(config["train"], "threads")),
    output:
        best=V(paths.CHECKPOINT),
        history=V(paths.HISTORY),
    log:
        "logs/ablation/{variant}/train.log",
    benchmark:
        "benchmarks/ablation/{variant}/train.tsv"
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
        "radflow train {input.manifest:q} {params.out:q} --root . "
        "--settings {params.settings:q} --threads {threads} > {log:q} 2>&1"


rule ablation_evaluate:
    input:
        checkpoint=V(paths.CHECKPOINT),
        history=V(paths.HISTORY),
        manifest=V(paths.CASES_PARQUET),
        settings=settings_input(
            "evaluate", {**config["evaluate"], "device": config["train"]["device"]}
        ),
    output:
        predictions=V(paths.PREDICTIONS),
        metrics=V(paths.METRICS),
        roc=f"{V(paths.EVAL_DIR)}/roc.png",
        confusion=f"{V(paths.EVAL_DIR)}/confusion.png",
        curves=f"{V(paths.EVAL_DIR)}/training_curves.png",
    log:
        "logs/ablation/{variant}/evaluate.log",
    benchmark:
        "benchmarks/ablation/{variant}/evaluate.tsv"
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


rule ablation_explain:
    input:
        checkpoint=V(paths.CHECKPOINT),
        manifest=V(paths.CASES_PARQUET),
        predictions=V(paths.PREDICTIONS),
        metrics=V(paths.METRICS),
        id_map=paths.ID_MAP_PARQUET,
        settings=settings_input("explain", without(config["explain"], "threads")),
    output:
        directory(V(paths.EXPLAIN_DIR)),
    log:
        "logs/ablation/{variant}/explain.log",
    benchmark:
        "benchmarks/ablation/{variant}/explain.tsv"
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


rule ablation_summary:
    input:
        predictions=expand(V(paths.PREDICTIONS), variant=VARIANTS),
        explain=expand(V(paths.EXPLAIN_DIR), variant=VARIANTS),
    output:
        summary=paths.ABLATION_SUMMARY,
        png=report(
            paths.ABLATION_PNG,
            caption="../report/ablation.rst",
            category="Mask ablation",
            labels={"figure": "test AUC per variant"},
        ),
    log:
        "logs/ablation/summary.log",
    benchmark:
        "benchmarks/ablation/summary.tsv"
    conda:
        "../../envs/ablation.yaml"
    threads: 1
    params:
        bootstrap=config["evaluate"]["bootstrap"],
        seed=config["train"]["seed"],
    shell:
        "radflow ablation {output.summary:q} {output.png:q} --root . "
        "--bootstrap {params.bootstrap} --seed {params.seed} > {log:q} 2>&1"


rule ablation_all:
    input:
        paths.ABLATION_SUMMARY,

include: "helpers/bundle.smk"


# The model leaves as a self-describing folder: weights, model.json (everything inference
# needs, with the sha256 of every file) and MODEL_CARD.md.
rule model:
    input:
        checkpoint=paths.CHECKPOINT,
        metrics=paths.METRICS,
        manifest=paths.CASES_PARQUET,
        explain=paths.EXPLAIN_DIR,
        seg_groups=bundle_seg_groups(),
    output:
        paths.BUNDLE_FILES,
    log:
        "logs/model.log",
    benchmark:
        "benchmarks/model.tsv"
    conda:
        "../../envs/bundle.yaml"
    threads: 1
    resources:
        mem_mb=2000,
    params:
        preprocessing=as_json(bundle_preprocessing()),
        explain=as_json(bundle_explain()),
        weights=os.path.abspath(resolve_resource(config["segment"]["weights_dir"])),
        out=lambda wc, output: os.path.dirname(output[0]),
    shell:
        "radflow bundle {input.checkpoint:q} {input.metrics:q} {input.manifest:q} "
        "{params.out:q} --preprocessing {params.preprocessing:q} "
        "--explain {params.explain:q} --faithfulness {input.explain:q}/faithfulness.json "
        "--segment-weights {params.weights:q} --segment-records {input.seg_groups:q} "
        "> {log:q} 2>&1"

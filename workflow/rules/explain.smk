rule explain:
    input:
        checkpoint="results/train/best.pt",
        masked="results/masked/{case}.nii.gz",
        roi="results/masked/{case}_roi.nii.gz",
        ct="results/nifti/{case}.nii.gz",
        predictions="results/eval/predictions.csv",
        metrics="results/eval/metrics.json",
        lesion=lesion_mask,
    output:
        cam="results/explain/{case}_cam.nii.gz",
        raw="results/explain/{case}_cam_raw.nii.gz",
        cam_ct="results/explain/{case}_cam_ct.nii.gz",
        info="results/explain/{case}.json",
        png=report(
            "results/explain/{case}.png",
            caption="../report/explain.rst",
            category="Grad-CAM",
            subcategory=explain_group,
            labels=explain_labels,
        ),
    log:
        "logs/explain/{case}.log",
    benchmark:
        "benchmarks/explain/{case}.tsv"
    conda:
        "../../envs/explain.yaml"
    threads: config["explain"]["threads"]
    resources:
        mem_mb=4000,
        gpu=0 if config["explain"]["device"] == "cpu" else 1,
    params:
        settings=as_json(
            without(config["explain"], "threads", "splits", "lesion_reference")
        ),
        lesion=lambda wc, input: opt("--lesion", input.lesion),
    shell:
        "radflow explain {input.checkpoint:q} {input.masked:q} {input.roi:q} {input.ct:q} "
        "results/explain --case-id {wildcards.case} --predictions {input.predictions:q} "
        "--metrics {input.metrics:q} {params.lesion} --settings {params.settings:q} "
        "--threads {threads} > {log} 2>&1"


rule explain_report:
    input:
        infos=lambda wc: expand("results/explain/{case}.json", case=explain_cases()),
        cams=lambda wc: expand(
            "results/explain/{case}_cam.nii.gz", case=explain_cases()
        ),
        metrics="results/eval/metrics.json",
    output:
        html=report(
            "results/explain/index.html",
            caption="../report/viewer.rst",
            category="Grad-CAM",
            subcategory="review",
            labels={"figure": "review viewer"},
        ),
        faithfulness="results/explain/faithfulness.json",
        faithfulness_png=report(
            "results/explain/faithfulness.png",
            caption="../report/faithfulness.rst",
            category="Grad-CAM",
            subcategory="faithfulness",
            labels={"figure": "faithfulness"},
        ),
    log:
        "logs/explain_report.log",
    benchmark:
        "benchmarks/explain_report.tsv"
    conda:
        "../../envs/explain.yaml"
    threads: 1
    resources:
        mem_mb=4000,
    shell:
        "radflow explain-report results/explain {input.infos:q} --root . "
        "--metrics {input.metrics:q} > {log} 2>&1"


rule explain_all:
    input:
        explained,

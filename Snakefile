# radflow: raw CT DICOM in, an explained 3D classifier out. See README.md and shared DESIGN.md.
from snakemake.utils import min_version, validate

min_version("9.0")


configfile: "config/config.yaml"


validate(config, "workflow/schemas/config.schema.yaml")


report: "workflow/report/workflow.rst"


include: "workflow/rules/common.smk"
include: "workflow/rules/ingest.smk"
include: "workflow/rules/convert.smk"
include: "workflow/rules/segment.smk"
include: "workflow/rules/mask.smk"
include: "workflow/rules/manifest.smk"
include: "workflow/rules/train.smk"
include: "workflow/rules/evaluate.smk"
include: "workflow/rules/explain.smk"


rule all:
    default_target: True
    input:
        "results/inventory/series.parquet",
        # every case's converted, segmented and masked files are the manifest's inputs, so they
        # are not listed again here (a per-case list in this rule would be one more job to
        # rebuild when the ingest checkpoint's case list arrives: DAG time at 10,000 cases)
        "results/qc/segmentation.csv",
        MANIFESTS,
        "results/eval/metrics.json",
        "results/explain",
        ["results/cv/summary.json"] if config["manifest"]["folds"] > 1 else [],

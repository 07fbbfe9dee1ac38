# radflow: raw CT DICOM in, an explained 3D classifier out. See README.md and docs/.
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
include: "workflow/rules/bundle.smk"
include: "workflow/rules/predict.smk"
include: "workflow/rules/ablation.smk"


rule all:
    default_target: True
    input:
        paths.INVENTORY_PARQUET,
        # every case's records are the manifest's inputs, so they are not listed again here
        paths.SEG_QC_TABLE,
        MANIFESTS,
        # none without labels (labels.path null): a preprocessing-only run ends at the manifests
        model_targets(),

# Helpers of the mask rules (workflow/rules/mask.smk): input functions, params.
from radflow.mask import validate_roi_names
from radflow.segment import known_rois


def validate_rois():
    """mask.rois must be class names of the segmentation task (close matches suggested)."""
    validate_roi_names(config["mask"]["rois"], known_rois(config["segment"]["task"]))


validate_rois()


def case_group(wildcards):
    return paths.SEG_GROUP.format(group=group_of(wildcards.case, BATCHES))


def mask_options():
    """qc.reference: a template filled in the job from the private id map (it may name UIDs).
    A function (called per job) only when set: a params string would be wildcard-expanded.
    """
    ref = config["qc"].get("reference")
    if not ref:
        return ""
    text = f"{opt('--reference-template', ref)} {opt('--id-map', paths.ID_MAP_PARQUET)}"
    return lambda wildcards: text

# Helpers of the mask rules (workflow/rules/mask.smk): input functions, params.
from radflow.mask import validate_roi_names
from radflow.segment import known_rois


def validate_rois():
    """mask.rois must be class names of the segmentation task (close matches suggested)."""
    validate_roi_names(config["mask"]["rois"], known_rois(config["segment"]["task"]))


def validate_mask_config():
    """Combinations that cannot work, refused when the workflow starts (not case by case)."""
    seg, m = config["segment"], config["mask"]
    if seg["backend"] == "none" and m["enabled"]:
        raise WorkflowError(
            "segment.backend none gives no ROI to mask with: set mask.enabled false (the "
            "whole volume, resampled to mask.size, is then the input) or choose a backend"
        )
    if not m["enabled"] and "roi" in config["train"]["channels"]:
        raise WorkflowError(
            "train.channels holds roi but mask.enabled is false (there is no ROI): use "
            "train.channels [image]"
        )


validate_mask_config()
if config["mask"]["enabled"]:
    validate_rois()

SEGMENTED = config["segment"]["backend"] != "none"


def mask_seg_group():
    """The mask job's segmentation group record (a fixed pattern with a group per case: no
    function call per case); nothing with segment.backend none."""
    if not SEGMENTED:
        return []
    return case_group if BATCHES else paths.SEG_GROUP.replace("{group}", "{case}")


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

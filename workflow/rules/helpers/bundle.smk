# Helpers of workflow/rules/bundle.smk: params.
from radflow.bundle import preprocessing


def bundle_preprocessing():
    """The settings that made the training cases (radflow.bundle.preprocessing)."""
    return preprocessing(config)


def bundle_explain():
    return without(config["explain"], "threads", "splits", "lesion_reference", "device")


def bundle_seg_groups():
    """The segment group records (their weights sha256 identify the segmenter the training
    masks came from); none with segment.backend none."""
    if not SEGMENTED:
        return []
    return lambda wc: [paths.SEG_GROUP.format(group=g) for g in sorted(groups())]

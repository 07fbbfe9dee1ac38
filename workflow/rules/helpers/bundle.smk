# Helpers of workflow/rules/bundle.smk: params.
from radflow.bundle import preprocessing


def bundle_preprocessing():
    """The settings that made the training cases (radflow.bundle.preprocessing)."""
    return preprocessing(config)


def bundle_explain():
    return without(config["explain"], "threads", "splits", "lesion_reference", "device")

# Helpers of the bundle rule (workflow/rules/bundle.smk): params.
from radflow import bundle


def bundle_preprocessing():
    """The settings that made the training cases (radflow.bundle.preprocessing)."""
    return bundle.preprocessing(config)


def bundle_explain():
    return without(config["explain"], "threads", "splits", "lesion_reference", "device")

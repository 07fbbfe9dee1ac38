# Helpers of the ingest rules (workflow/rules/ingest.smk): input functions, params.
from radflow import source


def selection_rules():
    """ingest.selection plus the convert limits that make a series usable."""
    rules = dict(config["ingest"]["selection"])
    rules["max_missing_slices"] = config["convert"]["max_missing_slices"]
    rules["gantry_tilt"] = config["convert"]["gantry_tilt"]
    rules["irregular_spacing"] = config["convert"]["irregular_spacing"]
    return rules


def ingest_labels():
    """Labels ingest joins: a NIfTI sheet's label column goes through labels.mapping there.
    (DICOM labels are joined at the manifest only: a new labels sheet never re-indexes the
    raw tree.)"""
    return config["labels"] if INPUT.format == "nifti" else {}

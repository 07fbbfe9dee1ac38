# Helpers of the convert rules (workflow/rules/convert.smk): input functions, params.
def case_filelist(wildcards):
    inventory()  # the file lists exist once the ingest checkpoint has run
    return paths.FILE_LIST.format(case=wildcards.case)


def convert_settings_record():
    """What a conversion depends on (its settings file): convert, the memory budget and, for
    NIfTI input only, the input spec (a DICOM cohort's settings file keeps its hash)."""
    record = {
        **without(config["convert"], "threads"),
        "max_image_mb": config["ingest"]["max_image_mb"],
    }
    if INPUT.format == "nifti":
        record["input"] = INPUT.stage_settings()
    return record

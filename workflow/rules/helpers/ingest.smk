# Helpers of the ingest rules (workflow/rules/ingest.smk): input functions, params.
def selection_rules():
    """ingest.selection plus the convert limits that make a series usable."""
    rules = dict(config["ingest"]["selection"])
    rules["max_missing_slices"] = config["convert"]["max_missing_slices"]
    rules["gantry_tilt"] = config["convert"]["gantry_tilt"]
    rules["irregular_spacing"] = config["convert"]["irregular_spacing"]
    return rules

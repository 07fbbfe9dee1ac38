# Helpers of the explain rules (workflow/rules/explain.smk): input functions, params.
def _explain_info(name):
    with open(f"{paths.EXPLAIN_DIR}/{name}.json") as fh:
        return json.load(fh)


def explain_subcategory(wildcards):
    """Report subcategory: the case's outcome (TP, FP, FN, TN), or the cohort pages."""
    if not wildcards.name.startswith("case-"):
        return "review and faithfulness"
    return _explain_info(wildcards.name)["group"]


def explain_labels(wildcards):
    if not wildcards.name.startswith("case-"):
        return {"figure": wildcards.name}
    info = _explain_info(wildcards.name)
    return {
        "case": wildcards.name,
        "split": info["split"],
        "probability": f"{info['probability']:.3f}",
        "label": str(info["label"]),
    }

# Helpers of the train rules (workflow/rules/train.smk): input functions, params.
def model_targets():
    """rule all's training, evaluation and explanation targets. Without a labels sheet
    (labels.path null) there is nothing to train on: the default target then ends with the
    masks, the QC table and the manifests, and says so. (With a sheet that labels no case,
    train fails with one line naming the cause.)"""
    if has_labels():
        cv = [paths.CV_SUMMARY] if config["manifest"]["folds"] > 1 else []
        return [paths.METRICS, paths.EXPLAIN_DIR, *paths.BUNDLE_FILES, *cv]
    if workflow.is_main_process:
        print(
            "radflow: no labels (labels.path null, no label column in the sheet): "
            "preprocessing only (inventory, masks, QC, "
            "manifests); training, evaluation and explanation are skipped until a labels "
            "sheet is set",
            file=sys.stderr,
        )
    return []

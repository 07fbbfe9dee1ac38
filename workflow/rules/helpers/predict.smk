# Helpers of the predict rules (workflow/rules/predict.smk): params.
import sys


def predict_config():
    """The project's config for radflow predict-config, without the salt (it reaches the job
    through the environment, never a command line). Rerun predict_all after a config change
    (--forcerun predict_cases): a function param is not a rerun trigger."""
    text = as_json({**config, "ids": without(config["ids"], "salt")})
    return (
        lambda wildcards: text
    )  # a function: templates in it would be wildcard-expanded


def predict_bundle():
    return [os.path.join(config["predict"]["model"], "model.json")]


def predict_inputs():
    """The new cohort's tree and labels sheet (none when predict.raw_dir is unset: the job
    then says what to set)."""
    pred = config["predict"]
    return [p for p in (pred["raw_dir"], (pred.get("labels") or {}).get("path")) if p]

# Helpers of the ablation rules (workflow/rules/ablation.smk): input functions, params.
from radflow.ablation import variant_mask_settings

VARIANTS = paths.ABLATION_VARIANTS


def V(template):
    """A path of the default layout in the variant's layout (``{variant}`` kept)."""
    return paths.in_variant(template)


def _variant_mask(wildcards):
    try:
        return without(
            variant_mask_settings(wildcards.variant, config["mask"]), "threads"
        )
    except ValueError as exc:
        raise WorkflowError(str(exc)) from None


def ablation_mask_settings(wildcards):
    return as_json(_variant_mask(wildcards))


def ablation_mask_settings_file(wildcards):
    return settings_input("mask", {**_variant_mask(wildcards), "qc": config["qc"]})


def ablation_mask_records(wildcards):
    """Every selected case's mask record of the variant (the default manifest picks)."""
    return [
        V(paths.MASK_STATUS).format(variant=wildcards.variant, case=c) for c in cases()
    ]

# Helpers of the segment rules (workflow/rules/segment.smk): input functions, params.
from radflow.segment import group_of, phantom_guard, workflow_free


def segment_settings():
    s = workflow_free(config["segment"])
    s["weights_dir"] = resolve_resource(s["weights_dir"])
    return s


def guard_phantom():
    """The phantom weights on a cohort other than the demo's stop the workflow at start, before
    any case is segmented (segment.allow_phantom: true lets them run)."""
    seg = config["segment"]
    why = phantom_guard(
        seg["backend"],
        resolve_resource(seg["weights_dir"]),
        config["raw_dir"],
        seg["allow_phantom"],
    )
    if why:
        raise WorkflowError(why)


guard_phantom()


def segment_gpus():
    seg = config["segment"]
    return 0 if seg["backend"] == "precomputed" or seg["device"] == "cpu" else 1


BATCHES = int(config["segment"]["batches"] or 0)


@lru_cache(maxsize=4)
def _groups(path, mtime):
    """group -> its cases, grouped once per inventory version (not once per group job)."""
    out = {}
    for c in sorted(_inventory(path, mtime).index):
        out.setdefault(group_of(c, BATCHES), []).append(c)
    return out


def groups():
    path = ingest_output().parquet
    return _groups(path, os.path.getmtime(path))


def group_sidecars(wildcards):
    return [paths.SIDECAR.format(case=c) for c in groups().get(wildcards.group, [])]


def group_priority(wildcards):
    """Larger groups first (longest-job-first), so the biggest does not set the run's tail."""
    return len(groups().get(wildcards.group, []))


def precomputed_template():
    """segment.precomputed, else (a NIfTI sheet) the sheet's mask column: ``{mask}`` is
    filled from the private id map, which holds each case's mask path."""
    template = config["segment"]["precomputed"]
    if template is None and INPUT.format == "nifti":
        return "{mask}"
    return resolve_resource(template)


def segment_options():
    """The precomputed backend's template, filled per case in the job from the private id map
    (the template may name raw UIDs: never resolved into a path Snakemake records)."""
    seg = config["segment"]
    if seg["backend"] != "precomputed":
        return ""
    text = " ".join(
        [
            opt("--precomputed", precomputed_template()),
            opt("--id-map", paths.ID_MAP_PARQUET),
        ]
    )
    return (
        lambda wildcards: text
    )  # a function: a params string would be wildcard-expanded

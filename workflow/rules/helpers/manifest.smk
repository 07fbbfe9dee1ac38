# Helpers of the manifest rules (workflow/rules/manifest.smk): input functions, params.
MANIFESTS = [
    paths.CASES_CSV,
    paths.CASES_PARQUET,
    paths.EXCLUDED,
    paths.DATALIST,
] + [paths.SPLIT_CSV.format(split=s) for s in paths.SPLITS]

# Config sections that shape the cases a manifest describes (not train/evaluate/explain:
# changing those must not rerun the manifest and everything after it).
UPSTREAM = (
    "raw_dir",
    "input",
    "labels",
    "ids",
    "ingest",
    "convert",
    "segment",
    "mask",
    "qc",
    "manifest",
)


def config_hash():
    # how the work is spread (threads, segmentation batches) does not change the cases; the
    # salt is in it only through its fingerprint
    def what(k, v):
        if k == "ids":
            return {"salt": fingerprint(v["salt"])}
        return (
            without(v, "threads", "batches", "allow_phantom")
            if isinstance(v, dict)
            else v
        )

    text = as_json({k: what(k, config.get(k)) for k in UPSTREAM})
    return hashlib.sha256(text.encode()).hexdigest()[:16]

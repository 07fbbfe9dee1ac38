rule convert:
    input:
        # ancient: the edge from ingest without re-converting every case whenever the
        # inventory is rewritten; the per-case file list is what triggers a conversion (the
        # inventory gives the sidecar its series pseudonym, fixed by the case id and the salt)
        inventory=ancient("results/inventory/series.csv"),
        files=case_filelist,
    output:
        nifti="results/nifti/{case}.nii.gz",
        sidecar="results/nifti/{case}.json",
    log:
        "logs/convert/{case}.log",
    benchmark:
        "benchmarks/convert/{case}.tsv"
    conda:
        "../../envs/convert.yaml"
    threads: config["convert"]["threads"]
    resources:
        mem_mb=4000,
    params:
        settings=as_json(without(config["convert"], "threads")),
    shell:
        "radflow convert {input.files:q} {output.nifti:q} --sidecar {output.sidecar:q} "
        "--settings {params.settings:q} --case-id {wildcards.case} "
        "--inventory {input.inventory:q} --threads {threads} > {log} 2>&1"


rule convert_all:
    input:
        converted,

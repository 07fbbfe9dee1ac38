include: "helpers/convert.smk"


# The job's output is the sidecar, written last: the volume beside it when the series converts,
# else the case's failed record (radflow convert --record-failure), so a bad case fails alone.
rule convert:
    input:
        # ancient: the edge from ingest without re-converting every case whenever the
        # inventory is rewritten; the case's file list is what triggers a conversion
        inventory=ancient(paths.INVENTORY_CSV),
        files=case_filelist,
        settings=settings_input("convert", convert_settings_record()),
    output:
        sidecar=paths.SIDECAR,
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
        nifti=paths.NIFTI,
        max_mb=config["ingest"]["max_image_mb"],
        input=as_json(INPUT.stage_settings()),
    shell:
        "radflow convert {input.files:q} {params.nifti:q} --sidecar {output.sidecar:q} "
        "--settings {params.settings:q} --input {params.input:q} --case-id {wildcards.case:q} "
        "--inventory {input.inventory:q} --max-image-mb {params.max_mb:q} --record-failure "
        "--threads {threads} > {log:q} 2>&1"


rule convert_all:
    input:
        per_case(paths.SIDECAR),

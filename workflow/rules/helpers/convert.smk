# Helpers of the convert rules (workflow/rules/convert.smk): input functions, params.
def case_filelist(wildcards):
    inventory()  # the file lists exist once the ingest checkpoint has run
    return paths.FILE_LIST.format(case=wildcards.case)

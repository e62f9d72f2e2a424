# dnd: DnD-Transformer experiments as one Snakemake DAG.
#
#   snakemake --cores 2                                  # the smoke experiment
#   snakemake --profile workflow/profiles/local --config experiments=[text-small]
#   snakemake --report report.zip                        # figures and sample grids
#
# The rules are thin: each calls one `python -m dnd <stage>`; the experiments are the
# YAML files in experiments/ (validated against workflow/schemas/experiment.schema.yaml).


report: "workflow/report/workflow.rst"


include: "workflow/rules/common.smk"
include: "workflow/rules/data.smk"
include: "workflow/rules/tokenizer.smk"
include: "workflow/rules/generator.smk"
include: "workflow/rules/evaluate.smk"
include: "workflow/rules/report.smk"


rule all:
    default_target: True
    input:
        final_outputs(),

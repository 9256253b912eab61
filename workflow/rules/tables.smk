# The landing page of `snakemake --report`: what this run computed, from its config.
report: "../report/workflow.rst"


# Table 1: Pre, PMF, SoftMerge and the main SMAT model, each without and with test-time fine-tuning. The report
# shows each table as rendered (HTML) and its tidy CSV.
rule table1:
    input:
        eval_csvs(TABLE1_IDS, config["evaluation"]["finetune"]),
    output:
        csv=report(
            "results/tables/table1.csv", caption="../report/tidy_table.rst", category="Tables", subcategory="Table 1"
        ),
        md="results/tables/table1.md",
        tex="results/tables/table1.tex",
        html=report(
            "results/tables/table1.html", caption="../report/table1.rst", category="Tables", subcategory="Table 1"
        ),
        provenance="results/tables/table1.provenance.json",
    log:
        "logs/tables/table1.log",
    localrule: True
    conda:
        "../../envs/smat.yaml"
    params:
        table="table1",
        datasets=DATASET_ARGS,
        out_dir=lambda wildcards, output: os.path.dirname(output.csv),
    shell:
        "smat tables {params.table} --eval {input} {params.datasets} --out-dir {params.out_dir} > {log} 2>&1"


# Table 2 (METHOD §2.2): row 1 = the main SMAT model, rows 2-5 = its ablations, row 6 = PMF; no fine-tuning.
use rule table1 as table2 with:
    input:
        eval_csvs(TABLE2_IDS),
    output:
        csv=report(
            "results/tables/table2.csv", caption="../report/tidy_table.rst", category="Tables", subcategory="Table 2"
        ),
        md="results/tables/table2.md",
        tex="results/tables/table2.tex",
        html=report(
            "results/tables/table2.html", caption="../report/table2.rst", category="Tables", subcategory="Table 2"
        ),
        provenance="results/tables/table2.provenance.json",
    log:
        "logs/tables/table2.log",
    params:
        table="table2",
        datasets=DATASET_ARGS,
        out_dir=lambda wildcards, output: os.path.dirname(output.csv),


# The paper's published numbers (METHOD §6), for side-by-side reading; never mixed into our results.
use rule table1 as table_reference with:
    input:
        [],
    output:
        csv=report(
            "results/tables/table_reference.csv",
            caption="../report/tidy_table.rst",
            category="Tables",
            subcategory="Published",
        ),
        md="results/tables/table_reference.md",
        tex="results/tables/table_reference.tex",
        html=report(
            "results/tables/table_reference.html",
            caption="../report/reference.rst",
            category="Tables",
            subcategory="Published",
        ),
        provenance="results/tables/table_reference.provenance.json",
    log:
        "logs/tables/table_reference.log",
    params:
        table="reference",
        datasets="",
        out_dir=lambda wildcards, output: os.path.dirname(output.csv),


# The fastest check of a reproduction: Pre and the authors' released models (config `released`) in Table 1's
# layout, with nothing trained: `snakemake table1_released --configfile config/paper.yaml config/released.yaml`.
use rule table1 as table1_released with:
    input:
        eval_csvs([*PRETRAINED_IDS, *RELEASED_IDS], config["evaluation"]["finetune"]),
    output:
        csv="results/tables/released/table1.csv",
        md="results/tables/released/table1.md",
        tex="results/tables/released/table1.tex",
        html="results/tables/released/table1.html",
        provenance="results/tables/released/table1.provenance.json",
    log:
        "logs/tables/table1_released.log",

"""SMAT experiment pipeline: datasets -> weights -> frozen episodes -> meta-tuning sweep -> lr selection ->
evaluation -> tables and figures. Every rule runs one `smat` command; all science lives in the package.

    snakemake --cores 2 all_tables                                   # embedded benchmark (config/config.yaml)
    snakemake all --profile workflow/profiles/slurm --profile workflow/profiles/paper --configfile config/paper.yaml

After `kill -9` of Snakemake: `snakemake --unlock`, then the same command with `--rerun-incomplete`
(workflow/profiles/README.md).
"""

import os
import shlex

from snakemake.utils import min_version, validate

from smat.config_loader import exponents_as_numbers

min_version("9.0")

# Where the conda environment's post-deploy script installs the package from (envs/smat.post-deploy.sh), since
# Snakemake runs it from a copy in its own conda folder.
os.environ.setdefault("SMAT_WORKFLOW_DIR", workflow.basedir)


# The embedded default, unless --configfile names a complete config of its own (config/paper.yaml, ...):
# Snakemake would otherwise merge the two, mixing their datasets.
if not workflow.overwrite_configfiles:

    configfile: workflow.source_path("config/config.yaml")


# `1e-3` is a number, as in the package's configs (Snakemake's YAML 1.1 reads it as a string). A wrong key or
# value stops here, before any job starts.
config.update(exponents_as_numbers(config))
validate(config, "workflow/schemas/config.schema.yaml")


include: "workflow/rules/common.smk"
include: "workflow/rules/data.smk"
include: "workflow/rules/weights.smk"
include: "workflow/rules/episodes.smk"
include: "workflow/rules/train.smk"
include: "workflow/rules/evaluate.smk"
include: "workflow/rules/tables.smk"
include: "workflow/rules/figures.smk"
include: "workflow/rules/anatomy.smk"


rule all:
    default_target: True
    input:
        all_tables(),
        all_figures(),


rule all_tables:
    input:
        all_tables(),


rule all_figures:
    input:
        all_figures(),


localrules:
    all,
    all_tables,
    all_figures,

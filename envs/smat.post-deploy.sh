#!/usr/bin/env bash
# Run by Snakemake once, inside the new conda environment of smat.yaml, right after creating it (from a copy
# of smat.yaml under .snakemake/conda/, which is why that file cannot install the project by a relative path).
# It installs this project in editable mode from the workflow's folder, so that every rule's `smat` is the
# code of that checkout: the folder in SMAT_WORKFLOW_DIR, else the working directory when it is the checkout
# (the README's way of running the workflow). The dependencies are already installed, at the pinned versions.
set -euo pipefail

source_dir="${SMAT_WORKFLOW_DIR:-$PWD}"
if ! grep -qs '^name = "smat"$' "$source_dir/pyproject.toml"; then
    echo "smat.post-deploy.sh: $source_dir is not the SMAT checkout; set SMAT_WORKFLOW_DIR to the folder" \
         "that holds the Snakefile (or run Snakemake there)" >&2
    exit 1
fi
python -m pip install --no-deps --no-build-isolation --editable "$source_dir"

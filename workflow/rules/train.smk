# Meta-tuning (METHOD §1, §2). The training yaml (training.config) holds every setting except the ones a
# model id fixes: method, tau, experts, seed and the Table 2 switches (smat/experiment.py).
#
# Interrupted runs resume. The declared outputs are the products: best.pt, train_log.jsonl and, for models with
# gates (common.smk: GATED_IDS), expert_masks.npz. During training `smat train` writes them under temporary
# names (best.partial.pt, train_log.partial.jsonl) next to its resume state (resume.pt, last.pt): none of those
# is a declared output, so Snakemake never deletes them and a re-run of a cut-off job continues from them. At
# the very end the products get their final names (best.pt last): a reader sees them only once the model is
# finished, and deleting a cut-off job's outputs before its re-run loses nothing (a job cut off between the renames
# takes back the renamed files, or trains again if Snakemake deleted them). meta_tune_dense: the same rule for the
# models without gates, which write no expert_masks.npz.
#
# compute.gpus_per_job = N > 1 runs the job as N data-parallel torchrun processes (METHOD §11) on one node
# (nodes=1) with N GPUs (gpu=N: Slurm --gpus=N). No `tasks` resource: the Slurm plugin would turn it into
# --ntasks-per-gpu and start the whole job N times; torchrun starts the N processes inside the one task, and
# threads (--cpus-per-task) is for all of them together.


rule meta_tune:
    input:
        config=project_path(config["training"]["config"]),
        pretrained=PRETRAINED,
        stores=[manifest(d) for d in ID_DATASETS],
    output:
        best="results/models/{model_id}/best.pt",
        train_log="results/models/{model_id}/train_log.jsonl",
        masks="results/models/{model_id}/expert_masks.npz",
    log:
        "logs/meta_tune/{model_id}.log",
    benchmark:
        "results/benchmarks/meta_tune/{model_id}.tsv"
    wildcard_constraints:
        model_id=one_of(GATED_IDS),
    conda:
        "../../envs/smat.yaml"
    threads: 1
    resources:
        runtime=per_attempt(30),
        mem_mb=per_attempt(3000),
        gpu=GPU * GPUS_PER_JOB,
        nodes=1,
    params:
        train=lambda wildcards, threads: rule_args.smat_train_command(config, threads),
        out=lambda wildcards, output: os.path.dirname(output.best),
        stores=[store(d) for d in ID_DATASETS],
        overrides=lambda wildcards: MODELS[wildcards.model_id].cli_overrides(),
        device=DEVICE,
    shell:
        "{params.train} --config {input.config} --store {params.stores} --pretrained {input.pretrained} "
        "--out {params.out} {params.overrides} --device {params.device} > {log} 2>&1"


# The models without gates (PMF, SoftMerge, the dense ablations); profiles size it as meta_tune.
use rule meta_tune as meta_tune_dense with:
    output:
        best="results/models/{model_id}/best.pt",
        train_log="results/models/{model_id}/train_log.jsonl",
    wildcard_constraints:
        model_id=one_of([m for m in TRAINED_IDS if m not in GATED_IDS]),


# The authors' released checkpoints (config `released`), converted by `smat import` into model checkpoints
# that the evaluation rules take like trained ones: extra Table 1 columns, no training (METHOD §10).
rule import_released:
    input:
        unpack(released_inputs),
    output:
        "results/models/released/{name}/best.pt",
    log:
        "logs/import_released/{name}.log",
    wildcard_constraints:
        name="[^/]+",
    conda:
        "../../envs/smat.yaml"
    threads: 1
    resources:
        runtime=per_attempt(10),
        mem_mb=per_attempt(8000),
    params:
        options=lambda wildcards: rule_args.released_import_args(config["released"][wildcards.name], PROJECT),
        checkpoint=lambda wildcards, input: input.get("checkpoint", ""),
    shell:
        "smat import {params.options} {params.checkpoint} --out {output} > {log} 2>&1"

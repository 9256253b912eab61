# Meta-tuning (METHOD §1, §2). The training yaml (training.config) holds every setting except the ones a
# model id fixes: method, tau, experts, seed and the Table 2 switches (smat/experiment.py).
#
# Interrupted runs resume. During training `smat train` writes best.pt (from the first validation on),
# train_log.jsonl and its resume state (resume.pt, last.pt): none of them is a declared output, so Snakemake
# never deletes them and a re-run of a cut-off job continues from them. The declared outputs are written at
# the very end (DONE last): deleting them before a re-run loses nothing. Readers of a model wait for DONE
# (common.smk: trained), and so do the readers of expert_masks.npz, which SMAT models with gates write
# before it. Not update(): Snakemake restores such a file after a failed job, which would put the log
# behind the resume state.
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
        done="results/models/{model_id}/DONE",
    log:
        "logs/meta_tune/{model_id}.log",
    benchmark:
        "results/benchmarks/meta_tune/{model_id}.tsv"
    wildcard_constraints:
        model_id=one_of(TRAINED_IDS),
    conda:
        "../../envs/smat.yaml"
    threads: 1
    resources:
        runtime=per_attempt(30),
        mem_mb=per_attempt(3000),
        gpu=GPU * GPUS_PER_JOB,
        nodes=1,
    params:
        train=lambda wildcards, threads: smat_train_command(threads),
        out=lambda wildcards, output: os.path.dirname(output.done),
        stores=[store(d) for d in ID_DATASETS],
        overrides=lambda wildcards: MODELS[wildcards.model_id].cli_overrides(),
        device=DEVICE,
    shell:
        "{params.train} --config {input.config} --store {params.stores} --pretrained {input.pretrained} "
        "--out {params.out} {params.overrides} --device {params.device} > {log} 2>&1"


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
        options=lambda wildcards: released_import_args(wildcards.name),
        checkpoint=lambda wildcards, input: input.get("checkpoint", ""),
    shell:
        "smat import {params.options} {params.checkpoint} --out {output} > {log} 2>&1"

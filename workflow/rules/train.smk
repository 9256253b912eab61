# Meta-tuning (spec §1, §2). The training yaml (training.config) holds every setting except the ones a
# model id fixes: method, tau, experts, seed and the Table 2 switches (common.smk, MODELS).
#
# Interrupted runs resume: `smat train` keeps its resume state (resume.pt) in the model directory, outside
# the declared outputs, so Snakemake never deletes it. best.pt and the JSON-lines log are written during
# training and flagged update(): a re-run of a killed job keeps them instead of deleting them first, and the
# resumed run continues both. DONE is written last; expert_masks.npz at the end of SMAT runs.


rule meta_tune_smat:
    input:
        config=project_path(config["training"]["config"]),
        pretrained=PRETRAINED,
        stores=[manifest(d) for d in ID_DATASETS],
    output:
        model=update("results/models/{model_id}/best.pt"),
        log=update("results/models/{model_id}/train_log.jsonl"),
        masks="results/models/{model_id}/expert_masks.npz",
        done="results/models/{model_id}/DONE",
    wildcard_constraints:
        model_id=one_of(SMAT_IDS),
    params:
        out=lambda wildcards, output: os.path.dirname(output.done),
        stores=[store(d) for d in ID_DATASETS],
        overrides=lambda wildcards: MODELS[wildcards.model_id]["overrides"],
        device=DEVICE,
    log:
        "logs/meta_tune/{model_id}.log",
    benchmark:
        "results/benchmarks/meta_tune/{model_id}.tsv"
    conda:
        "../../envs/smat.yaml"
    threads: JOBS["train"]["threads"]
    resources:
        runtime=runtime("train"),
        mem_mb=mem_mb("train"),
        gpu=gpus("train"),
        gpu_model=gpu_model("train"),
    shell:
        "smat train --config {input.config} --store {params.stores} --pretrained {input.pretrained} "
        "--out {params.out} {params.overrides} --device {params.device} > {log} 2>&1"


# PMF, SoftMerge and the Table 2 ablation rows: the same command, without expert masks among the outputs.
use rule meta_tune_smat as meta_tune with:
    output:
        model=update("results/models/{model_id}/best.pt"),
        log=update("results/models/{model_id}/train_log.jsonl"),
        done="results/models/{model_id}/DONE",
    wildcard_constraints:
        model_id=one_of(BASELINE_IDS),

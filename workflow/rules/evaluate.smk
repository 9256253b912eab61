# Test-time fine-tuning picks one learning rate per (model, dataset, mode) on the hps episodes (METHOD §3.5);
# one job per (model, mode) searches every dataset (common.smk: per_dataset).
rule select_lr:
    input:
        model=lambda wildcards: checkpoint(wildcards.model_id),
        episodes=per_dataset("results/episodes/{dataset}/hps.json"),
        stores=EVAL_MANIFESTS,
    output:
        per_dataset("results/lr/{model_id}/{dataset}/{finetune}.json"),
    log:
        "logs/select_lr/{model_id}/{finetune}.log",
    benchmark:
        "results/benchmarks/select_lr/{model_id}/{finetune}.tsv"
    wildcard_constraints:
        finetune=one_of(tuned_modes()),
    conda:
        "../../envs/smat.yaml"
    threads: 1
    resources:
        runtime=per_attempt(30 * len(EVAL_DATASETS)),  # 30 minutes per evaluated dataset
        mem_mb=per_attempt(3000),
        gpu=GPU,
    params:
        model=lambda wildcards: model_spec(wildcards.model_id),
        stores=EVAL_STORES,
        grid=rule_args.lr_grid_args(config),
        n_episodes=config["episodes"]["hps"]["n"],
        sizes=rule_args.eval_size_args(config),
        device=DEVICE,
    shell:
        "smat select-lr --model {params.model} --episodes {input.episodes} --store {params.stores} "
        "--finetune {wildcards.finetune} {params.grid} --n-episodes {params.n_episodes} {params.sizes} --out {output} "
        "--device {params.device} > {log} 2>&1"


# One job per (model, mode) evaluates every dataset, writing each dataset's CSV and JSON.
rule evaluate:
    input:
        unpack(evaluation_inputs),
    output:
        csv=per_dataset("results/eval/{model_id}/{dataset}/{finetune}.csv"),
        summary=per_dataset("results/eval/{model_id}/{dataset}/{finetune}.json"),
    log:
        "logs/evaluate/{model_id}/{finetune}.log",
    benchmark:
        "results/benchmarks/evaluate/{model_id}/{finetune}.tsv"
    conda:
        "../../envs/smat.yaml"
    threads: 1
    resources:
        runtime=per_attempt(30 * len(EVAL_DATASETS)),  # 30 minutes per evaluated dataset
        mem_mb=per_attempt(3000),
        gpu=GPU,
    params:
        model=lambda wildcards: model_spec(wildcards.model_id),
        stores=EVAL_STORES,
        options=lambda wildcards, input: rule_args.evaluation_args(
            config, MODELS[wildcards.model_id].label, wildcards.finetune, input.get("lr", [])
        ),
        sizes=rule_args.eval_size_args(config),
        device=DEVICE,
    shell:
        "smat evaluate --model {params.model} --episodes {input.episodes} --store {params.stores} "
        "--finetune {wildcards.finetune} {params.options} {params.sizes} --out {output.csv} --device {params.device} "
        "> {log} 2>&1"

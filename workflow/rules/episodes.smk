# Test episodes are sampled once and shared by every model, so comparisons are paired (METHOD §3.4); the
# hps file holds the few labelled episodes of the fine-tuning lr search (METHOD §3.5), with its own seed.
rule sample_episodes:
    input:
        store=lambda wildcards: manifest(wildcards.dataset),
    output:
        "results/episodes/{dataset}/{purpose}.json",
    log:
        "logs/sample_episodes/{dataset}/{purpose}.log",
    benchmark:
        "results/benchmarks/sample_episodes/{dataset}/{purpose}.tsv"
    conda:
        "../../envs/smat.yaml"
    threads: 1
    resources:
        runtime=per_attempt(10),
        mem_mb=per_attempt(2000),
    params:
        store=lambda wildcards: store(wildcards.dataset),
        options=lambda wildcards: rule_args.episode_args(config, wildcards.dataset, wildcards.purpose),
    shell:
        "smat episodes sample --store {params.store} --split test {params.options} --out {output} > {log} 2>&1"

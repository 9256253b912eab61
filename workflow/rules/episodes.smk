# Test episodes are sampled once and shared by every model, so comparisons are paired (spec §3.4); the
# hps file holds the few labelled episodes of the fine-tuning lr search (spec §3.5), with its own seed.
rule sample_episodes:
    input:
        store=lambda wildcards: manifest(wildcards.dataset),
    output:
        "results/episodes/{dataset}/{purpose}.json",
    params:
        store=lambda wildcards: store(wildcards.dataset),
        options=episode_args,
    log:
        "logs/sample_episodes/{dataset}/{purpose}.log",
    benchmark:
        "results/benchmarks/sample_episodes/{dataset}/{purpose}.tsv"
    conda:
        "../../envs/smat.yaml"
    threads: JOBS["light"]["threads"]
    resources:
        runtime=runtime("light"),
        mem_mb=mem_mb("light"),
    shell:
        "smat episodes sample --store {params.store} --split test {params.options} --out {output} > {log} 2>&1"

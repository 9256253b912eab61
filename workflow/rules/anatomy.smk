# Update anatomy (METHOD §5.6): per model, where its departure from θ_pre lies and what each tensor group of it
# is worth on the test episodes; then one table over the trained methods' main models and the τ sweep (its figure: figures.smk).
# Part of `all` (all_figures), not of all_tables: it is an analysis, as the figures are.

ANATOMY_IDS = FIGURE_MODELS["anatomy"]  # the trained methods' main models and the sweep's other points
ANATOMY_ROLES = " ".join(DATASETS[d]["role"] for d in EVAL_DATASETS)


rule anatomy:
    input:
        model=lambda wildcards: checkpoint(wildcards.model_id),
        pretrained=PRETRAINED,
        episodes=per_dataset("results/episodes/{dataset}/test.json"),
        stores=EVAL_MANIFESTS,
    output:
        csv="results/anatomy/{model_id}.csv",
        json="results/anatomy/{model_id}.json",
    log:
        "logs/anatomy/{model_id}.log",
    benchmark:
        "results/benchmarks/anatomy/{model_id}.tsv"
    wildcard_constraints:
        model_id=one_of(ANATOMY_IDS),
    conda:
        "../../envs/smat.yaml"
    threads: 1
    resources:
        runtime=per_attempt(30),
        mem_mb=per_attempt(3000),
        gpu=GPU,
    params:
        model=lambda wildcards: checkpoint(wildcards.model_id),
        stores=EVAL_STORES,
        datasets=" ".join(EVAL_DATASETS),
        roles=ANATOMY_ROLES,
        limit=config["evaluation"]["anatomy_episodes"],
        label=lambda wildcards: shlex.quote(MODELS[wildcards.model_id].label),
        device=DEVICE,
    shell:
        "smat anatomy --model {params.model} --pretrained {input.pretrained} --datasets {params.datasets} "
        "--roles {params.roles} --episodes {input.episodes} --store {params.stores} --limit {params.limit} "
        "--label {params.label} --out {output.csv} --device {params.device} > {log} 2>&1"


rule table_anatomy:
    input:
        files=[f"results/anatomy/{m}.csv" for m in ANATOMY_IDS],
    output:
        csv="results/tables/anatomy.csv",
        md=report("results/tables/anatomy.md", caption="../report/anatomy_table.rst", category="Tables"),
    log:
        "logs/tables/anatomy.log",
    localrule: True
    conda:
        "../../envs/smat.yaml"
    params:
        models=[f"{MODELS[m].label} ({m})" for m in ANATOMY_IDS],
    shell:
        "smat tables anatomy --eval {input.files} --out-dir results/tables > {log} 2>&1"

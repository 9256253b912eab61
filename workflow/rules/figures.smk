# Analyses of METHOD §5, drawn from the first seed's models; each figure is written as PNG and PDF. The
# `models` param names the models a figure shows ("label (model id)"), for its report caption
# (workflow/report/*.rst).


PARETO_IDS = [*FIGURE_SWEEP_IDS, "pre", FIGURE_IDS["pmf"], FIGURE_IDS["softmerge"]]
CURVES_IDS = [FIGURE_IDS[m] for m in ("smat", "pmf", "softmerge")]


rule figure_pareto:
    input:
        files=eval_csvs(PARETO_IDS),
    output:
        png=report("results/figures/pareto.png", caption="../report/pareto.rst", category="Figures"),
        pdf="results/figures/pareto.pdf",
    log:
        "logs/figures/pareto.log",
    localrule: True
    conda:
        "../../envs/smat.yaml"
    params:
        figure="pareto",
        datasets=DATASET_ARGS,
        prefix=figure_prefix,
        models=[f"{MODELS[m].label} ({m})" for m in PARETO_IDS],
    shell:
        "smat figures {params.figure} --inputs {input.files} {params.datasets} --out-prefix {params.prefix} "
        "> {log} 2>&1"


use rule figure_pareto as figure_dendrogram with:
    input:
        files=eval_csvs([FIGURE_IDS["smat"]]),
    output:
        png=report("results/figures/dendrogram.png", caption="../report/dendrogram.rst", category="Figures"),
        pdf="results/figures/dendrogram.pdf",
    log:
        "logs/figures/dendrogram.log",
    params:
        figure="dendrogram",
        datasets=DATASET_ARGS,
        prefix=figure_prefix,
        models=[f"{MODELS[m].label} ({m})" for m in [FIGURE_IDS["smat"]]],


# Training curves, gradient alignment and the expert-mask figures read files of a model directory that are
# not declared outputs (train.smk): these figures wait for DONE and name the files as params.
rule figure_curves:
    input:
        done=[done_marker(m) for m in CURVES_IDS],
    output:
        png=report("results/figures/curves.png", caption="../report/curves.rst", category="Figures"),
        pdf="results/figures/curves.pdf",
    log:
        "logs/figures/curves.log",
    localrule: True
    conda:
        "../../envs/smat.yaml"
    params:
        figure="curves",
        files=[train_log(m) for m in CURVES_IDS],
        prefix=figure_prefix,
        models=[f"{MODELS[m].label} ({m})" for m in CURVES_IDS],
    shell:
        "smat figures {params.figure} --inputs {params.files} --out-prefix {params.prefix} > {log} 2>&1"


use rule figure_curves as figure_grad_alignment with:
    input:
        done=[done_marker(m) for m in grad_alignment_models()],
    output:
        png=report("results/figures/grad_alignment.png", caption="../report/grad_alignment.rst", category="Figures"),
        pdf="results/figures/grad_alignment.pdf",
    log:
        "logs/figures/grad_alignment.log",
    params:
        figure="grad-alignment",
        files=[train_log(m) for m in grad_alignment_models()],
        prefix=figure_prefix,
        models=[f"{MODELS[m].label} ({m})" for m in grad_alignment_models()],


use rule figure_curves as figure_capacity with:
    input:
        done=done_marker(FIGURE_IDS["smat"]),
    output:
        type_png=report("results/figures/capacity_type.png", caption="../report/capacity_type.rst", category="Figures"),
        type_pdf="results/figures/capacity_type.pdf",
        depth_png=report(
            "results/figures/capacity_depth.png", caption="../report/capacity_depth.rst", category="Figures"
        ),
        depth_pdf="results/figures/capacity_depth.pdf",
    log:
        "logs/figures/capacity.log",
    params:
        figure="capacity",
        files=expert_masks(FIGURE_IDS["smat"]),
        prefix=figure_prefix,
        models=[f"{MODELS[m].label} ({m})" for m in [FIGURE_IDS["smat"]]],


use rule figure_curves as figure_mask_overlap with:
    input:
        done=done_marker(FIGURE_IDS["smat"]),
    output:
        png=report("results/figures/mask_overlap.png", caption="../report/mask_overlap.rst", category="Figures"),
        pdf="results/figures/mask_overlap.pdf",
    log:
        "logs/figures/mask_overlap.log",
    params:
        figure="mask-overlap",
        files=expert_masks(FIGURE_IDS["smat"]),
        prefix=figure_prefix,
        models=[f"{MODELS[m].label} ({m})" for m in [FIGURE_IDS["smat"]]],

# Analyses of spec §5, drawn from the first seed's models; each figure is written as PNG and PDF.


rule figure_pareto:
    input:
        files=eval_csvs([*FIGURE_SWEEP_IDS, "pre", FIGURE_IDS["pmf"], FIGURE_IDS["softmerge"]]),
    output:
        png=report("results/figures/pareto.png", caption="../report/pareto.rst", category="Figures"),
        pdf="results/figures/pareto.pdf",
    params:
        figure="pareto",
        datasets=DATASET_ARGS,
        prefix=figure_prefix,
    log:
        "logs/figures/pareto.log",
    conda:
        "../../envs/smat.yaml"
    localrule: True
    shell:
        "smat figures {params.figure} --inputs {input.files} {params.datasets} --out-prefix {params.prefix} "
        "> {log} 2>&1"


use rule figure_pareto as figure_dendrogram with:
    input:
        files=eval_csvs([FIGURE_IDS["smat"]]),
    output:
        png=report("results/figures/dendrogram.png", caption="../report/dendrogram.rst", category="Figures"),
        pdf="results/figures/dendrogram.pdf",
    params:
        figure="dendrogram",
        datasets=DATASET_ARGS,
        prefix=figure_prefix,
    log:
        "logs/figures/dendrogram.log",


use rule figure_pareto as figure_grad_alignment with:
    input:
        files=[f"results/models/{m}/train_log.jsonl" for m in grad_alignment_models()],
        done=[done_marker(m) for m in grad_alignment_models()],  # logs are read once training has finished
    output:
        png=report("results/figures/grad_alignment.png", caption="../report/grad_alignment.rst", category="Figures"),
        pdf="results/figures/grad_alignment.pdf",
    params:
        figure="grad-alignment",
        datasets="",
        prefix=figure_prefix,
    log:
        "logs/figures/grad_alignment.log",


use rule figure_pareto as figure_curves with:
    input:
        files=[f"results/models/{FIGURE_IDS[m]}/train_log.jsonl" for m in ("smat", "pmf", "softmerge")],
        done=[done_marker(FIGURE_IDS[m]) for m in ("smat", "pmf", "softmerge")],
    output:
        png=report("results/figures/curves.png", caption="../report/curves.rst", category="Figures"),
        pdf="results/figures/curves.pdf",
    params:
        figure="curves",
        datasets="",
        prefix=figure_prefix,
    log:
        "logs/figures/curves.log",


use rule figure_pareto as figure_capacity with:
    input:
        files=f"results/models/{FIGURE_IDS['smat']}/expert_masks.npz",
    output:
        type_png=report("results/figures/capacity_type.png", caption="../report/capacity_type.rst", category="Figures"),
        type_pdf="results/figures/capacity_type.pdf",
        depth_png=report(
            "results/figures/capacity_depth.png", caption="../report/capacity_depth.rst", category="Figures"
        ),
        depth_pdf="results/figures/capacity_depth.pdf",
    params:
        figure="capacity",
        datasets="",
        prefix=figure_prefix,
    log:
        "logs/figures/capacity.log",


use rule figure_pareto as figure_mask_overlap with:
    input:
        files=f"results/models/{FIGURE_IDS['smat']}/expert_masks.npz",
    output:
        png=report("results/figures/mask_overlap.png", caption="../report/mask_overlap.rst", category="Figures"),
        pdf="results/figures/mask_overlap.pdf",
    params:
        figure="mask-overlap",
        datasets="",
        prefix=figure_prefix,
    log:
        "logs/figures/mask_overlap.log",

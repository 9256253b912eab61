# Analyses of METHOD §5, one rule per entry of the figure table (smat/analysis/figures.py), drawn from the first
# seed's models of the entry's role (smat/experiment.py: figure_models); each figure is written as PNG and PDF.
# The `models` param names the models a figure shows ("label (model id)"), for its report caption
# (workflow/report/FILE.rst).

FIGURE_READS = {
    "eval": lambda ids: eval_csvs(ids),
    "train_log": lambda ids: [model_file(m, "train_log.jsonl") for m in ids],
    "expert_masks": lambda ids: [model_file(m, "expert_masks.npz") for m in ids],
    "anatomy": lambda ids: [f"results/anatomy/{m}.csv" for m in ids],
}


def figure_models(figure):
    models = FIGURE_MODELS[figure.models]
    return models[:1] if figure.one_model else models


for figure in FIGURES.values():

    rule:
        name:
            f"figure_{figure.file}"
        input:
            files=FIGURE_READS[figure.reads](figure_models(figure)),
        output:
            [
                report(png, caption=f"../report/{Path(png).stem}.rst", category="Figures")
                for png in rule_args.figure_outputs(figure, "png")
            ],
            rule_args.figure_outputs(figure, "pdf"),
        log:
            f"logs/figures/{figure.file}.log",
        localrule: True
        conda:
            "../../envs/smat.yaml"
        params:
            figure=figure.name,
            datasets=f" {DATASET_ARGS}" if figure.needs_datasets else "",
            prefix=lambda wildcards, output: rule_args.figure_prefix(output[0]),
            models=[f"{MODELS[m].label} ({m})" for m in figure_models(figure)],
        shell:
            "smat figures {params.figure} --inputs {input.files}{params.datasets} --out-prefix {params.prefix} "
            "> {log} 2>&1"

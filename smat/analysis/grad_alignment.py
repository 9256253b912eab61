"""Meta-gradient alignment between tasks during training (METHOD §5.2, Fig. 4b).

Reads the `grad_alignment` records of training logs: the mean pairwise cosine similarity between the
meta-gradients of tasks from different training domains, logged every few tasks for a parameter group.
One panel per parameter group, one line per model (legend from the model's method, τ and |M|).
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import pandas as pd
import seaborn as sns
from matplotlib.lines import Line2D

from smat.analysis.style import COLUMN_WIDTH, TEXT_WIDTH, new_figure, paper_style, save_figure
from smat.analysis.train_logs import read_runs
from smat.io import SmatError


def alignment_table(paths: Sequence[Path]) -> pd.DataFrame:
    """Columns model, tau, group, task, mean_cos, n_pairs; models ordered by τ."""
    rows = []
    runs = read_runs(paths)
    for run in runs:
        for record in run.of_kind("grad_alignment"):
            missing = [k for k in ("task", "group", "mean_cos") if k not in record]
            if missing:
                raise SmatError(f"{run.path}: grad_alignment record without {', '.join(missing)}: {record}")
            rows.append({"model": run.name, "tau": run.tau, "group": str(record["group"]),
                         "task": record["task"], "mean_cos": record["mean_cos"], "n_pairs": record.get("n_pairs")})
    if not rows:
        raise SmatError(f"grad-alignment: no 'grad_alignment' records in {', '.join(str(p) for p in paths)}; "
                        f"train with grad_alignment.interval > 0 in the training config")
    table = pd.DataFrame(rows)
    logged = sorted((r for r in runs if r.name in set(table["model"])),
                    key=lambda r: (r.tau is None, r.tau or 0.0, r.name))
    table["model"] = pd.Categorical(table["model"], [r.name for r in logged], ordered=True)
    return table.sort_values(["model", "group", "task"], kind="stable")


def make(inputs: Sequence[Path], out_prefix: Path, id_datasets: Sequence[str], ood_datasets: Sequence[str]) -> None:
    table = alignment_table(inputs)
    groups = list(dict.fromkeys(table["group"]))
    models = list(table["model"].cat.categories)
    colours = dict(zip(models, sns.color_palette("colorblind", len(models))))
    with paper_style():
        fig, axes = new_figure(width=COLUMN_WIDTH if len(groups) == 1 else TEXT_WIDTH, height=2.3,
                               ncols=len(groups), sharey=True, squeeze=False)
        for ax, group in zip(axes[0], groups):
            for model in models:
                part = table[(table["group"] == group) & (table["model"] == model)]
                if len(part):
                    ax.plot(part["task"], part["mean_cos"], marker="o", markersize=2.5, color=colours[model])
            ax.axhline(0.0, color="0.3", linewidth=0.6)
            ax.set_title(f"meta-gradients w.r.t. {group}")
            ax.set_xlabel("training task")
        axes[0][0].set_ylabel("mean pairwise cosine")
        handles = [Line2D([], [], color=colours[m], marker="o", markersize=2.5, label=m) for m in models]
        fig.legend(handles=handles, loc="outside lower center", ncols=min(len(models), 3), frameon=False)
        save_figure(fig, out_prefix, "grad-alignment", inputs)

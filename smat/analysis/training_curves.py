"""Training curves from `train_log.jsonl` files, as small multiples.

Panels: query cross-entropy and query accuracy vs training task (faint: every logged task; solid: running
mean over ~1/25 of the run), per-expert sparsity (fraction of zero gates) vs task with the target τ
(METHOD §1.9), and validation accuracy vs epoch. A panel without data in any log (e.g. sparsity for PMF) is
left out. Accuracies logged as fractions (all values ≤ 1) are shown in %.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Sequence

import numpy as np
import pandas as pd
import seaborn as sns
from matplotlib.lines import Line2D
from matplotlib.ticker import MaxNLocator

from smat.analysis.style import TEXT_WIDTH, new_figure, paper_style, save_figure
from smat.analysis.train_logs import TrainingRun, read_runs
from smat.io import SmatError


def _series(run: TrainingRun, kind: str, x: str, y: str) -> pd.DataFrame:
    rows = [(r[x], r[y]) for r in run.of_kind(kind) if r.get(x) is not None and r.get(y) is not None]
    return pd.DataFrame(rows, columns=["x", "y"], dtype=float)


def _as_percent(series: pd.DataFrame) -> pd.DataFrame:
    return series.assign(y=series["y"] * 100) if len(series) and series["y"].max() <= 1.0 else series


def _sparsity(run: TrainingRun) -> tuple[np.ndarray, np.ndarray]:
    """Tasks (n,) and per-expert sparsity (n, M) of the train records that carry one."""
    records = [r for r in run.of_kind("train") if r.get("sparsity")]
    sizes = {len(r["sparsity"]) for r in records}
    if len(sizes) > 1:
        raise SmatError(f"{run.path}: 'sparsity' lists of different lengths {sorted(sizes)}")
    return np.array([r["task"] for r in records]), np.array([r["sparsity"] for r in records], dtype=float)


def _noisy_curve(ax, series: pd.DataFrame, colour) -> None:
    ax.plot(series["x"], series["y"], color=colour, alpha=0.25, linewidth=0.6)
    window = max(1, len(series) // 25)
    ax.plot(series["x"], series["y"].rolling(window, min_periods=1).mean(), color=colour)


def _curve_panel(ax, by_run: dict[str, pd.DataFrame], colours: dict, per_epoch: bool) -> None:
    for name, series in by_run.items():
        if series.empty:
            continue
        if per_epoch:
            ax.plot(series["x"], series["y"], color=colours[name], marker="o", markersize=3)
        else:
            _noisy_curve(ax, series, colours[name])


def _sparsity_panel(ax, runs: list[TrainingRun], colours: dict) -> None:
    single = len(runs) == 1
    for run in runs:
        tasks, values = _sparsity(run)
        if not len(tasks):
            continue
        n_experts = values.shape[1]
        # One model: a colour per expert; several: the model's colour for all its experts.
        palette = sns.color_palette("colorblind", n_experts) if single else [colours[run.name]] * n_experts
        for m in range(n_experts):
            ax.plot(tasks, values[:, m], color=palette[m], linewidth=0.9, label=f"expert {m}" if single else None)
        if run.tau is not None:
            ax.axhline(run.tau, color="0.2" if single else colours[run.name], linestyle="--", linewidth=0.8,
                       label="target τ" if single else None)
    if single:
        ax.legend(ncols=2, frameon=False, fontsize=6, handlelength=1.2)


PANELS = {   # key: (y label, x label)
    "ce": ("query cross-entropy", "training task"),
    "acc": ("query accuracy (%)", "training task"),
    "sparsity": ("sparsity (zero-gate fraction)", "training task"),
    "val": ("validation accuracy (%)", "epoch"),
}


def make(inputs: Sequence[Path], out_prefix: Path, id_datasets: Sequence[str], ood_datasets: Sequence[str]) -> None:
    runs = read_runs(inputs)
    colours = dict(zip([r.name for r in runs], sns.color_palette("colorblind", len(runs))))
    curves = {"ce": {r.name: _series(r, "train", "task", "ce") for r in runs},
              "acc": {r.name: _as_percent(_series(r, "train", "task", "acc")) for r in runs},
              "val": {r.name: _as_percent(_series(r, "val", "epoch", "acc")) for r in runs}}
    if all(s.empty for s in curves["ce"].values()):
        raise SmatError(f"curves: no 'train' records with task and ce in {', '.join(map(str, inputs))}")
    present = {key: any(not s.empty for s in by_run.values()) for key, by_run in curves.items()}
    present["sparsity"] = any(len(_sparsity(r)[0]) for r in runs)
    panels = [key for key in PANELS if present[key]]

    with paper_style():
        nrows = math.ceil(len(panels) / 2)
        fig, axes = new_figure(width=TEXT_WIDTH, height=0.4 + 2.0 * nrows, nrows=nrows, ncols=2, squeeze=False)
        axes = axes.ravel()
        for ax, panel in zip(axes, panels):
            if panel == "sparsity":
                _sparsity_panel(ax, runs, colours)
            else:
                _curve_panel(ax, curves[panel], colours, per_epoch=panel == "val")
            ax.set_ylabel(PANELS[panel][0])
            ax.set_xlabel(PANELS[panel][1])
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        for ax in axes[len(panels):]:
            ax.set_visible(False)
        if len(runs) > 1:
            handles = [Line2D([], [], color=colours[r.name], label=r.name) for r in runs]
            fig.legend(handles=handles, loc="outside lower center", ncols=min(len(runs), 4), frameon=False)
        else:
            fig.suptitle(runs[0].name, fontsize=8)
        save_figure(fig, out_prefix, "curves", inputs)

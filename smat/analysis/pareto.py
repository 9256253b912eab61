"""ID-vs-OOD trade-off over τ and |M| (METHOD §5.1, Fig. 4a): one point per model, Pareto front drawn.

x = mean ID accuracy, y = mean OOD accuracy, each the mean of the per-dataset mean accuracies over the
listed datasets, from eval CSVs without fine-tuning, with its 95% CI as error bars on both axes: the CI of a
mean of k per-dataset means, √(Σ CI_d²)/k, as in the tables (none where a dataset has a single episode).
SMAT models are coloured by τ and marked by |M|; the other methods (Pre, PMF, SoftMerge, ...) are hollow
reference points named in the legend. The front is taken over all points.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence


import numpy as np
import pandas as pd
import seaborn as sns
from matplotlib.lines import Line2D

from smat.analysis.eval_results import check_datasets, read_eval_csvs, summarise
from smat.methods.registry import column_rank, swept_method
from smat.analysis.style import MARKERS, new_figure, paper_style, save_figure
from smat.evaluation.stats import propagated_ci
from smat.evaluation.modes import NO_FINETUNING
from smat.io import SmatError

# Reference models (Pre, PMF, SoftMerge, ...) are hollow black markers, SMAT models filled by τ.
REFERENCE_MARKERS = ("X", "P", "*", "h", "p", "d")


def pareto_front(points: np.ndarray) -> np.ndarray:
    """Indices of the points that no other point dominates when maximising both coordinates, ordered by
    increasing x (so decreasing y). Equal points do not dominate each other; all of them are kept."""
    points = np.asarray(points, dtype=float)
    if points.ndim != 2 or points.shape[1] != 2:
        raise ValueError(f"expected an (n, 2) array of points, got shape {points.shape}")
    at_least = (points[None, :, :] >= points[:, None, :]).all(axis=2)   # [i, j]: j >= i in both
    better = (points[None, :, :] > points[:, None, :]).any(axis=2)      # [i, j]: j > i in one
    dominated = (at_least & better).any(axis=1)
    front = np.flatnonzero(~dominated)
    return front[np.lexsort((-points[front, 1], points[front, 0]))]


def model_points(results: pd.DataFrame, id_datasets: Sequence[str], ood_datasets: Sequence[str]) -> pd.DataFrame:
    """One row per model: label, method, tau, experts, id and ood mean accuracy with their 95% CIs (id_ci95,
    ood_ci95: √(Σ CI_d²)/k over the k datasets; NaN when a dataset has no CI)."""
    if not id_datasets or not ood_datasets:
        raise SmatError("pareto: needs both --id-datasets and --ood-datasets")
    plain = results[results["finetune"] == NO_FINETUNING]
    if plain.empty:
        raise SmatError("pareto: no rows with finetune 'none' in the given CSVs")
    check_datasets(plain, id_datasets, ood_datasets, "pareto")
    summary = summarise(plain, by=("model_id", "dataset")).set_index(["model_id", "dataset"])
    means, cis = summary["mean"], summary["ci95"]
    swept = swept_method()
    rows = []
    for model_id, group in plain.groupby("model_id", sort=False):
        missing = [d for d in [*id_datasets, *ood_datasets] if (model_id, d) not in means.index]
        if missing:
            raise SmatError(f"pareto: model {model_id!r} ({', '.join(group['source'].unique())}) has no results "
                            f"for {', '.join(missing)}; evaluate it on every listed dataset")
        first = group.iloc[0]
        tau = pd.to_numeric(group["tau"], errors="coerce").iloc[0]
        experts = pd.to_numeric(group["experts"], errors="coerce").iloc[0]
        if first["method"] == swept.name and (np.isnan(tau) or np.isnan(experts)):
            raise SmatError(f"pareto: {swept.display} model {model_id!r} has no tau/experts in {first['source']}")
        rows.append({"model_id": model_id, "label": first["label"], "method": first["method"], "tau": tau,
                     "experts": experts, "id": np.mean([means[(model_id, d)] for d in id_datasets]),
                     "ood": np.mean([means[(model_id, d)] for d in ood_datasets]),
                     "id_ci95": propagated_ci([cis[(model_id, d)] for d in id_datasets]),
                     "ood_ci95": propagated_ci([cis[(model_id, d)] for d in ood_datasets])})
    return pd.DataFrame(rows)


def make(inputs: Sequence[Path], out_prefix: Path, id_datasets: Sequence[str], ood_datasets: Sequence[str]) -> None:
    points = model_points(read_eval_csvs(inputs), id_datasets, ood_datasets)
    swept = points["method"] == swept_method().name
    smat, others = points[swept], points[~swept]          # the sweep's points (a front per |M|), the other models
    others = others.iloc[np.lexsort((others["label"], others["method"].map(column_rank)))]
    taus, experts = sorted(smat["tau"].unique()), sorted(smat["experts"].unique())
    if len(others) > len(REFERENCE_MARKERS):
        raise SmatError(f"pareto: {len(others)} reference models; at most {len(REFERENCE_MARKERS)} can be told apart")
    if len(experts) > len(MARKERS):
        raise SmatError(f"pareto: {len(experts)} different expert counts; at most {len(MARKERS)} can be told apart")
    colours = dict(zip(taus, sns.color_palette("viridis", len(taus))))
    markers = dict(zip(experts, MARKERS))

    with paper_style():
        fig, ax = new_figure(height=2.6)
        front = points.iloc[pareto_front(points[["id", "ood"]].to_numpy())]
        ax.step(front["id"], front["ood"], where="pre", color="0.45", linestyle="--", linewidth=0.9, zorder=1)
        # 95% CIs of both means, under the markers.
        ax.errorbar(points["id"], points["ood"], xerr=points["id_ci95"].fillna(0), yerr=points["ood_ci95"].fillna(0),
                    fmt="none", ecolor="0.6", elinewidth=0.6, capsize=1.5, capthick=0.6, zorder=2)
        for row in smat.itertuples():
            ax.scatter(row.id, row.ood, color=colours[row.tau], marker=markers[row.experts], s=28,
                       edgecolor="black", linewidth=0.4, zorder=3)
        reference_markers = dict(zip(others["label"], REFERENCE_MARKERS))
        for row in others.itertuples():
            # Hollow and on top, so that a SMAT model at the same point stays visible through it.
            ax.scatter(row.id, row.ood, facecolors="none", marker=reference_markers[row.label], s=34,
                       edgecolors="black", linewidth=0.9, zorder=4)
        ax.set_xlabel("mean ID accuracy (%)")
        ax.set_ylabel("mean OOD accuracy (%)")
        ax.margins(0.12)
        handles = [Line2D([], [], linestyle="", marker="o", color=colours[t], markeredgecolor="black",
                          markeredgewidth=0.4, label=f"τ = {t:g}") for t in taus]
        handles += [Line2D([], [], linestyle="", marker=markers[m], color="0.6", markeredgecolor="black",
                           markeredgewidth=0.4, label=f"|M| = {m:g}") for m in experts]
        handles += [Line2D([], [], linestyle="", marker=marker, markerfacecolor="none", markeredgecolor="black",
                           markeredgewidth=0.9, label=label) for label, marker in reference_markers.items()]
        handles.append(Line2D([], [], color="0.45", linestyle="--", linewidth=0.9, label="Pareto front"))
        handles.append(Line2D([], [], color="0.6", linewidth=0.6, label="95% CI"))
        fig.legend(handles=handles, loc="outside right upper", frameon=False, handletextpad=0.3)
        save_figure(fig, out_prefix, "pareto", inputs)

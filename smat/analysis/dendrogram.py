"""Task similarity of the test datasets through the router (METHOD §5.4, Fig. 5c).

Each dataset is represented by its mean router score vector α over the episodes of one SMAT (or SoftMerge)
model's eval CSVs without fine-tuning. Datasets are clustered by average linkage on cosine distance: α is a
point of the simplex, and cosine compares which experts a dataset leans on regardless of how peaked the
scores are.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np
import pandas as pd
from scipy.cluster import hierarchy

from smat.analysis.eval_results import check_datasets, parse_alpha, read_eval_csvs
from smat.analysis.style import ID_COLOUR, OOD_COLOUR, new_figure, paper_style, save_figure
from smat.evaluation.modes import NO_FINETUNING
from smat.io import SmatError


def mean_alpha(results: pd.DataFrame) -> pd.DataFrame:
    """One row per dataset (in order of appearance), one column per expert: the mean α over episodes."""
    plain = results[results["finetune"] == NO_FINETUNING]
    models = plain["model_id"].unique()
    if len(models) != 1:
        raise SmatError(f"dendrogram: expected the eval CSVs of one model without fine-tuning, found models "
                        f"{', '.join(map(str, models)) or 'none'}")
    vectors: dict[str, list[np.ndarray]] = {}
    for row in plain.itertuples():
        alpha = parse_alpha(row.alpha, row.source)
        if alpha is None:
            raise SmatError(f"dendrogram: {row.source}: episode {row.episode} of {row.dataset!r} has no alpha; "
                            f"router scores exist only for SMAT and SoftMerge models")
        vectors.setdefault(row.dataset, []).append(alpha)
    sizes = {len(a) for episodes in vectors.values() for a in episodes}
    if len(sizes) != 1:
        raise SmatError(f"dendrogram: alpha vectors of different lengths {sorted(sizes)} in the given CSVs")
    return pd.DataFrame({d: np.mean(a, axis=0) for d, a in vectors.items()}).T


def make(inputs: Sequence[Path], out_prefix: Path, id_datasets: Sequence[str], ood_datasets: Sequence[str]) -> None:
    results = read_eval_csvs(inputs)
    if id_datasets or ood_datasets:
        check_datasets(results[results["finetune"] == NO_FINETUNING], id_datasets, ood_datasets, "dendrogram")
        results = results[results["dataset"].isin([*id_datasets, *ood_datasets])]
    vectors = mean_alpha(results)
    if len(vectors) < 2:
        raise SmatError(f"dendrogram: needs at least 2 datasets, got {len(vectors)} ({', '.join(vectors.index)})")
    if vectors.shape[1] < 2:
        raise SmatError("dendrogram: alpha has a single entry (one expert); every dataset would be identical")
    links = hierarchy.linkage(vectors.to_numpy(), method="average", metric="cosine")
    colours = {**{d: ID_COLOUR for d in id_datasets}, **{d: OOD_COLOUR for d in ood_datasets}}
    with paper_style():
        fig, ax = new_figure(height=0.6 + 0.17 * len(vectors))
        hierarchy.dendrogram(links, labels=list(vectors.index), orientation="left", ax=ax, color_threshold=0,
                             above_threshold_color="0.25", leaf_font_size=7)
        for label in ax.get_yticklabels():
            label.set_color(colours.get(label.get_text(), "black"))
        ax.set_xlabel("cosine distance between mean router scores α")
        ax.grid(axis="y", visible=False)
        if id_datasets and ood_datasets:
            ax.set_title("ID datasets in blue, OOD in red", fontsize=7)
        save_figure(fig, out_prefix, "dendrogram", inputs)

"""Overlap between the binary eval-mode masks of the experts (METHOD §5.5, Fig. 5d).

IoU = |z_a ∧ z_b| / |z_a ∨ z_b| over all gated backbone parameters (METHOD §5.5 leaves IoU or overlap relative
to the smaller mask open; IoU is symmetric and 1 only for identical masks).
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np
import seaborn as sns

from smat.analysis.expert_masks import read_expert_masks
from smat.analysis.style import COLUMN_WIDTH, new_figure, paper_style, save_figure
from smat.io import SmatError


def mask_iou(masks: np.ndarray) -> np.ndarray:
    """(M, M) IoU of M boolean masks of shape (M, ...). Two empty masks are identical: IoU 1."""
    masks = np.asarray(masks, dtype=bool).reshape(len(masks), -1).astype(np.float64)
    intersection = masks @ masks.T
    sizes = masks.sum(axis=1)
    union = sizes[:, None] + sizes[None, :] - intersection
    return np.divide(intersection, union, out=np.ones_like(intersection), where=union > 0)


def make(inputs: Sequence[Path], out_prefix: Path, id_datasets: Sequence[str], ood_datasets: Sequence[str]) -> None:
    if len(inputs) != 1:
        raise SmatError(f"mask-overlap: expected one expert_masks.npz, got {len(inputs)} inputs")
    masks = read_expert_masks(Path(inputs[0]))
    n_experts = next(iter(masks.values())).shape[0]
    if n_experts < 2:
        raise SmatError(f"{inputs[0]}: only {n_experts} expert; mask overlap needs at least 2")
    iou = mask_iou(np.concatenate([m.reshape(n_experts, -1) for m in masks.values()], axis=1))
    with paper_style():
        size = min(COLUMN_WIDTH, 1.0 + 0.33 * n_experts)
        fig, ax = new_figure(width=size + 0.5, height=size)
        sns.heatmap(iou, ax=ax, vmin=0.0, vmax=1.0, cmap="viridis", square=True, annot=n_experts <= 10,
                    fmt=".2f", annot_kws={"fontsize": 6 if n_experts > 5 else 7},
                    cbar_kws={"label": "IoU of non-zero gates", "shrink": 0.8}, linewidths=0.3, linecolor="white")
        ax.set_xlabel("expert")
        ax.set_ylabel("expert")
        ax.tick_params(axis="y", labelrotation=0)
        save_figure(fig, out_prefix, "mask-overlap", inputs)

"""Model capacity of each expert by layer type and by block depth (METHOD §5.3, Fig. 5a,b).

Counts the non-zero eval-mode gates of each expert in `expert_masks.npz` and divides by the number of
parameters of the group, so groups of different size compare. Writes PREFIX_type and PREFIX_depth.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Sequence

import numpy as np
import pandas as pd
import seaborn as sns

from smat.analysis.expert_masks import masks_of_checkpoint, read_expert_masks
from smat.analysis.style import COLUMN_WIDTH, TEXT_WIDTH, new_figure, paper_style, save_figure
from smat.analysis.train_logs import describe_model
from smat.io import SmatError

LAYER_TYPES = ("embeddings", "qkv", "attention out", "MLP fc1", "MLP fc2", "norms")
_BLOCK = re.compile(r"^blocks\.(\d+)\.")


def layer_type(name: str) -> str:
    """Group of a timm ViT parameter name; 'other' for names outside the documented backbone layout."""
    if name in ("cls_token", "pos_embed") or name.startswith("patch_embed."):
        return "embeddings"
    for part, group in ((".attn.qkv.", "qkv"), (".attn.proj.", "attention out"), (".mlp.fc1.", "MLP fc1"),
                        (".mlp.fc2.", "MLP fc2"), (".norm1.", "norms"), (".norm2.", "norms")):
        if part in name:
            return group
    return "norms" if name.startswith("norm.") else "other"


def block_index(name: str) -> int | None:
    match = _BLOCK.match(name)
    return int(match.group(1)) if match else None


def _count(masks: dict[str, np.ndarray], key_of) -> pd.DataFrame:
    """Non-zero gates per (expert, key), the group size and the fraction, for names whose key is not None."""
    n_experts = next(iter(masks.values())).shape[0]
    nonzero, total = {}, {}
    for name, mask in masks.items():
        key = key_of(name)
        if key is None:
            continue
        nonzero[key] = nonzero.get(key, 0) + mask.reshape(n_experts, -1).sum(axis=1)
        total[key] = total.get(key, 0) + mask[0].size
    rows = [{"expert": m, "group": key, "nonzero": int(nonzero[key][m]), "total": total[key],
             "fraction": nonzero[key][m] / total[key]} for key in nonzero for m in range(n_experts)]
    return pd.DataFrame(rows, columns=["expert", "group", "nonzero", "total", "fraction"])


def capacity_by_type(masks: dict[str, np.ndarray]) -> pd.DataFrame:
    """Per expert and layer type (in LAYER_TYPES order, then 'other')."""
    table = _count(masks, layer_type)
    order = [g for g in (*LAYER_TYPES, "other") if g in set(table["group"])]
    table["group"] = pd.Categorical(table["group"], order, ordered=True)
    return table.sort_values(["group", "expert"]).reset_index(drop=True)


def capacity_by_depth(masks: dict[str, np.ndarray]) -> pd.DataFrame:
    """Per expert and transformer block index (parameters outside blocks.* are left out)."""
    table = _count(masks, block_index)
    return table.sort_values(["group", "expert"]).reset_index(drop=True).rename(columns={"group": "block"})


def _bars(table: pd.DataFrame, x: str, xlabel: str, target: float | None, out_prefix: Path,
          inputs: Sequence[Path], figure: str) -> None:
    """Grouped bars: one group per `x` value, one bar per expert, height = % of the group's gates non-zero."""
    groups = list(dict.fromkeys(table[x]))
    n_experts = table["expert"].nunique()
    percent = 100 * table.pivot(index=x, columns="expert", values="fraction").loc[groups].to_numpy()
    width = 0.85 / n_experts
    positions = np.arange(len(groups))
    with paper_style():
        fig, ax = new_figure(width=TEXT_WIDTH if len(groups) * n_experts > 48 else COLUMN_WIDTH, height=2.3)
        for m, colour in zip(range(n_experts), sns.color_palette("colorblind", n_experts)):
            ax.bar(positions + (m - (n_experts - 1) / 2) * width, percent[:, m], width=width, color=colour,
                   label=str(m), linewidth=0)
        if target is not None:
            ax.axhline(100 * target, color="0.2", linestyle="--", linewidth=0.8, label="target 1−τ")
        ax.set_xticks(positions, [str(g) for g in groups])
        ax.set_xlabel(xlabel)
        ax.set_ylabel("non-zero gates (% of group)")
        ax.grid(axis="x", visible=False)
        if x == "group":
            ax.tick_params(axis="x", labelrotation=30)
            for label in ax.get_xticklabels():
                label.set_horizontalalignment("right")
        fig.legend(title="expert", loc="outside right upper", frameon=False, ncols=1 if n_experts <= 8 else 2,
                   handlelength=1.0)
        save_figure(fig, out_prefix, figure, inputs)


def make(inputs: Sequence[Path], out_prefix: Path, id_datasets: Sequence[str], ood_datasets: Sequence[str]) -> None:
    if len(inputs) != 1:
        raise SmatError(f"capacity: expected one expert_masks.npz, got {len(inputs)} inputs")
    path = Path(inputs[0])
    if path.suffix in (".pt", ".pth"):          # a model checkpoint, trained or imported: its gates
        masks, tau = masks_of_checkpoint(path)
    else:
        masks, tau = read_expert_masks(path), describe_model(path.parent)["tau"]
    target = 1.0 - tau if tau is not None else None
    by_depth = capacity_by_depth(masks)
    if by_depth.empty:
        raise SmatError(f"{path}: no blocks.{{i}}.* parameters; expected timm ViT parameter names")
    out_prefix = Path(out_prefix)
    _bars(capacity_by_type(masks), "group", "layer type", target,
          out_prefix.with_name(out_prefix.name + "_type"), inputs, "capacity_type")
    _bars(by_depth, "block", "block depth", target,
          out_prefix.with_name(out_prefix.name + "_depth"), inputs, "capacity_depth")

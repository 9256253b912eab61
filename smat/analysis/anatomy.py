"""Update anatomy: where a meta-tuned model departs from θ_pre, and what each part of the departure is worth
(METHOD §5.6; the quantitative counterpart of the paper's Fig. 5a,b).

The backbone's tensors fall into groups: the input embeddings (patch embedding, CLS token, position table),
per block its attention, its MLP and its LayerNorms, and the final LayerNorm. For every group and model:

* `share`: the group's part of ‖θ_task − θ_pre‖², averaged over episodes (task weights depend on the
  episode for SMAT and SoftMerge);
* `open_fraction`: per expert, the share of the group's eval-mode gates that are open (SMAT with gates);
* `delta_id` / `delta_ood`: the accuracy change when the group's update alone is reverted to θ_pre, paired
  on the same episodes, as a mean over datasets of per-dataset mean differences with a 95 % CI
  (√Σ CI² / k, as the findings).

Gates alone (`gate_anatomy`) need no data, so a released SMAT checkpoint is drawn without any training.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import pandas as pd
import torch
from torch import Tensor

from smat.data.episodes import load_episode_file
from smat.data.loader import load_episode
from smat.data.store import Store
from smat.data.transforms import test_transform
from smat.evaluation.feature_cache import FeatureCache
from smat.evaluation.stats import paired_difference, propagated_ci
from smat.io import SmatError
from smat.methods.base import backbone_parameters

PARTS = ("embeddings", "attention", "MLP", "norms", "final norm")
_BLOCK = re.compile(r"^blocks\.(\d+)\.(attn|mlp|norm1|norm2|ls1|ls2)\b")


def tensor_group(name: str) -> tuple[str, int | None]:
    """(part, block depth) of a timm ViT parameter; depth is None outside the blocks."""
    if name in ("cls_token", "pos_embed", "reg_token") or name.startswith("patch_embed."):
        return "embeddings", None
    match = _BLOCK.match(name)
    if match:
        kind = match.group(2)
        part = {"attn": "attention", "mlp": "MLP"}.get(kind, "norms")
        return part, int(match.group(1))
    if name.startswith(("norm.", "fc_norm.")):
        return "final norm", None
    raise SmatError(f"update anatomy: parameter {name!r} is not part of the documented ViT layout "
                    "(embeddings, blocks.N.{attn,mlp,norm1,norm2}, norm)")


def group_label(part: str, depth: int | None) -> str:
    return part if depth is None else f"block {depth} {part}"


def groups_of(names: Sequence[str]) -> dict[str, list[str]]:
    """Group label -> parameter names, in forward order (embeddings, block 0 attention, ..., final norm)."""
    keyed = {}
    for name in names:
        part, depth = tensor_group(name)
        keyed.setdefault((-1 if depth is None and part == "embeddings" else (10 ** 6 if depth is None else depth),
                          PARTS.index(part), group_label(part, depth)), []).append(name)
    return {label: members for (_, _, label), members in sorted(keyed.items())}


def gate_anatomy(masks: dict[str, np.ndarray]) -> pd.DataFrame:
    """Per group: depth, part, size and each expert's fraction of open gates (columns open_0..open_{M-1})."""
    rows = []
    for label, names in groups_of(list(masks)).items():
        part, depth = tensor_group(names[0])
        size = sum(masks[n][0].size for n in names)
        n_experts = masks[names[0]].shape[0]
        open_ = sum(masks[n].reshape(n_experts, -1).sum(axis=1) for n in names) / size
        rows.append({"group": label, "part": part, "depth": depth, "size": size,
                     **{f"open_{m}": float(open_[m]) for m in range(n_experts)}})
    return pd.DataFrame(rows)


@dataclass
class Dataset:
    name: str
    role: str                    # "id" | "ood"
    store: Store
    episodes: list


def read_datasets(names: Sequence[str], roles: Sequence[str], episode_files: Sequence[Path],
                  stores: Sequence[Path], limit: int) -> list[Dataset]:
    """The first `limit` episodes of each dataset's frozen episode file, checked against its store."""
    if not (len(names) == len(roles) == len(episode_files) == len(stores)):
        raise SmatError("update anatomy: --datasets, --roles, --episodes and --store must pair up one to one")
    datasets = []
    for name, role, episodes_path, store_path in zip(names, roles, episode_files, stores):
        if role not in ("id", "ood"):
            raise SmatError(f"update anatomy: role {role!r} of {name}: expected id or ood")
        store = Store(Path(store_path))
        episodes, _ = load_episode_file(Path(episodes_path), store)
        datasets.append(Dataset(name, role, store, episodes[:limit]))
    return datasets


def _accuracy(model, support_f: Tensor, support_y: Tensor, query_f: Tensor, query_y: Tensor, n_way: int) -> float:
    logits = model.head_logits(support_f, support_y, query_f, n_way)
    return 100.0 * (logits.argmax(-1) == query_y).float().mean().item()


def _reverted(weights: dict[str, Tensor], theta_pre: dict[str, Tensor], names: Sequence[str]) -> dict[str, Tensor]:
    return {n: (theta_pre[n] if n in names else w) for n, w in weights.items()}


def _variants(groups: dict[str, list[str]], moved: set[str]) -> dict[str, list[str]]:
    """The weight sets scored per episode: the full task weights ('none' reverted), then each group that the
    model moved reverted (reverting an unmoved group changes nothing: its rows repeat 'none')."""
    return {"none": [], **{label: names for label, names in groups.items() if label in moved}}


@torch.inference_mode()
def measure(model, theta_pre: dict[str, Tensor], datasets: Sequence[Dataset],
            device: torch.device) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(per-episode accuracies of every variant, per-group update shares) of one model on `datasets`, against
    the pre-trained weights `theta_pre` (PMF trains the backbone itself, so they come from their own file)."""
    groups = groups_of(list(theta_pre))
    transform = test_transform(model.backbone.image_size)
    accuracy_rows, share_rows = [], []
    for dataset in datasets:
        if model.task_independent:           # one set of weights: embed each distinct image once per variant
            first = load_episode(dataset.store, dataset.episodes[0], transform).to(device)
            weights = model.task_params(first.support_x, first.support_y).weights
            share_rows.append(_shares(weights, theta_pre, groups))
            for variant, names in _variants(groups, _moved(weights, theta_pre, groups)).items():
                w = _reverted(weights, theta_pre, names)
                cache = FeatureCache.build(lambda x: model.features(w, x), dataset.store, dataset.episodes,
                                           transform, device, progress=False)
                for index, episode in enumerate(dataset.episodes):
                    accuracy_rows.append({"dataset": dataset.name, "role": dataset.role, "episode": index,
                                          "reverted": variant,
                                          "accuracy": _accuracy(model, *cache.lookup(episode), len(episode.classes))})
            continue
        for index, episode in enumerate(dataset.episodes):
            tensors = load_episode(dataset.store, episode, transform).to(device)
            weights = model.task_params(tensors.support_x, tensors.support_y).weights
            share_rows.append(_shares(weights, theta_pre, groups))
            x = torch.cat([tensors.support_x, tensors.query_x])
            n_support = len(tensors.support_x)
            for variant, names in _variants(groups, _moved(weights, theta_pre, groups)).items():
                features = model.features(_reverted(weights, theta_pre, names), x)
                accuracy = _accuracy(model, features[:n_support], tensors.support_y, features[n_support:],
                                     tensors.query_y, tensors.n_way)
                accuracy_rows.append({"dataset": dataset.name, "role": dataset.role, "episode": index,
                                      "reverted": variant, "accuracy": accuracy})
    shares = pd.DataFrame(share_rows).mean().rename("share").rename_axis("group").reset_index()
    return pd.DataFrame(accuracy_rows), shares


def _moved(weights: dict[str, Tensor], theta_pre: dict[str, Tensor], groups: dict[str, list[str]]) -> set[str]:
    return {label for label, names in groups.items() if any(not torch.equal(weights[n], theta_pre[n]) for n in names)}


def _shares(weights: dict[str, Tensor], theta_pre: dict[str, Tensor], groups: dict[str, list[str]]) -> dict:
    squared = {label: sum(float((weights[n] - theta_pre[n]).double().pow(2).sum()) for n in names)
               for label, names in groups.items()}
    total = sum(squared.values())
    return {label: (value / total if total > 0 else 0.0) for label, value in squared.items()}


def revert_effects(accuracies: pd.DataFrame) -> pd.DataFrame:
    """Per reverted group and role: mean over datasets of the paired per-dataset change, with its 95 % CI."""
    full = accuracies[accuracies["reverted"] == "none"].set_index(["dataset", "episode"])["accuracy"]
    rows = []
    if (accuracies["reverted"] == "none").all():
        return pd.DataFrame(columns=["group", "delta_id", "ci_id", "delta_ood", "ci_ood"])
    for group, block in accuracies[accuracies["reverted"] != "none"].groupby("reverted", sort=False):
        row = {"group": group}
        for role in ("id", "ood"):
            per = []
            for dataset, part in block[block["role"] == role].groupby("dataset", sort=False):
                before = full.loc[dataset].loc[part["episode"]].tolist()
                per.append(paired_difference(before, part["accuracy"].tolist()))
            if per:
                row[f"delta_{role}"] = sum(s.mean for s in per) / len(per)
                row[f"ci_{role}"] = propagated_ci([math.nan if s.ci95 is None else s.ci95 for s in per])
        rows.append(row)
    return pd.DataFrame(rows)


def full_accuracy(accuracies: pd.DataFrame) -> dict[str, float]:
    """Mean accuracy of the unreverted model per role (mean over datasets of per-dataset means)."""
    full = accuracies[accuracies["reverted"] == "none"]
    per_dataset = full.groupby(["role", "dataset"])["accuracy"].mean()
    return {role: float(per_dataset.loc[role].mean()) for role in per_dataset.index.get_level_values(0).unique()}


def pretrained_weights(backbone, device: torch.device) -> dict[str, Tensor]:
    """θ_pre by parameter name, from a backbone loaded at the model's image size."""
    return {n: p.detach().to(device) for n, p in backbone_parameters(backbone).items()}


def anatomy_table(model, theta_pre: dict[str, Tensor], datasets: Sequence[Dataset],
                  device: torch.device) -> tuple[pd.DataFrame, dict]:
    """One row per group: part, depth, share, open fractions per expert (if gated), delta/CI on ID and OOD."""
    missing = sorted(set(backbone_parameters(model.backbone)) ^ set(theta_pre))
    if missing:
        raise SmatError(f"update anatomy: the pre-trained weights do not match the model's backbone ({missing[0]}, "
                        f"...); pass the backbone the model was meta-tuned from")
    accuracies, shares = measure(model, theta_pre, datasets, device)
    table = pd.DataFrame([{"group": label, "part": tensor_group(members[0])[0], "depth": tensor_group(members[0])[1],
                           "size": sum(theta_pre[n].numel() for n in members)}
                          for label, members in groups_of(list(theta_pre)).items()])
    table = table.merge(shares, on="group").merge(revert_effects(accuracies), on="group", how="left")
    masks = model.expert_masks()
    if masks is not None:
        gates = gate_anatomy({n: m.cpu().numpy() for n, m in masks.items()})
        table = table.merge(gates.drop(columns=["part", "depth", "size"]), on="group", how="left")
    return table, {"full_accuracy": full_accuracy(accuracies),
                   "episodes": {d.name: len(d.episodes) for d in datasets}}


def run(model_spec: str, pretrained: Path, names: Sequence[str], roles: Sequence[str], episodes: Sequence[Path],
        stores: Sequence[Path], limit: int, out: Path, label: str | None = None, device: str = "auto") -> None:
    """`smat anatomy`: the anatomy table of one model, as OUT (CSV, one row per group) and OUT.json (summary)."""
    from smat.device import resolve_device
    from smat.io import atomic_path, provenance, sha256_file, write_json
    from smat.methods.checkpoint import load_model
    from smat.models.pretrained import load_pretrained

    torch_device = resolve_device(device)
    model = load_model(model_spec, torch_device)
    theta_pre = pretrained_weights(load_pretrained(Path(pretrained), model.backbone.image_size)[0], torch_device)
    datasets = read_datasets(names, roles, episodes, stores, limit)
    table, info = anatomy_table(model, theta_pre, datasets, torch_device)
    model_file = Path(model_spec.removeprefix("pretrained:"))
    table.insert(0, "model", label or model.method)
    out = Path(out)
    with atomic_path(out) as tmp:
        table.to_csv(tmp, index=False, float_format="%.6g")
    write_json(out.with_suffix(".json"), provenance(
        model=label or model.method, method=model.method, model_sha256=sha256_file(model_file),
        pretrained_sha256=sha256_file(pretrained), limit=limit, **info,
        inputs=[{"episodes": str(e), "sha256": sha256_file(e), "store": str(s)} for e, s in zip(episodes, stores)]))


def read_tables(paths: Sequence[Path]) -> pd.DataFrame:
    """The CSVs of `smat anatomy`, one model each, stacked (model order kept)."""
    frames = []
    for path in paths:
        try:
            frame = pd.read_csv(path)
        except (OSError, ValueError) as err:
            raise SmatError(f"{path}: not an anatomy table of `smat anatomy` ({err})") from err
        missing = {"model", "group", "share"} - set(frame.columns)
        if missing:
            raise SmatError(f"{path}: not an anatomy table of `smat anatomy` (no column {sorted(missing)[0]!r})")
        frames.append(frame)
    if not frames:
        raise SmatError("anatomy: no tables given")
    return pd.concat(frames, ignore_index=True)


def open_mean(table: pd.DataFrame) -> pd.Series:
    """Mean over experts of the open-gate fraction per row; NaN for models without gates."""
    columns = [c for c in table.columns if c.startswith("open_")]
    return table[columns].mean(axis=1) if columns else pd.Series(np.nan, index=table.index)


def make(inputs: Sequence[Path], out_prefix: Path, id_datasets: Sequence[str], ood_datasets: Sequence[str]) -> None:
    """Four panels over the tensor groups (rows, in forward order): share of ‖θ_task − θ_pre‖², accuracy change
    on ID and on OOD when the group alone is reverted (95 % CI), and the mean open-gate fraction of gated models."""
    import seaborn as sns

    from smat.analysis.style import TEXT_WIDTH, new_figure, paper_style, save_figure

    table = read_tables(inputs)
    table["open"] = open_mean(table)
    models = list(dict.fromkeys(table["model"]))
    groups = list(dict.fromkeys(table["group"]))
    y = {g: i for i, g in enumerate(groups)}
    panels = [("share", None, "share of ‖θ_task − θ_pre‖² (%)", 100), ("delta_id", "ci_id", "Δ ID acc. if reverted", 1),
              ("delta_ood", "ci_ood", "Δ OOD acc. if reverted", 1), ("open", None, "open gates (%, mean of experts)", 100)]
    if table["open"].isna().all():
        panels = panels[:3]
    colours = dict(zip(models, sns.color_palette("colorblind", len(models))))
    offset = {m: (i - (len(models) - 1) / 2) * 0.7 / max(1, len(models)) for i, m in enumerate(models)}
    with paper_style():
        fig, axes = new_figure(width=TEXT_WIDTH, height=0.6 + 0.17 * len(groups), ncols=len(panels))
        for ax, (column, ci, title, scale) in zip(np.atleast_1d(axes), panels):
            for model in models:
                rows = table[(table["model"] == model) & table[column].notna()]
                if rows.empty:
                    continue
                ys = [y[g] + offset[model] for g in rows["group"]]
                err = scale * rows[ci] if ci else None
                ax.errorbar(scale * rows[column], ys, xerr=err, fmt="o", markersize=2.5, linewidth=0.8,
                            color=colours[model], label=model)
            if ci:
                ax.axvline(0, color="0.5", linewidth=0.6)
            else:
                ax.set_xlim(0, 100)             # shares and open gates: percentages of the whole
            ax.set_title(title, fontsize="small")
            ax.set_yticks(range(len(groups)), groups if ax is np.atleast_1d(axes)[0] else [""] * len(groups))
            ax.set_ylim(len(groups) - 0.5, -0.5)
            ax.grid(axis="y", visible=False)
        fig.legend(*np.atleast_1d(axes)[0].get_legend_handles_labels(), loc="outside lower center",
                   ncols=min(len(models), 4), frameon=False)
        save_figure(fig, Path(out_prefix), "anatomy", inputs)


def markdown_table(table: pd.DataFrame) -> str:
    """One section per model: group, share (%), Δ ID and Δ OOD ± CI (points), open gates (%)."""
    table = table.assign(open=open_mean(table))
    lines = []
    for model, rows in table.groupby("model", sort=False):
        lines += [f"### {model}", "", "| group | share of update (%) | Δ ID if reverted | Δ OOD if reverted | open gates (%) |",
                  "|---|---|---|---|---|"]
        for _, r in rows.iterrows():
            delta = lambda v, c: "" if pd.isna(v) else f"{v:+.2f} ± {c:.2f}"  # noqa: E731
            opened = "" if pd.isna(r["open"]) else f"{100 * r['open']:.1f}"
            lines.append(f"| {r['group']} | {100 * r['share']:.1f} | {delta(r.get('delta_id'), r.get('ci_id'))} | "
                         f"{delta(r.get('delta_ood'), r.get('ci_ood'))} | {opened} |")
        lines.append("")
    return "\n".join(lines)

"""Meta-gradient alignment between training domains (METHOD §5.2, the gradient-alignment figure).

Every `grad_alignment.interval` tasks the loop samples one task from each of up to `max_domains` training
domains, computes each task's first-order outer-loss gradient with respect to the meta-learned update
(δ for SMAT and SoftMerge, all backbone weights for PMF) and, optionally, the merged task weights θ_i, and
logs the mean pairwise cosine similarity between the tasks' gradients. These extra forwards draw their
randomness from forked generators and restore the model's buffers and λ, so turning the analysis on does
not change the training run.
"""

from __future__ import annotations

import contextlib
from typing import Iterator

import torch
import torch.nn.functional as F
from torch import Tensor, nn


@contextlib.contextmanager
def without_side_effects(model: nn.Module, device: torch.device) -> Iterator[None]:
    """Restore random generators, buffers (spectral-norm vectors, counters) and λ after the block."""
    buffers = {name: b.detach().clone() for name, b in model.named_buffers()}
    lagrangian = getattr(model, "lagrangian", None)
    saved_lagrangian = lagrangian.detach().clone() if lagrangian is not None else None
    cuda = [device] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=cuda):
        try:
            yield
        finally:
            with torch.no_grad():
                for name, b in model.named_buffers():
                    b.copy_(buffers[name])
                if lagrangian is not None:
                    lagrangian.copy_(saved_lagrangian)


def mean_pairwise_cosine(vectors: Tensor) -> float:
    """Mean cosine similarity over all unordered pairs of rows of a (k, P) matrix, k >= 2."""
    unit = F.normalize(vectors.double(), dim=1)
    cos = unit @ unit.t()
    k = len(vectors)
    upper = torch.triu_indices(k, k, offset=1, device=cos.device)
    return cos[upper[0], upper[1]].mean().item()


def gradient_alignment(model: nn.Module, episodes: list, tasks_seen: int, merged: bool,
                       device: torch.device) -> list[dict]:
    """One log record per parameter group: {"kind": "grad_alignment", "task", "group", "mean_cos", "n_pairs"}."""
    if len(episodes) < 2:
        return []
    groups = model.alignment_parameters()
    flat: dict[str, list[Tensor]] = {name: [] for name in [*groups, *(["merged"] if merged else [])]}
    with without_side_effects(model, device):
        for episode in episodes:
            out = model.task_forward(episode, tasks_seen)
            targets = dict(groups)
            if merged:
                targets["merged"] = list(out.weights.values())
            tensors = [t for ts in targets.values() for t in ts]
            grads = iter(torch.autograd.grad(out.loss, tensors, allow_unused=True))
            for name, ts in targets.items():
                parts = [g if g is not None else torch.zeros_like(t) for t, g in zip(ts, grads)]
                flat[name].append(torch.cat([p.detach().float().reshape(-1) for p in parts]))
    k = len(episodes)
    return [{"kind": "grad_alignment", "task": tasks_seen, "group": name,
             "mean_cos": mean_pairwise_cosine(torch.stack(vectors)), "n_pairs": k * (k - 1) // 2}
            for name, vectors in flat.items()]

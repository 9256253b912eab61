"""Optimisers, gradient clipping and the per-epoch learning-rate schedule (METHOD §1.10, §2.3).

Each method names its parameter groups (`optimiser_groups` of its model class). SMAT / SoftMerge: one SGD
optimiser with groups δ (momentum 0.9, wd 1e-4), log α (lr 1e6, no momentum,
grad-norm clip 5) and λ (lr 2e-3), plus AdamW for the router (wd 1e-2, grad-norm clip 1). PMF: SGD over the
whole backbone and the head's scale and bias. The schedule multiplies every base lr by m(epoch) (HF cosine
with warm-up, stepped per epoch); in epoch 0 every SGD group instead runs at an absolute 1e-6 and the router
at 0 (METHOD §7.8).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from smat.methods.base import ParamGroup
from smat.training.config import OptimConfig, ScheduleConfig


@dataclass
class Optimisers:
    sgd: torch.optim.SGD
    router: torch.optim.AdamW | None
    clip: list[tuple[str, list[nn.Parameter], float]]     # (group name, parameters, max gradient norm)

    def all(self) -> list[torch.optim.Optimizer]:
        return [self.sgd] + ([self.router] if self.router is not None else [])

    def state_dict(self) -> dict:
        return {"sgd": self.sgd.state_dict(), "router": self.router.state_dict() if self.router else None}

    def load_state_dict(self, state: dict) -> None:
        self.sgd.load_state_dict(state["sgd"])
        if self.router is not None:
            self.router.load_state_dict(state["router"])


def _as_dict(group: ParamGroup, sgd: bool) -> dict:
    momentum = {"momentum": group.momentum} if sgd else {}
    return {"name": group.name, "params": group.params, "lr": group.lr, "base_lr": group.lr, **momentum,
            "weight_decay": group.weight_decay}


def build_optimisers(model, optim: OptimConfig) -> Optimisers:
    """The method's groups (`model.optimiser_groups`): one SGD optimiser, and AdamW where it has groups."""
    sgd_groups, adamw_groups = model.optimiser_groups(optim)
    sgd = torch.optim.SGD([_as_dict(group, sgd=True) for group in sgd_groups])
    router = torch.optim.AdamW([_as_dict(group, sgd=False) for group in adamw_groups]) if adamw_groups else None
    clip = [(group.name, group.params, group.clip) for group in sgd_groups + adamw_groups if group.clip is not None]
    return Optimisers(sgd, router, clip)


def lr_multiplier(epoch: int, warmup_epochs: int, cosine_epochs: int) -> float:
    """HF `get_cosine_schedule_with_warmup(warmup, total)` evaluated at step = epoch."""
    if epoch < warmup_epochs:
        return epoch / max(1, warmup_epochs)
    progress = (epoch - warmup_epochs) / max(1, cosine_epochs - warmup_epochs)
    return max(0.0, 0.5 * (1.0 + math.cos(math.pi * progress)))


def set_epoch_lr(optimisers: Optimisers, epoch: int, schedule: ScheduleConfig) -> dict[str, float]:
    """Set every group's lr for `epoch`; returns {group name: lr} for the log."""
    epoch0 = epoch == 0 and schedule.epoch0_lr is not None
    m = lr_multiplier(epoch, schedule.warmup_epochs, schedule.cosine_epochs)
    lrs = {}
    for group in optimisers.sgd.param_groups:
        group["lr"] = schedule.epoch0_lr if epoch0 else group["base_lr"] * m
        lrs[group["name"]] = group["lr"]
    if optimisers.router is not None:
        for group in optimisers.router.param_groups:
            group["lr"] = 0.0 if epoch0 else group["base_lr"] * m
            lrs[group["name"]] = group["lr"]
    return lrs


def step(optimisers: Optimisers, scaler: torch.amp.GradScaler) -> dict[str, float]:
    """Unscale, clip the log-α and router groups, step both optimisers with one scaler, clear gradients.

    Returns each clipped group's gradient norm before clipping, for the log: above the group's maximum, the
    clip sets the step size instead of the learning rate (METHOD §1.13)."""
    for optimiser in optimisers.all():
        scaler.unscale_(optimiser)
    norms = {}
    for name, params, max_norm in optimisers.clip:
        norms[name] = float(torch.nn.utils.clip_grad_norm_(params, max_norm))
    for optimiser in optimisers.all():
        scaler.step(optimiser)
    scaler.update()
    for optimiser in optimisers.all():
        optimiser.zero_grad(set_to_none=True)
    return norms

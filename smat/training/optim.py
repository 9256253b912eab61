"""Optimisers, parameter groups, gradient clipping and the per-epoch learning-rate schedule (spec §1.10, §2.3).

SMAT / SoftMerge: one SGD optimiser with groups δ (momentum 0.9, wd 1e-4), log α (lr 1e6, no momentum,
grad-norm clip 5) and λ (lr 2e-3), plus AdamW for the router (wd 1e-2, grad-norm clip 1). PMF: SGD over the
whole backbone and the head's scale and bias. The schedule multiplies every base lr by m(epoch) (HF cosine
with warm-up, stepped per epoch); in epoch 0 every SGD group instead runs at an absolute 1e-6 and the router
at 0 (spec §7.8).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from smat.training.config import OptimConfig, ScheduleConfig


@dataclass
class Optimisers:
    sgd: torch.optim.SGD
    router: torch.optim.AdamW | None
    clip: list[tuple[list[nn.Parameter], float]]          # (parameters, max gradient norm)

    def all(self) -> list[torch.optim.Optimizer]:
        return [self.sgd] + ([self.router] if self.router is not None else [])

    def state_dict(self) -> dict:
        return {"sgd": self.sgd.state_dict(), "router": self.router.state_dict() if self.router else None}

    def load_state_dict(self, state: dict) -> None:
        self.sgd.load_state_dict(state["sgd"])
        if self.router is not None:
            self.router.load_state_dict(state["router"])


def _group(name: str, params: list[nn.Parameter], lr: float, momentum: float = 0.0,
           weight_decay: float = 0.0) -> dict:
    return {"name": name, "params": params, "lr": lr, "base_lr": lr, "momentum": momentum,
            "weight_decay": weight_decay}


def build_optimisers(model: nn.Module, optim: OptimConfig) -> Optimisers:
    if model.method == "pmf":
        params = [p for p in model.parameters() if p.requires_grad]
        sgd = torch.optim.SGD([_group("pmf", params, optim.pmf_lr, optim.pmf_momentum, optim.pmf_weight_decay)])
        return Optimisers(sgd, None, [])
    groups = [_group("delta", [model.experts.delta], optim.delta_lr, optim.delta_momentum, optim.delta_weight_decay)]
    clip = []
    if model.experts.has_gates:
        groups.append(_group("masks", [model.experts.log_alpha], optim.mask_lr))
        groups.append(_group("lagrangian", [model.lagrangian], optim.lagrangian_lr))
        clip.append(([model.experts.log_alpha], optim.mask_clip))
    router = None
    if model.router is not None:
        router_params = list(model.router.parameters())
        router = torch.optim.AdamW([{"name": "router", "params": router_params, "lr": optim.router_lr,
                                     "base_lr": optim.router_lr, "weight_decay": optim.router_weight_decay}])
        clip.append((router_params, optim.router_clip))
    return Optimisers(torch.optim.SGD(groups), router, clip)


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


def step(optimisers: Optimisers, scaler: torch.amp.GradScaler) -> None:
    """Unscale, clip the log-α and router groups, step both optimisers with one scaler, clear gradients."""
    for optimiser in optimisers.all():
        scaler.unscale_(optimiser)
    for params, max_norm in optimisers.clip:
        torch.nn.utils.clip_grad_norm_(params, max_norm)
    for optimiser in optimisers.all():
        scaler.step(optimiser)
    scaler.update()
    for optimiser in optimisers.all():
        optimiser.zero_grad(set_to_none=True)

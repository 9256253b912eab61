"""Compressing the paper's meta-training schedule to another budget and model size while keeping the time
scale of each mechanism (METHOD §1.13).

The clock is the *effective length* U of a schedule: the sum over meta-updates of the learning-rate multiplier
of the update's epoch (the frozen epoch 0 counts 0). Every SGD-driven state moves by lr · m(epoch) per
update, so two runs whose rates are scaled by U/U' pass through the same states at the same fraction of U.

* Task-gradient paths (δ, the gates' task gradient, PMF, the router): lr' = lr · (U / U') · gain. The gain
  absorbs what no rule knows, how the gradient's size differs between two models; it is chosen on
  validation episodes (1: the same gradient scale).
* Expected-L0 path: each gate is pushed by mask_lr · λ · α_m · ∂density/∂log α / N per update, and λ grows
  by lagrangian_lr per update while its expert is too dense, so the push accumulated by fraction f of the
  run is ∝ mask_lr · lagrangian_lr · (f U)² / N. Equal pushes at equal f:
  lagrangian_lr' = lagrangian_lr · (mask_lr / mask_lr') · (U / U')² · (N' / N).
* The log-α gradient clip bounds a step to mask_lr · clip in norm, ≈ mask_lr · clip / √(M N) per gate; the
  same bound per gate and fraction of U: mask_clip' = mask_clip · (mask_lr / mask_lr') · (U / U') · √(N' / N).
* The router temperature falls with tasks seen, not with the learning rate: it reaches its minimum at the
  same fraction of the tasks, temperature_decay_tasks' = temperature_decay_tasks · tasks' / tasks.

Given the paper's own budget, schedule and model, the rules return the paper's values (tests/test_time_scales.py).
"""

from __future__ import annotations

from dataclasses import dataclass

from smat.methods.config import RouterConfig
from smat.training.config import OptimConfig, ScheduleConfig
from smat.training.optim import lr_multiplier


@dataclass(frozen=True)
class Budget:
    """What a schedule's rates depend on: the number of tasks, the epoch layout and the gated backbone size N."""
    epochs: int
    tasks_per_epoch: int
    meta_batch: int
    schedule: ScheduleConfig
    params: int

    @property
    def tasks(self) -> int:
        return self.epochs * self.tasks_per_epoch

    @property
    def effective_updates(self) -> float:
        """U: meta-updates weighted by their epoch's learning-rate multiplier (the frozen epoch 0 weighs 0)."""
        s = self.schedule
        weights = [0.0 if epoch == 0 and s.epoch0_lr is not None else
                   lr_multiplier(epoch, s.warmup_epochs, s.cosine_epochs) for epoch in range(self.epochs)]
        return sum(weights) * self.tasks_per_epoch / self.meta_batch


@dataclass(frozen=True)
class Gains:
    """Task-gradient gains, chosen on validation episodes (1 = the same gradient scale as the reference)."""
    delta: float = 1.0
    masks: float = 1.0
    pmf: float = 1.0
    router: float = 1.0


def compress(optim: OptimConfig, router: RouterConfig, reference: Budget, target: Budget,
             gains: Gains = Gains()) -> dict[str, float]:
    """The `optim.*` and `router.temperature_decay_tasks` settings for `target`, from `reference`'s."""
    speed = reference.effective_updates / target.effective_updates          # U / U'
    mask_lr = optim.mask_lr * speed * gains.masks
    size = target.params / reference.params                                 # N' / N
    return {
        "optim.delta_lr": optim.delta_lr * speed * gains.delta,
        "optim.mask_lr": mask_lr,
        "optim.lagrangian_lr": optim.lagrangian_lr * (optim.mask_lr / mask_lr) * speed ** 2 * size,
        "optim.mask_clip": optim.mask_clip * (optim.mask_lr / mask_lr) * speed * size ** 0.5,
        "optim.pmf_lr": optim.pmf_lr * speed * gains.pmf,
        "optim.router_lr": optim.router_lr * speed * gains.router,
        "router.temperature_decay_tasks": router.temperature_decay_tasks * target.tasks / reference.tasks,
    }

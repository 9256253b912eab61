"""The interface every few-shot model implements, used by training and evaluation alike.

Task weights are plain dicts of tensors keyed by timm parameter names (`cls_token`, `blocks.0.attn.qkv.weight`,
...); the backbone module keeps θ_pre and is run on any such dict with `torch.func.functional_call`, so no
model is ever copied per task.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import Tensor, nn
from torch.func import functional_call

from smat.methods.head import CosineHead

if TYPE_CHECKING:
    from smat.data.loader import EpisodeTensors


@dataclass
class TaskOutput:
    """One meta-training task: the loss to back-propagate, scalar metrics, and the task weights θ_i it used."""
    loss: Tensor
    metrics: dict
    weights: dict[str, Tensor]


@dataclass
class ParamGroup:
    """One optimiser parameter group of a method (METHOD §1.10, §2.3); `clip`: max gradient norm, or None."""
    name: str
    params: list[nn.Parameter]
    lr: float
    momentum: float = 0.0
    weight_decay: float = 0.0
    clip: float | None = None


@dataclass
class TaskParams:
    weights: dict[str, Tensor]      # every backbone parameter by timm name; detached, safe to modify in place
    alpha: Tensor | None = None     # router scores (M,) for smat/softmerge, else None


def backbone_parameters(backbone: nn.Module) -> dict[str, nn.Parameter]:
    """The backbone's parameters by timm name (the wrapped `vit` module's names)."""
    return dict(backbone.vit.named_parameters())


class FewShotModel(nn.Module):
    """A backbone, a cosine prototype head, and the method-specific way of getting task weights."""

    method: str
    task_independent: bool

    def __init__(self, backbone: nn.Module, head: CosineHead) -> None:
        super().__init__()
        self.backbone = backbone
        self.head = head
        # Meta-training tasks seen so far; saved with the model (SMAT's eval temperature depends on it).
        self.register_buffer("tasks_seen", torch.zeros((), dtype=torch.long))

    def task_params(self, support_x: Tensor, support_y: Tensor) -> TaskParams:
        raise NotImplementedError

    def features(self, weights: dict[str, Tensor], x: Tensor) -> Tensor:
        """Backbone features (CLS after the final norm) of `x` computed with `weights` instead of the stored ones."""
        return functional_call(self.backbone, {f"vit.{name}": value for name, value in weights.items()}, (x,))

    def head_logits(self, support_f: Tensor, support_y: Tensor, query_f: Tensor, n_way: int) -> Tensor:
        return self.head(query_f, self.head.prototypes(support_f, support_y, n_way))

    def meta_loss(self, episode: "EpisodeTensors", n_tasks_seen: int) -> tuple[Tensor, dict]:
        """Training loss of one task (to be divided by the meta-batch size by the caller) and its metrics."""
        out = self.task_forward(episode, n_tasks_seen)
        return out.loss, out.metrics

    def task_forward(self, episode: "EpisodeTensors", n_tasks_seen: int) -> TaskOutput:
        raise NotImplementedError

    def optimiser_groups(self, optim) -> tuple[list[ParamGroup], list[ParamGroup]]:
        """(SGD groups, AdamW groups) of meta-training, from the `OptimConfig` `optim`."""
        raise NotImplementedError

    def expert_masks(self) -> dict[str, Tensor] | None:
        """Eval-mode gate > 0 per backbone tensor, bool (M, *shape), for a model with expert gates; else None."""
        return None

    def replay_task_state_(self) -> None:
        """Apply what one training task changes in the model besides gradients, without running it (METHOD §11);
        nothing by default."""

    def configure_training(self, optim) -> None:
        """Trainer settings of the `OptimConfig` `optim` that change what a training task computes; none by
        default (a loaded model is built from its `ModelConfig` alone)."""

    def end_update_(self, alpha: list[float], lrs: dict[str, float]) -> None:
        """What a method does after each optimiser step, given the update's mean α and the SGD groups' learning
        rates; nothing by default."""

    def alignment_parameters(self) -> dict[str, list[Tensor]]:
        """Trained parameters whose per-task meta-gradients the gradient-alignment analysis compares."""
        raise NotImplementedError

    def frozen_weights(self) -> dict[str, Tensor]:
        """Detached copies of the stored backbone weights: the task weights of Pre and PMF."""
        return {name: p.detach().clone() for name, p in backbone_parameters(self.backbone).items()}

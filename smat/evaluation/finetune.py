"""Full test-time fine-tuning of a task's backbone weights on its support set (METHOD §3.5).

The fine-tuned weights are fresh tensors: the task weights passed in (and the model) are never modified,
so nothing needs restoring between tasks and consecutive tasks cannot influence each other.
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

from smat.evaluation.augment import diff_augment

# The released SMAT code runs 0 steps by mistake (METHOD §7.2); 50 is the intended count (METHOD §3.5).
FINETUNE_STEPS = 50
WEIGHT_DECAY = 0.01

FeatureFn = Callable[[Tensor], Tensor]


def support_loss(model, features: FeatureFn, support_x: Tensor, support_y: Tensor, n_way: int,
                 generator: torch.Generator) -> Tensor:
    """Cross-entropy of the head on the DiffAugment-ed support, prototypes from the clean support (METHOD §3.5).

    Clean and augmented images go through the backbone in one batch; gradients reach the prototypes too.
    """
    augmented = diff_augment(support_x, generator)
    both = features(torch.cat([support_x, augmented]))
    clean_f, augmented_f = both[: len(support_x)], both[len(support_x):]
    logits = model.head_logits(clean_f, support_y, augmented_f, n_way)
    return F.cross_entropy(logits, support_y)


def adamw_steps(model, features: FeatureFn, params: list[Tensor], support_x: Tensor, support_y: Tensor,
                n_way: int, lr: float, generator: torch.Generator, steps: int = FINETUNE_STEPS) -> None:
    """`steps` AdamW(lr, weight decay 0.01) updates of `params` on the support loss.

    Gradients are taken with torch.autograd.grad w.r.t. `params` only, so no other tensor (the model's own
    parameters, PMF's head scale and bias) accumulates a .grad or changes.
    """
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=WEIGHT_DECAY)
    for _ in range(steps):
        loss = support_loss(model, features, support_x, support_y, n_way, generator)
        grads = torch.autograd.grad(loss, params, allow_unused=True)
        for param, grad in zip(params, grads):
            param.grad = grad
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)


def finetune_full(model, weights: dict[str, Tensor], support_x: Tensor, support_y: Tensor, n_way: int,
                  lr: float, generator: torch.Generator, steps: int = FINETUNE_STEPS) -> dict[str, Tensor]:
    """Fine-tune every backbone tensor of the task (for SMAT: the collapsed θ_pre + (Σ α z) ⊙ θ_δ).

    Returns new, detached weights; `weights` is left untouched. lr 0 returns `weights` itself, which is
    exactly "no fine-tuning" (METHOD §3.5).
    """
    if lr == 0 or steps == 0:
        return weights
    trainable = {name: tensor.detach().clone().requires_grad_(True) for name, tensor in weights.items()}
    adamw_steps(model, lambda x: model.features(trainable, x), list(trainable.values()),
                support_x, support_y, n_way, lr, generator, steps)
    return {name: tensor.detach() for name, tensor in trainable.items()}

"""Distillation teachers (METHOD §1.8): the dense teacher and the KL term shared with the pre-trained teacher.

The dense teacher starts from a detached copy of the post-inner-step task weights (prototype head included),
takes one plain SGD step (lr 5e-3) on the query cross-entropy over all of them, and gives its query logits.
Its gradient is the gradient of the student's query cross-entropy with respect to the post-inner-step
weights: same function, same point. The caller passes that gradient, which saves one query forward pass.
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor


def kd_loss(student_logits: Tensor, teacher_logits: Tensor, temperature: float) -> Tensor:
    """T² · KL(student ‖ teacher) on temperature-softened distributions, averaged over examples.

    The direction is the official code's (`kl_div(log p_teacher, log p_student, log_target=True)`).
    """
    log_student = F.log_softmax(student_logits.float() / temperature, dim=-1)
    log_teacher = F.log_softmax(teacher_logits.detach().float() / temperature, dim=-1)
    kl = F.kl_div(log_teacher, log_student, log_target=True, reduction="batchmean")
    return temperature ** 2 * kl


def dense_teacher_logits(logits_fn: Callable[[dict[str, Tensor], Tensor], Tensor], weights: dict[str, Tensor],
                         prototypes: Tensor, grads: dict[str, Tensor], grad_prototypes: Tensor,
                         lr: float) -> Tensor:
    """Query logits after one SGD step of lr on every weight and on the prototype head; no gradient."""
    with torch.no_grad():
        stepped = {name: torch.add(w.detach(), grads[name], alpha=-lr) for name, w in weights.items()}
        return logits_fn(stepped, torch.add(prototypes.detach(), grad_prototypes, alpha=-lr))

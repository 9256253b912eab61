"""Cosine prototype head (ProtoNet): logits = scale · (cos(f, prototype_c) + bias).

SMAT and Pre use a fixed scale 10 and no bias (METHOD §1.6); PMF learns `scale` (init 10) and `bias` (init 0)
during meta-training (METHOD §2.3).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def class_prototypes(features: Tensor, labels: Tensor, n_way: int) -> Tensor:
    """Mean feature of each class 0..n_way-1, shape (n_way, d); differentiable w.r.t. the features."""
    one_hot = F.one_hot(labels, n_way).to(features.dtype)                     # (n, n_way)
    counts = one_hot.sum(0).clamp_min(1.0)
    return (one_hot.t() @ features) / counts[:, None]


def cosine_similarity(features: Tensor, prototypes: Tensor) -> Tensor:
    """(n, d) × (n_way, d) -> (n, n_way) cosine similarities, computed in fp32 for stability under fp16."""
    f = F.normalize(features.float(), dim=-1, eps=1e-12)
    w = F.normalize(prototypes.float(), dim=-1, eps=1e-12)
    return f @ w.t()


class CosineHead(nn.Module):
    def __init__(self, learnable: bool = False, scale: float = 10.0, bias: float = 0.0) -> None:
        super().__init__()
        self.learnable = learnable
        if learnable:
            self.scale = nn.Parameter(torch.tensor(float(scale)))
            self.bias = nn.Parameter(torch.tensor(float(bias)))
        else:
            self.register_buffer("scale", torch.tensor(float(scale)))
            self.register_buffer("bias", torch.tensor(float(bias)))

    @staticmethod
    def prototypes(features: Tensor, labels: Tensor, n_way: int) -> Tensor:
        return class_prototypes(features, labels, n_way)

    def forward(self, features: Tensor, prototypes: Tensor) -> Tensor:
        return self.scale * (cosine_similarity(features, prototypes) + self.bias)

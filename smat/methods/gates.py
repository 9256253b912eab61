"""Hard-concrete (L0) gates of Louizos et al., exactly as the official SMAT code samples them (METHOD §1.3).

z = clamp(s · (ζ − γ) + γ, 0, 1) with s = sigmoid((log u − log(1 − u) + log α) / β) in training and
s = sigmoid(log α) at eval (β = 1, no noise). The training noise u ~ U(0.5 ± w) has the released code's tiny width
w = 1e-6 by default, which makes sampling effectively deterministic (METHOD §7.4); w = 0.5 gives the textbook
U(0, 1) hard-concrete distribution, whose P(z ≠ 0) is what `expected_density` returns.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

EPS = 1e-6


@dataclass(frozen=True)
class HardConcrete:
    beta: float = 2 / 3
    zeta: float = 1.1
    gamma: float = -0.1
    noise_width: float = 1e-6
    log_alpha_min: float = math.log(0.01)
    log_alpha_max: float = math.log(100.0)

    def sample(self, log_alpha: Tensor, training: bool) -> Tensor:
        """Gate values z in [0, 1], same shape as `log_alpha`; differentiable where 0 < z < 1."""
        if training:
            noise = torch.empty_like(log_alpha).uniform_(0.5 - self.noise_width, 0.5 + self.noise_width)
            noise.clamp_(EPS, 1 - EPS).logit_().div_(self.beta)                 # (log u − log(1 − u)) / β
            s = torch.sigmoid(torch.add(noise, log_alpha, alpha=1 / self.beta))
        else:
            s = torch.sigmoid(log_alpha)
        return F.hardtanh(s.mul(self.zeta - self.gamma).add_(self.gamma), 0.0, 1.0)

    def density(self, log_alpha: Tensor) -> Tensor:
        """P(z ≠ 0) per gate under U(0, 1) noise: 1 − Q(0) = sigmoid(log α − β log(−γ/ζ)) (METHOD §1.3).

        Q(0) is clamped to [ε, 1 − ε] as in the official code; 1 − clamp(sigmoid(x)) = clamp(sigmoid(−x)).
        """
        density = torch.sigmoid(log_alpha - self.beta * math.log(-self.gamma / self.zeta))
        return F.hardtanh(density, EPS, 1 - EPS)

    def clamp_(self, log_alpha: Tensor) -> None:
        """Keep log α in [log 0.01, log 100], in place before every forward (METHOD §1.3)."""
        with torch.no_grad():
            log_alpha.clamp_(self.log_alpha_min, self.log_alpha_max)

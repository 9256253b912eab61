"""Expert-selection hypernetwork: support prototypes -> merging weights α over the M experts (METHOD §1.4).

Prototypes of the support set under the frozen θ_pre, followed by learnable skill tokens, pass one pre-LN
transformer block whose Linear layers are spectrally normalised; output token 0 is the task embedding e,
the logits are ℓ = K e with one key per expert. Training samples RelaxedBernoulli(T, ℓ); eval uses
sigmoid(ℓ / T); scores are normalised to sum to 1 when M > 1. Keys and skill tokens are registered,
trained and saved parameters (the official code's registration bug, METHOD §7.1, is not reproduced).
The router always runs in fp32: it is tiny, and its logits feed a temperature-scaled sigmoid.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.utils import parametrize
from torch.nn.utils.parametrizations import _SpectralNorm, spectral_norm


def _linear(d_in: int, d_out: int, bias: bool = True) -> nn.Module:
    return spectral_norm(nn.Linear(d_in, d_out, bias=bias))


class SpectralNormBlock(nn.Module):
    """Pre-LN transformer block (attention + GELU MLP), no dropout, spectral norm on every Linear."""

    def __init__(self, dim: int, heads: int, mlp_ratio: float) -> None:
        super().__init__()
        if dim % heads:
            raise ValueError(f"router: feature dim {dim} is not divisible by {heads} heads")
        self.heads = heads
        self.norm1 = nn.LayerNorm(dim, eps=1e-5)
        self.qkv = _linear(dim, 3 * dim, bias=False)
        self.proj = _linear(dim, dim)
        self.norm2 = nn.LayerNorm(dim, eps=1e-5)
        hidden = int(dim * mlp_ratio)
        self.fc1 = _linear(dim, hidden)
        self.fc2 = _linear(hidden, dim)

    def forward(self, x: Tensor) -> Tensor:                               # (B, L, d)
        b, length, d = x.shape
        q, k, v = self.qkv(self.norm1(x)).reshape(b, length, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        attended = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, length, d)
        x = x + self.proj(attended)
        return x + self.fc2(F.gelu(self.fc1(self.norm2(x))))


class Router(nn.Module):
    def __init__(self, dim: int, n_experts: int, heads: int = 4, mlp_ratio: float = 2.0,
                 skill_tokens: int = 4, skill_init_std: float = 1e-3) -> None:
        super().__init__()
        self.n_experts = n_experts
        self.skill_tokens = nn.Parameter(torch.randn(1, skill_tokens, dim) * skill_init_std)
        self.block = SpectralNormBlock(dim, heads, mlp_ratio)
        self.keys = nn.Parameter(torch.empty(n_experts, dim))
        nn.init.kaiming_normal_(self.keys)                                  # fan-in d: std sqrt(2 / d)

    def advance_power_iterations_(self, forwards: int) -> None:
        """Advance every spectral-norm u, v as `forwards` training forwards would, without running them.

        Each training forward runs one power iteration per Linear (eval forwards none); a data-parallel process
        replays those of the other processes' tasks with this, so that every process holds the single-process
        vectors (METHOD §11). torch's `_SpectralNorm._power_method` is the update its forward applies in place.
        """
        for module in self.modules():
            if not parametrize.is_parametrized(module, "weight"):
                continue
            weights = module.parametrizations.weight
            for norm in weights:
                if isinstance(norm, _SpectralNorm) and norm.training:
                    norm._power_method(norm._reshape_weight_to_matrix(weights.original),
                                       forwards * norm.n_power_iterations)

    def logits(self, prototypes: Tensor) -> Tensor:
        """(n_way, d) frozen-model prototypes -> (M,) selection logits ℓ."""
        with torch.autocast(device_type=prototypes.device.type, enabled=False):
            tokens = torch.cat([prototypes.float()[None], self.skill_tokens], dim=1)
            embedding = self.block(tokens)[0, 0]                            # token 0 (METHOD §1.4.4)
            return self.keys @ embedding

    def scores(self, logits: Tensor, temperature: float, training: bool) -> Tensor:
        """Merging weights α (M,): relaxed-Bernoulli sample in training, sigmoid(ℓ/T) at eval."""
        if training:
            s = torch.distributions.RelaxedBernoulli(torch.tensor(temperature, device=logits.device),
                                                     logits=logits).rsample()
        else:
            s = torch.sigmoid(logits / temperature)
        if self.n_experts > 1:
            s = s / (s.sum() + 1e-8)
        return s


def router_temperature(tasks_seen: int, start: float = 5.0, minimum: float = 0.5, decay_tasks: float = 4000.0) -> float:
    """T = max(0.5, 5 − n / 4000) with n the number of training tasks seen (METHOD §1.4.7)."""
    return max(minimum, start - tasks_seen / decay_tasks)

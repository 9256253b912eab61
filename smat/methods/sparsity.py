"""Per-expert sparsity constraint: expected-L0 term and Lagrangian multipliers (METHOD §1.9).

τ is a target *sparsity* (fraction of zero gates); the expected L0 is a *density*, so the constraint is
E[density_m] ≤ 1 − τ ⇔ s_m ≥ τ. λ_m grows (SGD on L_lag) while expert m is denser than allowed and is
reset to 0 whenever it is sparser than τ.
"""

from __future__ import annotations

import torch
from torch import Tensor

from smat.methods.gates import HardConcrete


def expected_density(gates: HardConcrete, log_alpha: Tensor) -> Tensor:
    """E‖z_m‖₀ / N per expert, (M,), differentiable in log α."""
    return gates.density(log_alpha).mean(dim=-1)


def realised_sparsity(z: Tensor) -> Tensor:
    """Fraction of exactly-zero gates per expert, (M,); a hard count without gradient."""
    return 1.0 - torch.sign(z.detach()).sum(dim=-1) / z.shape[-1]      # z ≥ 0: sign is the indicator z > 0


def transition_band(z: Tensor) -> Tensor:
    """Fraction of gates strictly between 0 and 1 per expert, (M,): the only ones the task loss moves
    (METHOD §1.3); a run whose band empties early has frozen its masks."""
    z = z.detach()
    return ((z > 0) & (z < 1)).float().mean(dim=-1)


def reset_multipliers_(multipliers: Tensor, sparsity: Tensor, tau: float) -> None:
    """λ_m ← 0 where s_m > τ; applied before the losses are computed (METHOD §1.9.1)."""
    with torch.no_grad():
        multipliers.masked_fill_(sparsity > tau, 0.0)


def sparsity_losses(density: Tensor, sparsity: Tensor, multipliers: Tensor, alpha: Tensor,
                    tau: float) -> tuple[Tensor, Tensor]:
    """(L_sp, L_lag) with sg = stop-gradient.

    L_sp = Σ_m sg(λ_m) sg(α_m) (e_m − (1 − τ)) moves log α only;
    L_lag = Σ_m (s_m − τ) λ_m sg(α_m) moves λ only.
    """
    alpha = alpha.detach().float()
    l_sparsity = (multipliers.detach() * alpha * (density - (1 - tau))).sum()
    l_lagrangian = ((sparsity - tau) * multipliers * alpha).sum()
    return l_sparsity, l_lagrangian

"""Per-expert sparsity constraint: expected-L0 term and Lagrangian multipliers (METHOD §1.9).

τ is a target *sparsity* (fraction of zero gates); the expected L0 is a *density*, so the constraint is
E[density_m] ≤ 1 − τ ⇔ s_m ≥ τ. λ_m grows (SGD on L_lag) while expert m is denser than allowed and is
reset to 0 whenever it is sparser than τ.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from smat.methods.gates import EPS, HardConcrete
from smat.methods.experts import SparseInterpolatedExperts


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


def integrate_constraint_(experts: SparseInterpolatedExperts, multipliers: Tensor, alpha: Tensor, tau: float,
                          mask_lr: float, lagrangian_lr: float, substeps: int) -> None:
    """One meta-update's expected-L0 path (L_sp on log α, L_lag on λ) as `substeps` SGD steps of lr / substeps.

    Per step, as a task forward does (METHOD §1.9): clamp log α, sample the gates, reset λ where s_m > τ, then
    log α_m −= lr · λ_m α_m ∂e_m/∂log α_m and λ_m −= lr_λ · (s_m − τ) α_m with the α averaged over the update's
    tasks. One step of the full lr is what the task loss's two terms do; K steps land the same push in K parts,
    so an expert stops at τ instead of one update's push past it (METHOD §1.13). Experts already sparser than
    τ have λ = 0 after the reset and their gates do not move: only the others are computed.
    """
    gates = experts.hard_concrete
    alpha = alpha.to(multipliers)
    with torch.no_grad():
        gates.clamp_(experts.log_alpha)
        sparsity = realised_sparsity(gates.sample(experts.log_alpha, training=True))
        rows = (sparsity <= tau).nonzero().flatten()
        # Experts sparser than τ: every step resets λ_m and then lowers it by lr_λ (s_m − τ) α_m / K.
        done = sparsity > tau
        multipliers[done] = -(lagrangian_lr / substeps) * (sparsity[done] - tau) * alpha[done]
        if len(rows) == 0:
            return
        log_alpha = experts.log_alpha[rows]
        shift = gates.beta * math.log(-gates.gamma / gates.zeta)
        for step in range(substeps):
            if step:
                gates.clamp_(log_alpha)
                sparsity = realised_sparsity(gates.sample(log_alpha, training=True))
            else:
                sparsity = sparsity[rows]
            lam = multipliers[rows].masked_fill(sparsity > tau, 0.0)
            # ∂e_m/∂log α = p (1 − p) / N with p = sigmoid(log α − β log(−γ/ζ)), 0 where e's clamp holds.
            p = torch.sigmoid(log_alpha - shift)
            slope = p * (1 - p) * ((p > EPS) & (p < 1 - EPS))
            push = (mask_lr / substeps) * lam * alpha[rows] / log_alpha.shape[-1]
            log_alpha.sub_(slope.mul_(push[:, None]))
            multipliers[rows] = lam - (lagrangian_lr / substeps) * (sparsity - tau) * alpha[rows]
        gates.clamp_(log_alpha)
        experts.log_alpha[rows] = log_alpha

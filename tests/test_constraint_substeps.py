"""The sparsity constraint integrated after the step in K parts (METHOD §1.13): one part is exactly the task loss's
L_sp + L_lag step, and more parts stop an expert at τ where one step of the whole push overshoots it."""

from __future__ import annotations

import torch

from smat.methods.experts import ParamLayout, SparseInterpolatedExperts
from smat.methods.gates import HardConcrete
from smat.methods.sparsity import (expected_density, integrate_constraint_, realised_sparsity, reset_multipliers_,
                                   sparsity_losses)

M, N, TAU = 3, 4000, 0.5


def _experts(offsets: list[float]) -> SparseInterpolatedExperts:
    """Three experts whose gates start at log α ~ N(offset, 0.5²)."""
    torch.manual_seed(0)
    experts = SparseInterpolatedExperts(ParamLayout({"w": torch.zeros(N)}), M, HardConcrete(), init_std=0.5)
    with torch.no_grad():
        experts.log_alpha.add_(torch.tensor(offsets)[:, None])
    return experts


def _loss_path_step(experts, multipliers, alpha, mask_lr, lagrangian_lr):
    """What one task forward + SGD step does to log α and λ when the losses hold the constraint."""
    lam = torch.nn.Parameter(multipliers.clone())
    sparsity = realised_sparsity(experts.gates(training=True))
    reset_multipliers_(lam, sparsity, TAU)
    density = expected_density(experts.hard_concrete, experts.log_alpha)
    l_sparsity, l_lagrangian = sparsity_losses(density, sparsity, lam, alpha, TAU)
    grad_log_alpha, grad_lam = torch.autograd.grad(l_sparsity + l_lagrangian, [experts.log_alpha, lam])
    with torch.no_grad():
        return experts.log_alpha - mask_lr * grad_log_alpha, lam - lagrangian_lr * grad_lam


def test_one_part_equals_the_loss_path():
    experts = _experts([-2.0, 0.0, 0.4])
    multipliers = torch.tensor([0.3, 0.0, 0.2])
    sparsity = realised_sparsity(experts.gates(training=True))
    assert sparsity[0] > TAU > sparsity[2]       # one expert past τ (reset), one below it with λ > 0
    alpha = torch.tensor([0.2, 0.5, 0.3])
    expected_log_alpha, expected_lam = _loss_path_step(experts, multipliers, alpha, 5e3, 0.1)
    integrate_constraint_(experts, multipliers, alpha, TAU, 5e3, 0.1, substeps=1)
    torch.testing.assert_close(experts.log_alpha.detach(), expected_log_alpha, rtol=0, atol=1e-5)
    torch.testing.assert_close(multipliers, expected_lam, rtol=0, atol=1e-7)
    assert not torch.equal(experts.log_alpha[2], _experts([-2.0, 0.0, 0.4]).log_alpha[2])   # the dense expert was pushed


def _run(substeps: int) -> torch.Tensor:
    """Three dense experts driven to τ, crossing it after 25-30 updates with jumps of up to 0.07 in sparsity
    per update near it, as the embedded schedule's experts do (METHOD §1.13)."""
    experts, multipliers, alpha = _experts([0.0, 0.3, 0.6]), torch.zeros(M), torch.full((M,), 1 / M)
    for _ in range(80):
        integrate_constraint_(experts, multipliers, alpha, TAU, 2e4, 0.1, substeps)
    return realised_sparsity(experts.gates(training=True))


def test_more_parts_stop_the_experts_at_tau():
    coarse, fine = _run(1), _run(8)
    assert (coarse >= TAU).all() and (fine >= TAU).all()
    assert (coarse - TAU).max() > 0.03                     # one push per update misses the ±0.03 band
    assert (fine - TAU).max() < 0.01                       # eight parts stop within an eighth of it

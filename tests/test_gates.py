"""Hard-concrete gates and the expected-L0 / realised sparsity that the constraint uses (METHOD §1.3, §1.9)."""

import math

import pytest
import torch

from smat.methods.gates import HardConcrete
from smat.methods.sparsity import expected_density, realised_sparsity

TRAIN_ZERO = 2 / 3 * math.log(0.1 / 1.1)   # -1.5986: z > 0 in training iff log α above this
EVAL_ZERO = math.log(0.1 / 1.1)            # -2.3979: z > 0 at eval iff log α above this



def test_constants_match_the_spec():
    gates = HardConcrete()
    assert (gates.beta, gates.zeta, gates.gamma, gates.noise_width) == (2 / 3, 1.1, -0.1, 1e-6)
    assert (gates.log_alpha_min, gates.log_alpha_max) == pytest.approx((-4.6052, 4.6052), abs=1e-4)


@pytest.mark.parametrize("training, zero_below, one_above", [(True, TRAIN_ZERO, -TRAIN_ZERO),
                                                            (False, EVAL_ZERO, -EVAL_ZERO)])
def test_gate_thresholds_in_train_and_eval(training, zero_below, one_above):
    gates = HardConcrete()
    log_alpha = torch.tensor([zero_below - 0.01, zero_below + 0.01, one_above - 0.01, one_above + 0.01, -4.6, 4.6])
    z = gates.sample(log_alpha, training=training)
    assert z[0] == 0 and z[1] > 0
    assert z[2] < 1 and z[3] == 1
    assert z[4] == 0 and z[5] == 1


def test_train_and_eval_differ_for_intermediate_log_alpha():
    gates = HardConcrete()
    log_alpha = torch.tensor([-2.0, 2.0])           # between the two modes' thresholds
    train, evaluation = gates.sample(log_alpha, True), gates.sample(log_alpha, False)
    assert train[0] == 0 and evaluation[0] > 0      # zero in training, open at eval
    assert train[1] == 1 and evaluation[1] < 1      # saturated in training, not at eval


def test_spec_noise_is_effectively_deterministic_but_not_absent():
    gates = HardConcrete()
    log_alpha = torch.linspace(-1.5, 1.5, 1001)
    a, b = gates.sample(log_alpha, True), gates.sample(log_alpha, True)
    assert not torch.equal(a, b)
    assert (a - b).abs().max() < 1e-5


def test_expected_density_equals_monte_carlo_of_the_full_noise_distribution():
    torch.manual_seed(0)
    gates = HardConcrete(noise_width=0.5)           # u ~ U(0, 1): the distribution the expected L0 describes
    log_alpha = torch.tensor([-3.0, -1.6, 0.0, 1.0, 2.5])
    n = 200_000
    samples = gates.sample(log_alpha.expand(n, -1).contiguous(), training=True)
    monte_carlo = (samples > 0).float().mean(0)
    expected = gates.density(log_alpha)
    standard_error = (expected * (1 - expected) / n).sqrt()
    assert torch.all((monte_carlo - expected).abs() < 5 * standard_error + 1e-4)
    assert torch.allclose(expected, torch.sigmoid(log_alpha - TRAIN_ZERO), atol=1e-6)   # sigmoid(log α + 1.5986)


def test_expected_density_and_realised_sparsity_per_expert():
    gates = HardConcrete()
    log_alpha = torch.stack([torch.full((100,), -4.6), torch.cat([torch.full((30,), 4.6), torch.full((70,), -4.6)])])
    density = expected_density(gates, log_alpha)
    assert density.shape == (2,)
    assert density[0] == pytest.approx(torch.sigmoid(torch.tensor(-4.6 - TRAIN_ZERO)).item(), rel=1e-5)
    assert realised_sparsity(gates.sample(log_alpha, True)).tolist() == pytest.approx([1.0, 0.7])


def test_clamp_keeps_log_alpha_in_range_in_place():
    gates = HardConcrete()
    log_alpha = torch.tensor([-50.0, 0.3, 50.0])
    gates.clamp_(log_alpha)
    assert log_alpha.tolist() == pytest.approx([math.log(0.01), 0.3, math.log(100)])


def test_gate_gradient_flows_only_inside_the_open_interval():
    gates = HardConcrete()
    log_alpha = torch.tensor([-4.0, 0.0, 4.0], requires_grad=True)
    gates.sample(log_alpha, True).sum().backward()
    assert log_alpha.grad[0] == 0 and log_alpha.grad[1] > 0 and log_alpha.grad[2] == 0

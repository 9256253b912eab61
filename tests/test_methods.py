"""SMAT, its switches, SoftMerge, PMF and Pre: each fact of the method (METHOD §1-2) on a tiny ViT."""

import copy
import math

import pytest
import torch
import torch.nn.functional as F

from smat.config_loader import build_dataclass
from smat.data.loader import EpisodeTensors
from smat.io import SmatError
from smat.methods.base import backbone_parameters
from smat.methods.pre import Pre
from smat.methods.registry import build_model
from smat.methods.smat import inner_step
from smat.methods.teacher import dense_teacher_logits, kd_loss
from smat.models.backbones import create_backbone
from smat.training.config import TrainConfig
from smat.training.optim import build_optimisers, set_epoch_lr, step



def config(**overrides) -> TrainConfig:
    return build_dataclass(TrainConfig, {"image_size": 16, "experts": 3,
                                         "tau": 0.9, **overrides})


def tiny(**overrides):
    torch.manual_seed(0)
    return build_model(config(**overrides), create_backbone("vit_tiny_patch4_32", image_size=16)).train()


def episode(n_way=3, shots=2, queries=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    return EpisodeTensors(torch.randn(n_way * shots, 3, 16, 16, generator=g), torch.arange(n_way).repeat(shots),
                          torch.randn(n_way * queries, 3, 16, 16, generator=g), torch.arange(n_way).repeat(queries),
                          n_way)


def theta_pre(model):
    return {k: v.detach() for k, v in backbone_parameters(model.backbone).items()}


# --- reparameterisation -------------------------------------------------------------------------------------

def test_every_backbone_tensor_is_gated_and_delta_starts_at_zero():
    model = tiny()
    n = sum(p.numel() for p in backbone_parameters(model.backbone).values())
    assert model.experts.delta.shape == (n,) and torch.all(model.experts.delta == 0)
    assert model.experts.log_alpha.shape == (3, n)
    assert model.experts.log_alpha.std().item() == pytest.approx(0.5, rel=0.02)
    assert not any(p.requires_grad for p in model.backbone.parameters())             # θ_pre frozen


def test_closed_gates_give_exactly_theta_pre_and_open_gates_theta_pre_plus_delta():
    model = tiny()
    with torch.no_grad():
        model.experts.delta.normal_()
        model.experts.log_alpha.fill_(-10.0)                                           # clamped, all z = 0
    ep = episode()
    weights = model.task_params(ep.support_x, ep.support_y).weights
    assert all(torch.equal(weights[k], v) for k, v in theta_pre(model).items())
    assert torch.all(model.experts.log_alpha == -10.0)                                # inference changes nothing
    delta = model.experts.layout.unflatten(model.experts.delta.detach())
    with torch.no_grad():
        model.experts.log_alpha.fill_(10.0)                                            # all z = 1
    weights = model.task_params(ep.support_x, ep.support_y).weights
    assert all(torch.allclose(weights[k], v + delta[k], atol=1e-6) for k, v in theta_pre(model).items())
    single = tiny(experts=1, switches={"ie": False})                                   # α ≡ 1: exact
    with torch.no_grad():
        single.experts.delta.normal_()
        single.experts.log_alpha.fill_(10.0)
    delta = single.experts.layout.unflatten(single.experts.delta.detach())
    weights = single.task_params(ep.support_x, ep.support_y).weights
    assert all(torch.equal(weights[k], v + delta[k]) for k, v in theta_pre(single).items())


def test_merged_weights_are_the_alpha_weighted_mask_times_delta():
    model = tiny()
    with torch.no_grad():
        model.experts.delta.normal_()
    ep = episode()
    params = model.task_params(ep.support_x, ep.support_y)
    z = model.experts.gates(training=False)
    mask = params.alpha @ z
    expected = model.experts.layout.unflatten(mask * model.experts.delta.detach())
    assert all(torch.allclose(params.weights[k], v + expected[k], atol=1e-6) for k, v in theta_pre(model).items())
    assert params.alpha.sum().item() == pytest.approx(1.0)


def test_task_weights_are_detached_copies():
    model = tiny()
    ep = episode()
    weights = model.task_params(ep.support_x, ep.support_y).weights
    assert not any(w.requires_grad for w in weights.values())
    before = theta_pre(model)["cls_token"].clone()
    weights["cls_token"].add_(1.0)
    assert torch.equal(theta_pre(model)["cls_token"], before)


def test_first_step_gate_gradient_is_zero_because_delta_is_zero():
    model = tiny()
    loss, _ = model.meta_loss(episode(), 0)
    loss.backward()
    assert torch.all(model.experts.log_alpha.grad == 0)
    assert model.experts.delta.grad.abs().sum() > 0


def test_gates_get_gradient_once_delta_moves():
    model = tiny()
    with torch.no_grad():
        model.experts.delta.normal_(0, 1e-2)
    loss, _ = model.meta_loss(episode(), 0)
    loss.backward()
    assert model.experts.log_alpha.grad.abs().sum() > 0


# --- inner step, teachers, loss -----------------------------------------------------------------------------

def test_inner_step_is_first_order_and_reaches_the_support_features():
    model = tiny()
    ep = episode()
    weights = {k: v.clone().requires_grad_(True) for k, v in theta_pre(model).items()}
    support_x = ep.support_x.clone().requires_grad_(True)
    stepped, head = inner_step(model, weights, support_x, ep.support_y, ep.n_way, lr=1e-3)
    # First order: θ' = θ − lr·g with g constant, so ∂θ'/∂θ is the identity.
    probe = {k: torch.randn_like(v) for k, v in stepped.items()}
    sum((stepped[k] * probe[k]).sum() for k in stepped).backward(retain_graph=True)
    assert all(torch.equal(weights[k].grad, probe[k]) for k in weights)
    # The value moved by one SGD step...
    moved = sum((stepped[k] - weights[k]).abs().sum() for k in weights)
    assert moved > 0
    # ...and the re-attached prototypes pass the outer gradient into the support images.
    query_logits = model.head(model.features(stepped, ep.query_x), head)
    F.cross_entropy(query_logits, ep.query_y).backward()
    assert support_x.grad is not None and support_x.grad.abs().sum() > 0


def test_dense_teacher_is_one_sgd_step_on_the_query_ce_from_detached_weights():
    model = tiny()
    ep = episode()
    weights = {k: v.clone().requires_grad_(True) for k, v in theta_pre(model).items()}
    stepped, head = inner_step(model, weights, ep.support_x, ep.support_y, ep.n_way, lr=1e-3)
    logits_fn = lambda w, h: model.head(model.features(w, ep.query_x), h)  # noqa: E731
    ce = F.cross_entropy(logits_fn(stepped, head), ep.query_y)
    names = list(stepped)
    *grads, grad_head = torch.autograd.grad(ce, [stepped[n] for n in names] + [head])
    teacher = dense_teacher_logits(logits_fn, stepped, head, dict(zip(names, grads)), grad_head, lr=5e-3)
    # Reference: a detached copy of the post-inner weights and head, one SGD step of its own on the query CE.
    copies = {k: v.detach().clone().requires_grad_(True) for k, v in stepped.items()}
    head_copy = head.detach().clone().requires_grad_(True)
    F.cross_entropy(logits_fn(copies, head_copy), ep.query_y).backward()
    with torch.no_grad():
        reference = logits_fn({k: v - 5e-3 * v.grad for k, v in copies.items()}, head_copy - 5e-3 * head_copy.grad)
        before = logits_fn(stepped, head)
    assert torch.allclose(teacher, reference, atol=1e-5) and not teacher.requires_grad
    assert not torch.allclose(teacher, before, atol=1e-3)                              # the step changed it


def test_kd_is_student_to_teacher_kl_times_t_squared():
    torch.manual_seed(0)
    student, teacher = torch.randn(6, 4), torch.randn(6, 4)
    p_s, p_t = F.softmax(student / 2, -1), F.softmax(teacher / 2, -1)
    kl_student_teacher = (p_s * (p_s.log() - p_t.log())).sum(-1).mean()
    kl_teacher_student = (p_t * (p_t.log() - p_s.log())).sum(-1).mean()
    assert kd_loss(student, teacher, 2.0).item() == pytest.approx(4 * kl_student_teacher.item(), rel=1e-5)
    assert kd_loss(student, teacher, 2.0).item() != pytest.approx(4 * kl_teacher_student.item(), rel=1e-3)


def test_loss_weights():
    model = tiny(router={"logit_l2": 0.0})                  # λ = 0 at the start: sparsity terms vanish
    loss, metrics = model.meta_loss(episode(), 0)
    assert metrics["kd"] > 0
    assert loss.item() == pytest.approx(0.75 * metrics["ce"] + 0.25 * metrics["kd"], rel=1e-5)
    model = tiny()
    torch.manual_seed(1)
    loss, metrics = model.meta_loss(episode(), 0)
    assert loss.item() > 0.75 * metrics["ce"] + 0.25 * metrics["kd"]                   # + 1e-4 mean(ℓ²)


# --- sparsity constraint --------------------------------------------------------------------------------------

def test_lambda_grows_while_dense_and_resets_when_sparse():
    model = tiny(meta_batch=1)
    model_config = config()
    optimisers = build_optimisers(model, model_config.optim)
    set_epoch_lr(optimisers, 5, model_config.schedule)       # past warm-up: full learning rates
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    ep = episode()
    for _ in range(2):                                       # initial sparsity ≈ 0 < τ = 0.9: λ grows
        loss, metrics = model.meta_loss(ep, 0)
        loss.backward()
        step(optimisers, scaler)
    assert all(lam > 0 for lam in model.lagrangian.tolist())
    grown = model.lagrangian.detach().clone()
    with torch.no_grad():
        model.experts.log_alpha[0].fill_(-10.0)               # expert 0 now fully sparse (s = 1 > τ)
        model.experts.delta.zero_()                           # keep log α still: only the constraint acts
    _, metrics = model.meta_loss(ep, 0)
    assert metrics["sparsity"][0] == 1.0
    assert model.lagrangian[0].item() == 0.0                  # reset before the losses
    assert model.lagrangian[1:].tolist() == pytest.approx(grown[1:].tolist())


def test_sparsity_term_pushes_log_alpha_down_in_proportion_to_lambda():
    model = tiny()
    with torch.no_grad():
        model.lagrangian.copy_(torch.tensor([1.0, 0.0, 2.0]))
    loss, metrics = model.meta_loss(episode(), 0)
    loss.backward()
    grad = model.experts.log_alpha.grad                       # δ = 0: only L_sp reaches log α
    assert torch.all(grad[0] > 0) and torch.all(grad[1] == 0) and torch.all(grad[2] > 0)
    assert model.lagrangian.grad.tolist() == pytest.approx(
        [(s - 0.9) * a for s, a in zip(metrics["sparsity"], metrics["alpha"])], rel=1e-4)


# --- switches, baselines, bad input ---------------------------------------------------------------------------

def test_dt_off_removes_both_kd_terms():
    model = tiny(switches={"dt": False}, router={"logit_l2": 0.0})
    loss, metrics = model.meta_loss(episode(), 0)
    assert metrics["kd"] == 0.0 and loss.item() == pytest.approx(metrics["ce"], rel=1e-6)


def test_ie_off_is_one_expert_with_alpha_one_and_no_router():
    model = tiny(experts=1, switches={"ie": False})
    assert model.router is None and model.experts.n_experts == 1
    assert not any(k.startswith("router.") for k in model.state_dict())
    _, metrics = model.meta_loss(episode(), 0)
    assert metrics["alpha"] == [1.0] and len(metrics["sparsity"]) == 1
    with pytest.raises(SmatError, match="experts: 1"):
        config(switches={"ie": False})


def test_meta_off_uses_support_and_query_together_everywhere():
    ep = episode()
    union = EpisodeTensors(torch.cat([ep.support_x, ep.query_x]), torch.cat([ep.support_y, ep.query_y]),
                           torch.cat([ep.support_x, ep.query_x]), torch.cat([ep.support_y, ep.query_y]), ep.n_way)
    off = tiny(switches={"meta": False})
    on = tiny()
    torch.manual_seed(5)
    loss_off, metrics_off = off.meta_loss(ep, 0)
    torch.manual_seed(5)
    loss_on, metrics_on = on.meta_loss(union, 0)
    assert loss_off.item() == pytest.approx(loss_on.item(), rel=1e-6)
    torch.manual_seed(5)
    assert on.meta_loss(ep, 0)[0].item() != pytest.approx(loss_off.item(), rel=1e-3)


def test_mls_and_ie_off_is_a_dense_delta():
    model = tiny(experts=1, switches={"mls": False, "ie": False})
    assert not hasattr(model.experts, "log_alpha") and model.lagrangian is None and model.router is None
    with torch.no_grad():
        model.experts.delta.normal_()
    ep = episode()
    delta = model.experts.layout.unflatten(model.experts.delta.detach())
    weights = model.task_params(ep.support_x, ep.support_y).weights
    assert all(torch.equal(weights[k], v + delta[k]) for k, v in theta_pre(model).items())
    _, metrics = model.meta_loss(ep, 0)
    assert "sparsity" not in metrics and metrics["kd"] > 0
    assert model.expert_masks() is None


def test_mls_off_with_ie_on_is_rejected():
    with pytest.raises(SmatError, match="not a Table 2 row"):
        config(switches={"mls": False})


def test_softmerge_is_dense_experts_merged_by_the_router_without_sparsity():
    model = tiny(method="softmerge")
    n = model.experts.layout.size
    assert model.method == "softmerge" and model.experts.delta.shape == (3, n) and model.lagrangian is None
    with torch.no_grad():
        model.experts.delta.normal_()
    ep = episode()
    params = model.task_params(ep.support_x, ep.support_y)
    expected = model.experts.layout.unflatten(params.alpha @ model.experts.delta.detach())
    assert all(torch.allclose(params.weights[k], v + expected[k], atol=1e-6) for k, v in theta_pre(model).items())
    loss, metrics = model.meta_loss(ep, 0)
    assert metrics["kd"] == 0.0 and "sparsity" not in metrics                        # plain query CE by default
    assert tiny(method="softmerge", switches={"dt": True}).meta_loss(ep, 0)[1]["kd"] > 0
    with pytest.raises(SmatError, match="softmerge"):
        config(method="softmerge", switches={"ie": False})


def test_pmf_trains_the_whole_backbone_with_learnable_scale_and_bias():
    model = tiny(method="pmf")
    assert model.head.scale.item() == 10.0 and model.head.bias.item() == 0.0
    assert all(p.requires_grad for p in model.parameters())
    assert not model.backbone.training                                                # PMF trains in eval mode
    ep = episode()
    loss, metrics = model.meta_loss(ep, 0)
    loss.backward()
    assert all(p.grad is not None for p in model.parameters())
    with torch.no_grad():
        model.head.scale.fill_(3.0)
        model.head.bias.fill_(0.5)
    f_s, f_q = model.backbone(ep.support_x), model.backbone(ep.query_x)
    prototypes = model.head.prototypes(f_s, ep.support_y, 3)
    cos = F.normalize(f_q, dim=-1) @ F.normalize(prototypes, dim=-1).t()
    assert torch.allclose(model.head_logits(f_s, ep.support_y, f_q, 3), 3.0 * (cos + 0.5), atol=1e-5)
    with pytest.raises(SmatError, match="PMF has no ablation switches"):
        config(method="pmf", switches={"dt": True})


def test_pre_uses_the_pretrained_weights_with_a_fixed_cosine_head():
    backbone = create_backbone("vit_tiny_patch4_32", image_size=16)
    model = Pre(copy.deepcopy(backbone)).eval()
    ep = episode()
    params = model.task_params(ep.support_x, ep.support_y)
    assert params.alpha is None and model.task_independent
    features = model.features(params.weights, ep.query_x)
    assert torch.allclose(features, backbone(ep.query_x), atol=1e-6)
    assert model.head.scale.item() == 10.0 and not model.head.learnable
    with pytest.raises(SmatError, match="no meta-training"):
        model.meta_loss(ep, 0)


@pytest.mark.parametrize("overrides, message", [
    ({"method": "maml"}, "method"),
    ({"switches": {"mls": True, "sparse": True}}, "unknown key"),
    ({"tau": 1.0}, r"tau=1.0"),
    ({"tau": -0.1}, r"tau=-0.1"),
    ({"experts": 0}, "experts=0"),
])
def test_bad_config_values_are_clear_errors(overrides, message):
    with pytest.raises(SmatError, match=message):
        config(**overrides)


def test_task_params_match_the_meta_loss_pieces_in_eval_mode():
    model = tiny().eval()
    ep = episode()
    a = model.task_params(ep.support_x, ep.support_y)
    b = model.task_params(ep.support_x, ep.support_y)
    assert torch.equal(a.alpha, b.alpha) and all(torch.equal(a.weights[k], b.weights[k]) for k in a.weights)
    assert math.isclose(float(a.alpha.sum()), 1.0, rel_tol=1e-6)

"""The expert-selection hypernetwork (METHOD §1.4): real parameters, gradients, scores, temperature."""

import math

import pytest
import torch

from smat.config_loader import build_dataclass
from smat.data.loader import EpisodeTensors
from smat.methods.registry import build_model
from smat.methods.router import Router, router_temperature
from smat.models.backbones import create_backbone
from smat.training.config import TrainConfig



def tiny_smat(**overrides):
    torch.manual_seed(0)
    config = build_dataclass(TrainConfig, {"image_size": 16, "experts": 3,
                                           **overrides})
    return build_model(config, create_backbone("vit_tiny_patch4_32", image_size=16))


def episode(n_way=3, shots=2, queries=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    return EpisodeTensors(torch.randn(n_way * shots, 3, 16, 16, generator=g), torch.arange(n_way).repeat(shots),
                          torch.randn(n_way * queries, 3, 16, 16, generator=g), torch.arange(n_way).repeat(queries),
                          n_way)


def test_keys_skill_tokens_and_block_are_saved_parameters():
    model = tiny_smat()
    state = model.state_dict()
    params = dict(model.named_parameters())
    for name in ("router.keys", "router.skill_tokens", "router.block.qkv.parametrizations.weight.original",
                 "router.block.fc2.parametrizations.weight.original"):
        assert name in state and name in params and params[name].requires_grad
    dim = model.backbone.feature_dim
    assert state["router.keys"].shape == (3, dim) and state["router.skill_tokens"].shape == (1, 4, dim)


def test_router_parameters_get_task_gradients():
    model = tiny_smat(**{"router": {"logit_l2": 0.0}})    # no logit penalty: gradients come from the task loss
    with torch.no_grad():
        model.experts.delta.normal_(0, 1e-2)               # with δ = 0 the merge ignores α
    model.train()
    loss, _ = model.meta_loss(episode(), 0)
    loss.backward()
    for name, p in model.router.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name


def test_initialisation():
    torch.manual_seed(0)
    router = Router(dim=256, n_experts=64)
    assert router.keys.std().item() == pytest.approx(math.sqrt(2 / 256), rel=0.1)      # kaiming, fan-in d
    assert router.skill_tokens.std().item() == pytest.approx(1e-3, rel=0.1)
    block = router.block
    assert block.qkv.bias is None and block.norm1.eps == 1e-5 and block.fc1.out_features == 512
    assert block.heads == 4 and hasattr(block.qkv, "parametrizations")                    # spectral norm


def test_logits_read_token_zero():
    torch.manual_seed(0)
    router = Router(dim=32, n_experts=2).eval()
    prototypes = torch.randn(5, 32)
    tokens = torch.cat([prototypes[None], router.skill_tokens], dim=1)
    assert torch.allclose(router.logits(prototypes), router.keys @ router.block(tokens)[0, 0])


def test_scores_eval_train_and_single_expert():
    torch.manual_seed(0)
    logits = torch.tensor([2.0, -1.0, 0.5])
    router = Router(dim=8, n_experts=3)
    alpha = router.scores(logits, 0.5, training=False)
    s = torch.sigmoid(logits / 0.5)
    assert torch.allclose(alpha, s / (s.sum() + 1e-8)) and alpha.sum().item() == pytest.approx(1.0)
    sampled = router.scores(logits.requires_grad_(), 1.0, training=True)
    assert sampled.sum().item() == pytest.approx(1.0) and sampled.requires_grad
    assert not torch.allclose(sampled, router.scores(logits, 1.0, training=True))   # relaxed Bernoulli noise
    single = Router(dim=8, n_experts=1)
    unnormalised = single.scores(torch.tensor([0.3]), 2.0, training=False)
    assert unnormalised.item() == pytest.approx(torch.sigmoid(torch.tensor(0.15)).item())


def test_temperature_schedule():
    assert [router_temperature(n) for n in (0, 4000, 10000, 18000, 10 ** 6)] == pytest.approx([5, 4, 2.5, 0.5, 0.5])


def test_eval_scores_use_the_saved_task_counter():
    model = tiny_smat().eval()
    ep = episode()
    model.tasks_seen.fill_(18000)                           # T = 0.5
    alpha = model.task_params(ep.support_x, ep.support_y).alpha
    logits = model.router.logits(model.head.prototypes(model.backbone(ep.support_x), ep.support_y, 3))
    s = torch.sigmoid(logits / 0.5)
    assert torch.allclose(alpha, s / (s.sum() + 1e-8), atol=1e-6)

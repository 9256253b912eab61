"""Batched fine-tuning equals fine-tuning one episode at a time (METHOD §3.5).

The reference below is the plain one-episode recipe: torch.optim.AdamW on a fresh copy of the task weights,
the backbone module run with `model.features`, PEFT LoRA on a copy whose fused q/k/v projection is split into
three Linears, and the DiffAugment of one image batch. It draws its random numbers in the order the batched
code defines per episode (LoRA init, a dropout seed, then per step the augmentation and the dropout masks).
Batches mix episode shapes (ways, shots, queries), so padding and masking are exercised.

Adam's first updates are ±lr whatever the size of a gradient, so a rounding difference in a near-zero
gradient component becomes a difference of lr in a weight: in fp32 the logits of two paths that round
differently (a batched matmul against one per episode) differ by up to 1e-2 after 4 steps. The comparison
therefore runs the backbone in fp64 (the task weights are computed in fp32 as always, then cast; the head
computes its cosine in fp32 by design), where the two paths give the same logits.
Both run timm's attention as written out (softmax(q kᵀ) v, `fused_attn = False`, which the batched code uses
under vmap); `test_fused_and_written_out_attention_agree` bounds its difference from the fused kernel.
"""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from peft import LoraConfig, inject_adapter_in_model
from peft.tuners.lora import LoraLayer
from torch import nn
from test_evaluation import ARCH, build_smat

from smat.data.loader import EpisodeTensors
from smat.evaluation.batching import BatchBudget, plan_batches
from smat.evaluation.finetune import Finetuner, Task
from smat.evaluation.lora import LORA_DROPOUT
from smat.methods.pmf import PMF
from smat.methods.pre import Pre
from smat.methods.registry import build_model
from smat.models.backbones import create_backbone
from smat.training.config import TrainConfig

STEPS = 4
LR = 3e-3


# --- the one-episode reference ------------------------------------------------------------------------------

def reference_augment(x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """DiffAugment of one batch (N, C, H, W), written out step by step."""
    x = x.detach()
    if torch.rand((), generator=generator).item() >= 0.9:
        return x
    if torch.rand((), generator=generator).item() < 0.5:
        x = x.flip(dims=(3,))
    n = len(x)
    uniform = lambda low, high: torch.rand((n, 1, 1, 1), generator=generator) * (high - low) + low  # noqa: E731
    x = x + uniform(-0.5, 0.5)
    mean = x.mean(dim=1, keepdim=True)
    x = (x - mean) * uniform(0.0, 2.0) + mean
    mean = x.mean(dim=(1, 2, 3), keepdim=True)
    x = (x - mean) * uniform(0.5, 1.5) + mean
    side = x.shape[-1]
    s = int(side * 0.125 + 0.5)
    dy = torch.randint(-s, s + 1, (n,), generator=generator)
    dx = torch.randint(-s, s + 1, (n,), generator=generator)
    out = torch.zeros_like(x)
    for i in range(n):          # output (r, c) = input (r − dy, c − dx), zero outside
        ys, xs = int(dy[i]), int(dx[i])
        out[i, :, max(0, ys):side + min(0, ys), max(0, xs):side + min(0, xs)] = \
            x[i, :, max(0, -ys):side - max(0, ys), max(0, -xs):side - max(0, xs)]
    return out


class SplitQKV(nn.Module):
    """timm's fused qkv as three Linears q, k, v (PEFT can then target q and v)."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor) -> None:
        super().__init__()
        dim_out, dim_in = weight.shape[0] // 3, weight.shape[1]
        self.q, self.k, self.v = (nn.Linear(dim_in, dim_out, dtype=weight.dtype) for _ in range(3))
        with torch.no_grad():
            for part, w, b in zip((self.q, self.k, self.v), weight.chunk(3), bias.chunk(3)):
                part.weight.copy_(w)
                part.bias.copy_(b)

    def forward(self, x):
        return torch.cat([self.q(x), self.k(x), self.v(x)], dim=-1)


class MaskDropout(nn.Module):
    """Dropout with a given keep mask: x · mask / (1 − p), as torch's dropout."""

    def __init__(self) -> None:
        super().__init__()
        self.mask = None

    def forward(self, x):
        return x if self.mask is None else x * (self.mask.to(x.dtype) / (1 - LORA_DROPOUT))


def reference_lora_backbone(model, weights):
    backbone = copy.deepcopy(model.backbone).eval().requires_grad_(False)
    vit = backbone.vit
    with torch.no_grad():
        for name, param in vit.named_parameters():
            param.copy_(weights[name])
    for i, block in enumerate(vit.blocks):
        block.attn.qkv = SplitQKV(weights[f"blocks.{i}.attn.qkv.weight"], weights[f"blocks.{i}.attn.qkv.bias"])
    inject_adapter_in_model(LoraConfig(r=8, lora_alpha=32, lora_dropout=0.1, target_modules=r".*attn\.qkv\.(q|v)"),
                            vit, adapter_name="default")
    backbone.to(weights["cls_token"].dtype).requires_grad_(False).eval()
    layers = [m for m in vit.modules() if isinstance(m, LoraLayer)]      # block by block, q before v
    for layer in layers:
        layer.lora_dropout["default"] = MaskDropout()
    return backbone, layers


def written_out_attention(model):
    model = copy.deepcopy(model)
    for module in model.modules():
        if hasattr(module, "fused_attn"):
            module.fused_attn = False
    return model


def reference_logits(model, mode: str, weights, episode: EpisodeTensors, lr: float, seed: int, steps: int = STEPS,
                     fused: bool = False) -> torch.Tensor:
    """Query logits of one episode fine-tuned alone (`fused`: with the model's own attention kernel, as the
    one-episode code before batching; benchmarks/bench_evaluation.py times it)."""
    model = model if fused else written_out_attention(model)
    generator = torch.Generator().manual_seed(seed)
    sx, sy = episode.support_x, episode.support_y
    if mode == "full":
        trainable = {n: w.detach().clone().requires_grad_(True) for n, w in weights.items()}
        features = lambda x: model.features(trainable, x)  # noqa: E731
        params, layers = list(trainable.values()), []
    else:
        backbone, layers = reference_lora_backbone(model, weights)
        params = []
        for layer in layers:
            a, b = layer.lora_A["default"].weight, layer.lora_B["default"].weight
            init = torch.empty(a.shape, dtype=torch.float32)
            nn.init.kaiming_uniform_(init, a=math.sqrt(5), generator=generator)
            with torch.no_grad():
                a.copy_(init)
                b.zero_()
            params += [a.requires_grad_(True), b.requires_grad_(True)]
        dropout = torch.Generator().manual_seed(int(torch.randint(0, 2**62, (), generator=generator)))
        features = backbone
        lr = lr * 10
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=0.01)
    tokens, dim = 1 + (sx.shape[-1] // 4) ** 2, model.backbone.feature_dim
    for _ in range(steps):
        augmented = reference_augment(sx, generator)
        if layers:
            masks = torch.rand((len(layers) // 2, 2, 2 * len(sx), tokens, dim), generator=dropout) >= LORA_DROPOUT
            for k, layer in enumerate(layers):
                layer.lora_dropout["default"].mask = masks[k // 2, k % 2]
        both = features(torch.cat([sx, augmented]))
        loss = F.cross_entropy(model.head_logits(both[:len(sx)], sy, both[len(sx):], episode.n_way), sy)
        for param, grad in zip(params, torch.autograd.grad(loss, params)):
            param.grad = grad
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    for layer in layers:
        layer.lora_dropout["default"].mask = None
    with torch.no_grad():
        return model.head_logits(features(sx), sy, features(episode.query_x), episode.n_way)


# --- models and episodes ----------------------------------------------------------------------------------------

def build(method: str):
    torch.manual_seed(1)
    if method == "pre":
        return Pre(create_backbone(ARCH)).eval()
    if method == "pmf":
        model = PMF(create_backbone(ARCH)).eval()
        with torch.no_grad():       # a trained head: scale and bias away from their initial values
            model.head.scale.fill_(7.0)
            model.head.bias.fill_(0.2)
        return model
    if method == "softmerge":
        model = build_model(TrainConfig(method="softmerge", experts=2), create_backbone(ARCH))
        with torch.no_grad():
            model.experts.delta.normal_(0, 0.02)
        return model.eval()
    return build_smat(seed=1)


def episode(shots: list[int], queries: int, seed: int) -> EpisodeTensors:
    """n_way = len(shots) classes with imbalanced shots; each class its own colour so that tasks are learnable."""
    g = torch.Generator().manual_seed(seed)
    colours = torch.rand(len(shots), 3, 1, 1, generator=g) * 2 - 1

    def images(counts):
        x = torch.cat([colours[c] + 0.5 * torch.randn(k, 3, 32, 32, generator=g) for c, k in enumerate(counts)])
        return x, torch.cat([torch.full((k,), c) for c, k in enumerate(counts)])

    sx, sy = images(shots)
    qx, qy = images([queries] * len(shots))
    return EpisodeTensors(sx, sy, qx, qy, len(shots))


SHAPES = [([1, 1, 1, 1, 1], 3), ([2, 1, 3], 2), ([1, 2], 4), ([1, 1, 1, 1, 1], 3)]


def tasks_of(model, episodes, lrs, seeds, dtype=torch.float32):
    weights = [task_weights(model, e, dtype) for e in episodes]
    return [Task(w, as_dtype(e, dtype), lr, torch.Generator().manual_seed(s))
            for w, e, lr, s in zip(weights, episodes, lrs, seeds)]


def task_weights(model, e: EpisodeTensors, dtype) -> dict[str, torch.Tensor]:
    """The task weights, computed by the model in fp32, in `dtype`."""
    return {n: w.to(dtype) for n, w in model.task_params(e.support_x, e.support_y).weights.items()}


def as_dtype(e: EpisodeTensors, dtype) -> EpisodeTensors:
    return EpisodeTensors(e.support_x.to(dtype), e.support_y, e.query_x.to(dtype), e.query_y, e.n_way)


@pytest.mark.parametrize("mode", ["full", "lora"])
@pytest.mark.parametrize("method", ["pre", "pmf", "softmerge", "smat"])
def test_batched_finetuning_equals_one_episode_at_a_time(method, mode):
    model = build(method)
    before = {n: t.clone() for n, t in model.state_dict().items()}
    episodes = [episode(shots, queries, seed) for seed, (shots, queries) in enumerate(SHAPES)]
    lrs = [LR, LR, 2 * LR, LR]           # the lr search batches several lrs
    seeds = [10, 11, 12, 13]
    model64 = copy.deepcopy(model).double()      # features and head: all that fine-tuning uses
    finetuner = Finetuner(model64, mode, steps=STEPS)
    batched = finetuner.query_logits(tasks_of(model, episodes, lrs, seeds, torch.float64))
    worst = 0.0
    for k, (e, lr, seed) in enumerate(zip(episodes, lrs, seeds)):
        weights, e = task_weights(model, e, torch.float64), as_dtype(e, torch.float64)
        expected = reference_logits(model64, mode, weights, e, lr, seed)
        untuned = model64.head_logits(model64.features(weights, e.support_x), e.support_y,
                                      model64.features(weights, e.query_x), e.n_way)
        assert batched[k].shape == expected.shape == (len(e.query_y), e.n_way)
        assert not torch.allclose(expected, untuned, atol=1e-2)       # fine-tuning did change the logits
        torch.testing.assert_close(batched[k], expected, rtol=0, atol=1e-6)
        assert torch.equal(batched[k].argmax(-1), expected.argmax(-1))
        worst = max(worst, (batched[k] - expected).abs().max().item())
    print(f"{method} {mode}: max |Δ logit| {worst:.2e}")
    # Episode 3 has the shape and lr of episode 0 but its own seed: a different result.
    assert not torch.allclose(batched[0], batched[3])
    after = model.state_dict()
    assert all(torch.equal(after[n], before[n]) for n in before)


@pytest.mark.parametrize("mode", ["full", "lora"])
def test_an_episode_does_not_depend_on_its_batch(mode):
    model = build("smat")
    episodes = [episode(shots, queries, seed) for seed, (shots, queries) in enumerate(SHAPES)]
    finetuner = Finetuner(model, mode, steps=2)
    together = finetuner.query_logits(tasks_of(model, episodes, [LR] * 4, [5, 6, 7, 8]))
    alone = [finetuner.query_logits(tasks_of(model, [e], [LR], [seed]))[0] for e, seed in zip(episodes, [5, 6, 7, 8])]
    reordered = finetuner.query_logits(tasks_of(model, episodes[::-1], [LR] * 4, [8, 7, 6, 5]))[::-1]
    for a, b, c in zip(together, alone, reordered):      # fp32, 2 steps: rounding only
        torch.testing.assert_close(a, b, rtol=0, atol=1e-4)
        torch.testing.assert_close(a, c, rtol=0, atol=1e-4)


def test_fused_and_written_out_attention_agree():
    model = build("smat")
    e = episode(*SHAPES[1], 0)
    weights = model.task_params(e.support_x, e.support_y).weights
    torch.testing.assert_close(written_out_attention(model).features(weights, e.query_x),
                               model.features(weights, e.query_x), rtol=0, atol=1e-5)


def test_batches_are_cut_by_episodes_and_images_smallest_first():
    budget = BatchBudget(episodes=3, images=40, how="test")
    sizes = [5, 20, 5, 5, 10, 5, 1]
    batches = plan_batches(sizes, budget)
    assert sorted(i for b in batches for i in b) == list(range(len(sizes)))
    for batch in batches:
        assert len(batch) == 1 or (len(batch) <= 3 and 2 * len(batch) * max(sizes[i] for i in batch) <= 40)
    assert batches[0] == [6, 0, 2]       # smallest supports first, stable among equals
    assert [20] in [[sizes[i] for i in b] for b in batches]     # too large for company: alone

"""Test-time fine-tuning of many episodes at once, full or LoRA (METHOD §3.5).

Episodes are independent given the model, so a batch of them runs its 50 AdamW steps as one computation:
every episode has its own copy of the trainable tensors (the backbone weights for full fine-tuning, the
adapters for LoRA) stacked along a leading episode axis, and `torch.func.vmap` runs the backbone on each
episode's images with that episode's tensors. What an episode computes does not depend on its batch:

* support and query sets of different sizes are padded; padded images go through the backbone but reach
  nothing (a ViT embeds every image on its own, and the head runs on each episode's own rows);
* each episode draws its LoRA initialisation, augmentation and dropout from its own generator;
* AdamW keeps per-episode state, and each episode has its own lr (the lr search batches candidates too).

`tests/test_batched_finetune.py` checks this against a plain one-episode implementation.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.func import functional_call, vmap

from smat.evaluation.augment import apply_augment, draw_augment
from smat.evaluation.modes import FINETUNE_MODES, tuned_modes
from smat.evaluation.lora import (draw_dropout, dropout_generator, init_adapters,
                                  lora_backbone)

# The released SMAT code runs 0 steps by mistake (METHOD §7.2); 50 is the intended count (METHOD §3.5).
FINETUNE_STEPS = 50
WEIGHT_DECAY = 0.01
BETAS = (0.9, 0.999)
EPS = 1e-8


@dataclass
class Task:
    """One fine-tuning run: an episode's task weights and tensors, its lr, and the episode's random stream."""
    weights: dict[str, Tensor]      # every backbone tensor by timm name; not modified
    episode: object                 # EpisodeTensors, on the model's device
    lr: float
    generator: torch.Generator      # CPU generator seeded for the episode


def pad(tensors: list[Tensor], value: float = 0) -> tuple[Tensor, Tensor]:
    """Stack tensors of different lengths along a new first axis, padding with `value`; also the mask of real
    entries (B, N)."""
    length = max(len(t) for t in tensors)
    out = tensors[0].new_full((len(tensors), length, *tensors[0].shape[1:]), value)
    mask = torch.zeros(len(tensors), length, dtype=torch.bool, device=tensors[0].device)
    for i, t in enumerate(tensors):
        out[i, :len(t)] = t
        mask[i, :len(t)] = True
    return out, mask


def batched_features(backbone, per_task: dict[str, Tensor], shared: dict[str, Tensor], x: Tensor) -> Tensor:
    """Features (B, N, d) of images x (B, N, C, H, W), episode b run with per_task[name][b] and `shared`
    (names as in backbone.named_parameters/buffers)."""
    def one(tensors: dict[str, Tensor], images: Tensor) -> Tensor:
        return functional_call(backbone, {**shared, **tensors}, (images,))
    return vmap(one)(per_task, x)


class BatchedAdamW:
    """torch.optim.AdamW (decoupled weight decay) over stacked per-episode tensors, with one lr per episode."""

    def __init__(self, params: list[Tensor], lrs: Tensor, weight_decay: float = WEIGHT_DECAY) -> None:
        self.params, self.lrs, self.weight_decay = params, lrs, weight_decay
        self.exp_avg = [torch.zeros_like(p) for p in params]
        self.exp_avg_sq = [torch.zeros_like(p) for p in params]
        self.steps = 0

    @torch.no_grad()
    def step(self, grads: list[Tensor | None]) -> None:
        self.steps += 1
        beta1, beta2 = BETAS
        correction1, correction2 = 1 - beta1 ** self.steps, math.sqrt(1 - beta2 ** self.steps)
        for param, grad, exp_avg, exp_avg_sq in zip(self.params, grads, self.exp_avg, self.exp_avg_sq):
            if grad is None:            # as torch: a tensor without a gradient is not updated at all
                continue
            lr = self.lrs.view(-1, *[1] * (param.dim() - 1))
            param.mul_(1 - lr * self.weight_decay)
            exp_avg.lerp_(grad, 1 - beta1)
            exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
            denom = (exp_avg_sq.sqrt() / correction2).add_(EPS)
            param.sub_(exp_avg / denom * (lr / correction1))


class Finetuner:
    """Fine-tunes and scores batches of tasks of one model, in one tuned mode of `FINETUNE_MODES`.

    For LoRA the model's backbone is copied once with LoRA-capable attention projections (`lora_backbone`).
    Pre and PMF have the same task weights for every episode: LoRA then shares one copy of them.
    """

    def __init__(self, model, mode: str, steps: int = FINETUNE_STEPS) -> None:
        if mode not in tuned_modes():
            raise ValueError(f"fine-tuning mode {mode!r}: expected one of {', '.join(tuned_modes())}")
        self.model, self.mode, self.steps = model, FINETUNE_MODES[mode], steps
        self.backbone, self.lora_layers = (lora_backbone(model.backbone) if self.mode.trains == "lora"
                                           else (copy.deepcopy(model.backbone).requires_grad_(False), []))
        for module in self.backbone.modules():
            if hasattr(module, "fused_attn"):   # vmap has no batching rule for fused attention on the CPU
                module.fused_attn = False

    def run(self, tasks: list[Task]) -> list[tuple[float, float]]:
        """(accuracy %, loss) of each task's query set after fine-tuning on its support; NaN for both when a
        logit is not finite (fine-tuning diverged)."""
        return [_score(logits, task.episode.query_y) for logits, task in zip(self.query_logits(tasks), tasks)]

    def query_logits(self, tasks: list[Task]) -> list[Tensor]:
        """Each task's query logits (Nq, n_way) after fine-tuning on its support."""
        support_x, _ = pad([t.episode.support_x for t in tasks])
        query_x, _ = pad([t.episode.query_x for t in tasks])
        trainable, fixed, shared = self._tensors(tasks)
        lrs = torch.tensor([t.lr for t in tasks], device=support_x.device, dtype=support_x.dtype)
        optimizer = BatchedAdamW(list(trainable.values()), lrs * self.mode.lr_multiplier)
        dropout = [dropout_generator(t.generator, support_x.device) for t in tasks] if self.lora_layers else []
        for _ in range(self.steps):
            loss = self._support_loss(tasks, trainable, fixed, shared, support_x, dropout)
            names = list(trainable)
            grads = torch.autograd.grad(loss, [trainable[n] for n in names], allow_unused=True)
            optimizer.step(list(grads))
        with torch.no_grad():
            per_task = {**{n: t.detach() for n, t in trainable.items()}, **fixed}
            support_f = batched_features(self.backbone, per_task, shared, support_x)
            query_f = batched_features(self.backbone, per_task, shared, query_x)
            return [self._logits(t, support_f[b], query_f[b]) for b, t in enumerate(tasks)]

    def _tensors(self, tasks: list[Task]) -> tuple[dict[str, Tensor], dict[str, Tensor], dict[str, Tensor]]:
        """(trainable per-episode tensors, fixed per-episode tensors, tensors shared by all episodes)."""
        names = list(tasks[0].weights)
        stack = lambda name: torch.stack([t.weights[name] for t in tasks])  # noqa: E731
        if self.mode.trains == "backbone":
            return {f"vit.{n}": stack(n).requires_grad_(True) for n in names}, {}, {}
        if self.model.task_independent:     # Pre, PMF: one set of weights for every episode
            fixed, shared = {}, {f"vit.{n}": tasks[0].weights[n].clone() for n in names}   # a normal tensor
        else:
            fixed, shared = {f"vit.{n}": stack(n) for n in names}, {}
        shapes = {}
        for layer in self.lora_layers:
            weight = tasks[0].weights[f"{layer}.weight"]
            shapes[layer] = (weight.shape[1], weight.shape[0] // 3)
        like = tasks[0].weights[f"{self.lora_layers[0]}.weight"]
        adapters = [init_adapters(self.lora_layers, shapes, t.generator, like) for t in tasks]
        trainable = {}
        for layer in self.lora_layers:
            trainable[f"vit.{layer}.lora_a"] = torch.stack([a[layer] for a, _ in adapters]).requires_grad_(True)
            trainable[f"vit.{layer}.lora_b"] = torch.stack([b[layer] for _, b in adapters]).requires_grad_(True)
        return trainable, fixed, shared

    def _logits(self, task: Task, support_f: Tensor, query_f: Tensor) -> Tensor:
        """The model's head on one episode's features, padding rows dropped."""
        e = task.episode
        return self.model.head_logits(support_f[:len(e.support_y)], e.support_y, query_f[:len(e.query_y)],
                                      e.n_way)

    def _support_loss(self, tasks, trainable, fixed, shared, support_x, dropout) -> Tensor:
        """Sum over episodes of each episode's cross-entropy of the head on its DiffAugment-ed support, with
        prototypes from the clean support (gradients reach the prototypes too); clean and augmented images go
        through the backbone in one batch (METHOD §3.5)."""
        height, width = support_x.shape[-2:]
        draws = [draw_augment(len(t.episode.support_y), height, width, t.generator) for t in tasks]
        augmented = apply_augment(support_x, draws)
        per_task = {**trainable, **fixed, **self._dropout_masks(tasks, dropout, support_x)}
        features = batched_features(self.backbone, per_task, shared, torch.cat([support_x, augmented], dim=1))
        n = support_x.shape[1]
        # The head runs per episode (a few small ops): exactly the model's own head_logits (METHOD §1.6).
        return sum(F.cross_entropy(self.model.head_logits(f[:len(t.episode.support_y)], t.episode.support_y,
                                                          f[n:n + len(t.episode.support_y)], t.episode.n_way),
                                   t.episode.support_y) for t, f in zip(tasks, features))

    def _dropout_masks(self, tasks, generators, support_x) -> dict[str, Tensor]:
        """This step's LoRA dropout masks, per episode drawn at its own size from its own generator and padded:
        {layer.dropout: (B, 2, 2·N, T, D)} for clean and augmented images (rows 0..N−1 clean)."""
        if not self.lora_layers:
            return {}
        vit = self.backbone.vit
        patch_h, patch_w = vit.patch_embed.patch_size
        tokens = vit.num_prefix_tokens + (support_x.shape[-2] // patch_h) * (support_x.shape[-1] // patch_w)
        dim = vit.embed_dim
        n_max = support_x.shape[1]
        masks = torch.ones(len(tasks), len(self.lora_layers), 2, 2, n_max, tokens, dim, dtype=torch.bool,
                           device=support_x.device)
        for b, (task, generator) in enumerate(zip(tasks, generators)):
            n = len(task.episode.support_y)
            masks[b, :, :, :, :n] = draw_dropout(generator, len(self.lora_layers), (2, n, tokens, dim),
                                                 support_x.device)
        masks = masks.flatten(3, 4)
        return {f"vit.{layer}.dropout": masks[:, i] for i, layer in enumerate(self.lora_layers)}


def _score(logits: Tensor, labels: Tensor) -> tuple[float, float]:
    """(accuracy %, loss) of one episode's query logits; both NaN when a logit is not finite."""
    if not torch.isfinite(logits).all():
        return math.nan, math.nan
    loss = F.cross_entropy(logits, labels).item()
    return 100.0 * (logits.argmax(-1) == labels).float().mean().item(), loss

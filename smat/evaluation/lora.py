"""LoRA on the query and value projections of timm's ViT, for many episodes at once (METHOD §3.5).

The paper attaches PEFT LoRA (r 8, alpha 32, dropout 0.1, no bias) to the query and value projections of the
HF ViT. timm fuses q, k and v into one Linear `attn.qkv`, so `LoraQKV` replaces it in a copy of the backbone:
the fused projection plus alpha/r · B A dropout(x) added to its q and v thirds, which is PEFT's LoRA on
separate q and v Linears. A and B (and the dropout masks) are inputs of the forward, not parameters, so
`torch.func.vmap` runs every episode with its own adapters (`smat.evaluation.finetune`).
"""

from __future__ import annotations

import copy
import math

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from smat.io import SmatError

LORA_RANK = 8
LORA_ALPHA = 32
LORA_DROPOUT = 0.1
TARGETS = ("q", "v")          # which thirds of the fused projection are adapted


class LoraQKV(nn.Module):
    """timm's fused `qkv` Linear with LoRA on q and v; the adapters are buffers set per call.

    `lora_a` (2, r, in) and `lora_b` (2, out/3, r) hold the q and v adapters; `dropout` (2, ..., in), if set,
    is the keep mask of the dropout on the adapters' input, for q and v. Without adapters it is the fused
    Linear.
    """

    def __init__(self, fused: nn.Linear) -> None:
        super().__init__()
        self.weight, self.bias = fused.weight, fused.bias     # same parameter names as the fused Linear
        self.register_buffer("lora_a", None, persistent=False)
        self.register_buffer("lora_b", None, persistent=False)
        self.register_buffer("dropout", None, persistent=False)

    def forward(self, x: Tensor) -> Tensor:
        out = F.linear(x, self.weight, self.bias)
        if self.lora_a is None:
            return out
        q, k, v = out.chunk(3, dim=-1)
        updates = []
        for target in range(2):
            # torch's dropout: x · (mask / (1 − p))
            inputs = x if self.dropout is None else x * (self.dropout[target].to(x.dtype) / (1 - LORA_DROPOUT))
            updates.append(F.linear(F.linear(inputs, self.lora_a[target]), self.lora_b[target]))
        scale = LORA_ALPHA / LORA_RANK
        return torch.cat([q + updates[0] * scale, k, v + updates[1] * scale], dim=-1)


def _fused_qkv_layers(vit: nn.Module) -> dict[str, nn.Linear]:
    return {name: module for name, module in vit.named_modules()
            if name.endswith("attn.qkv") and isinstance(module, nn.Linear) and module.out_features % 3 == 0}


def lora_backbone(backbone: nn.Module) -> tuple[nn.Module, list[str]]:
    """A copy of `backbone` whose fused qkv Linears are `LoraQKV`; also the names of those modules (timm names,
    in forward order). The copy shares nothing with the model, so the model is never modified."""
    copied = copy.deepcopy(backbone).eval().requires_grad_(False)
    fused = _fused_qkv_layers(copied.vit)
    if not fused:
        raise SmatError(
            f"LoRA fine-tuning needs the attention projections of timm's ViT (`blocks.N.attn.qkv`, an "
            f"nn.Linear); backbone {getattr(backbone, 'name', type(backbone).__name__)!r} has none: "
            f"use --finetune full or none with this model")
    for name, linear in fused.items():
        parent, _, child = name.rpartition(".")
        setattr(copied.vit.get_submodule(parent), child, LoraQKV(linear))
    return copied, list(fused)


def init_adapters(layers: list[str], shapes: dict[str, tuple[int, int]], generator: torch.Generator,
                  like: Tensor) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
    """Fresh adapters of one episode: PEFT's initialisation (kaiming-uniform A, zero B), A drawn in fp32 from the
    episode's generator, q before v, layer by layer; on the device and in the dtype of `like`.
    Returns ({layer: A (2, r, in)}, {layer: B (2, out, r)})."""
    a, b = {}, {}
    for layer in layers:
        dim_in, dim_out = shapes[layer]
        parts = []
        for _ in TARGETS:
            init = torch.empty(LORA_RANK, dim_in)
            nn.init.kaiming_uniform_(init, a=math.sqrt(5), generator=generator)
            parts.append(init)
        a[layer] = torch.stack(parts).to(like)
        b[layer] = like.new_zeros(len(TARGETS), dim_out, LORA_RANK)
    return a, b


def dropout_generator(generator: torch.Generator, device: torch.device) -> torch.Generator:
    """The episode's generator of dropout masks, on `device` (masks are large: drawn where they are used),
    seeded from the episode's own generator."""
    seed = int(torch.randint(0, 2**62, (), generator=generator))
    return torch.Generator(device=device).manual_seed(seed)


def draw_dropout(generator: torch.Generator, n_layers: int, shape: tuple[int, ...], device: torch.device) -> Tensor:
    """One step's dropout keep masks of an episode, bool (layers, 2, *shape): False with probability p;
    q before v, layer by layer."""
    return torch.rand((n_layers, len(TARGETS), *shape), generator=generator, device=device) >= LORA_DROPOUT

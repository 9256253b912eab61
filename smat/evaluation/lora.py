"""LoRA test-time fine-tuning with peft on the query and value projections of timm's ViT (METHOD §3.5).

timm fuses q, k and v into one Linear `attn.qkv`. To adapt only q and v, as the paper does (peft
target_modules ["query", "value"] on the HF ViT), a copy of the backbone has each fused `qkv` replaced by
`SplitQKV`: three Linears q, k, v whose outputs are concatenated, which computes exactly the fused
projection. peft then injects LoRA (r 8, alpha 32, dropout 0.1, no bias) into `q` and `v` only.

The copy is made once per evaluation. For every task its base weights are overwritten with the task's
(merged) weights and the adapters are re-initialised, so tasks never influence each other; only the adapter
weights are trained.
"""

from __future__ import annotations

import copy
import math

import torch
from peft import LoraConfig, inject_adapter_in_model
from peft.tuners.lora import LoraLayer
from torch import Tensor, nn

from smat.evaluation.finetune import FINETUNE_STEPS, FeatureFn, adamw_steps
from smat.io import SmatError

LORA_RANK = 8
LORA_ALPHA = 32
LORA_DROPOUT = 0.1
# SMAT and Pre+LoRA train the adapters at 10 × the searched lr (METHOD §3.5). The released pmf-lora baseline
# has no ×10; here every method uses ×10, which only shifts where the lr search lands on its grid.
LORA_LR_MULTIPLIER = 10.0
ADAPTER = "default"
_TARGETS = r".*attn\.qkv\.(q|v)"


class SplitQKV(nn.Module):
    """timm's fused `qkv` Linear as separate q, k and v Linears with the same output."""

    def __init__(self, fused: nn.Linear) -> None:
        super().__init__()
        dim_in, dim_out = fused.in_features, fused.out_features // 3
        has_bias = fused.bias is not None
        self.q, self.k, self.v = (nn.Linear(dim_in, dim_out, bias=has_bias, device=fused.weight.device,
                                            dtype=fused.weight.dtype) for _ in range(3))
        self.load_fused(fused.weight, fused.bias)

    @torch.no_grad()
    def load_fused(self, weight: Tensor, bias: Tensor | None) -> None:
        for part, w in zip((self.q, self.k, self.v), weight.chunk(3, dim=0)):
            part.weight.copy_(w)
        if bias is not None:
            for part, b in zip((self.q, self.k, self.v), bias.chunk(3, dim=0)):
                part.bias.copy_(b)

    def forward(self, x: Tensor) -> Tensor:
        return torch.cat([self.q(x), self.k(x), self.v(x)], dim=-1)


def _fused_qkv_layers(vit: nn.Module) -> dict[str, nn.Linear]:
    return {name: module for name, module in vit.named_modules()
            if name.endswith("attn.qkv") and isinstance(module, nn.Linear) and module.out_features % 3 == 0}


class LoraFinetuner:
    """A LoRA-adapted copy of a model's backbone, re-used for every task of an evaluation."""

    def __init__(self, backbone: nn.Module) -> None:
        self.backbone = copy.deepcopy(backbone).eval()
        vit = self.backbone.vit
        fused = _fused_qkv_layers(vit)
        if not fused:
            raise SmatError(
                f"LoRA fine-tuning needs the attention projections of timm's ViT (`blocks.N.attn.qkv`, an "
                f"nn.Linear); backbone {getattr(backbone, 'name', type(backbone).__name__)!r} has none: "
                f"use --finetune full or none with this model")
        self._params = {name: p for name, p in vit.named_parameters()
                        if name.rpartition(".")[0] not in fused}
        self._split: dict[str, SplitQKV] = {}
        for name, linear in fused.items():
            parent_name, _, child = name.rpartition(".")
            split = SplitQKV(linear)
            setattr(vit.get_submodule(parent_name), child, split)
            self._split[name] = split
        config = LoraConfig(r=LORA_RANK, lora_alpha=LORA_ALPHA, lora_dropout=LORA_DROPOUT, bias="none",
                            target_modules=_TARGETS)
        inject_adapter_in_model(config, vit, adapter_name=ADAPTER)
        self.backbone.eval()        # new adapter modules start in training mode (dropout on)
        self.backbone.requires_grad_(False)
        self.lora_layers = [m for m in vit.modules() if isinstance(m, LoraLayer)]
        self.adapter_params = [p for layer in self.lora_layers
                               for p in (*layer.lora_A[ADAPTER].parameters(), *layer.lora_B[ADAPTER].parameters())]
        for param in self.adapter_params:
            param.requires_grad_(True)

    @torch.no_grad()
    def load_task(self, weights: dict[str, Tensor], generator: torch.Generator) -> None:
        """Set the base weights to the task's weights and re-initialise every adapter (B = 0: no change yet)."""
        missing = (set(self._params) | {f"{name}.weight" for name in self._split}) - set(weights)
        if missing:    # a stale weight of the previous task would leak into this one
            raise ValueError(f"task weights lack {sorted(missing)[:3]}...: expected every backbone parameter")
        fused: dict[str, dict[str, Tensor]] = {}
        for name, value in weights.items():
            module_name, _, leaf = name.rpartition(".")
            if module_name in self._split:
                fused.setdefault(module_name, {})[leaf] = value
            else:
                self._params[name].copy_(value)
        for name, split in self._split.items():
            split.load_fused(fused[name]["weight"], fused[name].get("bias"))
        for layer in self.lora_layers:
            lora_a, lora_b = layer.lora_A[ADAPTER].weight, layer.lora_B[ADAPTER].weight
            # peft's own initialisation (kaiming-uniform A, zero B), drawn from the task's generator.
            init = torch.empty(lora_a.shape, dtype=lora_a.dtype)
            nn.init.kaiming_uniform_(init, a=math.sqrt(5), generator=generator)
            lora_a.copy_(init)
            lora_b.zero_()

    def _set_dropout(self, active: bool) -> None:
        for layer in self.lora_layers:
            layer.lora_dropout[ADAPTER].train(active)

    def finetune(self, model, weights: dict[str, Tensor], support_x: Tensor, support_y: Tensor, n_way: int,
                 lr: float, generator: torch.Generator, steps: int = FINETUNE_STEPS) -> FeatureFn:
        """Fine-tune fresh adapters on the support (AdamW at 10 × lr); return the adapted feature function.

        The result depends only on the inputs and `generator` (adapter init, augmentation, dropout).
        lr 0 returns the model's own features with `weights`: exactly no fine-tuning.
        """
        if lr == 0 or steps == 0:
            return lambda x: model.features(weights, x)
        self.load_task(weights, generator)
        # Dropout draws from torch's global RNG: seed it from `generator` so the result depends on it alone.
        dropout_seed = int(torch.randint(0, 2**62, (), generator=generator))
        device = self.adapter_params[0].device
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
            torch.manual_seed(dropout_seed)
            self._set_dropout(True)     # dropout acts while training the adapters only
            try:
                adamw_steps(model, self.backbone, self.adapter_params, support_x, support_y, n_way,
                            lr * LORA_LR_MULTIPLIER, generator, steps)
            finally:
                self._set_dropout(False)
        return self.backbone

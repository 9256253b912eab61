"""Convert ViT state dicts in the official DINO or Hugging Face `ViTModel` naming to timm's naming.

Handled layouts:
* official DINO files (`dino_deitsmall16_pretrain.pth`): already timm's names (`blocks.N.attn.qkv`, ...);
* DINO training checkpoints and other wrappers: `{"teacher" | "student" | "model" | "state_dict": {...}}`
  with `module.` / `backbone.` prefixes and a projection head (`head.*`, dropped);
* Hugging Face `ViTModel` (`facebook/dino-vits16`, the backbone of the official SMAT code, METHOD §1.1):
  `embeddings.*`, `encoder.layer.N.attention.attention.{query,key,value}` (fused here into timm's `qkv`),
  `layernorm`, plus an unused `pooler` (dropped). This is the naming of the files on the hub; the
  in-memory naming of transformers >= 5 (`layers.N.attention.{q,k,v,o}_proj`, `layers.N.mlp.*`) is
  accepted too.
Keys that match none of these stay as they are, so the caller's strict check names them.
"""

from __future__ import annotations

import re
from typing import Any

import torch

# Wrapper keys, in order of preference: DINO evaluates its teacher (eval_knn.py `--checkpoint_key teacher`).
_WRAPPER_KEYS = ("teacher", "model", "state_dict", "student")
_PREFIXES = ("module.", "backbone.", "vit.")
# Heads that the backbone does not have (num_classes=0): DINO projection head, HF pooler, classifiers.
_DROPPED_PREFIXES = ("head.", "pooler.", "classifier.", "embeddings.mask_token")

_HF_TOP = {
    "embeddings.cls_token": "cls_token",
    "embeddings.position_embeddings": "pos_embed",
    "embeddings.patch_embeddings.projection.weight": "patch_embed.proj.weight",
    "embeddings.patch_embeddings.projection.bias": "patch_embed.proj.bias",
    "layernorm.weight": "norm.weight",
    "layernorm.bias": "norm.bias",
}
_HF_BLOCK = {
    "layernorm_before.": "norm1.",
    "layernorm_after.": "norm2.",
    "attention.output.dense.": "attn.proj.",
    "intermediate.dense.": "mlp.fc1.",
    "output.dense.": "mlp.fc2.",
    # transformers >= 5, in memory:
    "attention.o_proj.": "attn.proj.",
    "mlp.": "mlp.",
}
_HF_LAYER = re.compile(r"^(?:encoder\.layer|layers)\.(\d+)\.(.+)$")
_HF_QKV = re.compile(r"^attention\.(?:attention\.)?(query|key|value|q_proj|k_proj|v_proj)\.(weight|bias)$")
_QKV_ORDER = {"query": 0, "q_proj": 0, "key": 1, "k_proj": 1, "value": 2, "v_proj": 2}


def convert_to_timm(obj: Any) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Return (state dict in timm naming, notes on what was done: naming, unwrapped keys, dropped keys)."""
    state_dict, unwrapped = _unwrap(obj)
    state_dict = {_strip_prefixes(k): v for k, v in state_dict.items()}
    dropped = sorted(k for k in state_dict if k.startswith(_DROPPED_PREFIXES))
    state_dict = {k: v for k, v in state_dict.items() if k not in dropped}
    hf = any(k.startswith(("embeddings.", "encoder.layer.", "layers.")) for k in state_dict)
    naming = "hf-vit" if hf else "timm"
    if hf:
        state_dict = _from_hf_vit(state_dict)
    return state_dict, {"naming": naming, "unwrapped": unwrapped, "dropped_keys": dropped}


def _unwrap(obj: Any) -> tuple[dict[str, torch.Tensor], list[str]]:
    unwrapped = []
    while isinstance(obj, dict) and not _is_state_dict(obj):
        key = next((k for k in _WRAPPER_KEYS if isinstance(obj.get(k), dict)), None)
        if key is None:
            break
        unwrapped.append(key)
        obj = obj[key]
    if not isinstance(obj, dict):
        obj = {}
    return {k: v for k, v in obj.items() if isinstance(v, torch.Tensor)}, unwrapped


def _is_state_dict(obj: dict) -> bool:
    return bool(obj) and all(isinstance(v, torch.Tensor) for v in obj.values())


def _strip_prefixes(key: str) -> str:
    stripped = True
    while stripped:
        stripped = False
        for prefix in _PREFIXES:
            if key.startswith(prefix):
                key, stripped = key[len(prefix):], True
    return key


def _from_hf_vit(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    qkv: dict[tuple[str, str], dict[str, tuple[str, torch.Tensor]]] = {}
    for key, value in state_dict.items():
        if key in _HF_TOP:
            out[_HF_TOP[key]] = value
            continue
        layer = _HF_LAYER.match(key)
        if layer is None:
            out[key] = value
            continue
        index, rest = layer.groups()
        part = _HF_QKV.match(rest)
        if part is not None:
            name, kind = part.groups()
            qkv.setdefault((index, kind), {})[_QKV_ORDER[name]] = (key, value)
            continue
        for hf_name, timm_name in _HF_BLOCK.items():
            if rest.startswith(hf_name):
                out[f"blocks.{index}.{timm_name}{rest[len(hf_name):]}"] = value
                break
        else:
            out[key] = value
    for (index, kind), parts in qkv.items():
        if set(parts) == {0, 1, 2}:
            # timm's fused projection stacks the query, key and value rows in this order.
            out[f"blocks.{index}.attn.qkv.{kind}"] = torch.cat([parts[i][1] for i in range(3)])
        else:  # incomplete: keep the original names so that the strict check reports them
            out.update(parts.values())
    return out

"""Backbones: timm Vision Transformers whose feature is the CLS token after the final LayerNorm (METHOD §1.1).

`BACKBONES` is the registry, as data: the timm architecture each name builds, its size arguments, the
default input size, and where its pre-trained weights come from. `create_backbone(name)` builds one with
random weights; `smat.models.pretrained.load_pretrained` fills it from a normalised checkpoint.

Checkpoints imported from the authors' code (`smat.releases.official`) carry their own architecture `spec`
instead (`create_backbone(name, image_size, spec=...)`): the sizes, the LayerNorm eps of the code that
trained them, and a position table kept at its trained grid and resampled on every forward the authors'
way (METHOD §10). Pre-trained weights whose position grid differs from the run's input size (DINO's 14x14
table at 128 px) take the same path (`create_backbone(name, image_size, grid=14)`, METHOD §1.1): the
parameter is the native table, and every forward at another size resamples it, merged task weights included.

Parameter names are timm's (`cls_token`, `pos_embed`, `patch_embed.proj.*`, `blocks.{i}.attn.qkv.*`, ...)
under the `vit.` attribute, so `backbone.named_parameters()` yields `vit.<timm name>`; the meta-tuning code
passes such a dict to `torch.func.functional_call(backbone, weights, (x,))`.
"""

from __future__ import annotations

import math
from functools import partial
from typing import Any

import timm
import torch
import torch.nn.functional as F
from timm.models.vision_transformer import VisionTransformer
from torch import nn

from smat.io import SmatError

# Every entry: timm architecture + keyword arguments, default input size (pixels), patch size, and for the
# DINO ones the default weights. DINO publishes no checksums: `sha256` stays None until pinned from a
# verified download (`smat fetch` prints the digest of what it fetched).
BACKBONES: dict[str, dict[str, Any]] = {
    # DINO ViT-S/16, the paper's backbone. Meta-Dataset runs at 128 px: the 14x14 position table of the
    # 224-px weights stays the parameter and is resampled to 8x8 on every forward, the authors' way
    # (METHOD §1.1). LayerNorm eps 1e-6 as DINO's torch-hub ViT.
    "vit_small_patch16_dino": {
        "timm_arch": "vit_small_patch16_224",
        "kwargs": {"patch_size": 16, "embed_dim": 384, "depth": 12, "num_heads": 6},
        "image_size": 128,
        "patch_size": 16,
        "weights": {
            "url": "https://dl.fbaipublicfiles.com/dino/dino_deitsmall16_pretrain/dino_deitsmall16_pretrain.pth",
            "sha256": None,
            "hub": "timm/vit_small_patch16_224.dino",
            "hf": "hf-hub:facebook/dino-vits16",  # the exact weights the official SMAT code loads
        },
    },
    "vit_base_patch16_dino": {
        "timm_arch": "vit_base_patch16_224",
        "kwargs": {"patch_size": 16, "embed_dim": 768, "depth": 12, "num_heads": 12},
        "image_size": 128,
        "patch_size": 16,
        "weights": {
            "url": "https://dl.fbaipublicfiles.com/dino/dino_vitbase16_pretrain/dino_vitbase16_pretrain.pth",
            "sha256": None,
            "hub": "timm/vit_base_patch16_224.dino",
            "hf": "hf-hub:facebook/dino-vitb16",
        },
    },
    # Tiny ViT for the 32-px embedded benchmark, pre-trained locally by `smat pretrain`: 64 patch tokens of
    # 4 px (patch 8 loses the glyphs' strokes), dim 96 (1.5x the throughput of dim 128 at equal few-shot
    # accuracy for the same pre-training time), 4 blocks. Measured in benchmarks/results/pretrain.json.
    "vit_tiny_patch4_32": {
        "timm_arch": "vit_tiny_patch16_224",
        "kwargs": {"patch_size": 4, "embed_dim": 96, "depth": 4, "num_heads": 3},
        "image_size": 32,
        "patch_size": 4,
        "weights": None,
    },
}

# No dropout of any kind: METHOD §1.1's backbones have none, and meta-tuning relies on deterministic features.
_NO_DROPOUT = {"drop_rate": 0.0, "pos_drop_rate": 0.0, "proj_drop_rate": 0.0, "attn_drop_rate": 0.0,
               "drop_path_rate": 0.0}


def backbone_spec(name: str) -> dict[str, Any]:
    try:
        return BACKBONES[name]
    except KeyError:
        raise SmatError(f"unknown backbone {name!r}; known backbones: {', '.join(BACKBONES)}") from None


class Backbone(nn.Module):
    """A timm VisionTransformer without classifier; `forward(x)` returns the CLS token after the final norm."""

    def __init__(self, name: str, vit: nn.Module, image_size: int) -> None:
        super().__init__()
        self.name = name
        self.image_size = image_size
        self.feature_dim = vit.num_features
        self.vit = vit

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.vit(x)

    def extra_repr(self) -> str:
        return f"name={self.name!r}, image_size={self.image_size}, feature_dim={self.feature_dim}"


def create_backbone(name: str, image_size: int | None = None, *, patch_drop_rate: float = 0.0,
                    dynamic_img_size: bool = False, spec: dict[str, Any] | None = None,
                    grid: int | None = None) -> Backbone:
    """Build backbone `name` with random weights for `image_size`-pixel inputs (default: the registry's).

    `patch_drop_rate` > 0 keeps a random subset of the patch tokens in training mode only (timm's
    PatchDropout): a pre-training speed-up that adds no parameters; evaluation always sees every token.
    `dynamic_img_size` accepts inputs of other sizes by resampling the position embeddings on the fly
    (progressive-resizing pre-training); the parameters are the same as without it.
    `spec` (an imported checkpoint's architecture, see `ARCH_SPEC_KEYS`) replaces the registry entry.
    `grid`: the position grid of the weights to be loaded. When it is not `image_size`'s grid, the table
    keeps `grid` and is resampled per forward by the authors' rule (`AuthorsPosEmbedViT`, METHOD §1.1, §10).
    """
    if spec is not None:
        return _create_from_spec(name, spec, image_size)
    spec = backbone_spec(name)
    image_size = image_size or spec["image_size"]
    if image_size % spec["patch_size"]:
        raise SmatError(f"backbone {name}: image size {image_size} is not a multiple of the patch size "
                        f"{spec['patch_size']}; choose a multiple (default {spec['image_size']})")
    if grid is not None and grid * spec["patch_size"] != image_size:
        return _create_from_spec(name, registry_arch_spec(name, grid), image_size, patch_drop_rate=patch_drop_rate)
    vit = timm.create_model(spec["timm_arch"], pretrained=False, num_classes=0, global_pool="token",
                            img_size=image_size, patch_drop_rate=patch_drop_rate,
                            dynamic_img_size=dynamic_img_size, **_NO_DROPOUT, **spec["kwargs"])
    return Backbone(name, vit, image_size)


# The architecture record of an imported checkpoint (smat.releases.official), or of a registry backbone kept at
# its weights' grid (`registry_arch_spec`): sizes, the position grid the table was trained at, the LayerNorm
# eps, and how the table meets other input sizes.
ARCH_SPEC_KEYS = ("embed_dim", "depth", "num_heads", "mlp_ratio", "patch_size", "grid", "norm_eps", "pos_embed")
POS_EMBED_PER_FORWARD = "resampled per forward, bicubic, scale factor (n + 0.1) / grid"


def registry_arch_spec(name: str, grid: int) -> dict[str, Any]:
    """The architecture record (`ARCH_SPEC_KEYS`) of registry backbone `name` with its table at `grid`: timm's
    defaults for what the entry leaves out (MLP ratio 4, LayerNorm eps 1e-6, as DINO's ViT)."""
    entry = backbone_spec(name)
    kwargs = entry["kwargs"]
    return {"embed_dim": kwargs["embed_dim"], "depth": kwargs["depth"], "num_heads": kwargs["num_heads"],
            "mlp_ratio": kwargs.get("mlp_ratio", 4.0), "patch_size": entry["patch_size"], "grid": grid,
            "norm_eps": 1e-6, "pos_embed": POS_EMBED_PER_FORWARD}


def _create_from_spec(name: str, spec: dict[str, Any], image_size: int | None, *,
                      patch_drop_rate: float = 0.0) -> Backbone:
    missing = [key for key in ARCH_SPEC_KEYS if key not in spec]
    if missing:
        raise SmatError(f"backbone {name}: architecture spec {spec!r} lacks {', '.join(missing)}; re-import the "
                        f"checkpoint with `smat import`")
    if spec["pos_embed"] != POS_EMBED_PER_FORWARD:
        raise SmatError(f"backbone {name}: pos_embed rule {spec['pos_embed']!r} is not the one implemented "
                        f"({POS_EMBED_PER_FORWARD!r}); re-import the checkpoint with `smat import`")
    patch, native = spec["patch_size"], spec["grid"] * spec["patch_size"]
    image_size = image_size or native
    if image_size % patch:
        raise SmatError(f"backbone {name}: image size {image_size} is not a multiple of the patch size {patch}")
    vit = AuthorsPosEmbedViT(img_size=native, patch_size=patch, embed_dim=spec["embed_dim"], depth=spec["depth"],
                             num_heads=spec["num_heads"], mlp_ratio=spec["mlp_ratio"], num_classes=0,
                             global_pool="token", dynamic_img_size=True, patch_drop_rate=patch_drop_rate,
                             norm_layer=partial(nn.LayerNorm, eps=spec["norm_eps"]), **_NO_DROPOUT)
    return Backbone(name, vit, image_size)


class AuthorsPosEmbedViT(VisionTransformer):
    """timm ViT whose position table stays at its trained grid and is resampled on every forward.

    Inside `functional_call(backbone, weights, ...)` `self.pos_embed` is the task's merged tensor, so SMAT's
    θ_pre + mask ⊙ δ is resampled as a whole, as in the authors' code (METHOD §10). Used for imported
    checkpoints and for pre-trained weights whose grid is not the run's (METHOD §1.1); at the native grid
    the table is added as it is.
    """

    def _pos_embed(self, x: torch.Tensor) -> torch.Tensor:             # x: (B, H, W, C) patch tokens
        b, h, w, c = x.shape
        tokens = torch.cat([self.cls_token.expand(b, -1, -1), x.reshape(b, h * w, c)], dim=1)
        return self.pos_drop(tokens + resample_pos_embed_by_scale(self.pos_embed, h, w))


def resample_pos_embed_by_scale(pos_embed: torch.Tensor, rows: int, cols: int) -> torch.Tensor:
    """(1, 1 + N², d) table at an N×N grid -> (1, 1 + rows·cols, d), the way DINO's ViT and transformers
    4.30.2 do it: bicubic, align_corners=False, scale factor (n + 0.1) / N rather than the target size.

    The scale factor, not the size, sets where the source pixels are sampled, so this differs from a
    resize to rows × cols (timm's `resample_abs_pos_embed`) by a small shift (METHOD §10).
    """
    side = math.isqrt(pos_embed.shape[1] - 1)
    if (rows, cols) == (side, side):
        return pos_embed
    grid = pos_embed[:, 1:].reshape(1, side, side, -1).permute(0, 3, 1, 2)
    grid = F.interpolate(grid, scale_factor=((rows + 0.1) / side, (cols + 0.1) / side), mode="bicubic",
                         align_corners=False)
    return torch.cat([pos_embed[:, :1], grid.permute(0, 2, 3, 1).reshape(1, rows * cols, -1)], dim=1)

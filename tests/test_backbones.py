"""Backbone factory: every registered ViT builds, runs forward+backward on CPU, and is functional-call ready."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.func import functional_call

from smat.io import SmatError
from smat.models.backbones import BACKBONES, create_backbone


@pytest.fixture(scope="module", params=list(BACKBONES))
def built(request):
    torch.manual_seed(0)
    return request.param, create_backbone(request.param)


def test_every_backbone_runs_forward_and_backward_at_its_input_size(built):
    name, backbone = built
    size = BACKBONES[name]["image_size"]
    assert backbone.name == name and backbone.image_size == size
    batch = 1 if "dino" in name else 4  # ViT-S/B at 128 px: a small batch keeps the test fast
    x = torch.randn(batch, 3, size, size)
    features = backbone(x)
    assert features.shape == (batch, backbone.feature_dim)
    assert backbone.feature_dim == BACKBONES[name]["kwargs"]["embed_dim"]
    features.square().sum().backward()
    for param_name, param in backbone.named_parameters():
        assert param.grad is not None, f"{param_name} gets no gradient"
        norm = param.grad.norm()
        assert torch.isfinite(norm) and norm > 0, f"{param_name}: gradient norm {norm}"


def test_structure_follows_the_spec(built):
    name, backbone = built
    kwargs = BACKBONES[name]["kwargs"]
    vit = backbone.vit
    assert len(vit.blocks) == kwargs["depth"]
    assert vit.blocks[0].attn.num_heads == kwargs["num_heads"]
    assert vit.patch_embed.proj.kernel_size == (kwargs["patch_size"],) * 2
    grid = backbone.image_size // kwargs["patch_size"]
    assert vit.pos_embed.shape == (1, 1 + grid * grid, kwargs["embed_dim"])
    # LayerNorm eps 1e-6 as DINO's ViT; no dropout of any kind.
    assert all(m.eps == 1e-6 for m in backbone.modules() if isinstance(m, nn.LayerNorm))
    assert all(m.p == 0 for m in backbone.modules() if isinstance(m, nn.Dropout))
    assert not any(type(m).__name__ == "DropPath" for m in backbone.modules())
    # timm parameter names under `vit.` (docs/ARCHITECTURE.md)
    names = {n for n, _ in backbone.named_parameters()}
    assert {"vit.cls_token", "vit.pos_embed", "vit.patch_embed.proj.weight", "vit.blocks.0.attn.qkv.weight",
            "vit.blocks.0.mlp.fc2.bias", "vit.norm.weight"} <= names
    assert not any("head" in n for n in names)


def test_vit_small_at_224_px_matches_the_dino_parameter_count():
    # METHOD §1.1: 21,665,664 parameters without head at 224 px (197 position tokens).
    backbone = create_backbone("vit_small_patch16_dino", image_size=224)
    assert backbone.vit.pos_embed.shape[1] == 197
    assert sum(p.numel() for p in backbone.parameters()) == 21_665_664


def test_feature_is_the_cls_token_after_the_final_norm():
    torch.manual_seed(1)
    backbone = create_backbone("vit_tiny_patch4_32").eval()
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        tokens = backbone.vit.forward_features(x)  # after the final norm
        expected = tokens[:, 0]
        assert torch.equal(backbone(x), expected)


def test_functional_call_with_a_weights_dict_matches_loading_those_weights():
    torch.manual_seed(2)
    backbone = create_backbone("vit_tiny_patch4_32").eval()
    weights = {n: p.detach() + 0.01 * torch.randn_like(p) for n, p in backbone.named_parameters()}
    weights = {n: w.requires_grad_() for n, w in weights.items()}
    x = torch.randn(4, 3, 32, 32)
    out = functional_call(backbone, weights, (x,))

    reference = create_backbone("vit_tiny_patch4_32").eval()
    reference.load_state_dict({n: w.detach() for n, w in weights.items()})
    with torch.no_grad():
        torch.testing.assert_close(out, reference(x))
        assert not torch.allclose(out, backbone(x))  # the module's own weights were not used
    out.sum().backward()
    assert all(w.grad is not None for w in weights.values())


def test_patch_dropout_acts_in_training_only_and_adds_no_parameters():
    torch.manual_seed(3)
    dropping = create_backbone("vit_tiny_patch4_32", patch_drop_rate=0.5)
    plain = create_backbone("vit_tiny_patch4_32")
    plain.load_state_dict(dropping.state_dict())  # same keys: strict load
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(dropping.eval()(x), plain.eval()(x), rtol=0, atol=0)
        tokens = dropping.train().vit.forward_features(x)
    assert tokens.shape[1] == 1 + 32  # the class token and half of the 64 patch tokens


def test_bad_names_and_sizes_are_clear_errors():
    with pytest.raises(SmatError, match="not a multiple of the patch size"):
        create_backbone("vit_tiny_patch4_32", image_size=30)
    with pytest.raises(SmatError, match="unknown backbone 'resnet50'.*vit_small_patch16_dino"):
        create_backbone("resnet50")


def test_a_table_at_another_grid_is_kept_and_resampled_per_forward_the_authors_way():
    # METHOD §1.1: weights whose position grid is not the run's keep their table (one code path with the
    # imported checkpoints' AuthorsPosEmbedViT, METHOD §10); at the run's own grid the plain timm ViT is built.
    from timm.models.vision_transformer import VisionTransformer

    from smat.models.backbones import AuthorsPosEmbedViT, registry_arch_spec, resample_pos_embed_by_scale

    assert type(create_backbone("vit_tiny_patch4_32", 32, grid=8).vit) is VisionTransformer
    torch.manual_seed(0)
    native = create_backbone("vit_tiny_patch4_32", 56).eval()                     # 14x14 table
    kept = create_backbone("vit_tiny_patch4_32", 32, grid=14).eval()
    assert isinstance(kept.vit, AuthorsPosEmbedViT) and kept.image_size == 32
    assert registry_arch_spec("vit_tiny_patch4_32", 14)["grid"] == 14
    kept.vit.load_state_dict(native.vit.state_dict())      # same names and shapes
    assert all(m.eps == 1e-6 for m in kept.modules() if isinstance(m, nn.LayerNorm))
    x56, x32 = torch.randn(2, 3, 56, 56), torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(kept(x56), native(x56))                                 # native grid: as it is
        small = create_backbone("vit_tiny_patch4_32", 32).eval()
        small.vit.load_state_dict({**native.vit.state_dict(),
                                   "pos_embed": resample_pos_embed_by_scale(native.vit.pos_embed, 8, 8)})
        assert torch.equal(kept(x32), small(x32))

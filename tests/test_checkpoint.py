"""Checkpoint fetch and load: local files and file:// URLs, sha256 checks, DINO / Hugging Face naming,
position tables kept at their grid and resampled per forward (METHOD §1.1), clear errors that leave no output
behind."""

from __future__ import annotations

import argparse
import re

import pytest
import torch
from timm.models.vision_transformer import VisionTransformer

from smat.cli import main
from smat.io import SmatError, sha256_file
from smat.models.backbones import BACKBONES, AuthorsPosEmbedViT, create_backbone, resample_pos_embed_by_scale
from smat.models.pretrained import FORMAT, fetch, load_pretrained, read_checkpoint, save_checkpoint

TINY = "vit_tiny_patch4_32"
DIM = BACKBONES[TINY]["kwargs"]["embed_dim"]
HALF = DIM // 2


def _random_timm_weights(arch=TINY, image_size=None, seed=0):
    """Random, non-default weights in timm naming (LayerNorms perturbed too, so a mix-up would show)."""
    torch.manual_seed(seed)
    backbone = create_backbone(arch, image_size)
    return {k: v + 0.05 * torch.randn_like(v) for k, v in backbone.vit.state_dict().items()}


def _direct_features(weights, x, arch=TINY, image_size=None):
    backbone = create_backbone(arch, image_size).eval()
    backbone.vit.load_state_dict(weights)
    with torch.no_grad():
        return backbone(x)


def _loaded_features(path, x):
    backbone, _ = load_pretrained(path)
    with torch.no_grad():
        return backbone.eval()(x)


def _to_hf_vit_naming(weights):
    """Hugging Face ViTModel file naming (as on the hub), written independently of the code under test."""
    out = {
        "embeddings.cls_token": weights["cls_token"],
        "embeddings.position_embeddings": weights["pos_embed"],
        "embeddings.patch_embeddings.projection.weight": weights["patch_embed.proj.weight"],
        "embeddings.patch_embeddings.projection.bias": weights["patch_embed.proj.bias"],
        "layernorm.weight": weights["norm.weight"],
        "layernorm.bias": weights["norm.bias"],
        "pooler.dense.weight": torch.randn(DIM, DIM),
        "pooler.dense.bias": torch.randn(DIM),
    }
    names = {"norm1": "layernorm_before", "norm2": "layernorm_after", "attn.proj": "attention.output.dense",
             "mlp.fc1": "intermediate.dense", "mlp.fc2": "output.dense"}
    for key, value in weights.items():
        match = re.match(r"blocks\.(\d+)\.(.+)\.(weight|bias)$", key)
        if not match:
            continue
        layer, module, kind = match.groups()
        prefix = f"encoder.layer.{layer}."
        if module == "attn.qkv":
            for part, chunk in zip(("query", "key", "value"), value.chunk(3)):
                out[f"{prefix}attention.attention.{part}.{kind}"] = chunk.clone()
        else:
            out[f"{prefix}{names[module]}.{kind}"] = value
    return out


@pytest.fixture()
def weights_file(tmp_path):
    weights = _random_timm_weights()
    path = tmp_path / "raw.pth"
    torch.save(weights, path)
    return weights, path


def test_fetch_local_file_writes_a_normalised_checkpoint(tmp_path, weights_file):
    weights, path = weights_file
    out = tmp_path / "ckpt" / "tiny.pt"
    fetch(str(path), out)
    record = torch.load(out, weights_only=True)
    assert record["format"] == FORMAT and record["arch"] == TINY  # inferred from the shapes
    assert record["source"] == str(path)
    assert record["sha256"] == sha256_file(path)
    assert record["meta"]["image_size"] == 32 and record["meta"]["naming"] == "timm"
    assert record["state_dict"].keys() == weights.keys()
    x = torch.randn(3, 3, 32, 32)
    torch.testing.assert_close(_loaded_features(out, x), _direct_features(weights, x), rtol=0, atol=0)
    backbone, meta = load_pretrained(out)
    assert backbone.name == TINY and meta["sha256"] == record["sha256"] and "state_dict" not in meta


def test_file_url_with_correct_and_wrong_sha256(tmp_path, weights_file):
    _, path = weights_file
    digest = sha256_file(path)
    good = tmp_path / "good.pt"
    fetch(path.as_uri(), good, sha256=digest.upper())
    assert read_checkpoint(good)["sha256"] == digest

    bad = tmp_path / "out" / "bad.pt"
    with pytest.raises(SmatError, match="sha256 mismatch.*nothing was written"):
        fetch(path.as_uri(), bad, sha256="0" * 64)
    assert not bad.exists()
    assert list(bad.parent.iterdir()) == []  # no temporary download left behind


def test_cli_fetch_exit_codes(tmp_path, weights_file, capsys):
    _, path = weights_file
    assert main(["fetch", str(path), "--out", str(tmp_path / "a.pt"), "--arch", TINY]) == 0
    assert main(["fetch", str(path), "--out", str(tmp_path / "b.pt"), "--sha256", "ab" * 32]) == 2
    assert "sha256 mismatch" in capsys.readouterr().err
    assert not (tmp_path / "b.pt").exists()


def test_official_dino_checkpoint_layout_loads_identically(tmp_path):
    weights = _random_timm_weights(seed=1)
    student = {f"module.backbone.{k}": torch.randn_like(v) for k, v in weights.items()}
    teacher = {f"backbone.{k}": v for k, v in weights.items()}
    teacher["head.mlp.0.weight"] = torch.randn(64, DIM)
    teacher["head.last_layer.weight_g"] = torch.randn(1, 64)
    path = tmp_path / "dino_full_checkpoint.pth"
    torch.save({"student": student, "teacher": teacher, "epoch": 3, "args": argparse.Namespace(arch="vit")}, path)

    out = tmp_path / "dino.pt"
    fetch(str(path), out)
    meta = read_checkpoint(out)["meta"]
    assert meta["unwrapped"] == ["teacher"]
    assert meta["dropped_keys"] == ["head.last_layer.weight_g", "head.mlp.0.weight"]
    x = torch.randn(2, 3, 32, 32)
    torch.testing.assert_close(_loaded_features(out, x), _direct_features(weights, x), rtol=0, atol=0)


def test_hf_vit_naming_loads_identically(tmp_path):
    weights = _random_timm_weights(seed=2)
    path = tmp_path / "pytorch_model.bin"
    torch.save(_to_hf_vit_naming(weights), path)
    out = tmp_path / "hf.pt"
    fetch(str(path), out)
    assert read_checkpoint(out)["meta"]["naming"] == "hf-vit"
    x = torch.randn(2, 3, 32, 32)
    torch.testing.assert_close(_loaded_features(out, x), _direct_features(weights, x), rtol=0, atol=0)


def test_hf_vit_model_file_gives_the_same_features_as_transformers(tmp_path):
    transformers = pytest.importorskip("transformers")
    config = transformers.ViTConfig(hidden_size=DIM, num_hidden_layers=4, num_attention_heads=3,
                                    intermediate_size=4 * DIM, image_size=32, patch_size=4, layer_norm_eps=1e-6)
    torch.manual_seed(3)
    model = transformers.ViTModel(config).eval()
    with torch.no_grad():
        for param in model.parameters():
            param.normal_(0, 0.2)
    model.save_pretrained(tmp_path / "hf")
    out = tmp_path / "hf.pt"
    fetch(str(tmp_path / "hf" / "model.safetensors"), out)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        expected = model(pixel_values=x).last_hidden_state[:, 0]
    torch.testing.assert_close(_loaded_features(out, x), expected, rtol=1e-5, atol=1e-5)


def test_weights_on_a_14x14_grid_keep_it_and_resample_per_forward_at_8x8(tmp_path):
    # The METHOD §1.1 case (224 px -> 128 px with patch 16) on the tiny ViT: 56 px -> 32 px with patch 4.
    weights = _random_timm_weights(image_size=56)
    path = tmp_path / "grid14.pth"
    torch.save(weights, path)
    fetch(str(path), tmp_path / "grid14.pt")
    assert read_checkpoint(tmp_path / "grid14.pt")["meta"]["image_size"] == 56

    backbone, _ = load_pretrained(tmp_path / "grid14.pt")  # the registry's 32 px
    assert isinstance(backbone.vit, AuthorsPosEmbedViT)
    assert backbone.image_size == 32 and torch.equal(backbone.vit.pos_embed.detach(), weights["pos_embed"])
    torch.testing.assert_close(backbone.vit.blocks[3].attn.qkv.weight, weights["blocks.3.attn.qkv.weight"],
                               rtol=0, atol=0)
    # At 32 px: the plain 8x8 ViT with the table resampled by the authors' rule; at 56 px: the table as it is.
    x = torch.randn(2, 3, 32, 32)
    resampled = {**weights, "pos_embed": resample_pos_embed_by_scale(weights["pos_embed"], 8, 8)}
    with torch.no_grad():
        assert torch.equal(backbone.eval()(x), _direct_features(resampled, x))
        x56 = torch.randn(2, 3, 56, 56)
        assert torch.equal(backbone(x56), _direct_features(weights, x56, image_size=56))
    same, _ = load_pretrained(tmp_path / "grid14.pt", image_size=56)  # at the weights' own size: plain timm ViT
    assert type(same.vit) is VisionTransformer and torch.equal(same.vit.pos_embed.detach(), weights["pos_embed"])


def test_pos_embed_resampling_keeps_smooth_patterns(tmp_path):
    weights = _random_timm_weights()
    grid = 8
    rows = torch.linspace(-1, 1, grid).view(grid, 1, 1).expand(grid, grid, DIM)
    weights["pos_embed"][0, 1:] = (2.0 + 0 * rows).reshape(grid * grid, DIM)  # constant over the grid
    weights["pos_embed"][0, 1:, :HALF] = rows.reshape(grid * grid, DIM)[:, :HALF]  # linear in the row index
    save_checkpoint(tmp_path / "w.pt", TINY, weights, source="test", sha256=None, meta={"image_size": 32})

    backbone, _ = load_pretrained(tmp_path / "w.pt", image_size=64)  # 8x8 kept, resampled to 16x16 per forward
    assert torch.equal(backbone.vit.pos_embed.detach(), weights["pos_embed"])
    pos = resample_pos_embed_by_scale(backbone.vit.pos_embed.detach(), 16, 16)[0]
    assert pos.shape == (1 + 16 * 16, DIM)
    torch.testing.assert_close(pos[0], weights["pos_embed"][0, 0])
    torch.testing.assert_close(pos[1:, HALF:], torch.full((256, DIM - HALF), 2.0))
    row_values = pos[1:, 0].view(16, 16)
    assert torch.allclose(row_values, row_values[:, :1].expand(16, 16))  # constant along each row
    assert (row_values[1:, 0] > row_values[:-1, 0]).all()  # still increasing down the rows
    assert backbone(torch.randn(1, 3, 64, 64)).shape == (1, DIM)


def test_errors_are_clear_and_leave_nothing(tmp_path, weights_file):
    weights, path = weights_file
    out = tmp_path / "x.pt"
    not_vit_s = r"(?s)not fit backbone vit_small_patch16_dino.*missing keys \(96\).*wrong shapes"
    with pytest.raises(SmatError, match=not_vit_s):
        fetch(str(path), out, arch="vit_small_patch16_dino")
    with pytest.raises(SmatError, match="unknown backbone 'vit_huge'"):
        fetch(str(path), out, arch="vit_huge")
    with pytest.raises(SmatError, match="no such file"):
        fetch(str(tmp_path / "missing.pth"), out)
    # A relative path with a slash is not tried as a hub name (30 s of retries offline, then a hub error).
    with pytest.raises(SmatError, match=r"weights/dino\.pth: no such file \(from .*\); check the path"):
        fetch("weights/dino.pth", out)
    garbage = tmp_path / "garbage.pth"
    garbage.write_bytes(b"not a checkpoint")
    with pytest.raises(SmatError, match="not a readable PyTorch weights file"):
        fetch(str(garbage), out)
    # No network: a refused connection explains how to place the file by hand.
    with pytest.raises(SmatError, match=r"(?s)cannot download.*http://127\.0\.0\.1:9/w\.pth.*smat fetch /path/"):
        fetch("http://127.0.0.1:9/w.pth", out, arch=TINY)
    assert not out.exists()

    incomplete = {k: v for k, v in weights.items() if k != "blocks.0.norm1.weight"}
    save_checkpoint(tmp_path / "incomplete.pt", TINY, incomplete, source="test", sha256=None, meta={})
    with pytest.raises(SmatError, match=r"missing keys \(1\): blocks\.0\.norm1\.weight"):
        load_pretrained(tmp_path / "incomplete.pt")
    with pytest.raises(SmatError, match=r"not a backbone checkpoint \(format 'smat-backbone/1'\).*smat fetch"):
        load_pretrained(path)


def test_hub_name_without_network_says_where_to_download(tmp_path, monkeypatch):
    import huggingface_hub.constants

    # As on a compute node: no network, and a hub cache without the model.
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "empty-cache"))
    out = tmp_path / "vits.pt"
    with pytest.raises(SmatError, match=r"(?s)huggingface\.co/timm/vit_small_patch16_224\.dino/resolve/main/"
                                        r".*--arch vit_small_patch16_dino"):
        fetch("timm/vit_small_patch16_224.dino", out)
    assert not out.exists()


# --- position tables of pre-trained weights (METHOD §1.1): DINO's 14x14 table kept, resampled per forward ------

VITS = "vit_small_patch16_dino"


@pytest.fixture(scope="module")
def dino_vits(tmp_path_factory):
    """A ViT-S/16 with random weights in DINO's file layout (bare timm names, 224 px, 14x14 table), fetched."""
    root = tmp_path_factory.mktemp("dino_vits")
    torch.manual_seed(5)
    weights = {k: v + 0.02 * torch.randn_like(v)
               for k, v in create_backbone(VITS, image_size=224).vit.state_dict().items()}
    torch.save(weights, root / "dino_deitsmall16_pretrain.pth")
    fetch(str(root / "dino_deitsmall16_pretrain.pth"), root / "dino.pt")
    return weights, root / "dino.pt"


def _plain_vits(weights, image_size):
    """timm's own ViT-S at `image_size` holding `weights` (table already at that grid), in eval mode."""
    backbone = create_backbone(VITS, image_size).eval()
    backbone.vit.load_state_dict(weights)
    return backbone


def test_tiny_backbone_at_its_own_grid_is_the_plain_timm_vit_bit_for_bit(tmp_path):
    # The embedded default: weights at 32 px run at 32 px; nothing is resampled and nothing changes.
    weights = _random_timm_weights(seed=4)
    save_checkpoint(tmp_path / "tiny.pt", TINY, weights, source="test", sha256=None, meta={"image_size": 32})
    backbone, _ = load_pretrained(tmp_path / "tiny.pt")
    assert type(backbone.vit) is VisionTransformer and backbone.vit.pos_embed.shape == (1, 65, DIM)
    assert torch.equal(backbone.vit.pos_embed.detach(), weights["pos_embed"])
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(backbone.eval()(x), _direct_features(weights, x))
    from smat.methods.registry import build_model
    from smat.training.config import TrainConfig

    model = build_model(TrainConfig(method="smat", experts=2), backbone)
    assert model.experts.layout.size == sum(v.numel() for v in weights.values())


def test_pre_at_224_px_uses_dinos_table_bit_for_bit(dino_vits):
    from smat.methods.checkpoint import load_model

    weights, path = dino_vits
    pre = load_model(f"pretrained:{path}", "cpu")              # the registry's 128 px
    assert pre.backbone.image_size == 128 and isinstance(pre.backbone.vit, AuthorsPosEmbedViT)
    assert pre.backbone.vit.pos_embed.shape == (1, 197, 384)
    assert torch.equal(pre.backbone.vit.pos_embed.detach(), weights["pos_embed"])
    assert sum(p.numel() for p in pre.backbone.parameters()) == 21_665_664      # as at 224 px (METHOD §1.1)
    x224 = torch.randn(1, 3, 224, 224)
    x128 = torch.randn(1, 3, 128, 128)
    with torch.no_grad():
        assert torch.equal(pre.backbone(x224), _plain_vits(weights, 224)(x224))
        resampled = {**weights, "pos_embed": resample_pos_embed_by_scale(weights["pos_embed"], 8, 8)}
        assert torch.equal(pre.backbone(x128), _plain_vits(resampled, 128)(x128))


def test_smat_merges_the_native_table_and_resamples_the_merged_one(dino_vits):
    from smat.methods.base import backbone_parameters
    from smat.methods.registry import build_model
    from smat.training.config import TrainConfig

    weights, path = dino_vits
    backbone, _ = load_pretrained(path, image_size=128)         # the paper's training size
    torch.manual_seed(6)
    model = build_model(TrainConfig(method="smat", experts=2), backbone).eval()
    layout = model.experts.layout
    assert layout.shapes[layout.names.index("pos_embed")] == (1, 197, 384)
    assert layout.size == 21_665_664                            # N counts the 197-row table
    with torch.no_grad():
        update = {name: torch.zeros(shape) for name, shape in zip(layout.names, layout.shapes)}
        update["pos_embed"] = 0.1 * torch.randn(1, 197, 384)    # δ on the position table only
        model.experts.delta.copy_(layout.flatten(update))
        support_x, support_y = torch.randn(2, 3, 128, 128), torch.tensor([0, 1])
        task = model.task_params(support_x, support_y)
        merged = task.weights["pos_embed"]
        theta_pre = backbone_parameters(model.backbone)["pos_embed"].detach()
        assert merged.shape == (1, 197, 384) and not torch.equal(merged, theta_pre)
        task_weights = {**weights, "pos_embed": merged}
        x224 = torch.randn(1, 3, 224, 224)
        assert torch.equal(model.features(task.weights, x224), _plain_vits(task_weights, 224)(x224))
        x128 = torch.randn(1, 3, 128, 128)
        resampled = {**weights, "pos_embed": resample_pos_embed_by_scale(merged, 8, 8)}
        assert torch.equal(model.features(task.weights, x128), _plain_vits(resampled, 128)(x128))


def test_trained_model_checkpoint_keeps_the_native_grid_and_evaluates_the_same(tmp_path, capsys):
    # The tiny analogue of DINO at 224 px run at 128 px: weights at 32 px (8x8 table) meta-trained at 16 px.
    import csv

    from test_evaluation import build_store
    from test_training import CI_CONFIG, make_store

    from smat.data.episodes import load_episode_file, sample_to_file
    from smat.data.store import Store
    from smat.evaluation.evaluate import EpisodeRunner
    from smat.methods.registry import build_model
    from smat.methods.checkpoint import load_trained
    from smat.methods.checkpoint import read_model_checkpoint
    from smat.training.loop import train

    stores = [make_store(tmp_path / name, name, seed) for seed, name in enumerate(["alpha", "beta"])]
    weights = _random_timm_weights(seed=7)
    save_checkpoint(tmp_path / "pre.pt", TINY, weights, source="test", sha256=None, meta={"image_size": 32})
    train(CI_CONFIG, stores, tmp_path / "pre.pt", tmp_path / "run", device="cpu",
          overrides=["image_size=16", "experts=2", "epochs=1", "tasks_per_epoch=2", "validation.episodes=1"])
    record, config = read_model_checkpoint(tmp_path / "run" / "best.pt")
    assert record["backbone"]["image_size"] == 16
    assert torch.equal(record["state_dict"]["backbone.vit.pos_embed"], weights["pos_embed"])   # θ_pre, 8x8

    model, _ = load_trained(tmp_path / "run" / "best.pt", "cpu")
    assert model.backbone.image_size == 16 and isinstance(model.backbone.vit, AuthorsPosEmbedViT)
    # The model as training built it: load_pretrained at the run's size, then the saved state.
    reference = build_model(config, load_pretrained(tmp_path / "pre.pt", 16)[0])
    reference.load_state_dict(record["state_dict"])
    reference.eval()
    for size in (16, 32):
        x = torch.randn(4, 3, size, size)
        with torch.no_grad():
            task, again = (m.task_params(x, torch.tensor([0, 1, 0, 1])) for m in (model, reference))
            assert torch.equal(model.features(task.weights, x), reference.features(again.weights, x))

    # `smat evaluate` on a converted 32-px store, at the model's 16 px.
    test_store = build_store(tmp_path, "toy")
    episodes = tmp_path / "episodes.json"
    sample_to_file(test_store, "test", n=2, seed=3, out=episodes, ways=3, shots=1, queries=2)
    out = tmp_path / "eval.csv"
    assert main(["evaluate", "--model", str(tmp_path / "run" / "best.pt"), "--episodes", str(episodes),
                 "--store", str(test_store), "--device", "cpu", "--out", str(out)]) == 0
    with open(out, newline="") as handle:
        rows = list(csv.DictReader(handle))
    store = Store(test_store)
    loaded, meta = load_episode_file(episodes, store)
    expected = EpisodeRunner(reference, store, "none", torch.device("cpu")).run(loaded, range(2), meta["seed"], 0.0,
                                                                                 progress=False)
    assert [float(r["loss"]) for r in rows] == pytest.approx([e["loss"] for e in expected], rel=1e-6, abs=1e-7)
    assert [float(r["accuracy"]) for r in rows] == pytest.approx([e["accuracy"] for e in expected])

"""Update anatomy (smat/analysis/anatomy.py, METHOD §5.6): tensor groups, update shares, revert effects, gates,
the `smat anatomy` command, its table and its figure."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from smat.analysis.anatomy import (anatomy_table, gate_anatomy, groups_of, pretrained_weights, read_datasets,
                                   tensor_group)
from smat.cli import main
from smat.config_loader import to_dict
from smat.data.episodes import sample_to_file
from smat.io import read_json
from smat.methods.base import backbone_parameters
from smat.methods.pmf import PMF
from smat.models.pretrained import load_pretrained
from smat.methods.checkpoint import save_model_checkpoint
from smat.training.config import TrainConfig
from tests.test_evaluation import ARCH, build_pretrained, build_smat, build_store

CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("anatomy")
    stores, episodes = [], []
    for name, seed in (("toy", 0), ("other", 1)):
        store = build_store(root, name, seed=seed)
        path = root / f"{name}.json"
        sample_to_file(store, "test", n=3, seed=seed, out=path, ways=3, shots=1, queries=2)
        stores.append(store)
        episodes.append(path)
    pretrained = build_pretrained(root / "pre.pt")
    return root, stores, episodes, pretrained


def test_every_vit_parameter_has_one_group_in_forward_order():
    from smat.models.backbones import create_backbone

    names = list(backbone_parameters(create_backbone(ARCH)))
    groups = groups_of(names)
    assert sorted(n for members in groups.values() for n in members) == sorted(names)
    assert list(groups)[0] == "embeddings" and list(groups)[-1] == "final norm"
    assert list(groups)[1:4] == ["block 0 attention", "block 0 MLP", "block 0 norms"]
    assert tensor_group("blocks.3.mlp.fc2.bias") == ("MLP", 3)
    with pytest.raises(Exception, match="not part of the documented ViT layout"):
        tensor_group("head.weight")


def _pmf_moved_in(pretrained: Path, group_prefix: str, scale: float) -> PMF:
    """PMF whose backbone is θ_pre except the tensors whose names start with `group_prefix`."""
    backbone, _ = load_pretrained(pretrained)
    model = PMF.from_config(backbone, TrainConfig(method="pmf")).eval()
    with torch.no_grad():
        for name, p in backbone_parameters(model.backbone).items():
            if name.startswith(group_prefix):
                p.add_(torch.randn_like(p) * scale)
    return model


def test_one_moved_group_holds_the_whole_update_and_its_revert_restores_theta_pre(world):
    root, stores, episodes, pretrained = world
    model = _pmf_moved_in(pretrained, "blocks.1.mlp.", scale=0.5)
    theta_pre = pretrained_weights(load_pretrained(pretrained)[0], CPU)
    datasets = read_datasets(["toy", "other"], ["id", "ood"], episodes, stores, limit=3)
    table, info = anatomy_table(model, theta_pre, datasets, CPU)
    share = table.set_index("group")["share"]
    assert share["block 1 MLP"] == pytest.approx(1.0)
    assert share.drop("block 1 MLP").abs().max() == 0.0
    # Only the moved group is reverted; the others are not scored (nothing to revert).
    moved = table.set_index("group").loc["block 1 MLP"]
    assert table.set_index("group").drop("block 1 MLP")["delta_id"].isna().all()
    # Reverting it gives θ_pre's accuracy: the change is Pre's accuracy minus the model's, paired per episode.
    pre = PMF.from_config(load_pretrained(pretrained)[0], TrainConfig(method="pmf")).eval()
    pre_table, pre_info = anatomy_table(pre, theta_pre, datasets, CPU)
    assert (pre_table["share"] == 0).all()
    for role in ("id", "ood"):
        expected = pre_info["full_accuracy"][role] - info["full_accuracy"][role]
        assert moved[f"delta_{role}"] == pytest.approx(expected, abs=1e-6)
    assert info["episodes"] == {"toy": 3, "other": 3}


def test_gate_fractions_per_group_and_expert():
    masks = {"patch_embed.proj.weight": np.array([[1, 1, 0, 0], [0, 0, 0, 0]], bool),
             "blocks.0.attn.qkv.weight": np.array([[1, 0], [1, 1]], bool)}
    table = gate_anatomy(masks).set_index("group")
    assert table.loc["embeddings", ["open_0", "open_1"]].tolist() == [0.5, 0.0]
    assert table.loc["block 0 attention", ["open_0", "open_1"]].tolist() == [0.5, 1.0]


def test_smat_anatomy_command_table_and_figure(world, tmp_path):
    root, stores, episodes, pretrained = world
    model = build_smat(experts=2)
    model.backbone.vit.load_state_dict(load_pretrained(pretrained)[0].vit.state_dict())
    checkpoint = tmp_path / "smat.pt"
    save_model_checkpoint(checkpoint, model, to_dict(model.config),
                          {"arch": ARCH, "image_size": 32, "pretrained_sha256": "0" * 64}, {})
    out = tmp_path / "anatomy" / "smat.csv"
    assert main(["anatomy", "--model", str(checkpoint), "--pretrained", str(pretrained), "--datasets", "toy", "other",
                 "--roles", "id", "ood", "--episodes", *map(str, episodes), "--store", *map(str, stores),
                 "--limit", "2", "--label", "SMAT", "--out", str(out), "--device", "cpu"]) == 0
    table = pd.read_csv(out)
    assert set(table["model"]) == {"SMAT"}
    assert table["share"].sum() == pytest.approx(1.0)
    assert {"open_0", "open_1", "delta_id", "delta_ood"} <= set(table.columns)
    assert ((table[["open_0", "open_1"]] >= 0) & (table[["open_0", "open_1"]] <= 1)).all().all()
    summary = read_json(out.with_suffix(".json"))
    assert summary["episodes"] == {"toy": 2, "other": 2} and summary["method"] == "smat"
    assert main(["tables", "anatomy", "--eval", str(out), "--out-dir", str(tmp_path / "tables")]) == 0
    assert "### SMAT" in (tmp_path / "tables" / "anatomy.md").read_text()
    assert main(["figures", "anatomy", "--inputs", str(out), "--out-prefix", str(tmp_path / "fig")]) == 0
    assert (tmp_path / "fig.png").stat().st_size > 0 and (tmp_path / "fig.pdf").stat().st_size > 0


def test_anatomy_refuses_a_backbone_that_is_not_the_models(world, tmp_path):
    root, stores, episodes, pretrained = world
    model = _pmf_moved_in(pretrained, "blocks.0.", scale=0.1)
    theta_pre = pretrained_weights(load_pretrained(pretrained)[0], CPU)
    theta_pre.pop("pos_embed")
    datasets = read_datasets(["toy"], ["id"], episodes[:1], stores[:1], limit=1)
    with pytest.raises(Exception, match="do not match the model's backbone"):
        anatomy_table(model, theta_pre, datasets, CPU)


def test_gate_figures_read_a_model_checkpoint_without_training(world, tmp_path):
    """capacity and mask-overlap from a checkpoint's gates (an imported release has no expert_masks.npz)."""
    root, stores, episodes, pretrained = world
    model = build_smat(experts=2)
    checkpoint = tmp_path / "best.pt"
    save_model_checkpoint(checkpoint, model, to_dict(model.config),
                          {"arch": ARCH, "image_size": 32, "pretrained_sha256": "0" * 64}, {})
    for figure in ("capacity", "mask-overlap"):
        assert main(["figures", figure, "--inputs", str(checkpoint), "--out-prefix", str(tmp_path / figure)]) == 0
    assert (tmp_path / "capacity_type.png").is_file() and (tmp_path / "mask-overlap.png").is_file()

"""The model checkpoint format, "smat-model/1" (`best.pt`, `last.pt`; written by `smat train` and `smat import`).

A model checkpoint is self-describing: `{"format": "smat-model/1", "method", "config", "backbone": {"arch",
"image_size", "pretrained_sha256"}, "state_dict", "progress", "provenance"}`; `load_trained` rebuilds the model
from it alone (θ_pre is part of the state dict, the model's settings are the config's `ModelConfig` keys).
`load_model(spec)` also takes `pretrained:FILE`, a θ_pre file, for Pre.
"""

from __future__ import annotations

import json
from dataclasses import fields
from pathlib import Path
from typing import Any

import torch

from smat.config_loader import build_dataclass
from smat.io import SmatError, atomic_path, first_nonfinite, load_torch_record, provenance
from smat.methods.base import FewShotModel
from smat.methods.config import ModelConfig
from smat.methods.registry import METHODS, PRETRAINED_PREFIX, build_model, trained_methods
from smat.models.backbones import create_backbone
from smat.models.pretrained import load_pretrained, table_grid

MODEL_FORMAT = "smat-model/1"


def save_model_checkpoint(path: Path, model: torch.nn.Module, config: dict, backbone: dict, progress: dict,
                          imported: dict | None = None) -> None:
    """Written atomically, never with a non-finite tensor; `imported`: where an imported model came from
    (`smat import`: importer, source, ...), in its provenance."""
    state_dict = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    if (bad := first_nonfinite(state_dict)) and imported:
        raise SmatError(f"{imported['source']}: tensor {bad} of the imported model holds NaN or infinity; not a "
                        "usable checkpoint")
    if bad:
        raise SmatError(f"{path}: not written: tensor {bad} holds NaN or infinity after task "
                        f"{progress.get('tasks_seen')}, so training diverged; lower the learning rates (optim.*)")
    record = {"format": MODEL_FORMAT, "method": model.method, "config": _plain(config), "backbone": backbone,
              "state_dict": state_dict,
              "progress": progress,
              "provenance": _plain(provenance(imported=imported) if imported else provenance())}
    with atomic_path(path) as tmp:
        torch.save(record, tmp)


def _plain(record: dict) -> dict:
    """Plain JSON types only (e.g. torch's version string class), so `weights_only` loading accepts it."""
    return json.loads(json.dumps(record, default=str))


def read_model_checkpoint(path: Path) -> tuple[dict[str, Any], ModelConfig]:
    """(record, the model's config) of a model checkpoint, with a clear error for anything else. The record's
    config may also hold the settings of the training that made it (`TrainConfig`); only the model's are read."""
    record = load_torch_record(path, "model checkpoint", MODEL_FORMAT,
                               f"pass a `smat train` checkpoint, or pretrained:{path} for a backbone checkpoint")
    if record.get("method") not in trained_methods():
        raise SmatError(f"{path}: unknown method {record.get('method')!r}; known trained methods: "
                        f"{', '.join(trained_methods())}")
    if bad := first_nonfinite(record.get("state_dict") or {}):
        raise SmatError(f"{path}: tensor {bad} holds NaN or infinity; the training run diverged. Retrain with "
                        "lower learning rates (optim.*)")
    model_keys = {f.name for f in fields(ModelConfig)}
    config = build_dataclass(ModelConfig, {k: v for k, v in (record.get("config") or {}).items() if k in model_keys},
                             where=f"{path}: config")
    return record, config


def load_model(spec: str, device: torch.device | str) -> FewShotModel:
    """The model in eval mode on `device`: a `smat train` checkpoint, or `pretrained:FILE` for Pre."""
    if spec.startswith(PRETRAINED_PREFIX):
        backbone, _ = load_pretrained(Path(spec[len(PRETRAINED_PREFIX):]))
        return METHODS["pre"].load_class()(backbone).to(device).eval()
    return load_trained(Path(spec), device)[0]


def load_trained(path: Path, device: torch.device | str) -> tuple[FewShotModel, dict]:
    """(model in eval mode on `device`, checkpoint record) of a `smat train` or `smat import` checkpoint, read once.

    Imported checkpoints describe their architecture in `backbone.spec` (smat.releases.official). For models
    trained here the stored θ_pre position table gives the grid: a table at its pre-trained grid (DINO's 14x14
    for a 128-px run) is resampled per forward, as `load_pretrained` built it (METHOD §1.1)."""
    checkpoint, config = read_model_checkpoint(path)
    record = checkpoint["backbone"]
    grid = table_grid(checkpoint["state_dict"].get("backbone.vit.pos_embed"))    # None: load_state_dict names it
    backbone = create_backbone(record["arch"], record["image_size"], dynamic_img_size=True, spec=record.get("spec"),
                               grid=grid)
    model = build_model(config, backbone)
    model.load_state_dict(checkpoint["state_dict"])
    return model.to(device).eval(), checkpoint

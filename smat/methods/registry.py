"""Build a model from a training config, or load one for evaluation: `load_model(spec, device)`.

`spec` is a model checkpoint written by `smat train` (`MODEL_DIR/best.pt`), or `pretrained:FILE` for Pre
(a backbone checkpoint, no meta-training).
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import nn

from smat.methods.base import FewShotModel

if TYPE_CHECKING:
    from smat.training.config import TrainConfig

PRETRAINED_PREFIX = "pretrained:"


def build_model(config: "TrainConfig", backbone: nn.Module) -> FewShotModel:
    """A freshly initialised model of `config.method` around `backbone` (whose weights become θ_pre)."""
    if config.method == "pmf":
        from smat.methods.pmf import PMF

        return PMF(backbone)
    from smat.methods.smat import SMAT
    from smat.methods.softmerge import SoftMerge

    cls = SoftMerge if config.method == "softmerge" else SMAT
    return cls.from_config(backbone, config)


def load_model(spec: str, device: torch.device | str) -> FewShotModel:
    """The model in eval mode on `device`: a `smat train` checkpoint, or `pretrained:FILE` for Pre."""
    if spec.startswith(PRETRAINED_PREFIX):
        from smat.methods.pre import Pre
        from smat.models.checkpoint import load_pretrained

        backbone, _ = load_pretrained(Path(spec[len(PRETRAINED_PREFIX):]))
        model: FewShotModel = Pre(backbone)
    else:
        from smat.models.backbones import create_backbone
        from smat.training.checkpointing import read_model_checkpoint

        checkpoint, config = read_model_checkpoint(Path(spec))
        backbone = create_backbone(checkpoint["backbone"]["arch"], checkpoint["backbone"]["image_size"])
        model = build_model(config, backbone)
        model.load_state_dict(checkpoint["state_dict"])
    return model.to(device).eval()

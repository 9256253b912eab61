"""Pre: the pre-trained backbone with a fixed cosine ProtoNet head, no meta-training (METHOD §2.1)."""

from __future__ import annotations

from torch import Tensor, nn

from smat.io import SmatError
from smat.methods.base import FewShotModel, TaskParams
from smat.methods.head import CosineHead


class Pre(FewShotModel):
    method = "pre"
    task_independent = True

    def __init__(self, backbone: nn.Module) -> None:
        super().__init__(backbone, CosineHead(learnable=False))
        self.backbone.requires_grad_(False)

    def task_params(self, support_x: Tensor, support_y: Tensor) -> TaskParams:
        return TaskParams(weights=self.frozen_weights(), alpha=None)

    def task_forward(self, episode, n_tasks_seen: int):
        raise SmatError("method 'pre' has no meta-training: evaluate it with --model pretrained:FILE")

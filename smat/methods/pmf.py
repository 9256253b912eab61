"""PMF: full meta-tuning of the backbone with a ProtoNet loss on the query set (METHOD §2.3).

Every backbone parameter is trained (SGD, momentum 0.9); the head is cosine prototypes with a learnable
scale (init 10) and bias (init 0). As in PMF's code the backbone runs in eval mode during training (no
dropout or drop-path; our backbones have none anyway).
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

from smat.methods.base import FewShotModel, ParamGroup, TaskOutput, TaskParams, backbone_parameters
from smat.methods.head import CosineHead


class PMF(FewShotModel):
    method = "pmf"
    task_independent = True

    def __init__(self, backbone: nn.Module) -> None:
        super().__init__(backbone, CosineHead(learnable=True))
        self.backbone.requires_grad_(True)

    @classmethod
    def from_config(cls, backbone: nn.Module, config) -> "PMF":
        return cls(backbone)

    def optimiser_groups(self, optim) -> tuple[list[ParamGroup], list[ParamGroup]]:
        """SGD over the whole backbone and the head's scale and bias."""
        params = [p for p in self.parameters() if p.requires_grad]
        return [ParamGroup("pmf", params, optim.pmf_lr, optim.pmf_momentum, optim.pmf_weight_decay)], []

    def task_params(self, support_x: Tensor, support_y: Tensor) -> TaskParams:
        return TaskParams(weights=self.frozen_weights(), alpha=None)

    def task_forward(self, episode, n_tasks_seen: int) -> TaskOutput:
        weights = dict(backbone_parameters(self.backbone))
        support_f = self.features(weights, episode.support_x)
        query_f = self.features(weights, episode.query_x)
        logits = self.head_logits(support_f, episode.support_y, query_f, episode.n_way)
        ce = F.cross_entropy(logits, episode.query_y)
        acc = (logits.argmax(-1) == episode.query_y).float().mean()
        return TaskOutput(ce, {"loss": ce.item(), "ce": ce.item(), "kd": 0.0, "acc": acc.item()}, weights)

    def alignment_parameters(self) -> dict[str, list[Tensor]]:
        return {"backbone": list(backbone_parameters(self.backbone).values())}

    def train(self, mode: bool = True) -> "PMF":
        # PMF meta-trains with `model.train(False)`: keep the backbone in eval mode either way.
        super().train(mode)
        self.backbone.eval()
        return self

"""SMAT: sparse interpolated experts meta-tuned with one first-order inner step and dense teachers (METHOD §1).

Per training task (METHOD §1.12):
  prototypes of the support under the frozen θ_pre -> router -> α; gates z_m -> θ = θ_pre + (Σ α_m z_m) ⊙ δ;
  one first-order SGD step on the support CE (prototype head included, prototypes re-attached);
  query CE + KD to the dense teacher and to the pre-trained model + sparsity and Lagrangian terms
  + 1e-4 mean(ℓ²).
The Table 2 switches (METHOD §2.2) select the pieces: `meta` off trains on D = S ∪ Q throughout; `distill`
(DT) off drops both KD terms; IE off uses one expert with α ≡ 1 and no router; MLS off (with IE off) uses a
dense δ without gates. SoftMerge (`softmerge.py`) reuses this class with dense experts.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from smat.methods.base import FewShotModel, ParamGroup, TaskOutput, TaskParams, backbone_parameters
from smat.methods.experts import DenseDelta, ParamLayout, SparseInterpolatedExperts
from smat.methods.gates import HardConcrete
from smat.methods.head import CosineHead
from smat.methods.router import Router, router_temperature
from smat.methods.sparsity import (expected_density, integrate_constraint_, realised_sparsity, reset_multipliers_,
                                   sparsity_losses, transition_band)
from smat.methods.teacher import dense_teacher_logits, kd_loss


def inner_step(model: FewShotModel, weights: dict[str, Tensor], support_x: Tensor, support_y: Tensor,
               n_way: int, lr: float) -> tuple[dict[str, Tensor], Tensor]:
    """One first-order SGD step on the support CE over all weights and the prototype head (METHOD §1.7).

    Returns (θ', head'). The step g is a constant, so the outer gradient reaches θ by identity;
    head' = (w̄ − lr g_w) + w − sg(w) has the value of the stepped prototypes and passes the outer gradient
    into the support features through w.
    """
    support_f = model.features(weights, support_x)
    prototypes = model.head.prototypes(support_f, support_y, n_way)
    head_leaf = prototypes.detach().requires_grad_(True)
    support_ce = F.cross_entropy(model.head(support_f, head_leaf), support_y)
    names = list(weights)
    grads = torch.autograd.grad(support_ce, [weights[n] for n in names] + [head_leaf], retain_graph=True,
                                allow_unused=True)
    stepped = {n: torch.add(weights[n], g, alpha=-lr) if g is not None else weights[n] for n, g in zip(names, grads)}
    head = (head_leaf.detach() - lr * grads[-1]) + prototypes - prototypes.detach()
    return stepped, head


def alpha_entropy(alpha: Tensor) -> float:
    """Entropy (nats) of the merging weights: log M when uniform, 0 when one expert takes all."""
    a = alpha.detach().float().clamp_min(1e-12)
    return float(-(a * a.log()).sum())


class SMAT(FewShotModel):
    method = "smat"
    task_independent = False

    def __init__(self, backbone: nn.Module, experts: nn.Module, router: Router | None, *, tau: float,
                 inner_lr: float, meta: bool, distill: bool, teacher_lr: float, kd_weight: float,
                 kd_temperature: float, temperature: tuple[float, float, float], logit_l2: float) -> None:
        super().__init__(backbone, CosineHead(learnable=False))
        self.backbone.requires_grad_(False)             # θ_pre stays frozen (METHOD §1.1)
        self.experts = experts
        self.router = router
        self.lagrangian = nn.Parameter(torch.zeros(experts.n_experts)) if experts.has_gates else None
        self.tau = tau
        self.inner_lr = inner_lr
        self.meta = meta
        self.distill = distill
        self.teacher_lr = teacher_lr
        self.kd_weight = kd_weight
        self.kd_temperature = kd_temperature
        self.temperature_schedule = temperature
        self.logit_l2 = logit_l2
        self.constraint_substeps = 1                    # the paper's: the L0 path in the task loss

    @classmethod
    def from_config(cls, backbone: nn.Module, config) -> "SMAT":
        switches = config.switches
        layout = ParamLayout(backbone_parameters(backbone))
        if switches.mls:
            g = config.gates
            gates = HardConcrete(g.beta, g.zeta, g.gamma, g.noise_width, g.log_alpha_min, g.log_alpha_max)
            experts = SparseInterpolatedExperts(layout, config.experts, gates, g.init_mean, g.init_std)
        else:
            experts = cls.dense_experts(layout, config.experts)
        r = config.router
        router = None
        if switches.ie:
            router = Router(backbone.feature_dim, config.experts, r.heads, r.mlp_ratio, r.skill_tokens,
                            r.skill_init_std)
        return cls(backbone, experts, router, tau=config.tau, inner_lr=config.inner_lr, meta=switches.meta,
                   distill=switches.dt, teacher_lr=config.teacher.lr, kd_weight=config.teacher.kd_weight,
                   kd_temperature=config.teacher.temperature,
                   temperature=(r.temperature_start, r.temperature_min, r.temperature_decay_tasks),
                   logit_l2=r.logit_l2)

    @staticmethod
    def dense_experts(layout: ParamLayout, experts: int) -> nn.Module:
        """The experts without gates (MLS off): one dense δ (Table 2 row 5; IE off, so experts = 1)."""
        return DenseDelta(layout)

    def optimiser_groups(self, optim) -> tuple[list[ParamGroup], list[ParamGroup]]:
        """SGD: δ (momentum, weight decay), log α (huge lr, the only clipped SGD group) and λ; AdamW: the router."""
        sgd = [ParamGroup("delta", [self.experts.delta], optim.delta_lr, optim.delta_momentum,
                          optim.delta_weight_decay)]
        if self.experts.has_gates:
            sgd += [ParamGroup("masks", [self.experts.log_alpha], optim.mask_lr, clip=optim.mask_clip),
                    ParamGroup("lagrangian", [self.lagrangian], optim.lagrangian_lr)]
        adamw = []
        if self.router is not None:
            adamw.append(ParamGroup("router", list(self.router.parameters()), optim.router_lr,
                                    weight_decay=optim.router_weight_decay, clip=optim.router_clip))
        return sgd, adamw

    # --- pieces -------------------------------------------------------------------------------------------

    def temperature(self, tasks_seen: int) -> float:
        return router_temperature(tasks_seen, *self.temperature_schedule)

    def _route(self, pre_prototypes: Tensor, temperature: float, training: bool) -> tuple[Tensor, Tensor | None]:
        """(α, ℓ); without a router (IE off) α ≡ 1 for the single expert."""
        if self.router is None:
            return torch.ones(1, device=pre_prototypes.device), None
        logits = self.router.logits(pre_prototypes)
        return self.router.scores(logits, temperature, training), logits

    def _merge(self, update: Tensor) -> dict[str, Tensor]:
        theta_pre = backbone_parameters(self.backbone)
        return {name: theta_pre[name] + u for name, u in self.experts.layout.unflatten(update).items()}

    def _pre_prototypes(self, support_x: Tensor, support_y: Tensor, n_way: int) -> Tensor:
        with torch.no_grad():
            return self.head.prototypes(self.backbone(support_x), support_y, n_way)

    def _pre_features(self, support_x: Tensor, query_x: Tensor, need_query: bool) -> tuple[Tensor, Tensor | None]:
        """θ_pre features of the support (router input) and, for the pre-trained teacher, of the query: one pass."""
        with torch.no_grad():
            if not need_query:
                return self.backbone(support_x), None
            if query_x is support_x:
                features = self.backbone(support_x)
                return features, features
            features = self.backbone(torch.cat([support_x, query_x]))
            return features[:len(support_x)], features[len(support_x):]

    # --- inference ----------------------------------------------------------------------------------------

    def task_params(self, support_x: Tensor, support_y: Tensor) -> TaskParams:
        """Eval-mode task weights: eval gates (β = 1, no noise), α = normalised sigmoid(ℓ/T), no inner step."""
        n_way = int(support_y.max()) + 1
        with torch.no_grad():
            alpha, _ = self._route(self._pre_prototypes(support_x, support_y, n_way),
                                   self.temperature(int(self.tasks_seen)), training=False)
            gates = self.experts.gates(training=False) if self.experts.has_gates else None
            weights = self._merge(self.experts.update(alpha, gates))
        return TaskParams(weights={n: w.detach().clone() for n, w in weights.items()}, alpha=alpha.detach())

    def expert_masks(self) -> dict[str, Tensor] | None:
        return self.experts.expert_masks() if self.experts.has_gates else None

    # --- meta-training ------------------------------------------------------------------------------------

    def task_forward(self, episode, n_tasks_seen: int) -> TaskOutput:
        sx, sy, qx, qy, n_way = episode.support_x, episode.support_y, episode.query_x, episode.query_y, episode.n_way
        if not self.meta:                               # Meta off: one labelled set D = S ∪ Q (METHOD §2.2 row 4)
            sx = qx = torch.cat([sx, qx])
            sy = qy = torch.cat([sy, qy])
        # The gates are the task's first random draw, so that `replay_task_state_` redraws them (METHOD §11).
        gates = self.experts.gates(training=True) if self.experts.has_gates else None
        temperature = self.temperature(n_tasks_seen)
        pre_support_f, pre_query_f = self._pre_features(sx, qx, need_query=self.distill)
        pre_prototypes = self.head.prototypes(pre_support_f, sy, n_way)
        alpha, logits = self._route(pre_prototypes, temperature, training=True)
        weights = self._merge(self.experts.update(alpha, gates))

        stepped, head = inner_step(self, weights, sx, sy, n_way, self.inner_lr)
        student = self.head(self.features(stepped, qx), head)
        ce = F.cross_entropy(student, qy)
        loss = ce
        kd = torch.zeros((), device=ce.device)
        if self.distill:
            names = list(stepped)
            *grads, grad_head = torch.autograd.grad(ce, [stepped[n] for n in names] + [head], retain_graph=True)
            dense = dense_teacher_logits(lambda w, h: self.head(self.features(w, qx), h), stepped, head,
                                         dict(zip(names, grads)), grad_head, self.teacher_lr)
            with torch.no_grad():
                pretrained = self.head(pre_query_f, pre_prototypes)
            kd = 0.5 * kd_loss(student, dense, self.kd_temperature) + 0.5 * kd_loss(student, pretrained,
                                                                                     self.kd_temperature)
            loss = (1 - self.kd_weight) * ce + self.kd_weight * kd

        metrics = {"ce": ce.item(), "kd": kd.item(), "acc": (student.argmax(-1) == qy).float().mean().item(),
                   "temperature": temperature, "alpha": alpha.detach().float().tolist(),
                   "alpha_entropy": alpha_entropy(alpha)}
        if self.experts.has_gates:
            sparsity = realised_sparsity(gates)
            reset_multipliers_(self.lagrangian, sparsity, self.tau)
            density = expected_density(self.experts.hard_concrete, self.experts.log_alpha)
            if self.constraint_substeps == 1:       # else `end_update_` integrates them after the step
                l_sparsity, l_lagrangian = sparsity_losses(density, sparsity, self.lagrangian, alpha, self.tau)
                loss = loss + l_sparsity + l_lagrangian
            metrics.update(sparsity=sparsity.tolist(), expected_density=density.detach().tolist(),
                           gate_band=transition_band(gates).tolist(),
                           **{"lambda": self.lagrangian.detach().tolist()})
        if logits is not None:
            loss = loss + self.logit_l2 * logits.pow(2).mean()
        metrics["loss"] = loss.item()
        return TaskOutput(loss, metrics, weights)

    def configure_training(self, optim) -> None:
        self.constraint_substeps = optim.constraint_substeps     # METHOD §1.13

    def end_update_(self, alpha: list[float], lrs: dict[str, float]) -> None:
        """After the optimiser step: the sparsity constraint's update in `constraint_substeps` parts (METHOD §1.13),
        from the update's mean α and the epoch's mask and λ learning rates. Nothing when the losses hold it."""
        if self.experts.has_gates and self.constraint_substeps > 1:
            integrate_constraint_(self.experts, self.lagrangian.data, torch.tensor(alpha), self.tau, lrs["masks"],
                                  lrs["lagrangian"], self.constraint_substeps)

    def replay_task_state_(self) -> None:
        """Apply what one training task changes in the model besides gradients, without running it (METHOD §11).

        A task advances the router's spectral-norm vectors by one power iteration and resets λ where its gates
        are sparser than τ (METHOD §1.9.1), which the tasks after it see. A data-parallel process replays the
        other processes' tasks with this, in task order and under each task's seeded generators: the gates are
        the first draw of `task_forward`, so they come out the same here.
        """
        with torch.no_grad():
            if self.experts.has_gates:
                sparsity = realised_sparsity(self.experts.gates(training=True))
                reset_multipliers_(self.lagrangian, sparsity, self.tau)
            if self.router is not None:
                self.router.advance_power_iterations_(1)

    def alignment_parameters(self) -> dict[str, list[Tensor]]:
        return {"delta": [self.experts.delta]}

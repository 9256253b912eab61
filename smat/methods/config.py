"""`ModelConfig`: what builds a model: its method, experts, sparsity target, Table 2 switches, gates, router,
inner step and teachers, with the paper's ViT-S defaults (METHOD §1, §8).

A model checkpoint stores it (`smat.methods.checkpoint`), so a model is rebuilt from its file alone; the
trainer's settings extend it (`smat.training.config.TrainConfig`). The method's ablation switches are
resolved here once (`resolve_switches`), so the saved config says exactly what ran.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from smat.config_loader import check_ranges
from smat.methods.registry import Switches, resolve_switches


@dataclass
class GateConfig:
    """Hard-concrete gates (METHOD §1.3)."""
    beta: float = 2 / 3                 # temperature in training; 1 at eval
    zeta: float = 1.1
    gamma: float = -0.1
    noise_width: float = 1e-6           # training noise u ~ U(0.5 ± noise_width); 0.5 = the full U(0, 1)
    init_mean: float = 0.0
    init_std: float = 0.5
    log_alpha_min: float = math.log(0.01)
    log_alpha_max: float = math.log(100.0)

    def __post_init__(self) -> None:
        check_ranges(self, positive=("beta", "init_std"))
        if not (self.gamma < 0 < 1 < self.zeta):
            raise ValueError(f"gamma={self.gamma}, zeta={self.zeta}: the stretch needs gamma < 0 and zeta > 1")
        if not self.log_alpha_min < self.log_alpha_max:
            raise ValueError(f"log_alpha_min={self.log_alpha_min} must be below log_alpha_max={self.log_alpha_max}")


@dataclass
class RouterConfig:
    """Expert-selection hypernetwork (METHOD §1.4)."""
    heads: int = 4
    mlp_ratio: float = 2.0
    skill_tokens: int = 4
    skill_init_std: float = 1e-3
    temperature_start: float = 5.0      # T = max(temperature_min, temperature_start - n / temperature_decay_tasks)
    temperature_min: float = 0.5
    temperature_decay_tasks: float = 4000.0
    logit_l2: float = 1e-4              # weight of mean(logits²)

    def __post_init__(self) -> None:
        check_ranges(self, positive=("heads", "mlp_ratio", "skill_tokens", "temperature_min",
                                     "temperature_decay_tasks"),
                     non_negative=("skill_init_std", "logit_l2"))
        if self.temperature_start < self.temperature_min:
            raise ValueError(f"temperature_start={self.temperature_start} is below temperature_min="
                             f"{self.temperature_min}")


@dataclass
class TeacherConfig:
    """Dense teacher and distillation (METHOD §1.8)."""
    lr: float = 5e-3                    # the teacher's one SGD step on the query CE
    kd_weight: float = 0.25             # loss = (1 - kd_weight) CE + kd_weight (KD_dense + KD_pre) / 2 · T²
    temperature: float = 2.0

    def __post_init__(self) -> None:
        check_ranges(self, positive=("lr", "temperature"), fraction=("kd_weight",))


@dataclass
class ModelConfig:
    method: str = "smat"                # a meta-trained method of the registry (`resolve_switches` checks)
    image_size: int | None = None       # null: the input size of the backbone (`smat train --pretrained`)
    experts: int = 8                    # M
    tau: float = 0.9                    # target sparsity per expert (fraction of zero gates)
    switches: Switches = field(default_factory=Switches)
    gates: GateConfig = field(default_factory=GateConfig)
    router: RouterConfig = field(default_factory=RouterConfig)
    inner_lr: float = 1e-3              # one first-order SGD step on the support (METHOD §1.7)
    teacher: TeacherConfig = field(default_factory=TeacherConfig)

    def __post_init__(self) -> None:
        if not 0.0 <= self.tau < 1.0:
            raise ValueError(f"tau={self.tau}: the target sparsity must be in [0, 1)")
        if self.experts < 1:
            raise ValueError(f"experts={self.experts}: need at least one expert")
        if not 0.0 < self.gates.noise_width <= 0.5:
            raise ValueError(f"gates.noise_width={self.gates.noise_width}: must be in (0, 0.5]")
        check_ranges(self, positive=("image_size",), non_negative=("inner_lr",))
        self.switches = resolve_switches(self.method, self.switches, self.experts)

"""`TrainConfig`: every setting of meta-training, with the paper's ViT-S defaults (METHOD §1.10, §8).

Built strictly from YAML (`smat.config.load_config`): unknown keys and wrong types are errors. The method's
ablation switches are resolved here once (`resolve_switches`), so the saved config says exactly what ran.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Literal

from smat.config import check_ranges
from smat.data.episodes import SamplerConfig
from smat.methods.registry import TRAINED_METHODS, Switches, resolve_switches

MethodName = Literal[TRAINED_METHODS]


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
class OptimConfig:
    """Optimiser groups (METHOD §1.10 for smat/softmerge, §2.3 for pmf)."""
    delta_lr: float = 1e-4
    delta_momentum: float = 0.9
    delta_weight_decay: float = 1e-4
    mask_lr: float = 1e6
    mask_clip: float = 5.0              # gradient-norm clip of the log-alpha group (the only clipped SGD group)
    lagrangian_lr: float = 2e-3
    constraint_substeps: int = 1        # 1: the L0 path is in the task loss (the paper); K > 1: it is integrated
                                        # after each update in K steps of lr / K (METHOD §1.13)
    router_lr: float = 1e-4
    router_weight_decay: float = 1e-2
    router_clip: float = 1.0
    pmf_lr: float = 5e-5
    pmf_momentum: float = 0.9
    pmf_weight_decay: float = 0.0

    def __post_init__(self) -> None:
        check_ranges(self, positive=("delta_lr", "mask_lr", "lagrangian_lr", "router_lr", "pmf_lr", "mask_clip",
                                     "router_clip", "constraint_substeps"),
                     non_negative=("delta_weight_decay", "router_weight_decay", "pmf_weight_decay"))
        for name in ("delta_momentum", "pmf_momentum"):
            if not 0 <= getattr(self, name) < 1:
                raise ValueError(f"{name}={getattr(self, name)}: must be in [0, 1)")


@dataclass
class ScheduleConfig:
    """Per-epoch learning-rate multiplier: linear warm-up, then cosine (HF cosine-with-warmup, METHOD §1.10)."""
    warmup_epochs: int = 5
    cosine_epochs: int = 50             # HF `num_training_steps`; training may stop before the cosine ends
    epoch0_lr: float | None = 1e-6      # epoch 0: every SGD group at this absolute lr, router lr 0; null: off

    def __post_init__(self) -> None:
        check_ranges(self, positive=("cosine_epochs", "epoch0_lr"), non_negative=("warmup_epochs",))


@dataclass
class ValidationConfig:
    episodes: int = 120                 # fixed val episodes per domain, sampled once (METHOD §1.11)
    seed: int = 10_000                  # independent of the training seed, so every run is selected alike

    def __post_init__(self) -> None:
        check_ranges(self, non_negative=("episodes",), seeds=("seed",))


@dataclass
class CheckpointConfig:
    every_tasks: int = 500              # periodic resume point (at a meta-batch boundary); 0 = epoch ends only
    every_seconds: float = 600.0        # ... or after this much wall time, whichever comes first; 0 = off

    def __post_init__(self) -> None:
        check_ranges(self, non_negative=("every_tasks", "every_seconds"))


@dataclass
class GradAlignmentConfig:
    """Meta-gradient alignment between domains for the analysis figure (METHOD §5.2)."""
    interval: int = 0                   # every this many tasks; 0 = off
    max_domains: int = 8                # one task from each of up to this many training domains
    merged: bool = False                # also the gradient w.r.t. the merged task weights θ_i

    def __post_init__(self) -> None:
        check_ranges(self, non_negative=("interval",), positive=("max_domains",))


@dataclass
class TrainConfig:
    method: MethodName = "smat"
    image_size: int | None = None       # null: the input size of the backbone (`smat train --pretrained`)
    experts: int = 8                    # M
    tau: float = 0.9                    # target sparsity per expert (fraction of zero gates)
    switches: Switches = field(default_factory=Switches)
    gates: GateConfig = field(default_factory=GateConfig)
    router: RouterConfig = field(default_factory=RouterConfig)
    inner_lr: float = 1e-3              # one first-order SGD step on the support (METHOD §1.7)
    teacher: TeacherConfig = field(default_factory=TeacherConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    epochs: int = 25
    tasks_per_epoch: int = 2000
    meta_batch: int = 4                 # B: each task's loss / B is back-propagated; one step every B tasks
    sampler: SamplerConfig = field(default_factory=SamplerConfig)
    crop_scale: tuple[float, float] = (0.08, 1.0)   # RandomResizedCrop scale of the train augmentation
    validation: ValidationConfig = field(default_factory=ValidationConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    grad_alignment: GradAlignmentConfig = field(default_factory=GradAlignmentConfig)
    # Precision (METHOD §8): fp16 = autocast + GradScaler on CUDA and fp32 on CPU (the paper's, and the default);
    # bf16 = bf16 autocast on CUDA and CPU, no scaler (bf16 has fp32's range); off = fp32. true/false (configs
    # and checkpoints written before the choice existed) read as fp16/off.
    amp: Literal["fp16", "bf16", "off"] | bool = "fp16"
    tf32: bool = True                   # TF32 for fp32 matmuls on CUDA (merging, router, fp32 runs); ignored on CPU
    compile: bool = False               # torch.compile the backbone forward (CUDA only: `smat train` refuses it on CPU)
    seed: int = 0

    def __post_init__(self) -> None:
        if not 0.0 <= self.tau < 1.0:
            raise ValueError(f"tau={self.tau}: the target sparsity must be in [0, 1)")
        if self.experts < 1:
            raise ValueError(f"experts={self.experts}: need at least one expert")
        for name in ("epochs", "tasks_per_epoch", "meta_batch"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}={getattr(self, name)}: must be at least 1")
        if not 0.0 < self.gates.noise_width <= 0.5:
            raise ValueError(f"gates.noise_width={self.gates.noise_width}: must be in (0, 0.5]")
        check_ranges(self, positive=("image_size",), non_negative=("inner_lr",), seeds=("seed",))
        if not 0 < self.crop_scale[0] <= self.crop_scale[1] <= 1:
            raise ValueError(f"crop_scale={list(self.crop_scale)}: expected 0 < low <= high <= 1")
        if isinstance(self.amp, bool):
            self.amp = "fp16" if self.amp else "off"
        if self.amp not in ("fp16", "bf16", "off"):
            raise ValueError(f"amp={self.amp!r}: must be fp16, bf16 or off")
        self.switches = resolve_switches(self.method, self.switches, self.experts)


"""`TrainConfig`: every setting of meta-training, with the paper's ViT-S defaults (METHOD §1.10, §8): the model's
(`smat.methods.config.ModelConfig`, which it extends) and the trainer's (optimisers, schedule, episodes,
validation, checkpoints, precision, seed). One flat YAML holds both.

Built strictly from YAML (`smat.config_loader.load_config`): unknown keys and wrong types are errors.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from smat.config_loader import check_ranges
from smat.data.episodes import SamplerConfig
from smat.methods.config import ModelConfig


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
class TrainConfig(ModelConfig):
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
        super().__post_init__()
        for name in ("epochs", "tasks_per_epoch", "meta_batch"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}={getattr(self, name)}: must be at least 1")
        check_ranges(self, seeds=("seed",))
        if not 0 < self.crop_scale[0] <= self.crop_scale[1] <= 1:
            raise ValueError(f"crop_scale={list(self.crop_scale)}: expected 0 < low <= high <= 1")
        if isinstance(self.amp, bool):
            self.amp = "fp16" if self.amp else "off"
        if self.amp not in ("fp16", "bf16", "off"):
            raise ValueError(f"amp={self.amp!r}: must be fp16, bf16 or off")

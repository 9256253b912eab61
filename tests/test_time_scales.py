"""The rules that compress the paper's schedule (smat/training/time_scales.py, METHOD §1.13): they return the
paper's values for the paper's own budget, and the embedded training config follows them."""

from __future__ import annotations

from pathlib import Path

import pytest

from smat.config_loader import load_config
from smat.models.backbones import create_backbone
from smat.methods.config import RouterConfig
from smat.training.config import OptimConfig, TrainConfig
from smat.training.time_scales import Budget, Gains, compress

ROOT = Path(__file__).resolve().parents[1]


def n_params(arch: str, image_size: int | None = None) -> int:
    return sum(p.numel() for p in create_backbone(arch, image_size).parameters())


def budget(config: TrainConfig, params: int) -> Budget:
    return Budget(config.epochs, config.tasks_per_epoch, config.meta_batch, config.schedule, params)


def paper_budget() -> Budget:
    paper = load_config(TrainConfig, ROOT / "config" / "training" / "paper.yaml")
    return budget(paper, n_params("vit_small_patch16_dino", paper.image_size))


def test_the_paper_budget_gives_the_paper_values():
    paper = load_config(TrainConfig, ROOT / "config" / "training" / "paper.yaml")
    derived = compress(paper.optim, paper.router, paper_budget(), paper_budget(), Gains())
    assert derived == pytest.approx({
        "optim.delta_lr": 1e-4, "optim.mask_lr": 1e6, "optim.lagrangian_lr": 2e-3, "optim.mask_clip": 5.0,
        "optim.pmf_lr": 5e-5, "optim.router_lr": 1e-4, "router.temperature_decay_tasks": 4000.0}, rel=1e-12)


def test_effective_length_counts_the_schedule():
    # The paper: epoch 0 frozen, warm-up m = e/5 for e = 1..4, then a cosine over 50 epochs cut at 25.
    assert paper_budget().effective_updates == pytest.approx(9628.44, abs=0.01)


def test_rules_scale_as_stated():
    paper = paper_budget()
    half_size = Budget(paper.epochs, paper.tasks_per_epoch, paper.meta_batch, paper.schedule, paper.params // 4)
    derived = compress(OptimConfig(), RouterConfig(), paper, half_size, Gains(masks=0.5))
    # A quarter of the gates and half the mask lr: λ must move 2 · 1/4 as fast, the clip 2 · 1/2 as large.
    assert derived["optim.mask_lr"] == pytest.approx(5e5)
    assert derived["optim.lagrangian_lr"] == pytest.approx(2e-3 * 2 / 4, rel=1e-4)
    assert derived["optim.mask_clip"] == pytest.approx(5.0 * 2 / 2, rel=1e-4)


def test_embedded_config_follows_the_rules():
    """The free gains of the task-gradient paths are the embedded config's own choice (on validation episodes);
    the expected-L0 path (λ lr), the log-α clip and the router temperature must then follow the rules."""
    embedded = load_config(TrainConfig, ROOT / "config" / "training" / "embedded.yaml")
    paper = load_config(TrainConfig, ROOT / "config" / "training" / "paper.yaml")
    reference, target = paper_budget(), budget(embedded, n_params("vit_tiny_patch4_32"))
    speed = reference.effective_updates / target.effective_updates
    gains = Gains(delta=embedded.optim.delta_lr / (paper.optim.delta_lr * speed),
                  masks=embedded.optim.mask_lr / (paper.optim.mask_lr * speed),
                  pmf=embedded.optim.pmf_lr / (paper.optim.pmf_lr * speed),
                  router=embedded.optim.router_lr / (paper.optim.router_lr * speed))
    derived = compress(paper.optim, paper.router, reference, target, gains)
    stated = {"optim.lagrangian_lr": embedded.optim.lagrangian_lr, "optim.mask_clip": embedded.optim.mask_clip,
              "router.temperature_decay_tasks": embedded.router.temperature_decay_tasks}
    # The config states them to two significant digits.
    assert stated == pytest.approx({key: derived[key] for key in stated}, rel=0.02)

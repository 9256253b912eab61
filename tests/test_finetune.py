"""Test-time fine-tuning: full and LoRA leave no trace between tasks; LoRA trains only its adapters; DiffAugment."""

from __future__ import annotations

import pytest
import torch
from test_evaluation import ARCH, CPU, build_smat, toy  # noqa: F401  (fixtures)

from smat.data.episodes import load_episode_file
from smat.data.loader import load_episode
from smat.data.store import Store
from smat.data import transforms
from smat.evaluation.augment import diff_augment, translate
from smat.evaluation.evaluate import EpisodeRunner
from smat.evaluation.finetune import finetune_full, support_loss
from smat.evaluation.lora import LoraFinetuner, SplitQKV
from smat.methods.pre import Pre
from smat.models.backbones import create_backbone


def snapshot(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {name: value.detach().clone() for name, value in module.state_dict().items()}


def assert_same_state(module: torch.nn.Module, before: dict[str, torch.Tensor]) -> None:
    after = module.state_dict()
    assert after.keys() == before.keys()
    assert all(torch.equal(after[name], before[name]) for name in before)
    assert all(p.grad is None for p in module.parameters())


def small_task(toy, index: int = 0, episode_file=None):
    store = Store(toy.store)
    episodes, meta = load_episode_file(episode_file or toy.small, store)
    tensors = load_episode(store, episodes[index], transforms.test_transform(32))
    return store, episodes, meta, tensors


@pytest.mark.parametrize("method, finetune", [("pre", "full"), ("smat", "full"), ("smat", "lora")])
def test_finetuned_tasks_do_not_influence_each_other(toy, method, finetune):
    """Two consecutive fine-tuned tasks give the same result as each alone; the model is untouched."""
    store, episodes, meta, _ = small_task(toy)
    torch.manual_seed(0)
    model = Pre(create_backbone(ARCH)).eval() if method == "pre" else build_smat()
    before = snapshot(model)
    runner = EpisodeRunner(model, store, finetune, CPU, steps=3)
    both = runner.run(episodes, [0, 1], meta["seed"], 1e-2, progress=False)
    alone = runner.run(episodes[1:], [1], meta["seed"], 1e-2, progress=False)
    assert (both[1]["accuracy"], both[1]["loss"]) == (alone[0]["accuracy"], alone[0]["loss"])
    untuned = EpisodeRunner(model, store, "none", CPU).run(episodes[1:], [1], meta["seed"], 0.0, progress=False)
    assert alone[0]["loss"] != untuned[0]["loss"]     # fine-tuning did change the task model
    assert_same_state(model, before)


def test_full_finetuning_lowers_its_objective_and_returns_new_tensors(toy):
    # 5-way 2-shot: on the 2-way 1-shot episodes the random model's objective is already ~0.03, too close
    # to 0 for a few normalised AdamW steps to lower it reliably.
    _, _, _, task = small_task(toy, episode_file=toy.episodes)
    model = build_smat()
    params = model.task_params(task.support_x, task.support_y)
    originals = {name: w.clone() for name, w in params.weights.items()}

    def objective(weights):
        """The fine-tuning loss (augmented support vs clean prototypes), averaged over 16 fixed draws."""
        with torch.no_grad():
            return sum(support_loss(model, lambda x: model.features(weights, x), task.support_x, task.support_y,
                                    task.n_way, torch.Generator().manual_seed(seed)).item()
                       for seed in range(16)) / 16

    tuned = finetune_full(model, params.weights, task.support_x, task.support_y, task.n_way, 1e-3,
                          torch.Generator().manual_seed(0), steps=20)
    assert objective(tuned) < 0.6 * objective(params.weights)
    assert all(torch.equal(params.weights[n], originals[n]) for n in originals)
    assert any(not torch.equal(tuned[n], originals[n]) for n in originals)
    assert finetune_full(model, params.weights, task.support_x, task.support_y, task.n_way, 0.0,
                         torch.Generator()) is params.weights


def test_lora_trains_only_adapter_weights(toy):
    _, _, _, task = small_task(toy)
    torch.manual_seed(0)
    model = Pre(create_backbone(ARCH)).eval()
    before = snapshot(model)
    lora = LoraFinetuner(model.backbone)
    assert len(lora.lora_layers) == 2 * len(model.backbone.vit.blocks)     # q and v of every block
    weights = model.task_params(task.support_x, task.support_y).weights
    generator = torch.Generator().manual_seed(0)
    lora.load_task(weights, generator)
    base = {n: p.detach().clone() for n, p in lora.backbone.named_parameters() if "lora_" not in n}
    adapters = [p.detach().clone() for p in lora.adapter_params]
    assert {n for n, p in lora.backbone.named_parameters() if p.requires_grad} == \
        {n for n, _ in lora.backbone.named_parameters() if "lora_" in n}

    features = lora.finetune(model, weights, task.support_x, task.support_y, task.n_way, 1e-3,
                             torch.Generator().manual_seed(0), steps=3)
    for name, param in lora.backbone.named_parameters():
        if "lora_" not in name:
            assert torch.equal(param, base[name]), name
    assert all(not torch.equal(p, a) for p, a in zip(lora.adapter_params, adapters))
    assert_same_state(model, before)
    with torch.no_grad():
        adapted = features(task.query_x)
        plain = model.features(weights, task.query_x)
    assert not torch.allclose(adapted, plain)
    # Adapters are reset per task: the same task and seed give the same adapted features again.
    again = lora.finetune(model, weights, task.support_x, task.support_y, task.n_way, 1e-3,
                          torch.Generator().manual_seed(0), steps=3)
    with torch.no_grad():
        assert torch.equal(again(task.query_x), adapted)


def test_split_qkv_computes_the_fused_projection():
    torch.manual_seed(0)
    fused = torch.nn.Linear(16, 48)
    x = torch.randn(4, 5, 16)
    torch.testing.assert_close(SplitQKV(fused)(x), fused(x), rtol=0, atol=1e-6)


def test_diff_augment_is_seeded_and_keeps_shape():
    x = torch.randn(6, 3, 16, 16, requires_grad=True)
    a = diff_augment(x, torch.Generator().manual_seed(5))
    b = diff_augment(x, torch.Generator().manual_seed(5))
    assert torch.equal(a, b) and a.shape == x.shape and not a.requires_grad
    # Applied to 90% of batches.
    applied = sum(not torch.equal(diff_augment(x, torch.Generator().manual_seed(s)), x.detach())
                  for s in range(400))
    assert 330 <= applied <= 390


def shift(x: torch.Tensor, dy: int, dx: int) -> torch.Tensor:
    """Reference: output (i, j) = input (i - dy, j - dx), zero outside."""
    out = torch.zeros_like(x)
    height, width = x.shape[-2:]
    out[..., max(0, dy):height + min(0, dy), max(0, dx):width + min(0, dx)] = \
        x[..., max(0, -dy):height - max(0, dy), max(0, -dx):width - max(0, dx)]
    return out


def test_translation_is_an_integer_shift_with_zero_fill():
    x = torch.arange(64, dtype=torch.float).reshape(1, 1, 8, 8) + 1
    seen = set()
    for seed in range(60):
        shifted = translate(x, torch.Generator().manual_seed(seed))    # up to 12.5% of 8 px: 1 pixel
        matches = [(dy, dx) for dy in (-1, 0, 1) for dx in (-1, 0, 1) if torch.equal(shifted, shift(x, dy, dx))]
        assert len(matches) == 1, f"seed {seed}: not an integer shift with zero fill"
        seen.add(matches[0])
    assert len(seen) == 9

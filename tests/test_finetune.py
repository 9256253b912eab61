"""Test-time fine-tuning: full and LoRA leave no trace between tasks and lower their objective; the LoRA copy
adapts only q and v; DiffAugment. (Batched against one-episode fine-tuning: tests/test_batched_finetune.py.)"""

from __future__ import annotations

import pytest
import torch
from test_evaluation import ARCH, CPU, build_smat, toy  # noqa: F401  (fixtures)

from smat.data.episodes import load_episode_file
from smat.data.loader import load_episode
from smat.data.store import Store
from smat.data import transforms
from smat.evaluation.augment import apply_augment, diff_augment, draw_augment, translate
from smat.evaluation.evaluate import EpisodeRunner
from smat.evaluation.finetune import Finetuner, Task
from smat.evaluation.lora import LoraQKV, lora_backbone
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


@pytest.mark.parametrize("mode", ["full", "lora"])
def test_finetuning_lowers_its_objective(toy, mode):
    """Fine-tuned on a support set and scored on it, the model fits it better than before."""
    # 5-way 2-shot: on the 2-way 1-shot episodes the random model's objective is already ~0.03.
    _, _, _, task = small_task(toy, episode_file=toy.episodes)
    model = build_smat()
    weights = model.task_params(task.support_x, task.support_y).weights
    originals = {name: w.clone() for name, w in weights.items()}
    on_support = type(task)(task.support_x, task.support_y, task.support_x, task.support_y, task.n_way)

    def support_loss(steps):
        finetuner = Finetuner(model, mode, steps=steps)
        logits = finetuner.query_logits([Task(weights, on_support, 1e-3, torch.Generator().manual_seed(0))])[0]
        return torch.nn.functional.cross_entropy(logits, task.support_y).item()

    assert support_loss(20) < 0.6 * support_loss(0)
    assert all(torch.equal(weights[n], originals[n]) for n in originals)


def test_lora_copy_leaves_the_model_alone_and_adapts_only_q_and_v():
    torch.manual_seed(0)
    model = Pre(create_backbone(ARCH)).eval()
    before = snapshot(model)
    backbone, layers = lora_backbone(model.backbone)
    assert layers == [f"blocks.{i}.attn.qkv" for i in range(len(model.backbone.vit.blocks))]
    assert all(not p.requires_grad for p in backbone.parameters())
    qkv = backbone.vit.get_submodule(layers[0])
    assert isinstance(qkv, LoraQKV)
    x = torch.randn(2, 5, qkv.weight.shape[1])
    plain = qkv(x)
    qkv.lora_a = torch.randn(2, 8, qkv.weight.shape[1])
    qkv.lora_b = torch.randn(2, qkv.weight.shape[0] // 3, 8)
    q, k, v = (qkv(x) - plain).chunk(3, dim=-1)
    assert torch.equal(k, torch.zeros_like(k))
    torch.testing.assert_close(q, 4.0 * x @ qkv.lora_a[0].T @ qkv.lora_b[0].T, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(v, 4.0 * x @ qkv.lora_a[1].T @ qkv.lora_b[1].T, rtol=1e-4, atol=1e-4)
    assert_same_state(model, before)


def test_batch_augmentation_is_each_episodes_own():
    """Episodes augmented together get what each gets alone; padding rows are left as they are."""
    x = torch.randn(3, 4, 3, 16, 16)
    sizes, seeds = [4, 2, 3], [1, 2, 4]
    draws = [draw_augment(n, 16, 16, torch.Generator().manual_seed(seed)) for n, seed in zip(sizes, seeds)]
    together = apply_augment(x, draws)
    for b, (n, seed) in enumerate(zip(sizes, seeds)):
        alone = diff_augment(x[b, :n], torch.Generator().manual_seed(seed))
        torch.testing.assert_close(together[b, :n], alone, rtol=0, atol=1e-6)
        assert torch.equal(together[b, n:], x[b, n:])


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
        g = torch.Generator().manual_seed(seed)
        dy, dx = torch.randint(-1, 2, (1,), generator=g), torch.randint(-1, 2, (1,), generator=g)
        shifted = translate(x, dy, dx)
        matches = [(dy, dx) for dy in (-1, 0, 1) for dx in (-1, 0, 1) if torch.equal(shifted, shift(x, dy, dx))]
        assert len(matches) == 1, f"seed {seed}: not an integer shift with zero fill"
        seen.add(matches[0])
    assert len(seen) == 9

"""Precision and compilation settings of meta-training (`amp`, `tf32`, `compile`; smat/device.py).

The GPU path cannot run here, so what is checked on CPU is what carries over: bf16 autocast (which CPU supports)
stays close to fp32 on one meta-training task, `amp: off` and the default (fp16, which is fp32 on CPU) are exactly
the fp32 meta-update, and `compile: true` is refused on CPU with one line.
"""

from __future__ import annotations

import pytest
import torch

from smat.config_loader import build_dataclass, load_config
from smat.data.loader import EpisodeTensors
from smat.device import autocast, autocast_dtype, grad_scaler
from smat.io import SmatError
from smat.methods.registry import build_model
from smat.models.backbones import create_backbone
from smat.training.config import TrainConfig
from smat.training.loop import train
from smat.training.optim import build_optimisers, set_epoch_lr, step
from test_training import CI_CONFIG, FAST, SIZE, data  # noqa: F401  (fixture)

CPU = torch.device("cpu")

# bf16 keeps 8 significant bits: one rounding is off by up to 2^-8 ≈ 0.4 %, and a forward and backward pass
# through the tiny ViT's 4 blocks (layer norms, softmax, the cosine head) compounds dozens of them. Measured on
# this task: loss 1.3 % off, each gradient tensor 0.3-5.5 % off in norm with cosine ≥ 0.999. The bounds below
# leave about 2x of margin over that, while anything wrong (a tensor left out of autocast's casts in the wrong
# way, a scaler applied to bf16, different random draws) moves a loss or gradient by O(1).
BF16_LOSS_RTOL = 0.05
BF16_GRAD_RTOL = 0.10          # ‖g_bf16 − g_fp32‖ / ‖g_fp32‖ per gradient tensor
BF16_GRAD_MIN_COS = 0.99


def tiny_smat(method: str = "smat") -> torch.nn.Module:
    torch.manual_seed(0)
    model = build_model(TrainConfig(method=method, image_size=SIZE, experts=2),
                        create_backbone("vit_tiny_patch4_32", image_size=SIZE)).train()
    if method == "smat":
        with torch.no_grad():       # away from the start (δ = 0), so that the gates get a task gradient too
            model.experts.delta.normal_(0, 1e-2)
    return model


def episode() -> EpisodeTensors:
    g = torch.Generator().manual_seed(0)
    return EpisodeTensors(torch.randn(6, 3, SIZE, SIZE, generator=g), torch.arange(3).repeat(2),
                          torch.randn(6, 3, SIZE, SIZE, generator=g), torch.arange(3).repeat(2), 3)


def task_loss_and_grads(model, amp) -> tuple[float, dict[str, torch.Tensor]]:
    """One meta-training task under `amp`, with the same random draws (router sample, gate noise) every time."""
    model.zero_grad(set_to_none=True)
    torch.manual_seed(1)
    with autocast(CPU, amp):
        loss, _ = model.meta_loss(episode(), 0)
    loss.backward()
    return loss.item(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("method", ["smat", "pmf"])
def test_bf16_autocast_is_close_to_fp32_on_one_task(method):
    model = tiny_smat(method)
    loss32, grads32 = task_loss_and_grads(model, "off")
    loss16, grads16 = task_loss_and_grads(model, "bf16")
    assert loss16 != loss32                                 # bf16 did run
    assert abs(loss16 - loss32) <= BF16_LOSS_RTOL * abs(loss32)
    assert grads16.keys() == grads32.keys()
    compared = 0
    for name, g32 in grads32.items():
        if g32.norm() == 0:     # PMF's head bias: the CE is shift-invariant, so only bf16's softmax rounding is
            # left, whose rows sum to 1 within ≈ n_way · 2^-8 = 0.012
            assert grads16[name].abs().max() <= 3 * 2 ** -8, name
            continue
        g16 = grads16[name].float()
        assert (g16 - g32).norm() <= BF16_GRAD_RTOL * g32.norm(), name
        assert torch.nn.functional.cosine_similarity(g16.flatten(), g32.flatten(), 0) >= BF16_GRAD_MIN_COS, name
        compared += 1
    assert compared >= 10


def meta_update(amp) -> dict[str, torch.Tensor]:
    """The trainer's meta-update (B = 2 tasks, loss / B, one step through the scaler) under `amp`; the new state."""
    model = tiny_smat()
    config = TrainConfig(image_size=SIZE, experts=2, meta_batch=2)
    optimisers = build_optimisers(model, config.optim)
    set_epoch_lr(optimisers, 5, config.schedule)
    scaler = grad_scaler(CPU, amp)
    for task in range(2):
        torch.manual_seed(task)
        with autocast(CPU, amp):
            loss, _ = model.meta_loss(episode(), task)
        scaler.scale(loss / 2).backward()
    step(optimisers, scaler)
    return {k: v.clone() for k, v in model.state_dict().items()}


def test_amp_off_and_the_cpu_default_are_exactly_the_fp32_update():
    model = tiny_smat()
    config = TrainConfig(image_size=SIZE, experts=2, meta_batch=2)
    optimisers = build_optimisers(model, config.optim)
    set_epoch_lr(optimisers, 5, config.schedule)
    for task in range(2):                   # the reference: no autocast context, no scaler at all
        torch.manual_seed(task)
        loss, _ = model.meta_loss(episode(), task)
        (loss / 2).backward()
    step(optimisers, torch.amp.GradScaler("cpu", enabled=False))
    reference = model.state_dict()
    for amp in ("off", "fp16", False, True):        # fp16 (the default) is fp32 on CPU, as before bf16 existed
        state = meta_update(amp)
        assert all(torch.equal(state[k], v) for k, v in reference.items()), amp
    assert not all(torch.equal(meta_update("bf16")[k], v) for k, v in reference.items())


def test_autocast_dtype_and_scaler_per_device():
    cuda = torch.device("cuda")
    assert [autocast_dtype(cuda, a) for a in ("fp16", "bf16", "off", True, False)] == [
        torch.float16, torch.bfloat16, None, torch.float16, None]
    assert [autocast_dtype(CPU, a) for a in ("fp16", "bf16", "off")] == [None, torch.bfloat16, None]
    assert not grad_scaler(CPU, "bf16").is_enabled() and not grad_scaler(CPU, "fp16").is_enabled()


def test_precision_keys_defaults_old_spellings_and_bad_values():
    config = TrainConfig()
    assert (config.amp, config.tf32, config.compile) == ("fp16", True, False)
    # Configs and checkpoints written when amp was a switch; YAML 1.1 also reads a bare `off` as false.
    assert build_dataclass(TrainConfig, {"amp": True}).amp == "fp16"
    assert build_dataclass(TrainConfig, {"amp": False}).amp == "off"
    assert load_config(TrainConfig, None, ["amp=off"]).amp == "off"
    assert load_config(TrainConfig, None, ["amp=bf16", "tf32=false", "compile=true"]).amp == "bf16"
    for override, message in [("amp=fp32", "config.amp: 'fp32' is not one of 'fp16', 'bf16', 'off'"),
                              ("tf32=1", "config.tf32: expected true or false, got 1"),
                              ("compile=2", "config.compile: expected true or false, got 2")]:
        with pytest.raises(SmatError) as excinfo:
            load_config(TrainConfig, None, [override])
        assert str(excinfo.value) == message
    with pytest.raises(ValueError, match=r"^amp='fp8': must be fp16, bf16 or off$"):
        TrainConfig(amp="fp8")


def test_compile_is_refused_on_cpu_in_one_line(data, tmp_path):  # noqa: F811
    with pytest.raises(SmatError) as excinfo:
        train(CI_CONFIG, data["stores"], data["pretrained"], tmp_path / "out", overrides=[*FAST, "compile=true"],
              device="cpu")
    message = str(excinfo.value)
    assert message.startswith("compile=true: torch.compile of the backbone is for CUDA only") and "\n" not in message
    assert not (tmp_path / "out").exists()


def test_bf16_trains_end_to_end_on_cpu(data, tmp_path):  # noqa: F811
    out = tmp_path / "bf16"
    train(CI_CONFIG, data["stores"], data["pretrained"], out, device="cpu",
          overrides=[*FAST, "amp=bf16", "epochs=1", "tasks_per_epoch=2", "validation.episodes=1"])
    assert (out / "best.pt").is_file() and (out / "train_log.jsonl").is_file() and not list(out.glob("*.partial.*"))
    assert "amp: bf16" in (out / "config.yaml").read_text()

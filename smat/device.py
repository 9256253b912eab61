"""One device-agnostic code path: pick the device once; mixed precision and TF32 from the training config."""

from __future__ import annotations

import contextlib

import torch

from smat.io import SmatError


def resolve_device(name: str = "auto") -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SmatError(f"--device {name}: CUDA is not available on this machine (use --device cpu)")
    return device


def autocast_dtype(device: torch.device, amp: bool | str = True) -> torch.dtype | None:
    """The autocast dtype of the `amp` setting (fp16 | bf16 | off; true = fp16) on `device`, or None for fp32.

    fp16 only on CUDA, as in the paper's training: CPU fp16 kernels are slow and fp32 has always been the CPU
    path. bf16 on both, since CPU autocast supports it (the CPU tests compare it with fp32)."""
    amp = {True: "fp16", False: "off"}.get(amp, amp)
    if amp == "fp16" and device.type == "cuda":
        return torch.float16
    if amp == "bf16":
        return torch.bfloat16
    return None


def autocast(device: torch.device, amp: bool | str = True):
    """Autocast to `autocast_dtype(device, amp)`; a no-op context where that is fp32."""
    dtype = autocast_dtype(device, amp)
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=dtype)


def grad_scaler(device: torch.device, amp: bool | str = True) -> torch.amp.GradScaler:
    """A loss scaler, enabled only for fp16: bf16 and fp32 gradients do not underflow, so theirs is a no-op."""
    return torch.amp.GradScaler(device.type, enabled=autocast_dtype(device, amp) is torch.float16)


def set_matmul_precision(device: torch.device, tf32: bool) -> None:
    """TF32 for fp32 matmuls on CUDA (`tf32`); on CPU nothing is changed, so CPU numbers stay exact fp32."""
    if device.type == "cuda":
        torch.set_float32_matmul_precision("high" if tf32 else "highest")

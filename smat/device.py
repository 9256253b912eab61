"""One device-agnostic code path: pick the device once, enable mixed precision only on CUDA."""

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


def autocast(device: torch.device, enabled: bool = True):
    """fp16 autocast on CUDA (as in the paper's training); a no-op context on CPU."""
    if enabled and device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.float16)
    return contextlib.nullcontext()

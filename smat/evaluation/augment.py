"""DiffAugment for test-time fine-tuning: flip, colour and translation of a normalised image batch (METHOD §3.5)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

APPLY_PROBABILITY = 0.9
FLIP_PROBABILITY = 0.5
TRANSLATION_RATIO = 0.125


def _uniform(shape: tuple[int, ...], low: float, high: float, generator: torch.Generator, like: torch.Tensor):
    # Draw on the CPU generator, then move: the same seed gives the same augmentation on any device.
    return (torch.rand(shape, generator=generator) * (high - low) + low).to(like.device, like.dtype)


def diff_augment(x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Augment a batch (B, C, H, W) as PMF/SMAT do (METHOD §3.5); no gradient flows through the augmentation.

    With probability 0.9 for the whole batch: a horizontal flip of the batch with probability 0.5, then per
    image brightness + U(−0.5, 0.5), saturation × U(0, 2) about the pixel's channel mean, contrast × U(0.5, 1.5)
    about the image mean, and an integer translation of up to 12.5% of the side with zero padding.
    `generator` is a CPU torch.Generator; it makes the augmentation reproducible.
    """
    x = x.detach()
    if torch.rand((), generator=generator).item() >= APPLY_PROBABILITY:
        return x
    if torch.rand((), generator=generator).item() < FLIP_PROBABILITY:
        x = x.flip(dims=(3,))
    n = x.shape[0]
    x = x + _uniform((n, 1, 1, 1), -0.5, 0.5, generator, x)
    channel_mean = x.mean(dim=1, keepdim=True)
    x = (x - channel_mean) * _uniform((n, 1, 1, 1), 0.0, 2.0, generator, x) + channel_mean
    image_mean = x.mean(dim=(1, 2, 3), keepdim=True)
    x = (x - image_mean) * _uniform((n, 1, 1, 1), 0.5, 1.5, generator, x) + image_mean
    return translate(x, generator)


def translate(x: torch.Tensor, generator: torch.Generator, ratio: float = TRANSLATION_RATIO) -> torch.Tensor:
    """Shift each image by its own integer offset in [−s, s]² (s = ratio · side), filling with zeros."""
    n, _, height, width = x.shape
    shift_y, shift_x = int(height * ratio + 0.5), int(width * ratio + 0.5)
    if shift_y == 0 and shift_x == 0:
        return x
    dy = torch.randint(-shift_y, shift_y + 1, (n, 1), generator=generator).to(x.device)
    dx = torch.randint(-shift_x, shift_x + 1, (n, 1), generator=generator).to(x.device)
    padded = F.pad(x, [shift_x, shift_x, shift_y, shift_y])
    # Output pixel (i, j) reads padded pixel (i + s − dy, j + s − dx), i.e. input (i − dy, j − dx).
    rows = torch.arange(height, device=x.device)[None, :] + shift_y - dy        # (n, H)
    cols = torch.arange(width, device=x.device)[None, :] + shift_x - dx         # (n, W)
    batch = torch.arange(n, device=x.device)[:, None, None]
    out = padded.permute(0, 2, 3, 1)[batch, rows[:, :, None], cols[:, None, :]]  # (n, H, W, C)
    return out.permute(0, 3, 1, 2).contiguous()

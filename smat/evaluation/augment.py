"""DiffAugment for test-time fine-tuning: flip, colour and translation of normalised images (METHOD §3.5).

The random draws and their application are separate: each episode draws its own augmentation from its own
generator (`draw_augment`), then the images of many episodes are augmented in one batch (`apply_augment`),
so an episode's augmentation never depends on which episodes share its batch.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

APPLY_PROBABILITY = 0.9
FLIP_PROBABILITY = 0.5
TRANSLATION_RATIO = 0.125


@dataclass
class AugmentDraw:
    """One episode's augmentation of its n images; `applied` False means the images are left as they are."""
    applied: bool
    flip: bool = False
    brightness: Tensor | None = None    # (n,) added
    saturation: Tensor | None = None    # (n,) factor about the pixel's channel mean
    contrast: Tensor | None = None      # (n,) factor about the image mean
    shift_y: Tensor | None = None       # (n,) integer translation, rows
    shift_x: Tensor | None = None       # (n,) integer translation, columns


def _uniform(n: int, low: float, high: float, generator: torch.Generator) -> Tensor:
    return torch.rand((n,), generator=generator) * (high - low) + low


def max_shift(side: int, ratio: float = TRANSLATION_RATIO) -> int:
    return int(side * ratio + 0.5)


def draw_augment(n: int, height: int, width: int, generator: torch.Generator) -> AugmentDraw:
    """Draw the augmentation of n images of height × width from a CPU generator (METHOD §3.5).

    With probability 0.9 for the whole set: a horizontal flip of the set with probability 0.5, then per image
    brightness + U(−0.5, 0.5), saturation × U(0, 2), contrast × U(0.5, 1.5) and an integer translation of up
    to 12.5 % of the side. Drawn on the CPU so that a seed gives the same augmentation on any device.
    """
    if torch.rand((), generator=generator).item() >= APPLY_PROBABILITY:
        return AugmentDraw(applied=False)
    flip = torch.rand((), generator=generator).item() < FLIP_PROBABILITY
    brightness = _uniform(n, -0.5, 0.5, generator)
    saturation = _uniform(n, 0.0, 2.0, generator)
    contrast = _uniform(n, 0.5, 1.5, generator)
    sy, sx = max_shift(height), max_shift(width)
    zeros = torch.zeros(n, dtype=torch.long)
    shift_y = torch.randint(-sy, sy + 1, (n,), generator=generator) if sy or sx else zeros
    shift_x = torch.randint(-sx, sx + 1, (n,), generator=generator) if sy or sx else zeros
    return AugmentDraw(True, flip, brightness, saturation, contrast, shift_y, shift_x)


def apply_augment(x: Tensor, draws: list[AugmentDraw]) -> Tensor:
    """Augment x (B, N, C, H, W): episode b with draws[b], whose n_b ≤ N images come first (the rest is
    padding, returned unchanged). No gradient flows through the augmentation."""
    x = x.detach()
    batch, n_max = x.shape[:2]
    applied = torch.zeros(batch, n_max, dtype=torch.bool)
    flip = torch.zeros(batch, n_max, dtype=torch.bool)
    params = torch.zeros(5, batch, n_max)           # brightness, saturation, contrast, shift y, shift x
    params[1:3] = 1.0                               # neutral factors for padding and unaugmented episodes
    for b, draw in enumerate(draws):
        if draw.applied:
            n = len(draw.brightness)
            applied[b, :n], flip[b, :n] = True, draw.flip
            for row, value in enumerate((draw.brightness, draw.saturation, draw.contrast, draw.shift_y,
                                         draw.shift_x)):
                params[row, b, :n] = value
    flat = x.flatten(0, 1)
    as_image = lambda values: values.flatten().to(x.device, x.dtype)[:, None, None, None]  # noqa: E731
    out = torch.where(as_image(flip.float()).bool(), flat.flip(dims=(3,)), flat)
    out = out + as_image(params[0])
    channel_mean = out.mean(dim=1, keepdim=True)
    out = (out - channel_mean) * as_image(params[1]) + channel_mean
    image_mean = out.mean(dim=(1, 2, 3), keepdim=True)
    out = (out - image_mean) * as_image(params[2]) + image_mean
    out = translate(out, params[3].flatten().long(), params[4].flatten().long())
    out = torch.where(as_image(applied.float()).bool(), out, flat)
    return out.view_as(x)


def diff_augment(x: Tensor, generator: torch.Generator) -> Tensor:
    """Augment one batch of images (N, C, H, W) as PMF/SMAT do (METHOD §3.5), drawing from `generator`."""
    return apply_augment(x[None], [draw_augment(len(x), x.shape[2], x.shape[3], generator)])[0]


def translate(x: Tensor, shift_y: Tensor, shift_x: Tensor) -> Tensor:
    """Shift image i of x (N, C, H, W) by (shift_y[i], shift_x[i]) pixels, filling with zeros."""
    n, _, height, width = x.shape
    pad_y, pad_x = int(shift_y.abs().max()), int(shift_x.abs().max())
    if pad_y == 0 and pad_x == 0:
        return x
    dy, dx = shift_y.to(x.device)[:, None], shift_x.to(x.device)[:, None]
    padded = F.pad(x, [pad_x, pad_x, pad_y, pad_y])
    # Output pixel (i, j) reads padded pixel (i + pad − dy, j + pad − dx), i.e. input (i − dy, j − dx).
    rows = torch.arange(height, device=x.device)[None, :] + pad_y - dy        # (n, H)
    cols = torch.arange(width, device=x.device)[None, :] + pad_x - dx         # (n, W)
    batch = torch.arange(n, device=x.device)[:, None, None]
    out = padded.permute(0, 2, 3, 1)[batch, rows[:, :, None], cols[:, None, :]]  # (n, H, W, C)
    return out.permute(0, 3, 1, 2).contiguous()

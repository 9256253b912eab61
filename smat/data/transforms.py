"""Train and test transforms on whole batches: uint8 numpy (k, S, S, 3) -> normalised float tensors (k, 3, S, S).

They reproduce the PIL/torchvision pipelines of PMF one image at a time, but vectorised over the batch; random
parameters are drawn per image from an explicit torch.Generator, and the work runs on that generator's device.
* test (METHOD §3.4): Resize(int(S*256/224)), CenterCrop(S), ToTensor, Normalize(ImageNet);
* train (METHOD §1.11): RandomResizedCrop(S, scale, ratio 3/4..4/3) of the stored image, ImageJitter
  (PIL ImageEnhance Brightness, Contrast, Color, each factor 1 + 0.4*U(-1, 1), in that order),
  RandomHorizontalFlip, ToTensor, Normalize.
Pixel values stay on the 0..255 scale until normalisation, rounded where PIL would produce uint8 images.
"""

from __future__ import annotations

import math
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from smat.io import SmatError

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
JITTER_STRENGTH = 0.4  # PMF's ImageJitter(Brightness=0.4, Contrast=0.4, Color=0.4)
CROP_RATIO = (3 / 4, 4 / 3)


def test_transform(image_size: int) -> Callable[[np.ndarray], Tensor]:
    resize = int(image_size * 256 / 224)

    def transform(images: np.ndarray) -> Tensor:
        x = _resize(_to_float(images, torch.device("cpu")), resize)
        top = int(round((resize - image_size) / 2.0))  # torchvision CenterCrop
        return normalise(x[:, :, top:top + image_size, top:top + image_size])

    return transform


test_transform.__test__ = False  # not a test, although test modules that import it would make pytest think so


def train_transform(image_size: int, crop_scale: tuple[float, float] = (0.08, 1.0)
                    ) -> Callable[[np.ndarray, torch.Generator | None], Tensor]:
    if not 0 < crop_scale[0] <= crop_scale[1] <= 1:
        raise SmatError(f"crop_scale {tuple(crop_scale)}: need 0 < min <= max <= 1 (fractions of the image area)")

    def transform(images: np.ndarray, generator: torch.Generator | None = None) -> Tensor:
        device = generator.device if generator is not None else torch.device("cpu")
        # The crop is taken from the stored image, whatever its size, and resized to the model's (as PMF's
        # RandomResizedCrop on the decoded image, METHOD §1.11): a 146-px store keeps its detail in the crops.
        x = _to_float(images, device)
        boxes = random_resized_crop_boxes(len(x), x.shape[-2], x.shape[-1], crop_scale, CROP_RATIO, generator)
        flip = _uniform((len(x),), generator, device) < 0.5
        factors = 1 + JITTER_STRENGTH * (2 * _uniform((len(x), 3), generator, device) - 1)
        # The jitter acts on whole images and single pixels, so it commutes with the flip, which is done by
        # sampling the crop mirrored: crop, jitter, flip as in PMF, for the cost of crop and jitter.
        x = resized_crops(x, boxes, image_size, flip).round()
        return normalise(image_jitter(x, factors))

    return transform


def normalise(x: Tensor) -> Tensor:
    """0..255 values -> ToTensor scale -> ImageNet normalisation."""
    mean = torch.tensor(IMAGENET_MEAN, device=x.device).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD, device=x.device).view(1, 3, 1, 1)
    return (x * (1 / (255 * std))).sub_(mean / std)


def random_resized_crop_boxes(n: int, height: int, width: int, scale: tuple[float, float],
                              ratio: tuple[float, float], generator: torch.Generator | None,
                              attempts: int = 10) -> Tensor:
    """Per-image crop boxes (top, left, h, w), long (n, 4), with torchvision RandomResizedCrop.get_params rules:
    the first of 10 (area, log-ratio) draws that fits, else a centre crop with the ratio clamped."""
    device = generator.device if generator is not None else torch.device("cpu")
    area = height * width * (scale[0] + (scale[1] - scale[0]) * _uniform((n, attempts), generator, device))
    log_lo, log_hi = math.log(ratio[0]), math.log(ratio[1])
    aspect = torch.exp(log_lo + (log_hi - log_lo) * _uniform((n, attempts), generator, device))
    w = torch.round(torch.sqrt(area * aspect))
    h = torch.round(torch.sqrt(area / aspect))
    fits = (w > 0) & (h > 0) & (w <= width) & (h <= height)
    first = fits.to(torch.uint8).argmax(dim=1, keepdim=True)
    w, h = w.gather(1, first)[:, 0], h.gather(1, first)[:, 0]
    top = torch.floor(_uniform((n,), generator, device) * (height - h + 1))
    left = torch.floor(_uniform((n,), generator, device) * (width - w + 1))

    in_ratio = width / height
    if in_ratio < min(ratio):
        fallback_w, fallback_h = width, int(round(width / min(ratio)))
    elif in_ratio > max(ratio):
        fallback_w, fallback_h = int(round(height * max(ratio))), height
    else:
        fallback_w, fallback_h = width, height
    fallback = torch.tensor([(height - fallback_h) // 2, (width - fallback_w) // 2, fallback_h, fallback_w],
                            device=device, dtype=torch.float32)
    boxes = torch.stack([top, left, h, w], dim=1)
    return torch.where(fits.any(dim=1, keepdim=True), boxes, fallback).long()


def resized_crops(x: Tensor, boxes: Tensor, size: int, flip: Tensor | None = None) -> Tensor:
    """Crop box (top, left, h, w) of each image, resize it to size x size (bilinear) and mirror it left-right
    where `flip` is True, as one batched grid_sample (pixel centres as in PIL, align_corners=False; edges
    clamped)."""
    _, _, height, width = x.shape
    top, left, h, w = boxes.to(x.dtype).unbind(dim=1)
    theta = torch.zeros(len(x), 2, 3, dtype=x.dtype, device=x.device)
    theta[:, 0, 0] = w / width if flip is None else torch.where(flip, -w, w) / width
    theta[:, 0, 2] = (2 * left + w) / width - 1
    theta[:, 1, 1] = h / height
    theta[:, 1, 2] = (2 * top + h) / height - 1
    grid = F.affine_grid(theta, [len(x), x.shape[1], size, size], align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)


def image_jitter(x: Tensor, factors: Tensor) -> Tensor:
    """PIL ImageEnhance Brightness, Contrast, Color with per-image factors (k, 3), on 0..255 integer-valued
    images, with PIL's arithmetic: Image.blend(degenerate, image, f) truncated to uint8 after each step."""
    brightness, contrast, color = (factors[:, i].to(x.dtype).view(-1, 1, 1, 1) for i in range(3))
    x = _blend(torch.zeros((), dtype=x.dtype, device=x.device), x, brightness)
    mean = torch.floor(_luma(x).double().mean(dim=(1, 2, 3), keepdim=True) + 0.5).to(x.dtype)
    x = _blend(mean, x, contrast)
    return _blend(_luma(x), x, color)


def _blend(degenerate: Tensor, image: Tensor, factor: Tensor) -> Tensor:
    """Image.blend(degenerate, image, factor) = degenerate + factor * (image - degenerate), in float32 as PIL
    computes it, clipped to 0..255 and truncated; `degenerate` broadcasts (per image or per pixel)."""
    return (image - degenerate).mul_(factor).add_(degenerate).clamp_(0, 255).floor_()


def _luma(x: Tensor) -> Tensor:
    """PIL's RGB -> L conversion (ITU-R 601-2 in 16-bit fixed point), (k, 1, H, W); exact in float32."""
    return torch.floor((x[:, 0:1] * 19595 + x[:, 1:2] * 38470 + x[:, 2:3] * 7471 + 32768) / 65536)


def _resize(x: Tensor, size: int) -> Tensor:
    if x.shape[-2:] == (size, size):
        return x
    # Antialiasing (as PIL does) matters only when shrinking, and costs 3x when enlarging.
    return F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False, antialias=x.shape[-1] > size)


def _to_float(images: np.ndarray, device: torch.device) -> Tensor:
    if images.dtype != np.uint8 or images.ndim != 4 or images.shape[-1] != 3:
        raise ValueError(f"expected uint8 images of shape (k, H, W, 3), got {images.dtype} {images.shape}")
    return torch.from_numpy(np.ascontiguousarray(images)).to(device).permute(0, 3, 1, 2).contiguous().float()


def _uniform(shape: tuple[int, ...], generator: torch.Generator | None, device: torch.device) -> Tensor:
    return torch.rand(shape, generator=generator, device=device)

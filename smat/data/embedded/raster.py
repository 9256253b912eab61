"""Shared raster and augmentation helpers for the embedded benchmark, vectorised over image batches.

Images are float32 arrays in [0, 1], shaped (B, H, W, C). Generators draw at twice the output size and
box-downsample, which anti-aliases strokes and edges without any per-pixel Python loop.
"""

from __future__ import annotations

import zlib

import numpy as np
from PIL import Image, ImageDraw

IMAGE_SIZE = 32  # every image of the benchmark is 32x32 RGB
SUPERSAMPLE = 2  # generators draw at 64x64 and downsample
CANVAS = IMAGE_SIZE * SUPERSAMPLE


def domain_rng(seed: int, name: str) -> np.random.Generator:
    """One generator per (seed, domain); crc32 instead of hash() because hash() is salted per process."""
    return np.random.default_rng([seed, zlib.crc32(name.encode("utf-8"))])


def to_uint8(images: np.ndarray) -> np.ndarray:
    return np.clip(np.rint(images * 255.0), 0, 255).astype(np.uint8)


def downsample(images: np.ndarray, factor: int = SUPERSAMPLE) -> np.ndarray:
    """Box-average (B, H, W, C) by an integer factor."""
    b, h, w, c = images.shape
    return images.reshape(b, h // factor, factor, w // factor, factor, c).mean(axis=(2, 4))


def gray_to_rgb(images: np.ndarray) -> np.ndarray:
    """(B, H, W) or (B, H, W, 1) -> (B, H, W, 3)."""
    if images.ndim == 3:
        images = images[..., None]
    return np.repeat(images, 3, axis=-1)


def affine_inverse(
    angle: np.ndarray,
    shear: np.ndarray,
    scale: np.ndarray,
    translate: np.ndarray,
    center_in: np.ndarray,
    center_out: float,
) -> np.ndarray:
    """Inverse affine maps (B, 2, 3): output pixel (x, y) -> input pixel, for `warp`.

    The forward map rotates by `angle` (radians), shears x by `shear * y`, scales by `scale` ((B,) or
    (B, 2) for x/y) about `center_in`, and places that centre at `center_out + translate` (pixels).
    """
    n = angle.shape[0]
    scale = np.broadcast_to(np.asarray(scale, dtype=np.float64).reshape(n, -1), (n, 2))
    cos, sin = np.cos(angle), np.sin(angle)
    rotation = np.stack([np.stack([cos, -sin], -1), np.stack([sin, cos], -1)], -2)
    shearing = np.zeros((n, 2, 2))
    shearing[:, 0, 0] = shearing[:, 1, 1] = 1.0
    shearing[:, 0, 1] = shear
    forward = rotation @ shearing * scale[:, :, None]
    inverse = np.linalg.inv(forward)
    center_in = np.broadcast_to(np.asarray(center_in, dtype=np.float64), (n, 2))
    offset = center_in - np.einsum("bij,bj->bi", inverse, center_out + translate)
    return np.concatenate([inverse, offset[:, :, None]], axis=2)


def random_affine(
    rng: np.random.Generator,
    n: int,
    center_in: np.ndarray,
    rotation_deg: float,
    shear: float,
    scale: tuple[float, float],
    translate_px: float,
    aspect: tuple[float, float] = (1.0, 1.0),
    base_scale: np.ndarray | float = 1.0,
    center_out: float = (CANVAS - 1) / 2,
) -> np.ndarray:
    """Uniformly jittered inverse affine maps (see `affine_inverse`); x is stretched by `aspect` on top."""
    size = rng.uniform(*scale, n) * np.broadcast_to(base_scale, (n,))
    stretch = rng.uniform(*aspect, n)
    return affine_inverse(
        angle=np.deg2rad(rng.uniform(-rotation_deg, rotation_deg, n)),
        shear=rng.uniform(-shear, shear, n),
        scale=np.stack([size * stretch, size], axis=1),
        translate=rng.uniform(-translate_px, translate_px, (n, 2)),
        center_in=center_in,
        center_out=center_out,
    )


def smooth_field(rng: np.random.Generator, n: int, size: int, amplitude: float, grid: int = 4) -> np.ndarray:
    """Random smooth displacement fields (n, size, size, 2): Gaussian control points, bilinearly upsampled."""
    return upsample(rng.normal(0.0, amplitude, (n, grid, grid, 2)).astype(np.float32), size)


def upsample(coarse: np.ndarray, size: int) -> np.ndarray:
    """Bilinear upsampling of (n, g, g, C) control grids to (n, size, size, C), spanning the same extent."""
    up = _interpolation_matrix(coarse.shape[1], size).astype(coarse.dtype)
    return (up @ coarse.transpose(0, 3, 1, 2) @ up.T).transpose(0, 2, 3, 1)


def _interpolation_matrix(n_in: int, n_out: int) -> np.ndarray:
    """(n_out, n_in) linear interpolation weights."""
    pos = np.linspace(0.0, n_in - 1.0, n_out)
    lo = np.minimum(np.floor(pos).astype(int), n_in - 2)
    frac = pos - lo
    matrix = np.zeros((n_out, n_in))
    matrix[np.arange(n_out), lo] = 1.0 - frac
    matrix[np.arange(n_out), lo + 1] = frac
    return matrix


def warp(
    images: np.ndarray,
    inverse: np.ndarray,
    out_size: int,
    fill: float | np.ndarray = 0.0,
    displacement: np.ndarray | None = None,
) -> np.ndarray:
    """Bilinear resampling of (B, H, W, C) through inverse maps (B, 2, 3) (+ optional displacement).

    Samples that fall outside the input take `fill` (a scalar or one value per channel).
    """
    b, h, w, c = images.shape
    # Channels first, so that each gather reads one flat array with a precomputed index.
    padded = np.empty((b, c, h + 2, w + 2), dtype=np.float32)
    padded[...] = np.asarray(fill, dtype=np.float32).reshape(-1, 1, 1)
    padded[:, :, 1:-1, 1:-1] = images.transpose(0, 3, 1, 2)
    ys, xs = np.mgrid[0:out_size, 0:out_size].astype(np.float32)
    grid = np.stack([xs.ravel(), ys.ravel(), np.ones(out_size * out_size, np.float32)])  # (3, P)
    src = inverse.astype(np.float32) @ grid  # (B, 2, P)
    if displacement is not None:
        src += displacement.reshape(b, -1, 2).transpose(0, 2, 1)
    # +1 for the fill border; clipping into the border makes everything outside read `fill`.
    x = np.clip(src[:, 0] + 1.0, 0.0, w + 0.999)[:, None]
    y = np.clip(src[:, 1] + 1.0, 0.0, h + 0.999)[:, None]
    x0, y0 = x.astype(np.int64), y.astype(np.int64)  # floor: coordinates are >= 0
    fx, fy = x - np.floor(x), y - np.floor(y)
    stride, plane = w + 2, (h + 2) * (w + 2)
    index = x0 + y0 * stride + (np.arange(b * c) * plane).reshape(b, c, 1)
    flat = padded.ravel()
    top = flat[index] * (1 - fx) + flat[index + 1] * fx
    bottom = flat[index + stride] * (1 - fx) + flat[index + stride + 1] * fx
    out = top * (1 - fy) + bottom * fy  # (B, C, P)
    return out.reshape(b, c, out_size, out_size).transpose(0, 2, 3, 1)


def ink_boxes(masks: np.ndarray, threshold: float = 0.1) -> tuple[np.ndarray, np.ndarray]:
    """Centre (B, 2) as (x, y) and extent (B, 2) as (w, h) of the ink in (B, H, W) masks."""
    rows = masks.max(axis=2) > threshold
    cols = masks.max(axis=1) > threshold
    h, w = masks.shape[1:]
    top, bottom = rows.argmax(axis=1), h - 1 - rows[:, ::-1].argmax(axis=1)
    left, right = cols.argmax(axis=1), w - 1 - cols[:, ::-1].argmax(axis=1)
    center = np.stack([(left + right) / 2, (top + bottom) / 2], axis=1)
    extent = np.stack([right - left + 1, bottom - top + 1], axis=1)
    return center, extent


def cubic_bezier(controls: np.ndarray, n_points: int) -> np.ndarray:
    """Points on cubic Bézier curves: controls (..., 4, 2) -> (..., n_points, 2)."""
    t = np.linspace(0.0, 1.0, n_points)[:, None]
    p0, p1, p2, p3 = (controls[..., i, None, :] for i in range(4))
    u = 1.0 - t
    return u**3 * p0 + 3 * u**2 * t * p1 + 3 * u * t**2 * p2 + t**3 * p3


def draw_polylines(polylines: list[np.ndarray], widths: list[float], size: int = CANVAS) -> np.ndarray:
    """Rasterise polylines (pixel coordinates) as white strokes on black: (size, size) float in [0, 1]."""
    image = Image.new("L", (size, size), 0)
    draw = ImageDraw.Draw(image)
    for points, width in zip(polylines, widths):
        xy = [tuple(p) for p in np.round(points, 2).tolist()]
        draw.line(xy, fill=255, width=max(1, int(round(width))), joint="curve")
        radius = width / 2  # round caps: PIL draws butt ends
        for x, y in (xy[0], xy[-1]):
            draw.ellipse((x - radius, y - radius, x + radius, y + radius), fill=255)
    return np.asarray(image, dtype=np.float32) / 255.0


def mix(background: np.ndarray, foreground: np.ndarray, alpha: np.ndarray) -> np.ndarray:
    """Alpha blend; alpha broadcasts over the channel axis."""
    if alpha.ndim == background.ndim - 1:
        alpha = alpha[..., None]
    return background * (1.0 - alpha) + foreground * alpha

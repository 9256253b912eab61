"""FractalDB-like domain: a class is an iterated function system (IFS) of 2-4 contractive affine maps.

Images are rendered with the chaos game, vectorised over all images of a class and many chains per image
(notes pitfall 5). Every image perturbs the maps slightly (FractalDB's intra-class variation), and is drawn
with a new colour, rotation and placement; the attractor is always scaled to fill the frame.
"""

from __future__ import annotations

import numpy as np
from matplotlib.colors import hsv_to_rgb

from smat.data.embedded.raster import CANVAS, downsample, to_uint8
from smat.data.embedded.writing import DomainImages

CHAINS = 256  # parallel chaos-game chains per image
STEPS = 40  # steps per chain; the first BURN_IN are not drawn
BURN_IN = 8
MAX_MAPS = 4
FILL_RANGE = (0.08, 0.45)  # fraction of pixels an attractor must cover: rejects dust and blobs
CANDIDATES = 32  # IFSs drawn and screened at once


def generate(n_classes: int, n_images: int, rng: np.random.Generator) -> DomainImages:
    names, images = [], []
    while len(names) < n_classes:
        maps, probs = _random_ifs(rng, CANDIDATES)
        hits = _rasterise(_chaos_game(maps, probs, rng), np.zeros(CANDIDATES), margin=0.05)
        fill = (downsample(hits[..., None])[..., 0] > 0).mean(axis=(1, 2))
        for i in np.flatnonzero((fill >= FILL_RANGE[0]) & (fill <= FILL_RANGE[1]))[: n_classes - len(names)]:
            names.append(f"ifs-{len(names):03d}")
            images.append(_render(maps[i], probs[i], n_images, rng))
    return DomainImages(names, images)


def _random_ifs(rng: np.random.Generator, n: int) -> tuple[np.ndarray, np.ndarray]:
    """n IFSs of 2-4 maps, padded to MAX_MAPS: maps (n, MAX_MAPS, 2, 3) as [A | b], probabilities ~ |det A|.

    A = R(a) diag(s) R(b), possibly mirrored, with singular values s in (0.2, 0.85): contractive.
    """
    shape = (n, MAX_MAPS)
    singular = rng.uniform(0.2, 0.85, shape + (2,))
    linear = _rotation(rng.uniform(0, 2 * np.pi, shape)) * singular[..., None, :]
    linear = linear @ _rotation(rng.uniform(0, 2 * np.pi, shape))
    linear[..., :, 0] *= np.where(rng.random(shape) < 0.3, -1.0, 1.0)[..., None]
    maps = np.concatenate([linear, rng.uniform(-1, 1, shape + (2, 1))], axis=-1)
    used = np.arange(MAX_MAPS) < rng.integers(2, MAX_MAPS + 1, (n, 1))
    weight = np.abs(np.linalg.det(linear)) * used
    return maps, weight / weight.sum(axis=1, keepdims=True)


def _rotation(angle: np.ndarray) -> np.ndarray:
    cos, sin = np.cos(angle), np.sin(angle)
    return np.stack([np.stack([cos, -sin], -1), np.stack([sin, cos], -1)], -2)


def _chaos_game(maps: np.ndarray, probs: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Points (B, CHAINS * (STEPS - BURN_IN), 2) on the attractors of B IFSs: maps (B, N, 2, 3), probs (B, N)."""
    b, n_maps = maps.shape[:2]
    x, y = rng.uniform(-1, 1, (2, b, CHAINS)).astype(np.float32)
    # Inverse-CDF map choice: each IFS has its own probabilities (unused maps have probability 0).
    u = rng.random((STEPS, b, CHAINS), dtype=np.float32)
    cdf = np.cumsum(probs, axis=1).astype(np.float32)
    choice = sum((u > cdf[:, k, None]).astype(np.int64) for k in range(n_maps - 1))
    # The coefficients (a, c, e, b', d, f) of every step's map, gathered at once: x' = a x + c y + e.
    coef = maps.reshape(b * n_maps, 6).astype(np.float32)[choice + n_maps * np.arange(b)[:, None]]
    xs, ys = [], []
    for step in range(STEPS):
        a, c, e, bb, d, f = np.moveaxis(coef[step], -1, 0)
        x, y = a * x + c * y + e, bb * x + d * y + f
        if step >= BURN_IN:
            xs.append(x)
            ys.append(y)
    return np.stack([np.concatenate(xs, axis=1), np.concatenate(ys, axis=1)], axis=-1)


def _rasterise(points: np.ndarray, angle: np.ndarray, margin: float) -> np.ndarray:
    """Hit counts (B, CANVAS, CANVAS): each attractor rotated and scaled to fill the frame."""
    b = points.shape[0]
    cos, sin = np.cos(angle)[:, None], np.sin(angle)[:, None]
    x = points[..., 0] * cos - points[..., 1] * sin
    y = points[..., 0] * sin + points[..., 1] * cos
    # Robust extent from a subsample: a few chains may still be on their way to the attractor.
    sample = np.stack([x[:, ::16], y[:, ::16]], axis=-1)
    low, high = np.percentile(sample, 0.5, axis=1), np.percentile(sample, 99.5, axis=1)
    scale = (CANVAS * (1 - 2 * margin)) / np.maximum((high - low).max(axis=1), 1e-6)
    centre = (low + high) / 2
    col = np.floor((x - centre[:, :1]) * scale[:, None] + CANVAS / 2).astype(np.int64)
    row = np.floor((y - centre[:, 1:]) * scale[:, None] + CANVAS / 2).astype(np.int64)
    inside = (col >= 0) & (col < CANVAS) & (row >= 0) & (row < CANVAS)
    flat = (np.arange(b)[:, None] * CANVAS * CANVAS + row * CANVAS + col)[inside]
    return np.bincount(flat, minlength=b * CANVAS * CANVAS).reshape(b, CANVAS, CANVAS).astype(np.float32)


def _render(maps: np.ndarray, probs: np.ndarray, n: int, rng: np.random.Generator) -> np.ndarray:
    perturbed = maps * rng.uniform(0.88, 1.12, (n,) + maps.shape)
    points = _chaos_game(perturbed, np.broadcast_to(probs, (n, len(probs))), rng)
    hits = _rasterise(points, rng.uniform(-np.pi / 2, np.pi / 2, n), margin=0.08)
    hits = np.where(rng.random((n, 1, 1)) < 0.5, hits, hits[:, :, ::-1])  # mirror images
    density = np.log1p(hits) / np.log1p(hits).max(axis=(1, 2), keepdims=True)
    density = downsample(np.minimum(1.0, 1.6 * density)[..., None])
    colour = hsv_to_rgb(np.stack([rng.uniform(0, 1, n), rng.uniform(0.3, 0.9, n), np.ones(n)], 1))
    return to_uint8(density * colour[:, None, None, :])

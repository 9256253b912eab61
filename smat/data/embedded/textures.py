"""DTD-like texture domain: a class is a pattern kind with its own scale, orientation, shape and colours.

Every image re-draws the pattern with a new phase (or new random cells, noise, centre), a jittered scale,
orientation and colour, uneven lighting and sensor noise, so that, as in DTD, a class is recognised by its
texture rather than by any fixed pixel layout.
"""

from __future__ import annotations

import numpy as np
from matplotlib.colors import hsv_to_rgb

from smat.data.embedded.raster import CANVAS, downsample, to_uint8
from smat.data.embedded.writing import DomainImages

KINDS = ("stripes", "checks", "dots", "noise", "cells", "waves", "plaid", "rings", "marble", "zigzag",
         "fibres", "lattice")


def generate(n_classes: int, n_images: int, rng: np.random.Generator) -> DomainImages:
    kinds = [KINDS[i % len(KINDS)] for i in rng.permutation(n_classes)]
    names, images = [], []
    for i, kind in enumerate(kinds):
        params = _class_params(kind, rng)
        names.append(f"{kind}-{i:03d}")
        images.append(_render(kind, params, n_images, rng))
    return DomainImages(names, images)


def _class_params(kind: str, rng: np.random.Generator) -> dict:
    hue = rng.uniform(0, 1)
    # Two related material colours: DTD textures are rarely saturated primaries.
    dark = hsv_to_rgb([hue, rng.uniform(0.2, 0.8), rng.uniform(0.1, 0.45)])
    light = hsv_to_rgb([(hue + rng.normal(0, 0.08)) % 1, rng.uniform(0.1, 0.6), rng.uniform(0.6, 0.95)])
    return {
        "colours": (dark, light),
        "frequency": rng.uniform(2.0, 7.0),  # cycles per image
        "angle": rng.uniform(0, np.pi),
        "sharpness": rng.choice([1.0, 4.0, 16.0]),  # soft sinusoid .. hard-edged pattern
        "duty": rng.uniform(-0.5, 0.5),  # fraction of dark vs light
        "aspect": rng.uniform(1.0, 3.0),
        "warp": rng.uniform(0.5, 2.5),
        "beta": rng.uniform(1.2, 2.6),  # spectral slope of the noise kinds
    }


def _render(kind: str, p: dict, n: int, rng: np.random.Generator) -> np.ndarray:
    ys, xs = np.mgrid[0:CANVAS, 0:CANVAS] / CANVAS - 0.5  # image coordinates in [-0.5, 0.5)
    angle = p["angle"] + rng.normal(0, 0.1, (n, 1, 1))
    freq = p["frequency"] * rng.uniform(0.9, 1.1, (n, 1, 1))
    phase = rng.uniform(0, 2 * np.pi, (n, 2, 1, 1))
    u = xs * np.cos(angle) + ys * np.sin(angle)
    v = -xs * np.sin(angle) + ys * np.cos(angle)
    wave = 2 * np.pi * freq
    if kind == "stripes":
        field = np.sin(wave * u + phase[:, 0])
    elif kind == "checks":
        field = np.sin(wave * u + phase[:, 0]) * np.sin(wave * v + phase[:, 1]) * 2
    elif kind == "dots":
        cell_u = np.cos(wave * u / 2 + phase[:, 0])
        cell_v = np.cos(wave * v / 2 + phase[:, 1])
        field = np.abs(cell_u * cell_v) * 4 - 2
    elif kind == "noise":
        field = _fractal_noise(rng, n, p["beta"], 1.0) * 2
    elif kind == "cells":
        field = _cells(rng, n, xs, ys, int(freq.mean() ** 2 * 1.2) + 4)
    elif kind == "waves":
        field = np.sin(wave * u + p["warp"] * np.sin(wave / p["aspect"] * v + phase[:, 1]) + phase[:, 0])
    elif kind == "plaid":
        field = np.sin(wave * u + phase[:, 0]) + np.sin(wave / p["aspect"] * v + phase[:, 1])
    elif kind == "rings":
        centre = rng.uniform(-0.4, 0.4, (n, 2, 1, 1))
        radius = np.hypot(xs - centre[:, 0], (ys - centre[:, 1]) * p["aspect"] ** 0.5)
        field = np.sin(wave * radius + phase[:, 0])
    elif kind == "marble":
        turbulence = _fractal_noise(rng, n, 3.5, 1.0)  # smooth veins: a steep spectrum
        field = np.sin(wave * u + p["warp"] * 1.5 * turbulence + phase[:, 0])
    elif kind == "zigzag":
        triangle = np.abs(((wave / p["aspect"] * v + phase[:, 1]) / np.pi) % 2 - 1)
        field = np.sin(wave * u + p["warp"] * 2 * triangle + phase[:, 0])
    elif kind == "fibres":
        field = _fractal_noise(rng, n, p["beta"], 6.0 * p["aspect"], angle[:, 0, 0]) * 2
    elif kind == "lattice":
        field = np.maximum(np.cos(wave * u + phase[:, 0]), np.cos(wave * v + phase[:, 1]))
    else:
        raise ValueError(f"unknown texture kind {kind!r}")
    mask = 1.0 / (1.0 + np.exp(-p["sharpness"] * (field + p["duty"])))
    dark, light = (np.asarray(c)[None, None, None, :] for c in p["colours"])
    colour_jitter = rng.normal(1.0, 0.06, (n, 1, 1, 3))
    images = (dark + (light - dark) * mask[..., None]) * colour_jitter
    # Uneven lighting: a linear brightness ramp in a random direction, and an overall exposure.
    direction = rng.uniform(0, 2 * np.pi, (n, 1, 1))
    ramp = rng.uniform(-0.5, 0.5, (n, 1, 1)) * (xs * np.cos(direction) + ys * np.sin(direction))
    images = images * ((1.0 + ramp) * rng.uniform(0.8, 1.15, (n, 1, 1)))[..., None]
    images = downsample(images.astype(np.float32))
    images += rng.normal(0, 0.02, images.shape).astype(np.float32)
    return to_uint8(images)


def _fractal_noise(rng: np.random.Generator, n: int, beta: float, stretch: float,
                   angle: np.ndarray | float = 0.0) -> np.ndarray:
    """Gaussian noise with a 1/f^beta spectrum, stretched `stretch` times along `angle`: (n, CANVAS, CANVAS)."""
    fy = np.fft.fftfreq(CANVAS)[None, :, None]
    fx = np.fft.rfftfreq(CANVAS)[None, None, :]
    angle = np.asarray(angle, dtype=float).reshape(-1, 1, 1)
    along = fx * np.cos(angle) + fy * np.sin(angle)
    across = -fx * np.sin(angle) + fy * np.cos(angle)
    radius = np.hypot(along * stretch, across)
    amplitude = np.where(radius > 0, np.maximum(radius, 1.0 / CANVAS) ** (-beta / 2), 0.0)
    spectrum = (rng.normal(size=(n,) + radius.shape[1:]) + 1j * rng.normal(size=(n,) + radius.shape[1:]))
    noise = np.fft.irfft2(spectrum * amplitude, s=(CANVAS, CANVAS))
    return noise / noise.std(axis=(1, 2), keepdims=True)


def _cells(rng: np.random.Generator, n: int, xs: np.ndarray, ys: np.ndarray, n_seeds: int) -> np.ndarray:
    """Voronoi cells with dark borders (F2 - F1 distance), on a torus so the pattern has no edge effects."""
    seeds = rng.uniform(-0.5, 0.5, (n, n_seeds, 1, 2))
    points = np.stack([xs.ravel(), ys.ravel()], axis=-1)[None, None]  # (1, 1, P, 2)
    delta = np.abs(points - seeds)
    delta = np.minimum(delta, 1.0 - delta)
    dist = np.sqrt((delta**2).sum(-1))  # (n, seeds, P)
    nearest = np.partition(dist, 1, axis=1)[:, :2]
    edge = (nearest[:, 1] - nearest[:, 0]) * np.sqrt(n_seeds)
    return (edge.reshape(n, CANVAS, CANVAS) - 0.25) * 8

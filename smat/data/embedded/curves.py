"""Parametric-curve domain (out-of-domain): Lissajous figures, roses, hypo- and epitrochoids, spirals.

A class is a curve family with integer parameters; every image draws it with a new phase, rotation, size,
aspect, pen width and colour, as a bright trace on a dark background.
"""

from __future__ import annotations

from math import gcd

import numpy as np
from matplotlib.colors import hsv_to_rgb

from smat.data.embedded.raster import CANVAS, downsample, draw_polylines, to_uint8
from smat.data.embedded.writing import DomainImages

POINTS = 480


def curve_classes() -> list[tuple[str, tuple[int, ...]]]:
    """Every (family, integer parameters) this domain can draw, in a fixed order."""
    classes = [("lissajous", (a, b)) for b in range(2, 7) for a in range(1, b) if gcd(a, b) == 1]
    classes += [("rose", (n, d)) for n in range(1, 8) for d in range(1, 5) if gcd(n, d) == 1 and n != d]
    classes += [("hypotrochoid", (big, small, pen)) for big in range(3, 8) for small in range(1, big)
                if gcd(big, small) == 1 for pen in (6, 14)]
    classes += [("epitrochoid", (big, small, pen)) for big in range(1, 6) for small in range(1, 4)
                if gcd(big, small) == 1 for pen in (5, 12)]
    classes += [("spiral", (turns,)) for turns in range(2, 6)]
    return classes


def generate(n_classes: int, n_images: int, rng: np.random.Generator) -> DomainImages:
    available = curve_classes()
    if n_classes > len(available):
        raise ValueError(f"curves: at most {len(available)} classes, asked for {n_classes}")
    chosen = sorted(rng.choice(len(available), n_classes, replace=False).tolist())
    names, images = [], []
    for index in chosen:
        family, params = available[index]
        names.append("-".join([family, *map(str, params)]))
        images.append(_render(family, params, n_images, rng))
    return DomainImages(names, images)


def _points(family: str, params: tuple[int, ...], phase: float) -> np.ndarray:
    """Points (POINTS, 2) of one curve, roughly within [-1, 1]^2."""
    if family == "lissajous":
        a, b = params
        t = np.linspace(0, 2 * np.pi, POINTS)
        return np.stack([np.sin(a * t + np.pi / 4 + phase), np.sin(b * t)], 1)
    if family == "rose":
        n, d = params
        t = np.linspace(0, 2 * np.pi * d, POINTS)
        r = np.cos(n / d * t + phase)
        return np.stack([r * np.cos(t), r * np.sin(t)], 1)
    if family in ("hypotrochoid", "epitrochoid"):
        big, small, pen = params
        sign = -1 if family == "hypotrochoid" else 1
        t = np.linspace(0, 2 * np.pi * small / gcd(big, small), POINTS)
        arm = pen / 10 * small * (1 + phase)
        ratio = (big + sign * small) / small
        x = (big + sign * small) * np.cos(t) - sign * arm * np.cos(ratio * t)
        y = (big + sign * small) * np.sin(t) - arm * np.sin(ratio * t)
        points = np.stack([x, y], 1)
        return points / np.abs(points).max()
    if family == "spiral":
        (turns,) = params
        t = np.linspace(0, 2 * np.pi * turns, POINTS)
        r = (t / t[-1]) ** (1 + phase)
        return np.stack([r * np.cos(t), r * np.sin(t)], 1)
    raise ValueError(f"unknown curve family {family!r}")


def _render(family: str, params: tuple[int, ...], n: int, rng: np.random.Generator) -> np.ndarray:
    traces = np.empty((n, CANVAS, CANVAS), dtype=np.float32)
    for i in range(n):
        points = _points(family, params, rng.normal(0, 0.12))
        angle = rng.uniform(-0.3, 0.3)
        rotation = np.array([[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]])
        scale = CANVAS * 0.42 * rng.uniform(0.8, 1.0) * np.array([1.0, rng.uniform(0.8, 1.2)])
        points = (points * scale) @ rotation.T + CANVAS / 2 + rng.normal(0, 1.5, 2)
        traces[i] = draw_polylines([points], [rng.uniform(1.5, 3.0)])
    hue = rng.uniform(0, 1, n)
    ink = hsv_to_rgb(np.stack([hue, rng.uniform(0.3, 0.8, n), rng.uniform(0.8, 1.0, n)], 1))
    paper = hsv_to_rgb(np.stack([(hue + 0.5) % 1, rng.uniform(0.2, 0.6, n), rng.uniform(0.05, 0.2, n)], 1))
    alpha = downsample(traces[..., None])
    return to_uint8(paper[:, None, None] * (1 - alpha) + ink[:, None, None] * alpha)

"""QuickDraw-like sketch domain: a class is a doodle prototype of 2-5 pen strokes.

A prototype is an outline (ellipse, polygon or closed blob) plus open strokes (curves, lines, loops)
attached to it. Every image redraws it the way a person would: control points moved, the whole drawing
rotated, stretched and shifted, a hand tremor along each stroke, a pen of varying width, and now and
then a stroke left out.
"""

from __future__ import annotations

import numpy as np

from smat.data.embedded.raster import CANVAS, cubic_bezier, downsample, draw_polylines, gray_to_rgb, to_uint8
from smat.data.embedded.writing import DomainImages

POINTS_PER_STROKE = 48


def generate(n_classes: int, n_images: int, rng: np.random.Generator) -> DomainImages:
    names, images = [], []
    for i in range(n_classes):
        strokes = _prototype(rng)
        names.append(f"sketch-{i:03d}")
        images.append(_render(strokes, n_images, rng))
    return DomainImages(names, images)


def _prototype(rng: np.random.Generator) -> list[np.ndarray]:
    """Strokes as arrays of points in [0, 1]^2 (sampled densely, so jitter can be applied per point)."""
    strokes = [_outline(rng)]
    for _ in range(rng.integers(1, 5)):
        start = strokes[rng.integers(len(strokes))]
        anchor = start[rng.integers(len(start))]  # strokes start on the drawing, as doodles do
        strokes.append(_open_stroke(anchor, rng))
    # QuickDraw drawings are centred and scaled to fill the frame.
    points = np.concatenate(strokes)
    low, high = points.min(axis=0), points.max(axis=0)
    scale = 0.8 / (high - low).max()
    return [(s - (low + high) / 2) * scale + 0.5 for s in strokes]


def _outline(rng: np.random.Generator) -> np.ndarray:
    centre = rng.uniform(0.38, 0.62, 2)
    radii = rng.uniform(0.12, 0.3, 2)
    t = np.linspace(0, 2 * np.pi, POINTS_PER_STROKE)
    kind = rng.choice(["ellipse", "polygon", "blob"])
    if kind == "ellipse":
        r = np.ones_like(t)
    elif kind == "polygon":
        sides = rng.integers(3, 7)
        corner = 2 * np.pi / sides
        r = np.cos(corner / 2) / np.cos((t + rng.uniform(0, corner)) % corner - corner / 2)
    else:
        r = 1.0 + sum(rng.normal(0, 0.12) * np.cos(k * t + rng.uniform(0, 2 * np.pi)) for k in range(2, 5))
    return centre + np.stack([np.cos(t) * radii[0], np.sin(t) * radii[1]], axis=1) * r[:, None]


def _open_stroke(anchor: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    kind = rng.choice(["curve", "line", "loop", "zigzag"], p=[0.4, 0.3, 0.15, 0.15])
    direction = rng.uniform(0, 2 * np.pi)
    length = rng.uniform(0.15, 0.4)
    end = np.clip(anchor + length * np.array([np.cos(direction), np.sin(direction)]), 0.05, 0.95)
    t = np.linspace(0, 1, POINTS_PER_STROKE)[:, None]
    if kind == "curve":
        thirds = anchor + (end - anchor) * np.array([[1 / 3], [2 / 3]]) + rng.normal(0, 0.15, (2, 2))
        return cubic_bezier(np.stack([anchor, thirds[0], thirds[1], end]), POINTS_PER_STROKE)
    if kind == "line":
        return anchor + (end - anchor) * t
    normal = np.array([-(end - anchor)[1], (end - anchor)[0]])
    if kind == "loop":
        turns = np.sin(t * 2 * np.pi * rng.integers(1, 3)) * rng.uniform(0.2, 0.5)
        return anchor + (end - anchor) * t + normal * turns
    teeth = rng.integers(2, 5)
    triangle = np.abs((t * teeth * 2) % 2 - 1) - 0.5
    return anchor + (end - anchor) * t + normal * triangle * rng.uniform(0.3, 0.6)


def _render(strokes: list[np.ndarray], n: int, rng: np.random.Generator) -> np.ndarray:
    ink = np.empty((n, CANVAS, CANVAS), dtype=np.float32)
    for i in range(n):
        angle = rng.normal(0, 0.15)
        scale = rng.uniform(0.8, 1.1) * np.array([1.0, rng.uniform(0.85, 1.15)])
        shift = rng.normal(0, 0.05, 2)
        rotation = np.array([[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]])
        width = rng.uniform(1.5, 3.5)
        polylines = []
        for k, stroke in enumerate(strokes):
            if k > 0 and rng.random() < 0.1:
                continue  # a stroke left out
            moved = stroke + rng.normal(0, 0.025, 2) + _tremor(rng, len(stroke))
            points = ((moved - 0.5) * scale) @ rotation.T + 0.5 + shift
            polylines.append(points * CANVAS)
        ink[i] = draw_polylines(polylines, [width] * len(polylines))
    return to_uint8(gray_to_rgb(1.0 - downsample(ink[..., None])[..., 0]))


def _tremor(rng: np.random.Generator, n_points: int) -> np.ndarray:
    """A slow random wobble along a stroke (integrated noise, smoothed)."""
    steps = rng.normal(0, 0.004, (n_points, 2)).cumsum(axis=0)
    bend = rng.normal(0, 0.02, 2) * np.sin(np.linspace(0, np.pi, n_points))[:, None]
    return steps - steps.mean(axis=0) + bend

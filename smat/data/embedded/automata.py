"""Elementary cellular automata (out-of-domain): a class is one rule, drawn as a space-time diagram.

A rule, its mirror image and its complement draw the same patterns up to a flip or a colour swap, so only
one rule of each equivalence class is used, and each class keeps one palette, fixed per class, for its
"on" and "off" cells (notes pitfall 1). Rules whose patterns die out or freeze into a uniform colour are
left out. Every image starts from a new random row and shows a new window of space and time.
"""

from __future__ import annotations

import functools

import numpy as np

from smat.data.embedded.raster import IMAGE_SIZE, to_uint8
from smat.data.embedded.writing import DomainImages

WIDTH = 64  # cells simulated per row (periodic); the image shows a 32-cell window
WARM_UP = 8  # most steps skipped before the window starts
PALETTES = np.array([  # (off, on) colours; classes share palettes, so colour alone cannot name a class
    [(0.97, 0.97, 0.95), (0.1, 0.1, 0.12)], [(0.1, 0.1, 0.15), (0.95, 0.85, 0.3)],
    [(0.9, 0.95, 1.0), (0.15, 0.3, 0.7)], [(0.15, 0.05, 0.1), (0.9, 0.35, 0.3)],
    [(0.95, 0.92, 0.8), (0.2, 0.5, 0.25)], [(0.05, 0.15, 0.15), (0.4, 0.9, 0.85)],
])


def _mirror(rule: int) -> int:
    """The rule applied to the mirrored neighbourhood (left and right swapped)."""
    bits = [(rule >> n) & 1 for n in range(8)]
    return sum(bits[((n & 1) << 2) | (n & 2) | (n >> 2)] << n for n in range(8))


def _complement(rule: int) -> int:
    """The rule with 0 and 1 swapped in inputs and output."""
    return sum((1 - ((rule >> (7 - n)) & 1)) << n for n in range(8))


@functools.cache
def rule_classes() -> tuple[int, ...]:
    """The smallest rule of every mirror/complement equivalence class whose patterns stay alive."""
    rules = sorted({min(r, _mirror(r), _complement(r), _mirror(_complement(r))) for r in range(256)})
    rng = np.random.default_rng(0)  # a fixed probe: the rule list must not depend on the build seed
    return tuple(r for r in rules if _lively(_run(r, rng.random((16, WIDTH)) < 0.5, 2 * IMAGE_SIZE)))


def _run(rule: int, row: np.ndarray, steps: int) -> np.ndarray:
    """Space-time diagrams (B, steps, WIDTH) from initial rows (B, WIDTH)."""
    table = np.array([(rule >> n) & 1 for n in range(8)], dtype=bool)
    rows = [row]
    for _ in range(steps - 1):
        left, right = np.roll(row, 1, axis=1), np.roll(row, -1, axis=1)
        row = table[(left.astype(np.int64) << 2) | (row.astype(np.int64) << 1) | right.astype(np.int64)]
        rows.append(row)
    return np.stack(rows, axis=1)


def _lively(diagrams: np.ndarray) -> bool:
    """Late rows are not uniform: the pattern did not die out or fill the row."""
    late = diagrams[:, -IMAGE_SIZE:].mean(axis=2)
    return bool(((late > 0.06) & (late < 0.94)).mean() > 0.9)


def generate(n_classes: int, n_images: int, rng: np.random.Generator) -> DomainImages:
    available = rule_classes()
    if n_classes > len(available):
        raise ValueError(f"automata: at most {len(available)} classes, asked for {n_classes}")
    rules = sorted(rng.choice(available, n_classes, replace=False).tolist())
    names, images = [], []
    for rule in rules:
        palette = PALETTES[rng.integers(len(PALETTES))]
        names.append(f"rule-{rule:03d}")
        images.append(_render(rule, palette, n_images, rng))
    return DomainImages(names, images)


def _render(rule: int, palette: np.ndarray, n: int, rng: np.random.Generator) -> np.ndarray:
    density = rng.uniform(0.3, 0.7, (n, 1))
    diagrams = _run(rule, rng.random((n, WIDTH)) < density, WARM_UP + IMAGE_SIZE)
    start = rng.integers(0, WARM_UP + 1, n)
    left = rng.integers(0, WIDTH - IMAGE_SIZE + 1, n)
    rows = start[:, None] + np.arange(IMAGE_SIZE)
    cols = left[:, None] + np.arange(IMAGE_SIZE)
    window = diagrams[np.arange(n)[:, None, None], rows[:, :, None], cols[:, None, :]]
    images = np.where(window[..., None], palette[1], palette[0])
    return to_uint8(images + rng.normal(0, 0.02, images.shape))

"""Real handwritten digits (out-of-domain): scikit-learn's bundled 8x8 `load_digits`, upscaled to 32x32.

The only real image data that ships inside a common wheel (nothing is downloaded). Ten classes, so
episodes on this domain are 5-way; each class keeps a seeded random subset of its ~180 images.
"""

from __future__ import annotations

import numpy as np
from PIL import Image
from sklearn.datasets import load_digits

from smat.data.embedded.raster import IMAGE_SIZE, gray_to_rgb
from smat.data.embedded.writing import DomainImages

N_DIGITS = 10


def generate(n_classes: int, n_images: int, rng: np.random.Generator) -> DomainImages:
    if n_classes > N_DIGITS:
        raise ValueError(f"digits: there are only {N_DIGITS} classes, asked for {n_classes}")
    data = load_digits()
    names, images = [], []
    for digit in range(n_classes):
        rows = np.flatnonzero(data.target == digit)
        chosen = np.sort(rng.choice(rows, min(n_images, len(rows)), replace=False))
        names.append(f"digit-{digit}")
        images.append(np.stack([_upscale(data.images[i]) for i in chosen]))
    return DomainImages(names, images)


def _upscale(digit: np.ndarray) -> np.ndarray:
    """8x8 ink levels 0..16 -> 32x32 RGB, dark ink on white like the glyph domains."""
    gray = Image.fromarray(np.rint(255 - digit * (255 / 16)).astype(np.uint8))
    return gray_to_rgb(np.asarray(gray.resize((IMAGE_SIZE, IMAGE_SIZE), Image.Resampling.BICUBIC))[None])[0]

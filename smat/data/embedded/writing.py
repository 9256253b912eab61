"""What a domain generator returns, and how it is written: class folders of PNGs and a sample grid."""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from smat.data.embedded.raster import IMAGE_SIZE

SAFE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
GRID_CLASSES = 8
GRID_IMAGES = 8
GRID_ZOOM = 3
GRID_GAP = 4


@dataclass
class DomainImages:
    class_names: list[str]
    images: list[np.ndarray]  # per class: uint8 (n, 32, 32, 3)
    groups: dict[str, str] | None = None  # class name -> group name (glyph domains only)

    def __post_init__(self) -> None:
        if len(self.class_names) != len(self.images) or len(set(self.class_names)) != len(self.class_names):
            raise ValueError("class names must be unique and match the image arrays")
        for name, images in zip(self.class_names, self.images):
            if not SAFE_NAME.match(name):
                raise ValueError(f"class name {name!r} is not a safe folder name")
            if images.dtype != np.uint8 or images.shape[1:] != (IMAGE_SIZE, IMAGE_SIZE, 3):
                raise ValueError(f"class {name}: expected uint8 (n, 32, 32, 3), got {images.dtype} {images.shape}")


def write_class_folders(domain_dir: Path, data: DomainImages) -> None:
    """DOMAIN/{class}/{i:04d}.png. PIL writes no timestamps, so the bytes depend only on the pixels."""
    for name, images in zip(data.class_names, data.images):
        class_dir = domain_dir / name
        class_dir.mkdir(parents=True)
        for i, image in enumerate(images):
            Image.fromarray(image).save(class_dir / f"{i:04d}.png", format="PNG")


def write_grid(path: Path, data: DomainImages) -> None:
    """One row per class (8 classes spread over the class list), 8 images each, upscaled for viewing."""
    n_classes = len(data.class_names)
    rows = np.unique(np.linspace(0, n_classes - 1, min(GRID_CLASSES, n_classes)).round().astype(int))
    cell = IMAGE_SIZE * GRID_ZOOM + GRID_GAP
    grid = np.full((len(rows) * cell + GRID_GAP, GRID_IMAGES * cell + GRID_GAP, 3), 128, dtype=np.uint8)
    for r, class_id in enumerate(rows):
        images = data.images[class_id][:GRID_IMAGES]
        for c, image in enumerate(images):
            zoomed = image.repeat(GRID_ZOOM, axis=0).repeat(GRID_ZOOM, axis=1)
            y, x = GRID_GAP + r * cell, GRID_GAP + c * cell
            grid[y : y + zoomed.shape[0], x : x + zoomed.shape[1]] = zoomed
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(grid).save(path, format="PNG", compress_level=3)  # large image: faster, barely bigger

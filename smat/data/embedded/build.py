"""`smat data build-embedded`: the offline multi-domain few-shot benchmark, written as a raw download.

Layout (docs/ARCHITECTURE.md, "Files"):
    OUT/{domain}/{class}/{i:04d}.png   32x32 RGB
    OUT/{domain}/splits.json           {"train", "val", "test"[, "groups"]} class lists
    OUT/benchmark.json                 {"domains": {name: {"role", "kind", "n_classes", "images_per_class"}},
                                        "seed", "size", "versions"}
    OUT/grids/{domain}.png             8 classes x 8 images, for people to look at

The build goes into a sibling temporary folder that is renamed to OUT only when everything is written, so
an interrupted build never leaves a folder that looks complete. Every random draw comes from
(seed, domain name), so the same seed and size give the same bytes in every file.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import matplotlib
import numpy as np
import PIL
import PIL.features
import sklearn

import smat
from smat.data.embedded import automata, curves, digits, fractals, glyphs, signs, sketches, textures
from smat.data.embedded.raster import domain_rng
from smat.data.embedded.splits import grouped_splits, plan_groups, split_classes
from smat.data.embedded.writing import DomainImages, write_class_folders, write_grid
from smat.io import SmatError, atomic_dir, write_json
from smat.progress import progress_bar

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Size:
    id_classes: int  # classes per meta-training (glyph) domain
    ood_classes: int  # classes per out-of-domain domain (digits: all 10)
    images_per_class: int  # of the id and ood domains
    pretrain_classes: int  # classes per pre-training domain: the broad corpus in ImageNet's role
    pretrain_images: int
    digit_images: int  # real digits per class (there are ~180)
    group_sizes: tuple[int, int]  # classes per glyph group ("alphabet"), inclusive range


SIZES = {
    "default": Size(id_classes=100, ood_classes=60, images_per_class=20, pretrain_classes=400, pretrain_images=12,
                    digit_images=40, group_sizes=(8, 14)),
    "ci": Size(id_classes=25, ood_classes=10, images_per_class=8, pretrain_classes=25, pretrain_images=8,
               digit_images=8, group_sizes=(5, 5)),
}


@dataclass(frozen=True)
class Domain:
    name: str
    role: str  # "pretrain", "id" or "ood": see the comment above DOMAINS
    kind: str  # generator family


# Roles mirror the paper's structure (README, "What the default run computes"):
#   pretrain: a broad corpus of pictures in ImageNet's role; the backbone pre-trains on its train classes,
#             and its test classes are novel classes of a pre-training domain (OOD test sets);
#   id:       meta-train on train classes (val classes select checkpoints), test on test classes; alphabets,
#             which the corpus does not cover, as Omniglot is to DINO;
#   ood:      test only: every class is a test class.
DOMAINS = (
    Domain("latin-greek", "id", "glyphs"),
    Domain("cyrillic", "id", "glyphs"),
    Domain("armenian-georgian", "id", "glyphs"),
    Domain("syllabics", "id", "glyphs"),
    Domain("rtl-scripts", "id", "glyphs"),
    Domain("math-symbols", "id", "glyphs"),
    Domain("textures", "pretrain", "textures"),
    Domain("sketches", "pretrain", "sketches"),
    Domain("signs", "pretrain", "signs"),
    Domain("fractals", "pretrain", "fractals"),
    Domain("unseen-scripts", "ood", "glyphs"),
    Domain("tiles", "ood", "glyphs"),
    Domain("curves", "ood", "curves"),
    Domain("automata", "ood", "automata"),
    Domain("digits", "ood", "digits"),
)
GENERATORS: dict[str, Callable[..., DomainImages]] = {
    "textures": textures.generate, "sketches": sketches.generate, "signs": signs.generate,
    "fractals": fractals.generate, "curves": curves.generate, "automata": automata.generate,
    "digits": digits.generate,
}


def build_embedded(out: Path, size: str = "default", seed: int = 0) -> None:
    """Generate the benchmark into `out`, which must not exist or be an empty folder."""
    out = Path(out)
    if size not in SIZES:
        raise SmatError(f"--size {size!r}: unknown size; choose one of {', '.join(SIZES)}")
    if seed < 0:
        raise SmatError(f"--seed {seed}: the seed must be a non-negative integer")
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise SmatError(f"{out}: already exists and is not empty; delete it or choose another --out")
    start = time.perf_counter()
    with atomic_dir(out) as tmp:
        domains = {}
        for domain in progress_bar(DOMAINS, desc="build-embedded", unit="domain", disable=None):
            domains[domain.name] = _build_domain(domain, SIZES[size], seed, tmp)
        write_json(tmp / "benchmark.json", {"domains": domains, "seed": seed, "size": size, "versions": _versions()})
    n_images = sum(d["n_classes"] * d["images_per_class"] for d in domains.values())
    log.info("%s: %d domains, %d images in %.1f s", out, len(domains), n_images, time.perf_counter() - start)


def _versions() -> dict[str, str]:
    """What the pixels depend on besides the seed (fonts ship with matplotlib); no timestamps, so that
    identical builds stay byte-identical."""
    return {"smat": smat.__version__, "numpy": np.__version__, "pillow": PIL.__version__,
            "matplotlib": matplotlib.__version__, "freetype": PIL.features.version("freetype2") or "",
            "scikit-learn": sklearn.__version__}


def _build_domain(domain: Domain, size: Size, seed: int, root: Path) -> dict:
    rng = domain_rng(seed, domain.name)
    n_classes, n_images = {"id": (size.id_classes, size.images_per_class),
                           "ood": (size.ood_classes, size.images_per_class),
                           "pretrain": (size.pretrain_classes, size.pretrain_images)}[domain.role]
    if domain.kind == "digits":
        n_classes, n_images = digits.N_DIGITS, size.digit_images
    if domain.kind == "glyphs":
        plan = plan_groups(n_classes, domain.role, size.group_sizes, rng)
        data = glyphs.generate(domain.name, [n for _, n in plan], n_images, rng)
        group_order = list(dict.fromkeys(data.groups.values()))  # groups come in plan order
        splits = grouped_splits(data.groups, {g: split for g, (split, _) in zip(group_order, plan)})
    else:
        data = GENERATORS[domain.kind](n_classes, n_images, rng)
        splits = split_classes(data.class_names, domain.role, rng)
    (images_per_class,) = {len(images) for images in data.images}
    write_class_folders(root / domain.name, data)
    write_json(root / domain.name / "splits.json", splits)
    write_grid(root / "grids" / f"{domain.name}.png", data)
    return {"role": domain.role, "kind": domain.kind, "n_classes": len(data.class_names),
            "images_per_class": images_per_class}

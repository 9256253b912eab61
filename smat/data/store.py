"""The dataset store: every image of one domain in a single memory-mapped uint8 array plus a JSON manifest.

`STORE/images.npy` holds all images, shape (N, S, S, 3), class after class; `STORE/manifest.json` says which
rows belong to which class (offset, count), the split of every class, class groups or a class DAG for
hierarchical sampling, what conversion left out, and where the data came from. It also records the sha256 of
images.npy, of each class's pixels (`class_sha256`) and of itself (`manifest_sha256`): evaluation opens a
store with `verify=True`, which checks a class's pixels the first time they are read. A memory-mapped .npy was
chosen over HDF5 by measurement (benchmarks/bench_store_format.py, results/store_format.json): episode-shaped
random reads were 7-20x faster than the best HDF5 layout (warm cache) at 32 and 128 px, and writing was
faster too; reading it needs nothing but numpy.
"""

from __future__ import annotations

import contextlib
import errno
import functools
import hashlib
import logging
import math
import multiprocessing
import os
import re
import signal
import struct
import zlib
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np
from PIL import Image, ImageOps

from smat.data.class_splits import default_splits, read_splits
from smat.data.hierarchy import dag_problems
from smat.io import SmatError, atomic_dir, provenance, read_json, sha256_file, stable_hash, write_json
from smat.progress import progress_bar

log = logging.getLogger(__name__)

FORMAT = "smat-store/1"
SPLITS = ("train", "val", "test")
HIERARCHIES = ("flat", "groups", "dag")
IMAGE_EXTENSIONS = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm"}
# What PIL raises on a corrupt or truncated file, depending on the format plugin.
_DECODE_ERRORS = (OSError, SyntaxError, ValueError, EOFError, struct.error, zlib.error,
                  Image.DecompressionBombError)


@dataclass(frozen=True)
class ClassInfo:
    name: str
    split: str           # "train" | "val" | "test"
    n_images: int
    offset: int          # first row of this class in images.npy
    group: str | None    # superclass (alphabet) for two-level sampling, else None


class Store:
    """Read access to a converted dataset: class metadata and images by (class, index).

    With `verify` (evaluation), the store must record its content hashes (manifest_sha256, class_sha256), and
    the pixels of each class are checked against its sha256 the first time they are read: pixels changed after
    conversion are an error, not a wrong accuracy.
    """

    def __init__(self, root: str | os.PathLike, verify: bool = False) -> None:
        self.root = Path(root)
        manifest_path = self.root / "manifest.json"
        if not manifest_path.is_file():
            raise SmatError(f"{self.root}: not a dataset store (no manifest.json); create one with "
                            "`smat data convert imagefolder SRC --out DIR`")
        manifest = read_json(manifest_path)
        if problems := manifest_problems(manifest):
            raise SmatError(f"{manifest_path}: invalid store manifest: {'; '.join(problems)}; "
                            "re-create the store with `smat data convert`")
        # Older stores lack the hashes: they still open, except for evaluation (`verify`).
        if ("manifest_sha256" in manifest or verify) and (problem := _self_hash_problem(manifest)):
            raise SmatError(f"{manifest_path}: {problem}")
        if verify and (problem := _no_class_hashes(manifest)):
            raise SmatError(f"{manifest_path}: {problem}")
        self.manifest = manifest
        self.verify = verify
        self._verified: set[int] = set()      # classes whose pixels were checked
        self.domain: str = manifest["domain"]
        self.image_size: int = manifest["image_size"]
        self.hierarchy: str = manifest["hierarchy"]
        self.dag: dict[str, list[str]] | None = manifest.get("dag")
        self.classes = [ClassInfo(**info) for info in manifest["classes"]]
        self.fingerprint = stable_hash({
            "domain": self.domain, "image_size": self.image_size,
            "classes": [[c.name, c.split, c.n_images] for c in self.classes],
        })
        self._open()

    def _open(self) -> None:
        self._images = _open_images(self.root, sum(c.n_images for c in self.classes), self.image_size)

    def __repr__(self) -> str:
        return f"Store({str(self.root)!r}, domain={self.domain!r}, classes={len(self.classes)})"

    def class_ids(self, split: str) -> list[int]:
        if split not in SPLITS:
            raise SmatError(f"unknown split {split!r} for store {self.root}; expected one of {', '.join(SPLITS)}")
        return [i for i, c in enumerate(self.classes) if c.split == split]

    def images(self, class_id: int, image_ids: Sequence[int]) -> np.ndarray:
        """uint8 (k, S, S, 3) copies of the given images of one class."""
        if not 0 <= class_id < len(self.classes):
            raise SmatError(f"{self.root}: class id {class_id} out of range (the store has {len(self.classes)})")
        info = self.classes[class_id]
        ids = np.asarray(image_ids, dtype=np.int64)
        if ids.size and (ids.min() < 0 or ids.max() >= info.n_images):
            raise SmatError(f"{self.root}: image ids {ids.min()}..{ids.max()} out of range for class "
                            f"{info.name!r}, which has {info.n_images} images")
        if self.verify and class_id not in self._verified:
            if problem := _class_problem(self._images, info, self.manifest["class_sha256"][class_id]):
                raise SmatError(f"{self.root}: {problem}")
            self._verified.add(class_id)
        return self._images[info.offset + ids]

    # A memory map must not be pickled (that would copy the whole array): workers reopen it.
    def __getstate__(self) -> dict[str, Any]:
        return {k: v for k, v in self.__dict__.items() if k != "_images"}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._open()


def convert_imagefolder(src: str | os.PathLike, out: str | os.PathLike, image_size: int | None = None,
                        splits: str | os.PathLike | None = None, role: str = "ood", domain: str | None = None,
                        seed: int = 0, skip_bad: bool = False, min_images: int = 2, workers: int = 1) -> Store:
    """Convert a class-per-folder image dataset into a store at `out` (built aside, then renamed into place),
    decoding in `workers` processes.

    Images of a class are taken in file-name order; image i of a class is row `offset + i`. Splits come from
    `splits` or `src/splits.json`; without one, role "ood" puts every class in test and role "id" draws a
    seeded 60/15/25 train/val/test class split (METHOD §4.3).
    """
    src, out = Path(src), Path(out)
    if role not in ("id", "ood"):
        raise SmatError(f"role {role!r}: expected 'id' or 'ood'")
    if min_images < 2:
        raise SmatError(f"--min-images {min_images}: an episode needs at least 2 images per class "
                        "(1 support, 1 query)")
    if image_size is not None and image_size < 1:
        raise SmatError(f"--image-size {image_size}: must be a positive number of pixels")
    if not src.is_dir():
        raise SmatError(f"{src}: source folder not found")
    files = _class_folders(src)
    splits_file = Path(splits) if splits else src / "splits.json" if (src / "splits.json").is_file() else None
    if splits_file:
        split_of, groups, dag = read_splits(splits_file, src, list(files))
    else:
        split_of, groups, dag = default_splits(sorted(files), role, seed), None, None
    domain = domain or src.resolve().name
    hierarchy = "groups" if groups else "dag" if dag else "flat"

    ordered = sorted(files, key=lambda name: (SPLITS.index(split_of[name]), name))
    classes = [SourceClass(name, split_of[name], groups[name] if groups else None, files[name]) for name in ordered]
    return write_store(out, classes, domain=domain, source=src, image_size=image_size, hierarchy=hierarchy, dag=dag,
                       min_images=min_images, skip_bad=skip_bad,
                       details={"command": "data convert imagefolder", "role": role, "seed": seed,
                                "splits_file": str(splits_file) if splits_file else None}, workers=workers)


@dataclass
class SourceClass:
    """One class of a dataset being converted, with its images in store order: image files, or readers with
    `open() -> PIL.Image` whose str() names the image in messages (an h5 group, a TFRecord record, ...)."""
    name: str
    split: str
    group: str | None
    images: Sequence[Any]


def write_store(out: str | os.PathLike, classes: Sequence[SourceClass], *, domain: str, source: Path,
                image_size: int | None, hierarchy: str = "flat", dag: dict | None = None, min_images: int = 2,
                skip_bad: bool = False, details: dict[str, Any] | None = None, workers: int = 1) -> Store:
    """Decode `classes` into a store at `out` (built aside, then renamed into place); the one writer of the
    store format, whatever the source format. Classes with fewer than `min_images` (readable) images are
    left out and listed in the manifest; `details` go into its provenance. `workers` processes decode the
    images; the store is the same byte for byte whatever their number."""
    out = Path(out)
    if problem := domain_problem(domain):
        raise SmatError(f"{source}: {problem}; pass --domain NAME")
    if workers < 1:
        raise SmatError(f"--workers {workers}: must be at least 1")
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise SmatError(f"{out}: already exists; remove it to convert again")
    excluded = [_exclude(c.name, f"{len(c.images)} images < min_images {min_images}")
                for c in classes if len(c.images) < min_images]
    kept = [c for c in classes if len(c.images) >= min_images]
    if not kept:
        raise SmatError(f"{source}: no class has at least min_images = {min_images} images")
    size = image_size or _common_size(source, [item for c in kept for item in c.images])
    n_images = sum(len(c.images) for c in kept)
    log.info("%s: %d images at %d px: %s in %s", source, n_images, size, _size_text(n_images * size * size * 3),
             out)

    with atomic_dir(out) as tmp:
        written, skipped, too_few = _write_images(tmp / "images.npy", source, kept, size, image_size is not None,
                                                  skip_bad, min_images, workers)
        excluded += too_few
        if not written:
            raise SmatError(f"{source}: no class has at least min_images = {min_images} readable images")
        if skipped:
            names = ", ".join(s["file"] for s in skipped[:10]) + (", ..." if len(skipped) > 10 else "")
            log.warning("%s: skipped %d unreadable image(s): %s", source, len(skipped), names)
        manifest = {
            "format": FORMAT, "domain": domain, "image_size": size, "hierarchy": hierarchy,
            "classes": [asdict(c) for c in written],
            "dag": dag,
            "excluded": excluded, "skipped_images": skipped,
            "images_sha256": sha256_file(tmp / "images.npy"),
            "class_sha256": class_hashes(tmp / "images.npy", written),
            "source": str(Path(source).resolve()),
            "provenance": provenance(**(details or {}), min_images=min_images, skip_bad=skip_bad),
        }
        manifest["manifest_sha256"] = manifest_digest(manifest)
        write_json(tmp / "manifest.json", manifest)
    n_images = sum(c.n_images for c in written)
    log.info("%s: %d classes, %d images of %dx%d px -> %s", domain, len(written), n_images, size, size, out)
    return Store(out)


def check_store(root: str | os.PathLike) -> list[str]:
    """Problems found in the store at `root` (an empty list means it is consistent and fully readable)."""
    root = Path(root)
    try:
        manifest = read_json(root / "manifest.json")
    except SmatError as err:
        return [str(err)]
    if problems := manifest_problems(manifest):
        return [f"manifest.json: {p}" for p in problems]
    if problem := _self_hash_problem(manifest):
        return [f"{root / 'manifest.json'}: {problem}"]
    try:
        images = _open_images(root, sum(c["n_images"] for c in manifest["classes"]), manifest["image_size"])
    except SmatError as err:
        return [str(err)]
    if problem := _no_class_hashes(manifest):
        return [f"{root / 'manifest.json'}: {problem}"]
    for info, expected in zip(manifest["classes"], manifest["class_sha256"]):
        if problem := _class_problem(images, ClassInfo(**info), expected):
            return [f"{root}: {problem}"]
    digest = sha256_file(root / "images.npy")  # reads every byte: every image is readable
    if digest != manifest["images_sha256"]:
        return [f"{root / 'images.npy'}: content differs from the manifest's sha256 (corrupted or modified "
                "after conversion); re-create the store with `smat data convert`"]
    return []


def manifest_problems(manifest: Any) -> list[str]:
    """Schema and consistency problems of a parsed manifest.json."""
    if not isinstance(manifest, dict):
        return ["expected a JSON object"]
    if manifest.get("format") != FORMAT:
        return [f"format {manifest.get('format')!r}, expected {FORMAT!r}"]
    required = ["domain", "image_size", "hierarchy", "classes", "excluded", "skipped_images", "images_sha256"]
    if missing := [k for k in required if k not in manifest]:
        return [f"missing key(s) {', '.join(missing)}"]
    problems = []
    if problem := domain_problem(manifest["domain"]):
        problems.append(problem)
    if not _is_int(manifest["image_size"]) or manifest["image_size"] < 1:
        problems.append(f"image_size {manifest['image_size']!r} is not a positive integer")
    hierarchy = manifest["hierarchy"]
    if hierarchy not in HIERARCHIES:
        problems.append(f"hierarchy {hierarchy!r} is not one of {', '.join(HIERARCHIES)}")
    classes = manifest["classes"]
    if not isinstance(classes, list) or not classes:
        return problems + ["classes must be a non-empty list"]
    keys = {"name", "split", "n_images", "offset", "group"}
    offset = 0
    for i, c in enumerate(classes):
        if not isinstance(c, dict) or set(c) != keys:
            problems.append(f"classes[{i}] must have exactly the keys {', '.join(sorted(keys))}")
            continue
        if not isinstance(c["name"], str) or c["split"] not in SPLITS:
            problems.append(f"classes[{i}]: name {c['name']!r} or split {c['split']!r} invalid "
                            f"(splits: {', '.join(SPLITS)})")
        if not _is_int(c["n_images"]) or c["n_images"] < 1 or c["offset"] != offset:
            problems.append(f"classes[{i}] ({c['name']!r}): n_images {c['n_images']!r} / offset {c['offset']!r} "
                            f"inconsistent (offsets must be contiguous; expected offset {offset})")
            return problems
        if (c["group"] is None) == (hierarchy == "groups") or not isinstance(c["group"], (str, type(None))):
            problems.append(f"classes[{i}] ({c['name']!r}): group {c['group']!r} does not fit hierarchy "
                            f"{hierarchy!r}")
        offset += c["n_images"]
    names = [c["name"] for c in classes if isinstance(c, dict)]
    if len(set(names)) != len(names):
        problems.append("class names are not unique")
    hashes = manifest.get("class_sha256", [])      # older stores lack it
    if not isinstance(hashes, list) or (hashes and len(hashes) != len(classes)) or \
            not all(isinstance(h, str) and _SHA256.fullmatch(h) for h in hashes):
        problems.append("class_sha256 must be a list of one sha256 (64 hex digits) per class")
    excluded = manifest["excluded"]
    if not isinstance(excluded, list) or not all(isinstance(e, dict) and {"name", "reason"} <= set(e)
                                                 for e in excluded):
        problems.append("excluded must be a list of {name, reason}")
        excluded = []
    if hierarchy == "dag":
        problems += [f"dag: {p}" for p in dag_problems(manifest.get("dag"), names, [e["name"] for e in excluded])]
    elif manifest.get("dag") is not None:
        problems.append(f"a dag is given but hierarchy is {hierarchy!r}")
    return problems


_SHA256 = re.compile(r"[0-9a-f]{64}")

# A domain names files (a training run's val_episodes/DOMAIN.json): a plain name, never a path.
_DOMAIN = re.compile(r"[A-Za-z0-9][A-Za-z0-9._+-]{0,127}")


def domain_problem(domain: Any) -> str | None:
    if isinstance(domain, str) and _DOMAIN.fullmatch(domain):
        return None
    return (f"domain {domain!r} is not a plain name (letters, digits and . _ + -, starting with a letter or "
            "digit, at most 128 characters)")


def manifest_digest(manifest: dict[str, Any]) -> str:
    """sha256 of the manifest's content without its own hash (key order and white space do not count)."""
    return stable_hash({k: v for k, v in manifest.items() if k != "manifest_sha256"}, length=64)


def _self_hash_problem(manifest: dict[str, Any]) -> str | None:
    recorded = manifest.get("manifest_sha256")
    if recorded is None:
        return ("no manifest_sha256: written by an older smat, so edits cannot be detected; re-create the store "
                "with `smat data convert`")
    if recorded != manifest_digest(manifest):
        return ("content differs from its manifest_sha256 (edited after conversion: classes, splits or counts "
                "may have changed); re-create the store with `smat data convert`")
    return None


def class_hashes(images_path: Path, classes: Sequence[ClassInfo]) -> list[str]:
    """The sha256 of each class's pixels (its rows of images.npy, as raw bytes), in class order."""
    images = np.load(images_path, mmap_mode="r")
    return [_class_digest(images, info) for info in classes]


def _class_digest(images: np.ndarray, info: ClassInfo) -> str:
    return hashlib.sha256(np.ascontiguousarray(images[info.offset:info.offset + info.n_images])).hexdigest()


def _class_problem(images: np.ndarray, info: ClassInfo, expected: str) -> str | None:
    """Why the pixels of class `info` are not those converted (their sha256 differs), else None."""
    if _class_digest(images, info) == expected:
        return None
    return (f"the pixels of class {info.name!r} (rows {info.offset}..{info.offset + info.n_images - 1} of "
            "images.npy) differ from the sha256 its manifest records: changed after conversion; re-create the "
            "store with `smat data convert`")


def _no_class_hashes(manifest: dict[str, Any]) -> str | None:
    if manifest.get("class_sha256"):
        return None
    return ("no class_sha256: written by an older smat, so changed pixels cannot be detected; re-create the store "
            "with `smat data convert` (in the workflow: delete the store folder and run it again)")


def _open_images(root: Path, n_images: int, image_size: int) -> np.ndarray:
    path = root / "images.npy"
    if path.exists() and not path.is_file():
        raise SmatError(f"{path}: not a regular file; re-create the store with `smat data convert`")
    try:
        array = np.load(path, mmap_mode="r")
    except FileNotFoundError:
        raise SmatError(f"{path}: missing; re-create the store with `smat data convert`") from None
    except (ValueError, OSError, EOFError) as err:
        raise SmatError(f"{path}: not a readable .npy array ({err}); re-create the store") from None
    expected = (n_images, image_size, image_size, 3)
    if array.dtype != np.uint8 or array.shape != expected:
        raise SmatError(f"{path}: {array.dtype} array of shape {array.shape}, but manifest.json describes uint8 "
                        f"{expected}; re-create the store")
    return array


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _exclude(name: str, reason: str) -> dict[str, str]:
    log.warning("excluding class %r: %s", name, reason)
    return {"name": name, "reason": reason}


def _class_folders(src: Path) -> dict[str, list[Path]]:
    """{class name: image files sorted by file name} for every non-hidden sub-folder of `src`.

    A folder or image reached twice (symbolic or hard links) is refused: it would be two identical classes,
    or one image that is both support and query."""
    folders = sorted(p for p in src.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not folders:
        raise SmatError(f"{src}: no class folders found (expected one sub-folder of images per class)")
    files, seen = {}, {}
    for folder in folders:
        _check_unique(folder, seen, "class folder")
        images = []
        with os.scandir(folder) as entries:
            for entry in entries:
                if entry.name.startswith(".") or not entry.is_file() or \
                        Path(entry.name).suffix.lower() not in IMAGE_EXTENSIONS:
                    continue
                _check_unique(Path(entry.path), seen, "image")
                images.append(Path(entry.path))
        if not images:
            raise SmatError(f"{folder}: class folder contains no images ({', '.join(sorted(IMAGE_EXTENSIONS))}); "
                            "add images or remove the folder")
        files[folder.name] = sorted(images, key=lambda p: p.name)
    return files


def _check_unique(path: Path, seen: dict[tuple[int, int], Path], what: str) -> None:
    info = path.stat()
    first = seen.setdefault((info.st_dev, info.st_ino), path)
    if first != path:
        raise SmatError(f"{path}: the same {what} as {first} (a symbolic or hard link); every class and image "
                        "must appear once: remove the link or copy the data")


# Transparent pixels are composited onto white: strokes drawn on a transparent background (the usual
# PNG of a glyph or sketch) then look as they do on paper, as Omniglot's and QuickDraw's images are.
BACKGROUND = (255, 255, 255)
_ALPHA_MODES = ("RGBA", "LA", "PA", "RGBa", "La")
_UINT16_MODES = ("I;16", "I;16B", "I;16L", "I;16N")


def _open(item: Any) -> Image.Image:
    """A source image: a file, or a reader of another format (SourceClass)."""
    return Image.open(item) if isinstance(item, Path) else item.open()


def _decode(item: Any, image_size: int | None) -> np.ndarray:
    """RGB uint8 pixels of an image, upright (EXIF orientation), alpha on white, wide samples scaled from
    their range (`_to_rgb`); with `image_size`, the shorter side resized to it and the centre cropped
    (torchvision's Resize + CenterCrop), so that the aspect ratio is kept."""
    with _open(item) as image:
        image.load()
        # The TIFF tags that say how wide integer samples are belong to the file, not to the turned copy.
        rgb = _to_rgb(ImageOps.exif_transpose(image), getattr(image, "tag_v2", None))
    if image_size is not None and rgb.size != (image_size, image_size):
        rgb = _resize_and_centre_crop(rgb, image_size)
    return np.asarray(rgb)


def _to_rgb(image: Image.Image, tiff_tags: Any = None) -> Image.Image:
    """8-bit RGB from any PIL mode, each by the range its samples really have (METHOD, "Image decoding"):
    float (F) as intensities in [0, 1], integers (I, I;16*) from 0 to the maximum of their type, NaN,
    infinity and values outside the range refused (ValueError: an unreadable image)."""
    if image.mode == "F":
        return _grey(np.asarray(image, dtype=np.float64), 1.0, "F (32-bit float)")
    if image.mode in _UINT16_MODES:   # convert("RGB") would clip 16-bit values at 255: almost all white
        return _grey(np.asarray(image, dtype=np.float64), 65535, f"{image.mode} (16-bit)")
    if image.mode == "I":
        values, top, what = _int32_samples(image, tiff_tags)
        return _grey(values, top, what)
    if image.mode == "La":            # premultiplied alpha: PIL converts it only to LA
        image = image.convert("LA")
    if image.mode in _ALPHA_MODES or "transparency" in image.info:
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (*BACKGROUND, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return image.convert("RGB")      # 1, L, P, RGB, RGBX, CMYK, YCbCr, LAB, HSV: PIL's conversions


def _int32_samples(image: Image.Image, tags: Any) -> tuple[np.ndarray, int, str]:
    """(values, maximum of the type, description) of a mode-I image. PIL holds 32-bit TIFFs in mode I (their
    BitsPerSample and SampleFormat tags give the type), and also the 16-bit samples of PGM / PPM (and of PNG
    in older Pillow), which it scales to 0..65535."""
    if tags is None or 258 not in tags:
        return np.asarray(image, dtype=np.float64), 65535, "I (16-bit samples)"
    bits = int(tags[258][0] if isinstance(tags[258], tuple) else tags[258])
    sample_format = tags.get(339, (1,))
    signed = int(sample_format[0] if isinstance(sample_format, tuple) else sample_format) == 2
    values = np.asarray(image)
    if not signed and bits == 32:     # PIL reads uint32 samples into int32
        values = values.view(np.uint32)
    top = 2 ** (bits - 1) - 1 if signed else 2 ** bits - 1
    return values.astype(np.float64), top, f"I ({'signed' if signed else 'unsigned'} {bits}-bit integer)"


def _grey(values: np.ndarray, top: float, what: str) -> Image.Image:
    """Grey RGB image of samples in [0, top], scaled to 0..255."""
    if not np.isfinite(values).all():
        raise ValueError(f"mode {what} image holds {'NaN' if np.isnan(values).any() else 'infinite'} pixel "
                         "values")
    low, high = (float(values.min()), float(values.max())) if values.size else (0.0, 0.0)
    if low < 0 or high > top:
        raise ValueError(f"mode {what} pixel values span [{low:g}, {high:g}], outside the type's range "
                         f"[0, {top:g}]; rescale the image, or save it as 8- or 16-bit")
    grey = np.round(values / (top / 255)).astype(np.uint8)
    return Image.fromarray(grey, "L").convert("RGB")


def _resize_and_centre_crop(image: Image.Image, size: int) -> Image.Image:
    width, height = image.size
    if width <= height:
        new = (size, max(size, int(size * height / width)))
    else:
        new = (max(size, int(size * width / height)), size)
    image = image.resize(new, Image.Resampling.BICUBIC)    # PIL's resize is antialiased
    left, top = int(round((new[0] - size) / 2.0)), int(round((new[1] - size) / 2.0))
    return image.crop((left, top, left + size, top + size))


def _common_size(src: Path, items: list[Any]) -> int:
    """The side length shared by all images when they are kept at their size (each is checked when written)."""
    for path in items:
        try:
            with _open(path) as image:
                width, height = image.size
        except _DECODE_ERRORS:
            continue
        if width != height:
            raise SmatError(f"{path}: image is {width}x{height}, not square; pass --image-size N to resize the "
                            "shorter side to N and crop the centre")
        return width
    raise SmatError(f"{src}: no readable image found")


def _size_text(n_bytes: int) -> str:
    return f"{n_bytes / 1e9:.2f} GB" if n_bytes >= 1e9 else f"{n_bytes / 1e6:.1f} MB"


def _item_name(item: Any, src: Path) -> str:
    if isinstance(item, Path):
        return str(item.relative_to(src)) if item.is_relative_to(src) else str(item)
    return str(item)


_NO_SPACE = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG}


def _decode_or_error(item: Any, image_size: int | None) -> tuple[np.ndarray | None, str | None]:
    """(pixels, None), or (None, the reason) for an image that cannot be decoded (--skip-bad decides)."""
    try:
        return _decode(item, image_size), None
    except _DECODE_ERRORS as err:
        return None, str(err)


@contextlib.contextmanager
def _decoded(items: list[Any], image_size: int | None, workers: int) -> Iterator[Iterator[tuple]]:
    """`_decode_or_error` of every item, in the items' order: in this process, or in `workers` processes whose
    results are taken in order, so that the rows written do not depend on the number of workers."""
    if workers == 1:
        yield (_decode_or_error(item, image_size) for item in items)
        return
    # The items (paths, h5 keys, record offsets, in-memory arrays) travel pickled; forkserver starts workers from
    # a clean process, not from this one's threads (the progress bar's) and open files.
    with multiprocessing.get_context("forkserver").Pool(workers, initializer=_quiet_worker) as pool:
        yield pool.imap(functools.partial(_decode_or_error, image_size=image_size), items, chunksize=32)


def _quiet_worker() -> None:
    """Ctrl-C reaches the whole process group: only the parent turns it into a message."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def _create_images(path: Path, shape: tuple[int, ...]) -> np.memmap:
    """The memory-mapped images.npy with its blocks allocated now: a disk that fills up during the writes
    would otherwise kill the process with SIGBUS, which no handler can turn into a message."""
    try:
        images = np.lib.format.open_memmap(path, mode="w+", dtype=np.uint8, shape=shape)
        with open(path, "r+b") as handle:
            try:
                os.posix_fallocate(handle.fileno(), 0, path.stat().st_size)
            except OSError as err:       # file systems without fallocate: the writes go as before
                if err.errno not in (errno.EOPNOTSUPP, errno.EINVAL):
                    raise
    except OSError as err:
        if err.errno in _NO_SPACE:
            needed = _size_text(math.prod(shape))
            raise SmatError(f"{path.parent.parent}: not enough disk space for the store ({needed} of images: "
                            f"{err.strerror}); free space or choose another --out") from None
        raise
    return images


def _write_images(path: Path, src: Path, kept: list[SourceClass], size: int, resize: bool, skip_bad: bool,
                  min_images: int, workers: int) -> tuple[list[ClassInfo], list[dict], list[dict]]:
    """Decode the classes `kept` into rows of `path`, class after class.

    Returns the classes written, the skipped images, and the classes excluded because too few images remained.
    """
    n_max = sum(len(c.images) for c in kept)
    images = _create_images(path, (n_max, size, size, 3))
    classes, skipped, excluded, row = [], [], [], 0
    decoded = _decoded([item for c in kept for item in c.images], size if resize else None, workers)
    with progress_bar(total=n_max, desc=f"convert {src.name}", unit="img", leave=False) as bar, decoded as results:
        for name, split, group, items in ((c.name, c.split, c.group, c.images) for c in kept):
            start = row
            for file in items:
                bar.update()
                pixels, error = next(results)
                if error is not None:
                    if not skip_bad:
                        raise SmatError(f"{file}: cannot read image ({error}); fix or remove it, or pass --skip-bad")
                    skipped.append({"file": _item_name(file, src), "reason": error})
                    continue
                if pixels.shape != (size, size, 3):
                    raise SmatError(f"{file}: image is {pixels.shape[1]}x{pixels.shape[0]} but other images are "
                                    f"{size}x{size}; pass --image-size N to bring every image to NxN (shorter "
                                    "side N, centre crop)")
                images[row] = pixels
                row += 1
            if row - start < min_images:
                excluded.append(_exclude(name, f"{row - start} readable images < min_images {min_images}"))
                row = start
            else:
                classes.append(ClassInfo(name, split, row - start, start, group))
    images.flush()
    del images
    if row < n_max:  # images were skipped: keep only the rows written
        full = np.load(path, mmap_mode="r")
        np.save(path.with_name("trimmed.npy"), full[:row])
        del full
        os.replace(path.with_name("trimmed.npy"), path)
    return classes, skipped, excluded

"""The source formats of `smat data convert` as one table: the CLI's choices and dispatch, and the workflow's
conversion rule (which formats carry their own class split) read it. Adding a format is its reader plus one
entry here.

No image library is imported at load time: the workflow reads the table when it starts.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable


@dataclass(frozen=True)
class ConvertOptions:
    """The options of `smat data convert`; a format reads those that apply to it."""
    image_size: int | None = None
    splits: Path | None = None          # class split file (formats without their own split)
    role: str = "ood"                   # without a split file: which classes go to which split
    domain: str | None = None
    seed: int = 0
    skip_bad: bool = False
    min_images: int = 2
    workers: int = 1


def _imagefolder(name: str, src: Path, out: Path, o: ConvertOptions):
    from smat.data.store import convert_imagefolder

    return convert_imagefolder(src, out, image_size=o.image_size, splits=o.splits, role=o.role, domain=o.domain,
                               seed=o.seed, skip_bad=o.skip_bad, min_images=o.min_images, workers=o.workers)


def _meta_dataset(name: str, src: Path, out: Path, o: ConvertOptions):
    from smat.data.meta_dataset import convert_meta_dataset

    return convert_meta_dataset(src, out, name, image_size=o.image_size, domain=o.domain, skip_bad=o.skip_bad,
                                workers=o.workers)


def _classic(name: str, src: Path, out: Path, o: ConvertOptions):
    from smat.data.classic import convert_classic

    return convert_classic(name, src, out, image_size=o.image_size, splits=o.splits, role=o.role, domain=o.domain,
                           seed=o.seed, workers=o.workers)


@dataclass(frozen=True)
class SourceFormat:
    name: str                   # `smat data convert NAME`
    description: str
    convert: Callable[[str, Path, Path, ConvertOptions], object]
    own_splits: bool = False    # the source holds its class split (Meta-Dataset's dataset_spec.json)


SOURCE_FORMATS: dict[str, SourceFormat] = {f.name: f for f in (
    SourceFormat("imagefolder", "one sub-folder of images per class", _imagefolder),
    SourceFormat("tfrecords", "a Meta-Dataset domain: one TFRecord file per class + dataset_spec.json",
                 _meta_dataset, own_splits=True),
    SourceFormat("pmf-h5", "a Meta-Dataset domain: PMF's h5 file per class + dataset_spec.json", _meta_dataset,
                 own_splits=True),
    SourceFormat("cifar", "CIFAR-10/100 python pickle batches", _classic),
    SourceFormat("mnist", "MNIST idx files", _classic),
    SourceFormat("food101", "Food-101 (images/ + meta/test.txt)", _classic),
    SourceFormat("pets", "Oxford-IIIT Pets (images/ + annotations/test.txt)", _classic),
    SourceFormat("cars", "Stanford Cars (cars_test/ + devkit .mat annotations)", _classic),
)}


def convert_source(name: str, src: Path, out: Path, options: ConvertOptions):
    """Convert `src` in source format `name` into a store at `out`."""
    return SOURCE_FORMATS[name].convert(name, Path(src), Path(out), options)

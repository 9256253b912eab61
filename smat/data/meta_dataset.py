"""Meta-Dataset domains as stores: the official conversion's `{class}.tfrecords` and PMF's per-class h5 files,
both described by the domain's `dataset_spec.json` (METHOD §4.1, §4.2).

The spec gives the class ids of each split (contiguous: train, then valid, then test), the images per class,
Omniglot's alphabets (`BiLevelDatasetSpecification`: classes grouped by superclass) and ImageNet's WordNet
graph (`HierarchicalDatasetSpecification`: one sub-graph per split). The store keeps them as its class
groups or DAG; the DAG holds each split's sub-graph under its own node names ("TRAIN:n00001740"), so a
split samples exactly from its own graph as Meta-Dataset does.

TFRecords are read without TensorFlow: each record is `uint64 length, uint32 masked CRC32C(length), data,
uint32 masked CRC32C(data)`, and `data` a `tf.train.Example` whose feature "image" holds the encoded image.
Every CRC is checked. PMF's h5 files hold image j of a class as group "j" with an `image` dataset
(uint8 H×W×3 RGB).
"""

from __future__ import annotations

import io
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from smat.data.store import SourceClass, write_store
from smat.io import SmatError, read_json

SPEC_FILE = "dataset_spec.json"
SPEC_SPLITS = {"TRAIN": "train", "VALID": "val", "TEST": "test"}
_SPEC_KINDS = ("DatasetSpecification", "BiLevelDatasetSpecification", "HierarchicalDatasetSpecification")


@dataclass
class SpecClass:
    class_id: int
    name: str
    split: str
    group: str | None
    n_images: int


@dataclass
class DatasetSpec:
    name: str
    classes: list[SpecClass]     # in class-id order
    hierarchy: str               # flat | groups | dag
    dag: dict[str, list[str]] | None


# --- dataset_spec.json --------------------------------------------------------------------------------------

def read_spec(path: Path) -> DatasetSpec:
    """The classes, splits, counts and hierarchy of a `dataset_spec.json` (any of its three kinds)."""
    path = Path(path)
    if not path.is_file():
        raise SmatError(f"{path}: dataset specification not found; a converted Meta-Dataset domain has its "
                        f"{SPEC_FILE} next to the class files")
    data = read_json(path)
    kind = data.get("__class__") if isinstance(data, dict) else None
    if kind not in _SPEC_KINDS:
        raise SmatError(f"{path}: not a Meta-Dataset dataset specification (__class__ {kind!r}, expected one "
                        f"of {', '.join(_SPEC_KINDS)})")
    try:
        if kind == "DatasetSpecification":
            return _flat_spec(data)
        if kind == "BiLevelDatasetSpecification":
            return _bilevel_spec(data)
        return _hierarchical_spec(data)
    except (KeyError, TypeError, ValueError) as err:
        raise SmatError(f"{path}: malformed {kind} ({type(err).__name__}: {err})") from None


def _split_ranges(counts: dict[str, int]) -> list[tuple[str, int, int]]:
    """(split, first id, end id) in Meta-Dataset's order: train ids first, then valid, then test."""
    ranges, start = [], 0
    for key, split in SPEC_SPLITS.items():
        ranges.append((split, start, start + int(counts.get(key, 0))))
        start += int(counts.get(key, 0))
    return ranges


def _count(images_per_class: dict, class_id: int) -> int:
    value = images_per_class[str(class_id)]
    if isinstance(value, dict):
        raise ValueError(f"class {class_id} has example-level pools {sorted(value)}, which are not supported")
    return int(value)


def _flat_spec(data: dict) -> DatasetSpec:
    names, counts = data["class_names"], data["images_per_class"]
    classes = [SpecClass(i, str(names[str(i)]), split, None, _count(counts, i))
               for split, first, end in _split_ranges(data["classes_per_split"]) for i in range(first, end)]
    return DatasetSpec(data["name"], classes, "flat", None)


def _bilevel_spec(data: dict) -> DatasetSpec:
    per_super, names, counts = data["classes_per_superclass"], data["class_names"], data["images_per_class"]
    super_names = data["superclass_names"]
    classes, class_id = [], 0
    for split, first, end in _split_ranges(data["superclasses_per_split"]):
        for superclass in range(first, end):
            for _ in range(int(per_super[str(superclass)])):
                classes.append(SpecClass(class_id, str(names[str(class_id)]), split,
                                         str(super_names[str(superclass)]), _count(counts, class_id)))
                class_id += 1
    return DatasetSpec(data["name"], classes, "groups", None)


def _hierarchical_spec(data: dict) -> DatasetSpec:
    names = {int(i): str(wn_id) for i, wn_id in data["class_names"].items()}
    split_of, dag = {}, {}
    for key, split in SPEC_SPLITS.items():
        nodes = data["split_subgraphs"][key]
        internal = {node["wn_id"] for node in nodes if node["children_ids"]}
        for node in nodes:
            if node["children_ids"]:
                dag[f"{key}:{node['wn_id']}"] = [f"{key}:{c}" if c in internal else c for c in node["children_ids"]]
            else:
                split_of[node["wn_id"]] = split
    counts = {wn_id: int(n) for split_counts in data["images_per_class"].values()
              for wn_id, n in split_counts.items() if wn_id in split_of}
    classes = [SpecClass(i, names[i], split_of[names[i]], None, counts[names[i]]) for i in sorted(names)]
    order = [c.split for c in classes]
    if order != sorted(order, key=list(SPEC_SPLITS.values()).index):
        raise ValueError("class ids are not contiguous per split (train, then valid, then test)")
    return DatasetSpec(data["name"], classes, "dag", dag)


# --- the two file formats -----------------------------------------------------------------------------------

class H5Image:
    """Image `key` of a PMF per-class h5 file; the file stays open while one class is read."""

    _open_file: tuple[Path, Any] | None = None

    def __init__(self, path: Path, key: str) -> None:
        self.path, self.key = path, key

    def __str__(self) -> str:
        return f"{self.path}:/{self.key}"

    def open(self) -> Image.Image:
        return Image.fromarray(np.asarray(self._file()[self.key]["image"]))

    @staticmethod
    def close() -> None:
        if H5Image._open_file is not None:
            H5Image._open_file[1].close()
            H5Image._open_file = None

    def _file(self):
        import h5py

        if H5Image._open_file is None or H5Image._open_file[0] != self.path:
            if H5Image._open_file is not None:
                H5Image._open_file[1].close()
            H5Image._open_file = (self.path, h5py.File(self.path, "r"))
        return H5Image._open_file[1]


def h5_images(path: Path, expected: int) -> list[H5Image]:
    """The images of one PMF class file, checked against the count its spec gives."""
    import h5py

    if not path.is_file():
        raise SmatError(f"{path}: class file not found; the domain's {SPEC_FILE} lists this class")
    try:
        with h5py.File(path, "r") as handle:
            keys = sorted(handle.keys(), key=lambda k: (not k.isdigit(), int(k) if k.isdigit() else 0, k))
            bad = [k for k in keys if not k.isdigit() or not isinstance(handle[k], h5py.Group)
                   or "image" not in handle[k]]
    except OSError as err:
        raise SmatError(f"{path}: not a readable h5 file ({err})") from None
    if bad:
        raise SmatError(f"{path}: entry {bad[0]!r} is not an image group (PMF's layout: groups '0', '1', ... "
                        "each with an 'image' dataset)")
    if keys != [str(i) for i in range(len(keys))] or len(keys) != expected:
        raise SmatError(f"{path}: holds {len(keys)} images (groups {keys[:3]}...), but {SPEC_FILE} says {expected}")
    return [H5Image(path, key) for key in keys]


def _masked_crc(data: bytes) -> int:
    import google_crc32c

    crc = google_crc32c.value(data)
    return (((crc >> 15) | (crc << 17)) + 0xA282EAD8) & 0xFFFFFFFF


class TFRecordImage:
    """The "image" feature of one record of a TFRecord file, read (and its CRC checked) when opened."""

    def __init__(self, path: Path, offset: int, length: int) -> None:
        self.path, self.offset, self.length = path, offset, length

    def __str__(self) -> str:
        return f"{self.path}@{self.offset}"

    def open(self) -> Image.Image:
        with open(self.path, "rb") as handle:
            handle.seek(self.offset)
            data = handle.read(self.length)
            (crc,) = struct.unpack("<I", handle.read(4))
        if _masked_crc(data) != crc:
            raise SmatError(f"{self}: record data fails its CRC check; the file is corrupt: convert it again")
        image = example_bytes_feature(data, "image")
        if image is None:
            raise SmatError(f"{self}: the record has no 'image' feature (not a Meta-Dataset TFRecord)")
        return Image.open(io.BytesIO(image))


def tfrecord_images(path: Path, expected: int) -> list[TFRecordImage]:
    """The records of one class file (framing and length CRCs checked), checked against the spec's count."""
    if not path.is_file():
        raise SmatError(f"{path}: class file not found; the domain's {SPEC_FILE} lists this class")
    records, size = [], path.stat().st_size
    with open(path, "rb") as handle:
        while (offset := handle.tell()) < size:
            header = handle.read(12)
            if len(header) < 12:
                raise SmatError(f"{path}: truncated record at byte {offset}; the file is incomplete")
            length, crc = struct.unpack("<QI", header)
            if _masked_crc(header[:8]) != crc:
                raise SmatError(f"{path}: record length at byte {offset} fails its CRC check; not a TFRecord "
                                "file, or corrupt")
            if offset + 12 + length + 4 > size:
                raise SmatError(f"{path}: truncated record at byte {offset} ({length} bytes announced); the file "
                                "is incomplete")
            records.append(TFRecordImage(path, offset + 12, length))
            handle.seek(length + 4, io.SEEK_CUR)
    if len(records) != expected:
        raise SmatError(f"{path}: holds {len(records)} records, but {SPEC_FILE} says {expected}")
    return records


def example_bytes_feature(data: bytes, name: str) -> bytes | None:
    """The first value of bytes feature `name` of a serialised tf.train.Example (a minimal protobuf reader:
    Example.features = 1, Features.feature = 1 (map entries key = 1, value = 2), Feature.bytes_list = 1,
    BytesList.value = 1)."""
    for field, value in _fields(data):
        if field != 1:
            continue
        for entry_field, entry in _fields(value):
            if entry_field != 1:
                continue
            parts = dict(_fields(entry))
            if parts.get(1, b"").decode("utf-8", "replace") != name or 2 not in parts:
                continue
            for kind, values in _fields(parts[2]):
                if kind == 1:
                    for index, item in _fields(values):
                        if index == 1:
                            return item
    return None


def _fields(data: bytes):
    """(field number, bytes) of the length-delimited fields of a protobuf message; other wire types skipped."""
    position = 0
    while position < len(data):
        key, position = _varint(data, position)
        field, wire = key >> 3, key & 7
        if wire == 2:
            length, position = _varint(data, position)
            yield field, data[position:position + length]
            position += length
        elif wire == 0:
            _, position = _varint(data, position)
        elif wire == 1:
            position += 8
        elif wire == 5:
            position += 4
        else:
            raise SmatError(f"malformed protobuf (wire type {wire}); not a tf.train.Example")


def _varint(data: bytes, position: int) -> tuple[int, int]:
    result = shift = 0
    while True:
        if position >= len(data):
            raise SmatError("malformed protobuf (truncated varint); not a tf.train.Example")
        byte = data[position]
        result |= (byte & 0x7F) << shift
        position += 1
        if not byte & 0x80:
            return result, position
        shift += 7


# --- conversion ---------------------------------------------------------------------------------------------

READERS = {"tfrecords": (".tfrecords", tfrecord_images), "pmf-h5": (".h5", h5_images)}


def convert_meta_dataset(src: str | Path, out: str | Path, kind: str, image_size: int | None = None,
                         domain: str | None = None, skip_bad: bool = False, workers: int = 1):
    """Convert one Meta-Dataset domain folder (`{class id}{suffix}` files + dataset_spec.json) into a store,
    decoding in `workers` processes."""
    src = Path(src)
    if kind not in READERS:
        raise SmatError(f"format {kind!r}: expected one of {', '.join(READERS)}")
    if not src.is_dir():
        raise SmatError(f"{src}: domain folder not found")
    spec = read_spec(src / SPEC_FILE)
    suffix, reader = READERS[kind]
    classes = [SourceClass(c.name, c.split, c.group, reader(src / f"{c.class_id}{suffix}", c.n_images))
               for c in spec.classes]
    try:
        return write_store(out, classes, domain=domain or spec.name, source=src, image_size=image_size,
                           hierarchy=spec.hierarchy, dag=spec.dag, min_images=2, skip_bad=skip_bad,
                           details={"command": f"data convert {kind}", "spec": str(src / SPEC_FILE)},
                           workers=workers)
    finally:
        H5Image.close()


def spec_problems(store, spec_path: Path) -> list[str]:
    """Where a converted store disagrees with a dataset_spec.json: classes per split, images per class, names
    (Meta-Dataset's own consistency check, for `smat data check --spec`)."""
    spec = read_spec(spec_path)
    problems = []
    stored = {c.name: c for c in store.classes}
    for expected in spec.classes:
        got = stored.get(expected.name)
        if got is None:
            problems.append(f"class {expected.name!r} (id {expected.class_id}) is missing")
        elif got.split != expected.split:
            problems.append(f"class {expected.name!r} is in split {got.split}, the spec says {expected.split}")
        elif got.n_images != expected.n_images:
            problems.append(f"class {expected.name!r} has {got.n_images} images, the spec says {expected.n_images}")
    if extra := sorted(set(stored) - {c.name for c in spec.classes}):
        problems.append(f"{len(extra)} class(es) not in the spec, e.g. {extra[0]!r}")
    for split in SPEC_SPLITS.values():
        want = sum(c.split == split for c in spec.classes)
        have = len(store.class_ids(split))
        if want != have:
            problems.append(f"split {split}: {have} classes, the spec says {want}")
    return problems

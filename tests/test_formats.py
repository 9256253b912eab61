"""Source formats: Meta-Dataset TFRecords and PMF h5 (with dataset_spec.json), CIFAR pickles, MNIST idx,
Food-101, Oxford Pets and Stanford Cars lists. Every fixture is written here in its publisher's layout."""

from __future__ import annotations

import gzip
import io
import json
import pickle
import struct
from pathlib import Path

import h5py
import numpy as np
import pytest
from PIL import Image

from smat.cli import main
from smat.data.classic import convert_classic
from smat.data.episodes import sample_episodes
from smat.data.meta_dataset import _masked_crc, convert_meta_dataset, spec_problems
from smat.data.store import Store
from smat.io import SmatError

RNG = np.random.default_rng(0)


def picture(seed: int, size=(12, 10)) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)


def png_bytes(pixels: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


# --- protobuf / TFRecord writers (the published wire formats) ---------------------------------------------------

def _varint(value: int) -> bytes:
    out = bytearray()
    while True:
        byte, value = value & 0x7F, value >> 7
        out.append(byte | (0x80 if value else 0))
        if not value:
            return bytes(out)


def _field(number: int, payload: bytes) -> bytes:
    return _varint(number << 3 | 2) + _varint(len(payload)) + payload


def example(image: bytes, label: int) -> bytes:
    """tf.train.Example{features {feature {"image": bytes_list}, feature {"label": int64_list}}}."""
    image_feature = _field(1, _field(1, image))                        # Feature.bytes_list.value
    label_feature = _field(3, _field(1, _varint(label)))               # Feature.int64_list.value (packed)
    entries = _field(1, _field(1, b"image") + _field(2, image_feature)) + \
        _field(1, _field(1, b"label") + _field(2, label_feature))
    return _field(1, entries)


def tfrecord(records: list[bytes]) -> bytes:
    out = bytearray()
    for data in records:
        length = struct.pack("<Q", len(data))
        out += length + struct.pack("<I", _masked_crc(length)) + data + struct.pack("<I", _masked_crc(data))
    return bytes(out)


# --- dataset specs ------------------------------------------------------------------------------------------------

def flat_spec(name: str, per_split: dict[str, int], images: int) -> dict:
    n = sum(per_split.values())
    return {"__class__": "DatasetSpecification", "name": name, "classes_per_split": per_split,
            "images_per_class": {str(i): images for i in range(n)},
            "class_names": {str(i): f"{name}_class{i}" for i in range(n)}, "path": "x", "file_pattern": "{}.tfrecords"}


def bilevel_spec() -> dict:
    """Omniglot-like: 2 train alphabets of 5 characters, 1 valid, 1 test."""
    return {"__class__": "BiLevelDatasetSpecification", "name": "omniglot",
            "superclasses_per_split": {"TRAIN": 2, "VALID": 1, "TEST": 1},
            "classes_per_superclass": {str(s): 5 for s in range(4)},
            "images_per_class": {str(i): 2 for i in range(20)},
            "superclass_names": {str(s): f"alphabet{s}" for s in range(4)},
            "class_names": {str(i): f"alphabet{i // 5}/char{i % 5}" for i in range(20)},
            "path": "x", "file_pattern": "{}.tfrecords"}


def hierarchical_spec() -> dict:
    """ImageNet-like: train leaves n1..n10 under two internal nodes a, b below a root; valid and test graphs
    of 5 leaves each."""
    def node(wn_id, children=(), parents=()):
        return {"wn_id": wn_id, "words": wn_id, "children_ids": list(children), "parents_ids": list(parents)}

    train = [node("root", ["a", "b"]), node("a", [f"n{i}" for i in range(1, 6)], ["root"]),
             node("b", [f"n{i}" for i in range(6, 11)], ["root"])] + [node(f"n{i}", parents=["a" if i < 6 else "b"])
                                                                     for i in range(1, 11)]
    valid = [node("v", [f"v{i}" for i in range(5)])] + [node(f"v{i}", parents=["v"]) for i in range(5)]
    test = [node("t", [f"t{i}" for i in range(5)])] + [node(f"t{i}", parents=["t"]) for i in range(5)]
    leaves = [f"n{i}" for i in range(1, 11)] + [f"v{i}" for i in range(5)] + [f"t{i}" for i in range(5)]
    counts = {"TRAIN": {w: 2 for w in leaves[:10]} | {"root": 20, "a": 10, "b": 10},
              "VALID": {w: 2 for w in leaves[10:15]} | {"v": 10}, "TEST": {w: 2 for w in leaves[15:]} | {"t": 10}}
    return {"__class__": "HierarchicalDatasetSpecification", "name": "ilsvrc_2012",
            "split_subgraphs": {"TRAIN": train, "VALID": valid, "TEST": test}, "images_per_class": counts,
            "class_names": {str(i): w for i, w in enumerate(leaves)}, "path": "x", "file_pattern": "{}.tfrecords"}


def n_classes(spec: dict) -> int:
    return len(spec["class_names"])


def images_of(spec: dict, class_id: int) -> int:
    counts = spec["images_per_class"]
    if spec["__class__"] == "HierarchicalDatasetSpecification":
        wn_id = spec["class_names"][str(class_id)]
        return next(c[wn_id] for c in counts.values() if wn_id in c)
    return counts[str(class_id)]


def write_domain(root: Path, spec: dict, kind: str) -> tuple[Path, dict]:
    """A converted domain: dataset_spec.json and one class file per class; returns the pixels written."""
    root.mkdir(parents=True)
    (root / "dataset_spec.json").write_text(json.dumps(spec))
    pixels = {}
    for c in range(n_classes(spec)):
        images = [picture(100 * c + j) for j in range(images_of(spec, c))]
        pixels[c] = images
        if kind == "tfrecords":
            (root / f"{c}.tfrecords").write_bytes(tfrecord([example(png_bytes(p), c) for p in images]))
        else:
            with h5py.File(root / f"{c}.h5", "w") as handle:
                for j, image in enumerate(images):
                    group = handle.create_group(str(j))
                    group["image"], group["label"] = image, c
    return root, pixels


# --- classic sources in their publishers' layouts (also the paper run's data, tests/test_paper_run.py) ------------

def write_cifar(src: Path, version: int, n_classes: int, per_class: int) -> np.ndarray:
    """CIFAR-10 (`test_batch`, `batches.meta`) or CIFAR-100 (`test`, `meta`) python pickles; returns the images."""
    data_file, meta_file, label_key, names_key = (
        ("test_batch", "batches.meta", b"labels", b"label_names") if version == 10
        else ("test", "meta", b"fine_labels", b"fine_label_names"))
    src.mkdir(parents=True, exist_ok=True)
    n = n_classes * per_class
    images = np.random.default_rng(version).integers(0, 256, (n, 3, 32, 32), dtype=np.uint8)
    labels = [i % n_classes for i in range(n)]
    (src / data_file).write_bytes(pickle.dumps({b"data": images.reshape(n, -1), label_key: labels}))
    (src / meta_file).write_bytes(pickle.dumps({names_key: [f"class{c}".encode() for c in range(n_classes)]}))
    return images


def write_mnist(src: Path, per_class: int) -> None:
    """MNIST's test idx files, the labels gzipped (both spellings are read)."""
    n = 10 * per_class
    src.mkdir(parents=True, exist_ok=True)
    images = np.random.default_rng(1).integers(0, 256, (n, 28, 28), dtype=np.uint8)
    (src / "t10k-images-idx3-ubyte").write_bytes(struct.pack(">IIII", 2051, n, 28, 28) + images.tobytes())
    with gzip.open(src / "t10k-labels-idx1-ubyte.gz", "wb") as handle:
        handle.write(struct.pack(">II", 2049, n) + (np.arange(n, dtype=np.uint8) % 10).tobytes())


def write_food101(src: Path, n_classes: int, per_class: int) -> None:
    names = [f"dish{c}/{i}" for c in range(n_classes) for i in range(per_class)]
    for i, name in enumerate(names):
        _image_file(src / "images" / f"{name}.jpg", i)
    (src / "meta").mkdir(parents=True, exist_ok=True)
    (src / "meta" / "test.txt").write_text("".join(f"{name}\n" for name in names))


def write_pets(src: Path, n_classes: int, per_class: int) -> None:
    lines = []
    for c in range(n_classes):
        for i in range(per_class):
            _image_file(src / "images" / f"breed{c}_{i}.jpg", 10 * c + i)
            lines.append(f"breed{c}_{i} {c + 1} 1 {c + 1}\n")
    (src / "annotations").mkdir(parents=True, exist_ok=True)
    (src / "annotations" / "test.txt").write_text("".join(lines))


def write_cars(src: Path, n_classes: int, per_class: int) -> None:
    """Stanford Cars in torchvision's layout: cars_test/ and the devkit's two .mat files."""
    from scipy.io import savemat

    n = n_classes * per_class
    for i in range(n):
        _image_file(src / "cars_test" / f"{i:05d}.jpg", i)
    (src / "devkit").mkdir(parents=True, exist_ok=True)
    savemat(src / "devkit" / "cars_meta.mat",
            {"class_names": np.array([[f"Car {c}" for c in range(n_classes)]], dtype=object)})
    annotations = np.array([[(f"{i:05d}.jpg", i % n_classes + 1) for i in range(n)]],
                           dtype=[("fname", object), ("class", object)])
    savemat(src / "devkit" / "cars_test_annos_withlabels.mat", {"annotations": annotations})


def write_image_folder_with_splits(src: Path, splits_file: Path, splits: dict[str, int], per_class: int) -> None:
    """A DomainNet domain: CLASS/*.jpg, and SMAT's class split as a JSON file (its `valid` key)."""
    split_of = {}
    for split, count in splits.items():
        split_of[split] = [f"{split}_class{c}" for c in range(count)]
    for c, name in enumerate(n for names in split_of.values() for n in names):
        for i in range(per_class):
            _image_file(src / name / f"{i}.jpg", 10 * c + i)
    splits_file.write_text(json.dumps(split_of))


# --- Meta-Dataset ---------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("kind", ["tfrecords", "pmf-h5"])
def test_meta_dataset_domain_converts_with_its_splits_and_pixels(tmp_path, kind):
    spec = flat_spec("aircraft", {"TRAIN": 6, "VALID": 5, "TEST": 5}, images=4)
    src, pixels = write_domain(tmp_path / "aircraft", spec, kind)
    store = convert_meta_dataset(src, tmp_path / "store", kind, image_size=10)
    assert store.domain == "aircraft" and store.hierarchy == "flat" and store.image_size == 10
    assert [len(store.class_ids(s)) for s in ("train", "val", "test")] == [6, 5, 5]
    np.testing.assert_array_equal(store.images(7, [2])[0], pixels[7][2][:, 1:11])   # 12x10 -> centre 10x10
    assert spec_problems(store, src / "dataset_spec.json") == []
    assert main(["data", "check", str(tmp_path / "store"), "--spec", str(src / "dataset_spec.json")]) == 0


def test_omniglot_alphabets_become_groups_and_drive_two_level_episodes(tmp_path):
    src, _ = write_domain(tmp_path / "omniglot", bilevel_spec(), "tfrecords")
    store = convert_meta_dataset(src, tmp_path / "store", "tfrecords", image_size=8)
    assert store.hierarchy == "groups"
    assert {store.classes[i].group for i in store.class_ids("train")} == {"alphabet0", "alphabet1"}
    for episode in sample_episodes(store, "train", n=20, seed=1):
        assert len({store.classes[c].group for c in episode.classes}) == 1       # one alphabet per episode


def test_imagenet_graph_becomes_a_dag_and_episodes_span_one_node(tmp_path):
    spec = hierarchical_spec()
    src, _ = write_domain(tmp_path / "ilsvrc_2012", spec, "pmf-h5")
    store = convert_meta_dataset(src, tmp_path / "store", "pmf-h5", image_size=8)
    assert store.hierarchy == "dag" and [len(store.class_ids(s)) for s in ("train", "val", "test")] == [10, 5, 5]
    names = {store.classes[i].name for i in store.class_ids("train")}
    spans = [{f"n{i}" for i in range(1, 6)}, {f"n{i}" for i in range(6, 11)}, names]    # a, b, root
    seen = set()
    for episode in sample_episodes(store, "train", n=30, seed=2):
        classes = {store.classes[c].name for c in episode.classes}
        assert classes in spans
        seen.add(frozenset(classes))
    assert len(seen) == 3                                             # every node of the train graph drawn
    assert all({store.classes[c].name for c in e.classes} == {f"t{i}" for i in range(5)}
               for e in sample_episodes(store, "test", n=3, seed=3))


def _bad(tmp_path, kind="tfrecords"):
    spec = flat_spec("dtd", {"TRAIN": 2, "VALID": 0, "TEST": 2}, images=3)
    return write_domain(tmp_path / "dtd", spec, kind)[0]


@pytest.mark.parametrize("damage, message", [
    (lambda src: (src / "dataset_spec.json").unlink(), r"dataset_spec\.json: dataset specification not found"),
    (lambda src: (src / "2.tfrecords").unlink(), r"2\.tfrecords: class file not found"),
    (lambda src: (src / "1.tfrecords").write_bytes((src / "1.tfrecords").read_bytes()[:-9]),
     r"1\.tfrecords: truncated record at byte"),
    (lambda src: (src / "1.tfrecords").write_bytes(b"\x05" + (src / "1.tfrecords").read_bytes()[1:]),
     r"1\.tfrecords: record length at byte 0 fails its CRC check"),
    (lambda src: (src / "0.tfrecords").write_bytes(tfrecord([example(png_bytes(picture(0)), 0)] * 2)),
     r"0\.tfrecords: holds 2 records, but dataset_spec\.json says 3"),
    (lambda src: (src / "dataset_spec.json").write_text('{"__class__": "Other"}'), "not a Meta-Dataset dataset spec"),
])
def test_bad_tfrecord_domains_are_one_line_errors_and_write_nothing(tmp_path, damage, message):
    src = _bad(tmp_path)
    damage(src)
    with pytest.raises(SmatError, match=message):
        convert_meta_dataset(src, tmp_path / "out", "tfrecords", image_size=8)
    assert not (tmp_path / "out").exists()


def test_a_record_whose_data_fails_its_crc_is_refused(tmp_path):
    src = _bad(tmp_path)
    data = bytearray((src / "3.tfrecords").read_bytes())
    data[40] ^= 0xFF                                             # inside the first record's data
    (src / "3.tfrecords").write_bytes(bytes(data))
    with pytest.raises(SmatError, match=r"3\.tfrecords@12: record data fails its CRC check"):
        convert_meta_dataset(src, tmp_path / "out", "tfrecords", image_size=8)
    assert not (tmp_path / "out").exists()


def test_bad_h5_domains_are_one_line_errors(tmp_path):
    src = _bad(tmp_path, "pmf-h5")
    with h5py.File(src / "1.h5", "a") as handle:
        del handle["2"]["image"]
    with pytest.raises(SmatError, match=r"1\.h5: entry '2' is not an image group"):
        convert_meta_dataset(src, tmp_path / "out", "pmf-h5")
    (src / "0.h5").write_bytes(b"not h5")
    with pytest.raises(SmatError, match=r"0\.h5: not a readable h5 file"):
        convert_meta_dataset(src, tmp_path / "out", "pmf-h5")
    assert not (tmp_path / "out").exists()


def test_check_spec_reports_a_store_that_disagrees(tmp_path):
    src = _bad(tmp_path)
    convert_meta_dataset(src, tmp_path / "store", "tfrecords", image_size=8)
    spec = json.loads((src / "dataset_spec.json").read_text())
    spec["images_per_class"]["1"] = 5
    (tmp_path / "other_spec.json").write_text(json.dumps(spec))
    problems = spec_problems(Store(tmp_path / "store"), tmp_path / "other_spec.json")
    assert problems == ["class 'dtd_class1' has 3 images, the spec says 5"]
    assert main(["data", "check", str(tmp_path / "store"), "--spec", str(tmp_path / "other_spec.json")]) == 2


# --- classic datasets -------------------------------------------------------------------------------------------------

def test_cifar10_and_100_pickles(tmp_path):
    for folder, data_file, meta_file, label_key, names_key in (
            ("c10", "test_batch", "batches.meta", b"labels", b"label_names"),
            ("c100", "test", "meta", b"fine_labels", b"fine_label_names")):
        src = tmp_path / folder
        src.mkdir()
        images = RNG.integers(0, 256, (6, 3, 32, 32), dtype=np.uint8)
        (src / data_file).write_bytes(pickle.dumps({b"data": images.reshape(6, -1), label_key: [0, 1, 2, 0, 1, 2]}))
        (src / meta_file).write_bytes(pickle.dumps({names_key: [b"cat", b"dog", b"ship"]}))
        store = convert_classic("cifar", src, tmp_path / f"{folder}_store")
        assert [c.name for c in store.classes] == ["cat", "dog", "ship"] and store.image_size == 32
        np.testing.assert_array_equal(store.images(1, [1])[0], images[4].transpose(1, 2, 0))   # 2nd "dog"
    (tmp_path / "wrong").mkdir()
    (tmp_path / "wrong" / "test_batch").write_bytes(pickle.dumps([1, 2, 3]))
    with pytest.raises(SmatError, match=r"test_batch: a pickle of the wrong kind \(list"):
        convert_classic("cifar", tmp_path / "wrong", tmp_path / "out")


def test_mnist_idx_files_plain_and_gzipped(tmp_path):
    images = RNG.integers(0, 256, (20, 28, 28), dtype=np.uint8)
    labels = np.arange(20, dtype=np.uint8) % 10
    src = tmp_path / "mnist"
    src.mkdir()
    (src / "t10k-images-idx3-ubyte").write_bytes(struct.pack(">IIII", 2051, 20, 28, 28) + images.tobytes())
    with gzip.open(src / "t10k-labels-idx1-ubyte.gz", "wb") as handle:
        handle.write(struct.pack(">II", 2049, 20) + labels.tobytes())
    store = convert_classic("mnist", src, tmp_path / "store")
    assert len(store.classes) == 10 and store.image_size == 28
    np.testing.assert_array_equal(store.images(3, [1])[0][..., 0], images[13])
    (src / "t10k-images-idx3-ubyte").write_bytes(struct.pack(">IIII", 2049, 20, 28, 28))
    with pytest.raises(SmatError, match="not an idx file with magic number 2051"):
        convert_classic("mnist", src, tmp_path / "out")


def _image_file(path: Path, seed: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(picture(seed, (16, 12))).save(path)


def test_food101_and_pets_lists(tmp_path):
    food = tmp_path / "food-101"
    for i, name in enumerate(["apple_pie/1", "apple_pie/2", "ramen/7", "ramen/9"]):
        _image_file(food / "images" / f"{name}.jpg", i)
    (food / "meta").mkdir()
    (food / "meta" / "test.txt").write_text("apple_pie/1\napple_pie/2\nramen/7\nramen/9\n")
    store = convert_classic("food101", food, tmp_path / "food", image_size=12)
    assert [(c.name, c.n_images) for c in store.classes] == [("apple_pie", 2), ("ramen", 2)]

    pets = tmp_path / "pets"
    for i, name in enumerate(["Abyssinian_1", "Abyssinian_2", "great_pyrenees_3", "great_pyrenees_4"]):
        _image_file(pets / "images" / f"{name}.jpg", i)
    (pets / "annotations").mkdir()
    (pets / "annotations" / "test.txt").write_text(
        "Abyssinian_1 1 1 1\nAbyssinian_2 1 1 1\ngreat_pyrenees_3 2 2 1\ngreat_pyrenees_4 2 2 1\n")
    store = convert_classic("pets", pets, tmp_path / "pets_store", image_size=12)
    assert [c.name for c in store.classes] == ["Abyssinian", "great_pyrenees"]
    (pets / "annotations" / "test.txt").write_text("Abyssinian_1 1 1 1\nmissing_5 3 1 2\n")
    with pytest.raises(SmatError, match=r"test\.txt, line 2: image .*missing_5\.jpg not found"):
        convert_classic("pets", pets, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_stanford_cars_devkit(tmp_path):
    from scipy.io import savemat

    cars = tmp_path / "cars"
    for i in range(4):
        _image_file(cars / "cars_test" / f"{i:05d}.jpg", i)
    (cars / "devkit").mkdir()
    savemat(cars / "devkit" / "cars_meta.mat",
            {"class_names": np.array([["AM General Hummer"], ["Audi R8"]], dtype=object).T})
    annotations = np.array([[(f"{i:05d}.jpg", i % 2 + 1) for i in range(4)]],
                           dtype=[("fname", object), ("class", object)])
    savemat(cars / "devkit" / "cars_test_annos_withlabels.mat", {"annotations": annotations})
    store = convert_classic("cars", cars, tmp_path / "store", image_size=12)
    assert [(c.name, c.n_images) for c in store.classes] == [("AM General Hummer", 2), ("Audi R8", 2)]

"""Classic image datasets as their publishers distribute them, converted into stores (`smat data convert
cifar|mnist|food101|pets|cars SRC --out STORE`). They are test-only OOD sets in the paper (METHOD §3.2, §3.3),
so each converts its official **test** images; every class goes to the test split (role ood), or a seeded
60/15/25 class split with role id, or the class lists of a splits file.

* cifar: `test_batch` + `batches.meta` (CIFAR-10) or `test` + `meta` (CIFAR-100, fine labels), the python
  pickle versions;
* mnist: `t10k-images-idx3-ubyte` and `t10k-labels-idx1-ubyte` (optionally .gz), classes "0".."9";
* food101: `images/CLASS/ID.jpg` with `meta/test.txt` listing "CLASS/ID";
* pets: `images/NAME.jpg` with `annotations/test.txt` lines "NAME CLASS_ID SPECIES BREED_ID", the class being
  NAME without its trailing "_number";
* cars: `cars_test/*.jpg` with `cars_test_annos_withlabels.mat` and `cars_meta.mat` (in SRC or SRC/devkit).
"""

from __future__ import annotations

import gzip
import pickle
import struct
from collections import defaultdict
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from smat.data.class_splits import default_splits, read_splits
from smat.data.store import SourceClass, write_store
from smat.io import SmatError


class ArrayImage:
    """One image held in memory (decoded from a pickle or idx file)."""

    def __init__(self, name: str, pixels: np.ndarray) -> None:
        self.name, self.pixels = name, pixels

    def __str__(self) -> str:
        return self.name

    def open(self) -> Image.Image:
        return Image.fromarray(self.pixels)


# --- readers: {class name: [images]} ---------------------------------------------------------------------------

def _cifar(src: Path) -> dict[str, list]:
    for data_name, meta_name, labels_key, names_key in (("test_batch", "batches.meta", b"labels", b"label_names"),
                                                        ("test", "meta", b"fine_labels", b"fine_label_names")):
        if (src / data_name).is_file():
            break
    else:
        raise SmatError(f"{src}: neither CIFAR-10's test_batch nor CIFAR-100's test found (the python versions, "
                        "cifar-10-batches-py/ or cifar-100-python/)")
    data, meta = _unpickle(src / data_name), _unpickle(src / meta_name)
    try:
        pixels = np.asarray(data[b"data"], dtype=np.uint8).reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)
        labels = list(data[labels_key])
        names = [n.decode() for n in meta[names_key]]
    except (KeyError, TypeError, ValueError, AttributeError) as err:
        raise SmatError(f"{src / data_name}: not a CIFAR batch of the expected kind (missing or bad {err})") from None
    if len(labels) != len(pixels):
        raise SmatError(f"{src / data_name}: {len(pixels)} images but {len(labels)} labels")
    if bad := [label for label in labels if not isinstance(label, (int, np.integer)) or not 0 <= label < len(names)]:
        raise SmatError(f"{src / data_name}: label {bad[0]!r} is not a class index of {src / meta_name} "
                        f"(0..{len(names) - 1})")
    classes: dict[str, list] = {name: [] for name in names}
    for i, (label, image) in enumerate(zip(labels, pixels)):
        classes[names[label]].append(ArrayImage(f"{src / data_name}[{i}]", image))
    return classes


class _CifarUnpickler(pickle.Unpickler):
    """Unpickles only what CIFAR's python batches hold: dicts, lists, bytes, numbers and numpy arrays (as numpy
    and Python pickle them at protocols 2 to 5). Any other global (a function to call, a class to build) is
    refused, so a crafted batch cannot run code."""

    ALLOWED = {(f"numpy.{core}.{module}", name) for core in ("core", "_core")
               for module, name in (("multiarray", "_reconstruct"), ("multiarray", "scalar"),
                                    ("numeric", "_frombuffer"))} | \
        {("numpy", "ndarray"), ("numpy", "dtype"), ("_codecs", "encode")}

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) not in self.ALLOWED:
            raise pickle.UnpicklingError(f"it refers to {module}.{name}, which a CIFAR batch never holds")
        return super().find_class(module, name)


def _unpickle(path: Path) -> Any:
    """A CIFAR pickle, through the restricted unpickler above."""
    if not path.is_file():
        raise SmatError(f"{path}: not found")
    try:
        with open(path, "rb") as handle:
            data = _CifarUnpickler(handle, encoding="bytes").load()
    except (pickle.UnpicklingError, EOFError, AttributeError, ImportError, ValueError, TypeError, IndexError,
            KeyError, MemoryError) as err:
        raise SmatError(f"{path}: not a readable CIFAR pickle ({err})") from None
    if not isinstance(data, dict):
        raise SmatError(f"{path}: a pickle of the wrong kind ({type(data).__name__}, expected a CIFAR dict)")
    return data


def _relative(line: str, where: str) -> str:
    """A relative image path read from a list file, refused if it could leave the dataset's folder."""
    parts = line.replace("\\", "/").split("/")
    if not line or line.startswith("/") or "\0" in line or any(part in ("", ".", "..") for part in parts):
        raise SmatError(f"{where}: {line!r} is not a relative path inside the dataset (no '..', no absolute "
                        "path)")
    return line


def _idx(path: Path, magic: int) -> np.ndarray:
    candidates = [path, path.with_name(path.name + ".gz")]
    found = next((p for p in candidates if p.is_file()), None)
    if found is None:
        raise SmatError(f"{path}: not found (nor {path.name}.gz)")
    opener = gzip.open if found.suffix == ".gz" else open
    with opener(found, "rb") as handle:
        data = handle.read()
    if len(data) < 8 or struct.unpack(">I", data[:4])[0] != magic:
        raise SmatError(f"{found}: not an idx file with magic number {magic}")
    dims = data[3]
    shape = struct.unpack(f">{dims}I", data[4:4 + 4 * dims])
    body = np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * dims)
    if body.size != int(np.prod(shape)):
        raise SmatError(f"{found}: {body.size} bytes of data, but the header announces {shape}")
    return body.reshape(shape)


def _mnist(src: Path) -> dict[str, list]:
    images = _idx(src / "t10k-images-idx3-ubyte", 2051)
    labels = _idx(src / "t10k-labels-idx1-ubyte", 2049)
    if len(images) != len(labels):
        raise SmatError(f"{src}: {len(images)} images but {len(labels)} labels")
    classes: dict[str, list] = {str(d): [] for d in range(10)}
    for i, (label, image) in enumerate(zip(labels, images)):
        classes[str(int(label))].append(ArrayImage(f"{src}/t10k[{i}]", image))
    return classes


def _listed_images(list_file: Path, image_of) -> dict[str, list]:
    """{class: [image paths]} from a list file; `image_of(name)` gives (class, path) for the first field
    of a line, checked to stay inside the dataset."""
    if not list_file.is_file():
        raise SmatError(f"{list_file}: not found")
    classes: dict[str, list] = defaultdict(list)
    for number, line in enumerate(list_file.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        name, path = image_of(_relative(line.split()[0], f"{list_file}, line {number}"))
        if not path.is_file():
            raise SmatError(f"{list_file}, line {number}: image {path} not found")
        classes[name].append(path)
    return dict(classes)


def _food101(src: Path) -> dict[str, list]:
    return _listed_images(src / "meta" / "test.txt",
                          lambda name: (name.split("/")[0], src / "images" / f"{name}.jpg"))


def _pets(src: Path) -> dict[str, list]:
    def image_of(name: str) -> tuple[str, Path]:
        return name.rsplit("_", 1)[0], src / "images" / f"{name}.jpg"

    return _listed_images(src / "annotations" / "test.txt", image_of)


def _cars(src: Path) -> dict[str, list]:
    from scipy.io import loadmat

    folder = src if (src / "cars_meta.mat").is_file() else src / "devkit"
    paths = {"annotations": folder / "cars_test_annos_withlabels.mat", "meta": folder / "cars_meta.mat"}
    if not paths["annotations"].is_file():
        paths["annotations"] = src / "cars_test_annos_withlabels.mat"
    for path in paths.values():
        if not path.is_file():
            raise SmatError(f"{path}: not found (Stanford Cars' devkit file)")
    try:
        names = [str(n[0]) for n in loadmat(paths["meta"])["class_names"][0]]
        annotations = loadmat(paths["annotations"])["annotations"][0]
        rows = [(str(a["fname"][0]), int(a["class"][0][0])) for a in annotations]
    except (KeyError, ValueError, IndexError, TypeError) as err:
        raise SmatError(f"{paths['annotations']}: not Stanford Cars annotations "
                        f"({type(err).__name__}: {err})") from None
    classes: dict[str, list] = defaultdict(list)
    for fname, label in rows:
        path = src / "cars_test" / _relative(fname, str(paths["annotations"]))
        if not path.is_file():
            raise SmatError(f"{paths['annotations']}: image {path} not found")
        classes[names[label - 1]].append(path)
    return dict(classes)


READERS = {"cifar": _cifar, "mnist": _mnist, "food101": _food101, "pets": _pets, "cars": _cars}


def convert_classic(kind: str, src: str | Path, out: str | Path, image_size: int | None = None,
                    splits: str | Path | None = None, role: str = "ood", domain: str | None = None, seed: int = 0,
                    workers: int = 1):
    """Convert the test images of dataset `kind` at `src` into a store at `out`, decoding in `workers` processes."""
    src = Path(src)
    if kind not in READERS:
        raise SmatError(f"format {kind!r}: expected one of {', '.join(READERS)}")
    if not src.is_dir():
        raise SmatError(f"{src}: source folder not found")
    images = READERS[kind](src)
    names = sorted(images)
    if splits:
        split_of, groups, dag = read_splits(Path(splits), src, names)
    else:
        split_of, groups, dag = default_splits(names, role, seed), None, None
    order = sorted(names, key=lambda n: (["train", "val", "test"].index(split_of[n]), n))
    classes = [SourceClass(n, split_of[n], groups[n] if groups else None, images[n]) for n in order]
    return write_store(out, classes, domain=domain or kind, source=src, image_size=image_size,
                       hierarchy="groups" if groups else "dag" if dag else "flat", dag=dag,
                       details={"command": f"data convert {kind}", "role": role, "seed": seed,
                                "splits_file": str(splits) if splits else None}, workers=workers)

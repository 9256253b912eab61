"""`smat data convert --workers N`: images decoded in N processes give the same store, byte for byte."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from smat.data.meta_dataset import convert_meta_dataset
from smat.data.store import convert_imagefolder
from smat.io import SmatError
from test_formats import flat_spec, write_domain


def _image_folder(root: Path, corrupt: bool = False) -> Path:
    """Three classes of images of several sizes and modes (so that resizing and conversion both run)."""
    rng = np.random.default_rng(0)
    for c in range(3):
        folder = root / f"class{c}"
        folder.mkdir(parents=True)
        for i in range(7):
            h, w = int(rng.integers(20, 60)), int(rng.integers(20, 60))
            pixels = rng.integers(0, 256, size=(h, w, 3), dtype=np.uint8)
            image = Image.fromarray(pixels).convert("L" if i % 3 == 0 else "RGB")
            image.save(folder / f"{i:02d}.{'png' if i % 2 else 'jpg'}")
    if corrupt:
        (root / "class1" / "03.png").write_bytes(b"not an image")
    return root


def _store(out: Path) -> tuple[bytes, dict]:
    """The store's pixels and its manifest without the parts that name a time, a path or a host."""
    manifest = json.loads((out / "manifest.json").read_text())
    for key in ("provenance", "manifest_sha256", "source"):
        manifest.pop(key)
    return (out / "images.npy").read_bytes(), manifest


@pytest.mark.parametrize("skip_bad", [False, True])
def test_two_workers_write_the_store_one_worker_writes(tmp_path, skip_bad):
    src = _image_folder(tmp_path / "src", corrupt=skip_bad)
    convert_imagefolder(src, tmp_path / "one", image_size=24, skip_bad=skip_bad)
    convert_imagefolder(src, tmp_path / "two", image_size=24, skip_bad=skip_bad, workers=2)
    one, two = _store(tmp_path / "one"), _store(tmp_path / "two")
    assert one[0] == two[0] and one[1] == two[1]
    assert len(one[1]["skipped_images"]) == (1 if skip_bad else 0)


def test_workers_read_meta_dataset_class_files_in_order(tmp_path):
    for kind in ("pmf-h5", "tfrecords"):
        src, _ = write_domain(tmp_path / kind / "aircraft", flat_spec("aircraft", {"TRAIN": 3, "VALID": 2, "TEST": 2},
                                                                      images=3), kind)
        convert_meta_dataset(src, tmp_path / kind / "one", kind, image_size=16)
        convert_meta_dataset(src, tmp_path / kind / "two", kind, image_size=16, workers=2)
        assert _store(tmp_path / kind / "one") == _store(tmp_path / kind / "two"), kind


def test_an_unreadable_image_stops_every_worker_with_one_line(tmp_path):
    src = _image_folder(tmp_path / "src", corrupt=True)
    with pytest.raises(SmatError, match=r"03\.png: cannot read image .*--skip-bad"):
        convert_imagefolder(src, tmp_path / "out", image_size=24, workers=2)
    assert not (tmp_path / "out").exists()
    with pytest.raises(SmatError, match="--workers 0"):
        convert_imagefolder(src, tmp_path / "out", image_size=24, workers=0)

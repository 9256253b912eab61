"""Dataset store: conversion from class folders, round trip, manifest, check_store, and every bad input."""

from __future__ import annotations

import json
import logging
import pickle
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from smat.cli import main
from smat.data.store import Store, check_store, convert_imagefolder
from smat.io import SmatError, read_json, write_json


def make_imagefolder(root, counts, size=8, seed=0, square=True):
    """Random RGB PNGs root/{class}/{i}.png; returns {class: [pixels in file-name order]}."""
    rng = np.random.default_rng(seed)
    pixels = {}
    for name, n in counts.items():
        (root / name).mkdir(parents=True)
        images = {f"{i}.png": rng.integers(0, 256, (size, size if square else size + 2, 3), dtype=np.uint8)
                  for i in range(n)}
        for file, image in images.items():
            Image.fromarray(image).save(root / name / file)
        pixels[name] = [images[f] for f in sorted(images)]
    return pixels


def leftovers(parent, out_name):
    return [p.name for p in parent.iterdir() if p.name.startswith(f".{out_name}.")]


def test_round_trip_keeps_pixels_and_file_name_order(tmp_path):
    pixels = make_imagefolder(tmp_path / "raw", {"b": 12, "a": 3, "c": 5})
    store = convert_imagefolder(tmp_path / "raw", tmp_path / "store", domain="toy")
    assert store.domain == "toy" and store.image_size == 8 and store.hierarchy == "flat"
    assert [c.name for c in store.classes] == ["a", "b", "c"]  # role "ood": all test, by name
    assert store.class_ids("test") == [0, 1, 2] and store.class_ids("train") == []
    for class_id, info in enumerate(store.classes):
        assert info.n_images == len(pixels[info.name])
        read = store.images(class_id, list(range(info.n_images)))
        assert read.dtype == np.uint8 and read.shape == (info.n_images, 8, 8, 3)
        np.testing.assert_array_equal(read, np.stack(pixels[info.name]))  # "10.png" sorts before "2.png"
    np.testing.assert_array_equal(store.images(1, [11, 0]), np.stack([pixels["b"][11], pixels["b"][0]]))
    assert [c.offset for c in store.classes] == [0, 3, 15]
    assert check_store(tmp_path / "store") == []
    again = pickle.loads(pickle.dumps(store))  # data-loader workers reopen the memory map
    np.testing.assert_array_equal(again.images(2, [4]), store.images(2, [4]))


def test_resize_keeps_the_aspect_ratio_and_manifest_records_provenance(tmp_path):
    """Shorter side to N (PIL bicubic), then the centre N×N, as torchvision's Resize(N) + CenterCrop(N)."""
    pixels = make_imagefolder(tmp_path / "raw", {"x": 2, "y": 2}, size=10, square=False)   # 12 wide, 10 high
    store = convert_imagefolder(tmp_path / "raw", tmp_path / "store", image_size=5)
    resized = np.asarray(Image.fromarray(pixels["y"][1]).resize((6, 5), Image.Resampling.BICUBIC))
    np.testing.assert_array_equal(store.images(1, [1])[0], resized[:, 0:5])   # round((6 - 5) / 2) = 0
    manifest = read_json(tmp_path / "store" / "manifest.json")
    assert manifest["format"] == "smat-store/1" and manifest["image_size"] == 5
    assert manifest["source"] == str((tmp_path / "raw").resolve())
    assert manifest["provenance"]["smat_version"] and manifest["provenance"]["role"] == "ood"
    assert manifest["excluded"] == [] and manifest["skipped_images"] == []


def _stored(tmp_path, image: Image.Image, name: str = "img.png", **save) -> np.ndarray:
    """The pixels `smat data convert` stores for one image file (in a class of its own, twice)."""
    folder = tmp_path / "raw" / "c"
    folder.mkdir(parents=True)
    for i in range(2):
        image.save(folder / f"{i}_{name}", **save)
    return convert_imagefolder(tmp_path / "raw", tmp_path / "store").images(0, [0])[0]


def test_transparent_strokes_are_composited_onto_white(tmp_path):
    rgba = np.zeros((8, 8, 4), np.uint8)                  # fully transparent black ...
    rgba[2:6, 3, 3] = 255                                 # ... with an opaque black stroke
    rgba[7, 7] = (255, 0, 0, 128)                         # and a half-transparent red pixel
    pixels = _stored(tmp_path, Image.fromarray(rgba, "RGBA"))
    assert (pixels[2:6, 3] == 0).all() and (pixels[0, 0] == 255).all()
    np.testing.assert_array_equal(pixels[7, 7], [255, 127, 127])


def test_palette_transparency_and_grey_alpha_are_composited(tmp_path):
    palette = Image.fromarray(np.array([[0, 1], [1, 1]] * 2, np.uint8).reshape(4, 2).repeat(2, 1), "P")
    palette.putpalette([0, 0, 0, 0, 0, 255] + [0] * 762)
    pixels = _stored(tmp_path / "p", palette, transparency=0)       # colour 0 is transparent, 1 is blue
    assert (pixels[pixels.sum(-1) < 765] == [0, 0, 255]).all() and (pixels == 255).all(-1).any()
    la = Image.fromarray(np.stack([np.zeros((4, 4), np.uint8), np.full((4, 4), 0, np.uint8)], -1), "LA")
    assert (_stored(tmp_path / "la", la) == 255).all()              # black, but fully transparent


def test_16_bit_grey_is_scaled_not_clipped(tmp_path):
    grey = np.array([[0, 257 * 64], [257 * 128, 65535]], np.uint16).repeat(2, 0).repeat(2, 1)
    pixels = _stored(tmp_path, Image.fromarray(grey))
    np.testing.assert_array_equal(pixels[::2, ::2, 0], [[0, 64], [128, 255]])
    assert (pixels[..., 0] == pixels[..., 2]).all()


def test_exif_orientation_is_applied(tmp_path):
    upright = np.zeros((6, 6, 3), np.uint8)
    upright[0, :] = 255                                   # the top row is white
    image = Image.fromarray(np.rot90(upright, k=1).copy())  # stored rotated 90° counter-clockwise ...
    exif = Image.Exif()
    exif[0x0112] = 6                                      # ... with the tag that says "rotate 90° clockwise"
    pixels = _stored(tmp_path, image, name="img.jpg", exif=exif, quality=100)
    assert pixels[0].mean() > 200 and pixels[:, 0].mean() < 100 and pixels[-1].mean() < 50


def test_a_full_disk_is_a_message_and_leaves_nothing(tmp_path):
    """A file-size limit stands in for a full disk: without the up-front allocation the memory-mapped writes
    would die of SIGBUS (or SIGXFSZ) with no message and leave a hidden partial folder."""
    make_imagefolder(tmp_path / "raw", {"a": 40, "b": 40}, size=64)       # 983 kB of pixels
    script = (
        "import resource, signal, sys\n"
        "signal.signal(signal.SIGXFSZ, signal.SIG_IGN)\n"
        "resource.setrlimit(resource.RLIMIT_FSIZE, (200_000, 200_000))\n"
        "from smat.cli import main\n"
        f"sys.exit(main(['data', 'convert', 'imagefolder', {str(tmp_path / 'raw')!r}, '--out', "
        f"{str(tmp_path / 'store')!r}]))\n")
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert result.returncode == 2, result.stderr
    assert "not enough disk space for the store (1.0 MB of images: File too large)" in result.stderr
    assert "Traceback" not in result.stderr and len(result.stderr.strip().splitlines()) <= 2
    assert not (tmp_path / "store").exists() and leftovers(tmp_path, "store") == []


def test_splits_file_groups_and_fingerprint(tmp_path):
    raw = tmp_path / "raw"
    make_imagefolder(raw, {"a1": 3, "a2": 3, "b1": 4, "b2": 2, "c1": 2})
    write_json(raw / "splits.json", {"train": ["a2", "a1"], "valid": ["b1"], "test": ["b2", "c1"],
                                     "groups": {"a1": "A", "a2": "A", "b1": "B", "b2": "B", "c1": "C"}})
    store = convert_imagefolder(raw, tmp_path / "s1")
    assert store.hierarchy == "groups"
    assert [(c.name, c.split, c.group) for c in store.classes] == [
        ("a1", "train", "A"), ("a2", "train", "A"), ("b1", "val", "B"), ("b2", "test", "B"), ("c1", "test", "C")]
    assert store.class_ids("val") == [2]
    # The fingerprint depends on domain, size and per-class (name, split, count), not on when it was built.
    assert convert_imagefolder(raw, tmp_path / "s2", domain="raw").fingerprint == store.fingerprint
    (raw / "c1" / "1.png").unlink()
    changed = convert_imagefolder(raw, tmp_path / "s3", min_images=1 + 1, domain="raw")
    assert changed.fingerprint != store.fingerprint


def test_default_id_split_is_seeded_60_15_25(tmp_path):
    make_imagefolder(tmp_path / "raw", {f"k{i:02d}": 2 for i in range(20)}, size=4)
    first = convert_imagefolder(tmp_path / "raw", tmp_path / "a", role="id", seed=3)
    again = convert_imagefolder(tmp_path / "raw", tmp_path / "b", role="id", seed=3)
    other = convert_imagefolder(tmp_path / "raw", tmp_path / "c", role="id", seed=4)
    assert [len(first.class_ids(s)) for s in ("train", "val", "test")] == [12, 3, 5]
    assert first.classes == again.classes and first.classes != other.classes


def test_dag_hierarchy_is_recorded(tmp_path):
    raw = tmp_path / "raw"
    make_imagefolder(raw, {f"l{i}": 2 for i in range(5)} | {"l5": 1}, size=4)
    dag = {"root": ["n1", "n2"], "n1": ["l0", "l1", "l2"], "n2": ["l3", "l4", "l5"]}
    write_json(tmp_path / "splits.json", {"test": [f"l{i}" for i in range(6)], "dag": dag})
    store = convert_imagefolder(raw, tmp_path / "store", splits=tmp_path / "splits.json")
    assert store.hierarchy == "dag" and store.dag == dag
    assert [e["name"] for e in store.manifest["excluded"]] == ["l5"]  # an excluded leaf stays in the dag
    assert check_store(tmp_path / "store") == []


def test_check_store_finds_corruption(tmp_path):
    make_imagefolder(tmp_path / "raw", {"a": 3, "b": 4})
    root = tmp_path / "store"
    convert_imagefolder(tmp_path / "raw", root)
    data = bytearray((root / "images.npy").read_bytes())
    data[-5] ^= 0xFF
    (root / "images.npy").write_bytes(bytes(data))
    assert any("sha256" in p for p in check_store(root))

    (root / "images.npy").write_bytes(bytes(data[:-100]))  # truncated
    problems = check_store(root)
    assert len(problems) == 1 and "images.npy" in problems[0]
    with pytest.raises(SmatError, match="images.npy"):
        Store(root)

    manifest = read_json(root / "manifest.json")
    manifest["classes"][1]["offset"] = 2
    manifest["classes"][0]["split"] = "training"
    write_json(root / "manifest.json", manifest)
    problems = check_store(root)
    assert any("training" in p for p in problems) and any("contiguous" in p for p in problems)
    with pytest.raises(SmatError, match="manifest.json: invalid store manifest"):
        Store(root)

    (root / "manifest.json").unlink()
    assert "manifest.json" in check_store(root)[0]
    with pytest.raises(SmatError, match="not a dataset store"):
        Store(root)


def test_corrupt_image_is_an_error_and_nothing_is_written(tmp_path):
    make_imagefolder(tmp_path / "raw", {"a": 3, "b": 3})
    (tmp_path / "raw" / "b" / "1.png").write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    with pytest.raises(SmatError, match=r"b/1\.png: cannot read image.*--skip-bad"):
        convert_imagefolder(tmp_path / "raw", tmp_path / "out")
    assert not (tmp_path / "out").exists() and leftovers(tmp_path, "out") == []


def test_skip_bad_records_skipped_images_and_excludes_classes_left_too_small(tmp_path, caplog):
    pixels = make_imagefolder(tmp_path / "raw", {"a": 4, "b": 3, "c": 2})
    good = (tmp_path / "raw" / "a" / "0.png").read_bytes()
    (tmp_path / "raw" / "a" / "1.png").write_bytes(good[:60])  # truncated
    (tmp_path / "raw" / "c" / "0.png").write_bytes(b"not an image")
    with caplog.at_level(logging.WARNING):
        store = convert_imagefolder(tmp_path / "raw", tmp_path / "out", skip_bad=True)
    assert [(c.name, c.n_images) for c in store.classes] == [("a", 3), ("b", 3)]
    np.testing.assert_array_equal(store.images(0, [0, 1]), np.stack([pixels["a"][0], pixels["a"][2]]))
    manifest = store.manifest
    assert sorted(s["file"] for s in manifest["skipped_images"]) == ["a/1.png", "c/0.png"]
    assert [e["name"] for e in manifest["excluded"]] == ["c"]
    assert "skipped 2 unreadable image(s)" in caplog.text and "excluding class 'c'" in caplog.text
    assert check_store(tmp_path / "out") == []


def test_class_with_too_few_images_is_excluded_with_a_warning(tmp_path, caplog):
    make_imagefolder(tmp_path / "raw", {"big": 5, "small": 2})
    with caplog.at_level(logging.WARNING):
        store = convert_imagefolder(tmp_path / "raw", tmp_path / "out", min_images=3)
    assert [c.name for c in store.classes] == ["big"]
    assert store.manifest["excluded"] == [{"name": "small", "reason": "2 images < min_images 3"}]
    assert "excluding class 'small'" in caplog.text
    with pytest.raises(SmatError, match="no class has at least min_images = 9"):
        convert_imagefolder(tmp_path / "raw", tmp_path / "out2", min_images=9)
    assert not (tmp_path / "out2").exists()


def test_empty_source_and_empty_class_folder(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(SmatError, match="no class folders"):
        convert_imagefolder(tmp_path / "empty", tmp_path / "out")
    make_imagefolder(tmp_path / "raw", {"a": 2})
    (tmp_path / "raw" / "hollow").mkdir()
    (tmp_path / "raw" / "hollow" / "notes.txt").write_text("no images here")
    with pytest.raises(SmatError, match="hollow: class folder contains no images"):
        convert_imagefolder(tmp_path / "raw", tmp_path / "out")
    with pytest.raises(SmatError, match="source folder not found"):
        convert_imagefolder(tmp_path / "missing", tmp_path / "out")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("splits, message", [
    ({"train": ["a"], "test": ["b"], "holdout": []}, "unknown split name.*'holdout'"),
    ({"train": ["a", "ghost"], "test": ["b"]}, "'ghost' are not folders"),
    ({"train": ["a"]}, "folder.*'b' are in no split"),
    ({"train": ["a"], "test": ["a", "b"]}, "'a' is listed in more than one split"),
    ({"train": ["a"], "val": [], "valid": ["b"]}, "both 'val' and 'valid'"),
    ({"train": ["a"], "test": ["b"], "groups": {"a": "G"}}, "'b' have no entry in 'groups'"),
    ({"test": ["a", "b"], "dag": {"r": ["a", "x"]}}, "dag leaves that are not classes: x"),
    ({"test": ["a", "b"], "dag": {"r": ["n"], "n": ["r", "a", "b"]}}, "cycle"),
])
def test_bad_splits_files(tmp_path, splits, message):
    make_imagefolder(tmp_path / "raw", {"a": 2, "b": 2})
    write_json(tmp_path / "raw" / "splits.json", splits)
    with pytest.raises(SmatError, match=message) as err:
        convert_imagefolder(tmp_path / "raw", tmp_path / "out")
    assert "splits.json" in str(err.value)
    assert not (tmp_path / "out").exists()


def test_unknown_split_in_store_query(tmp_path):
    make_imagefolder(tmp_path / "raw", {"a": 2})
    store = convert_imagefolder(tmp_path / "raw", tmp_path / "out")
    with pytest.raises(SmatError, match="unknown split 'valid'"):
        store.class_ids("valid")
    with pytest.raises(SmatError, match="out of range"):
        store.images(0, [2])


def test_image_sizes_must_agree_without_image_size(tmp_path):
    make_imagefolder(tmp_path / "raw", {"a": 2})
    Image.new("RGB", (9, 9)).save(tmp_path / "raw" / "a" / "2.png")
    with pytest.raises(SmatError, match=r"2\.png: image is 9x9 .*--image-size"):
        convert_imagefolder(tmp_path / "raw", tmp_path / "out")
    assert leftovers(tmp_path, "out") == []
    make_imagefolder(tmp_path / "wide", {"a": 2}, square=False)
    with pytest.raises(SmatError, match="not square; pass --image-size"):
        convert_imagefolder(tmp_path / "wide", tmp_path / "out")
    assert convert_imagefolder(tmp_path / "raw", tmp_path / "out", image_size=8).classes[0].n_images == 3


def test_existing_output_is_never_overwritten(tmp_path):
    make_imagefolder(tmp_path / "raw", {"a": 2})
    (tmp_path / "empty_out").mkdir()
    convert_imagefolder(tmp_path / "raw", tmp_path / "empty_out")  # an empty folder may be filled
    before = (tmp_path / "empty_out" / "manifest.json").read_bytes()
    with pytest.raises(SmatError, match="already exists; remove it"):
        convert_imagefolder(tmp_path / "raw", tmp_path / "empty_out")
    assert (tmp_path / "empty_out" / "manifest.json").read_bytes() == before


def test_cli_convert_and_check(tmp_path, capsys):
    make_imagefolder(tmp_path / "raw", {"a": 2, "b": 3}, size=10)
    args = ["data", "convert", "imagefolder", str(tmp_path / "raw"), "--out", str(tmp_path / "store"),
            "--image-size", "4", "--domain", "toy"]
    assert main(args) == 0
    assert json.loads((tmp_path / "store" / "manifest.json").read_text())["image_size"] == 4
    assert main(["data", "check", str(tmp_path / "store")]) == 0
    assert "OK" in capsys.readouterr().out
    (tmp_path / "store" / "images.npy").write_bytes(b"")
    assert main(["data", "check", str(tmp_path / "store")]) == 2
    assert "store check failed" in capsys.readouterr().err
    assert main(args) == 2

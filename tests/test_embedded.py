"""The embedded benchmark generator: layout, splits, groups, image format, determinism, safe writes."""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from smat.data.embedded import SIZES, build_embedded
from smat.data.embedded import build as build_module
from smat.data.embedded.raster import affine_inverse, warp
from smat.io import SmatError

CI = SIZES["ci"]


def file_digests(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def built(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("embedded") / "raw"
    build_embedded(out, size="ci", seed=0)
    return out


@pytest.fixture(scope="module")
def description(built) -> dict:
    return json.loads((built / "benchmark.json").read_text())


def test_benchmark_description(built, description):
    assert description["seed"] == 0 and description["size"] == "ci"
    domains = description["domains"]
    by_role = {role: [n for n, d in domains.items() if d["role"] == role] for role in ("pretrain", "id", "ood")}
    assert sum(map(len, by_role.values())) == len(domains)
    assert len(by_role["pretrain"]) >= 4 and len(by_role["id"]) >= 6 and len(by_role["ood"]) >= 4
    assert "digits" in by_role["ood"] and domains["digits"]["n_classes"] == 10
    # The meta-training domains are alphabets; the pre-training corpus holds none (as DINO's ImageNet).
    assert {domains[n]["kind"] for n in by_role["id"]} == {"glyphs"}
    assert "glyphs" not in {domains[n]["kind"] for n in by_role["pretrain"]}
    for role, classes, images in (("id", CI.id_classes, CI.images_per_class),
                                  ("pretrain", CI.pretrain_classes, CI.pretrain_images)):
        for name in by_role[role]:
            assert domains[name]["n_classes"] == classes and domains[name]["images_per_class"] == images, name
    ood_domains = by_role["ood"]
    for name in ood_domains:
        assert domains[name]["n_classes"] >= 5
    top_level = {p.name for p in built.iterdir()}
    assert top_level == set(domains) | {"benchmark.json", "grids"}


def test_class_folders_match_splits(built, description):
    for name, info in description["domains"].items():
        splits = json.loads((built / name / "splits.json").read_text())
        folders = sorted(p.name for p in (built / name).iterdir() if p.is_dir())
        listed = splits["train"] + splits["val"] + splits["test"]
        assert sorted(listed) == folders and len(set(listed)) == len(listed), name
        assert len(folders) == info["n_classes"]
        for folder in folders:
            assert re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]*", folder), folder
            files = sorted(p.name for p in (built / name / folder).iterdir())
            assert files == [f"{i:04d}.png" for i in range(info["images_per_class"])], (name, folder)


def test_splits_by_role(built, description):
    for name, info in description["domains"].items():
        splits = json.loads((built / name / "splits.json").read_text())
        if info["role"] == "ood":
            assert splits["train"] == [] and splits["val"] == [] and len(splits["test"]) == info["n_classes"]
        else:
            assert len(splits["val"]) >= 5 and len(splits["test"]) >= 5, name
            assert len(splits["train"]) > len(splits["test"]) >= len(splits["val"]), name


def test_glyph_groups_are_split_aligned(built, description):
    glyph_domains = [n for n, d in description["domains"].items() if d["kind"] == "glyphs"]
    assert len(glyph_domains) >= 6
    for name, info in description["domains"].items():
        splits = json.loads((built / name / "splits.json").read_text())
        if name not in glyph_domains:
            assert "groups" not in splits, name
            continue
        groups = splits["groups"]
        assert set(groups) == set(splits["train"] + splits["val"] + splits["test"])
        members: dict[str, list[str]] = {}
        for cls, group in groups.items():
            members.setdefault(group, []).append(cls)
        for group, classes in members.items():
            assert len(classes) >= 5, (name, group)
            split_of = {s for s in ("train", "val", "test") for c in classes if c in splits[s]}
            assert len(split_of) == 1, (name, group, split_of)


def test_images_are_32px_rgb_and_vary(built, description):
    for name in description["domains"]:
        domain = built / name
        arrays = []
        for path in sorted(domain.glob("*/*.png")):
            with Image.open(path) as image:
                assert image.format == "PNG" and image.mode == "RGB" and image.size == (32, 32), path
                arrays.append(np.asarray(image))
        stack = np.stack(arrays).astype(np.float32)
        assert stack.std() > 10, name  # not blank
        assert len({a.tobytes() for a in arrays}) == len(arrays), f"{name}: duplicate images"


def test_grids_written(built, description):
    for name in description["domains"]:
        with Image.open(built / "grids" / f"{name}.png") as grid:
            assert grid.mode == "RGB" and min(grid.size) >= 5 * 32 * 2, name


def test_same_seed_same_bytes_other_seed_other_images(built, tmp_path):
    again = tmp_path / "again"
    build_embedded(again, size="ci", seed=0)
    assert file_digests(again) == file_digests(built)

    other = tmp_path / "other"
    other.mkdir()  # an existing empty folder is fine
    build_embedded(other, size="ci", seed=1)
    first, second = file_digests(built), file_digests(other)
    assert json.loads((other / "benchmark.json").read_text())["seed"] == 1
    for name in json.loads((built / "benchmark.json").read_text())["domains"]:
        images_0 = {d for p, d in first.items() if p.startswith(f"{name}/") and p.endswith(".png")}
        images_1 = {d for p, d in second.items() if p.startswith(f"{name}/") and p.endswith(".png")}
        assert images_0 and images_1, name
        if name == "digits":  # real images: another seed draws another subset of the same pool
            assert images_0 != images_1
        else:
            assert not images_0 & images_1, name


def test_refuses_non_empty_out(tmp_path):
    out = tmp_path / "raw"
    out.mkdir()
    (out / "keep.txt").write_text("earlier work")
    with pytest.raises(SmatError, match=r"raw.*not empty.*delete it"):
        build_embedded(out, size="ci")
    assert [p.name for p in out.iterdir()] == ["keep.txt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["raw"]


def test_failed_build_leaves_nothing(tmp_path, monkeypatch):
    def broken(*args, **kwargs):
        raise RuntimeError("generator failed")

    monkeypatch.setitem(build_module.GENERATORS, "textures", broken)  # after six glyph domains are written
    with pytest.raises(RuntimeError, match="generator failed"):
        build_embedded(tmp_path / "raw", size="ci")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("kwargs, message", [
    ({"size": "huge"}, r"--size 'huge'.*default, ci"),
    ({"seed": -1}, r"--seed -1"),
])
def test_bad_arguments(tmp_path, kwargs, message):
    with pytest.raises(SmatError, match=message):
        build_embedded(tmp_path / "raw", **kwargs)
    assert list(tmp_path.iterdir()) == []


def test_warp_moves_the_input_centre_to_the_output_centre_and_rotates_about_it():
    image = np.zeros((1, 40, 40, 1), dtype=np.float32)
    image[0, 10, 30] = 1.0  # the centre, x=30, y=10
    image[0, 10, 31] = 0.5  # one pixel to its right
    quarter_turn = affine_inverse(np.full(1, np.pi / 2), np.zeros(1), np.ones(1), np.array([[3.0, -2.0]]),
                                  center_in=np.array([[30.0, 10.0]]), center_out=16.0)
    out = warp(image, quarter_turn, out_size=32, fill=0.0)[0, :, :, 0]
    assert out[14, 19] == pytest.approx(1.0)  # centre lands at (16 + 3, 16 - 2)
    assert out[15, 19] == pytest.approx(0.5)  # "right of centre" turns to "below centre" (y points down)
    assert out.sum() == pytest.approx(1.5)

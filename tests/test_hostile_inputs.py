"""Inputs that would give silently wrong results or lose data, each a one-line error (or, for images, the value
its range says):

* every PIL mode decoded by its real range; NaN, infinity and out-of-range samples refused by name;
* every numeric config setting refuses NaN and infinity (cases generated from the config dataclasses);
* damaged episode files and stores (edited manifest, a class or image reached twice, pixels changed after
  conversion); episode and model files replaced while a run reads them; tables mixing two models under one
  label or two episode files in one dataset row;
* a full disk for every writer; temporary files of killed writers removed by the next run; one `smat train`
  per --out.
"""

from __future__ import annotations

import contextlib
import csv
import dataclasses
import json
import os
import re
import resource
import shutil
import signal
import subprocess
import sys
import typing
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from smat.cli import main
from smat.config_loader import load_config, nonfinite_keys
from smat.data.episodes import load_episode_file
from smat.data.store import SourceClass, Store, _decode, write_store
from smat.io import SmatError, atomic_path, run_lock, sha256_file
from smat.models.backbones import create_backbone
from smat.models.pretrained import save_checkpoint
from smat.training.pretrain import PretrainConfig
from smat.training.config import TrainConfig

ROOT = Path(__file__).resolve().parents[1]
ARCH = "vit_tiny_patch4_32"
CI_TRAINING = str(ROOT / "config" / "training" / "ci.yaml")


def one_line_error(capsys, args: list[str]) -> str:
    """The command's one-line error (exit 2); progress bars (tqdm, on stderr) aside."""
    assert main(args) == 2
    err = [line for line in re.split(r"[\r\n]+", capsys.readouterr().err.strip()) if line and "%|" not in line]
    assert len(err) == 1 and err[0].startswith("smat: error: "), err
    return err[0]


def tiny_world(root: Path, n_classes: int, n_episodes: int) -> Path:
    """ROOT/raw (random 32-px images, 6 per class), ROOT/store, ROOT/tiny.pt (a random tiny ViT) and
    ROOT/episodes.json (2-way 1-shot test episodes), made through the CLI."""
    rng = np.random.default_rng(0)
    for c in range(n_classes):
        (root / "raw" / f"class{c}").mkdir(parents=True)
        for i in range(6):
            Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(root / "raw" / f"class{c}" / f"{i}.png")
    assert main(["data", "convert", "imagefolder", str(root / "raw"), "--out", str(root / "store"), "--role", "id"]) == 0
    torch.manual_seed(0)
    save_checkpoint(root / "tiny.pt", ARCH, create_backbone(ARCH).vit.state_dict(), source="test", sha256=None,
                    meta={"image_size": 32})
    assert main(["episodes", "sample", "--store", str(root / "store"), "--split", "test", "--n", str(n_episodes),
                 "--ways", "2", "--shots", "1", "--queries", "1", "--out", str(root / "episodes.json")]) == 0
    return root


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return tiny_world(tmp_path_factory.mktemp("hostile"), n_classes=10, n_episodes=40)


# --- image decoding: every PIL mode ---------------------------------------------------------------------------------

# (black, white) pixel values of each mode; a mode PIL adds fails the test until it is decided here and in METHOD.
MODE_EXTREMES = {
    "1": (0, 1), "L": (0, 255), "P": (0, 1), "RGB": ((0, 0, 0), (255, 255, 255)),
    "RGBX": ((0, 0, 0, 0), (255, 255, 255, 0)), "RGBA": ((0, 0, 0, 255), (255, 255, 255, 255)),
    "RGBa": ((0, 0, 0, 255), (255, 255, 255, 255)), "LA": ((0, 255), (255, 255)), "La": ((0, 255), (255, 255)),
    "PA": ((0, 255), (1, 255)), "CMYK": ((0, 0, 0, 255), (0, 0, 0, 0)), "YCbCr": ((0, 128, 128), (255, 128, 128)),
    "LAB": ((0, 128, 128), (255, 128, 128)), "HSV": ((0, 0, 0), (0, 0, 255)), "F": (0.0, 1.0),
    "I": (0, 65535), "I;16": (0, 65535), "I;16B": (0, 65535), "I;16L": (0, 65535), "I;16N": (0, 65535),
}


class InMemory:
    """A source image given as a PIL image: the reader protocol of SourceClass."""

    def __init__(self, image: Image.Image) -> None:
        self.image = image

    def __str__(self) -> str:
        return f"image in mode {self.image.mode}"

    def open(self) -> Image.Image:
        return self.image.copy()


@pytest.mark.parametrize("mode", Image.MODES)
def test_every_pil_mode_maps_its_black_and_white(mode):
    black, white = MODE_EXTREMES[mode]
    image = Image.new(mode, (2, 1))
    if mode in ("P", "PA"):
        image.putpalette([0, 0, 0, 255, 255, 255])
    image.putpixel((0, 0), black)
    image.putpixel((1, 0), white)
    pixels = _decode(InMemory(image), None).astype(int)
    assert pixels.shape == (1, 2, 3)
    assert np.abs(pixels[0, 0]).max() <= 1 and np.abs(pixels[0, 1] - 255).max() <= 1, (mode, pixels)


def _tiff(path: Path, array: np.ndarray) -> Path:
    Image.fromarray(array).save(path)
    return path


def test_wide_samples_keep_their_grey_levels(tmp_path):
    """Float in [0, 1], 32-bit integer TIFFs by the range of their type, 16-bit by 65535: mid-grey stays
    mid-grey (before, float images became black and 32-bit ones were divided by 257)."""
    cases = {
        "float": _tiff(tmp_path / "f.tif", np.array([[0.0, 0.5], [0.25, 1.0]], np.float32)),
        "int32": _tiff(tmp_path / "i.tif", np.array([[0, 2**30], [2**29, 2**31 - 1]], np.int32)),
        "uint16": _tiff(tmp_path / "u.tif", np.array([[0, 32768], [16384, 65535]], np.uint16)),
    }
    for name, path in cases.items():
        grey = _decode(path, None)[..., 0]
        np.testing.assert_allclose(grey, [[0, 128], [64, 255]], atol=1, err_msg=name)


@pytest.mark.parametrize("values, named", [
    ([[0.0, np.nan]], "holds NaN"), ([[0.0, np.inf]], "holds infinite"), ([[0.0, 2.0]], "span [0, 2]"),
    ([[-1.0, 0.5]], "span [-1, 0.5]"),
])
def test_float_images_with_nan_inf_or_out_of_range_values_are_refused_by_name(tmp_path, capsys, values, named):
    raw = tmp_path / "raw"
    for c in ("a", "b"):
        (raw / c).mkdir(parents=True)
        for i in range(2):
            _tiff(raw / c / f"{i}.tif", np.full((4, 4), 0.5, np.float32))
    _tiff(raw / "b" / "1.tif", np.array(values * 2, np.float32).repeat(2, axis=1))
    message = one_line_error(capsys, ["data", "convert", "imagefolder", str(raw), "--out", str(tmp_path / "s")])
    assert "b/1.tif: cannot read image" in message and "mode F" in message and named in message
    assert not (tmp_path / "s").exists()


def test_negative_integer_samples_are_refused(tmp_path):
    with pytest.raises(ValueError, match=r"mode I \(signed 32-bit integer\) pixel values span \[-5, 7\]"):
        _decode(_tiff(tmp_path / "n.tif", np.array([[-5, 7]], np.int32)), None)


# --- numeric config settings: generated from the dataclasses --------------------------------------------------------

def numeric_keys(cls: type, prefix: str = "") -> list[tuple[str, type]]:
    """(dotted key, float or int) of every numeric setting of a config dataclass, nested ones included; a tuple
    of numbers gives one key per position (as `key=[...]` with that position changed)."""
    keys = []
    hints = typing.get_type_hints(cls)
    for field in dataclasses.fields(cls):
        hint, key = hints[field.name], prefix + field.name
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        if dataclasses.is_dataclass(hint):
            keys += numeric_keys(hint, key + ".")
        elif hint in (int, float) or (len(args) == 1 and args[0] in (int, float)):
            keys.append((key, hint if hint in (int, float) else args[0]))
        elif typing.get_origin(hint) is tuple and set(args) <= {int, float}:
            keys += [(f"{key}[{i}]", arg) for i, arg in enumerate(args)]
    return keys


CONFIG_KEYS = [(cls, key, kind) for cls in (TrainConfig, PretrainConfig) for key, kind in numeric_keys(cls)]


def _override(cls: type, key: str, value: str) -> str:
    """`--set` text giving `key` the YAML `value` (for `name[i]`: the default list with position i changed)."""
    if "[" not in key:
        return f"{key}={value}"
    name, index = key[:-1].split("[")
    default = _attribute(cls(), name)
    items = [repr(v) for v in default]
    items[int(index)] = value
    return f"{name}=[{', '.join(items)}]"


def _attribute(obj, dotted: str):
    for part in dotted.split("."):
        obj = getattr(obj, part)
    return obj


def test_the_generated_cases_cover_the_known_settings():
    names = {f"{cls.__name__}.{key}" for cls, key, _ in CONFIG_KEYS}
    for expected in ("TrainConfig.router.temperature_start", "TrainConfig.gates.zeta", "TrainConfig.gates.gamma",
                     "TrainConfig.gates.init_mean", "TrainConfig.gates.log_alpha_min", "TrainConfig.crop_scale[1]",
                     "TrainConfig.sampler.max_ways", "PretrainConfig.checkpoint_every_seconds", "PretrainConfig.lr"):
        assert expected in names
    assert len(CONFIG_KEYS) > 60


@pytest.mark.parametrize("value", [".nan", ".inf", "-.inf", "1e999"])
def test_every_numeric_setting_refuses_nan_and_infinity(value):
    for cls, key, kind in CONFIG_KEYS:
        with pytest.raises(SmatError) as excinfo:
            load_config(cls, None, [_override(cls, key, value)])
        message = str(excinfo.value)
        assert key.split("[")[0] in message and "\n" not in message, (key, message)
        wanted = "not a finite number" if kind is float else "expected an integer"
        assert wanted in message, (key, message)


def test_nonfinite_settings_are_found_anywhere_in_a_workflow_config():
    config = {"models": {"smat": {"tau": float("nan")}}, "evaluation": {"lr_grid": [1e-3, float("inf")]}, "n": 3}
    assert nonfinite_keys(config) == ["config.models.smat.tau=nan", "config.evaluation.lr_grid[1]=inf"]


@pytest.mark.parametrize("setting, named", [
    ("router.temperature_start=.nan", "router.temperature_start: nan is not a finite number"),
    ("router.temperature_start=.inf", "router.temperature_start: inf is not a finite number"),
    ("gates.zeta=.inf", "gates.zeta: inf is not a finite number"),
])
def test_train_refuses_a_nonfinite_setting_before_any_work(data, tmp_path, capsys, setting, named):
    message = one_line_error(capsys, ["train", "--config", CI_TRAINING, "--store", str(data / "store"), "--pretrained",
                                      str(data / "tiny.pt"), "--out", str(tmp_path / "run"), "--set", setting])
    assert named in message and not (tmp_path / "run").exists()


@pytest.mark.parametrize("option", [["--lr", "nan"], ["--lr", "inf"], ["--limit", "0"]])
def test_evaluate_refuses_nonfinite_numbers(data, tmp_path, capsys, option):
    message = one_line_error(capsys, ["evaluate", "--model", f"pretrained:{data / 'tiny.pt'}", "--episodes",
                                      str(data / "episodes.json"), "--store", str(data / "store"), "--out",
                                      str(tmp_path / "e.csv"), *option])
    assert f"{option[0]} {option[1]}" in message
    message = one_line_error(capsys, ["select-lr", "--model", f"pretrained:{data / 'tiny.pt'}", "--episodes",
                                      str(data / "episodes.json"), "--store", str(data / "store"), "--finetune",
                                      "full", "--grid", "1e-3", "nan", "--out", str(tmp_path / "lr.json")])
    assert "--grid 1e-3 nan" in message


# --- episode files ----------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("edit, named", [
    (lambda eps: eps.__setitem__(1, eps[0]), "episode 1 repeats episode 0"),
    (lambda eps: eps[0].update(classes=eps[0]["classes"][:1], support=eps[0]["support"][:1],
                               query=eps[0]["query"][:1]), "1 way(s)"),
    (lambda eps: eps[0]["support"][0].__setitem__(0, 99), "image ids must be distinct and in 0..5"),
    (lambda eps: eps[0]["classes"].__setitem__(0, 99), "class id 99 out of range"),
    (lambda eps: eps[0]["query"].__setitem__(0, []), "must be non-empty lists"),
    (lambda eps: eps.clear(), "must be a non-empty list"),
])
def test_edited_episode_files_are_refused(data, tmp_path, edit, named):
    content = json.loads((data / "episodes.json").read_text())
    edit(content["episodes"])
    path = tmp_path / "episodes.json"
    path.write_text(json.dumps(content))
    with pytest.raises(SmatError) as excinfo:
        load_episode_file(path, Store(data / "store"))
    assert named in str(excinfo.value) and str(path) in str(excinfo.value)


def test_a_repeat_the_sampler_drew_itself_is_accepted(data):
    """40 episodes of 2 ways from 3 classes of 6 images: seed 0 draws one episode twice. The file reproduces from
    its seed, so it is not an edited one."""
    episodes, _ = load_episode_file(data / "episodes.json", Store(data / "store"))
    keys = [json.dumps(dataclasses.asdict(e)) for e in episodes]
    assert len(set(keys)) < len(keys)


# --- checkpoints -------------------------------------------------------------------------------------------------

def _pmf(path: Path, scale: float = 9.0, poison: str | None = None) -> Path:
    """A file in the layout of PMF's released checkpoint (a tiny registered backbone)."""
    import argparse

    torch.manual_seed(5)
    weights = {f"backbone.{n}": p.detach().clone() for n, p in create_backbone(ARCH).vit.named_parameters()}
    if poison == "nan":
        weights["backbone.blocks.0.attn.qkv.weight"][0, 0] = float("nan")
    if poison == "int":
        weights["backbone.cls_token"] = weights["backbone.cls_token"].long()
    torch.save({"model": {"bias": torch.tensor([-0.1]), "scale_cls": torch.tensor([scale]), **weights},
                "args": argparse.Namespace(epochs=100), "epoch": 99}, path)
    return path


@pytest.mark.parametrize("kwargs, named", [
    ({"poison": "nan"}, "blocks.0.attn.qkv.weight of the imported model holds NaN"),
    ({"scale": -3.0}, "model.scale_cls is -3.0; PMF's classifier scale must be positive"),
    ({"poison": "int"}, "backbone tensor cls_token holds torch.int64 values"),
])
def test_a_released_checkpoint_with_nan_negative_scale_or_integer_weights_is_refused(tmp_path, capsys, kwargs,
                                                                                      named):
    source = _pmf(tmp_path / "checkpoint.pth", **kwargs)
    message = one_line_error(capsys, ["import", "pmf", str(source), "--out", str(tmp_path / "best.pt")])
    assert named in message and not (tmp_path / "best.pt").exists()
    assert main(["import", "pmf", str(_pmf(tmp_path / "good.pth")), "--out", str(tmp_path / "best.pt")]) == 0


def test_a_backbone_with_integer_tensors_is_refused(data, tmp_path, capsys):
    record = torch.load(data / "tiny.pt", weights_only=True)
    record["state_dict"]["pos_embed"] = record["state_dict"]["pos_embed"].long()
    torch.save(record, tmp_path / "int.pt")
    message = one_line_error(capsys, ["train", "--config", CI_TRAINING, "--store", str(data / "store"),
                                      "--pretrained", str(tmp_path / "int.pt"), "--out", str(tmp_path / "run")])
    assert "not floating-point tensors (1): pos_embed (torch.int64)" in message


# --- stores -------------------------------------------------------------------------------------------------------------

def test_an_edited_manifest_fails_data_check_and_opening(data, tmp_path, capsys):
    store = tmp_path / "store"
    shutil.copytree(data / "store", store)
    assert main(["data", "check", str(store)]) == 0
    manifest = json.loads((store / "manifest.json").read_text())
    moved = next(c for c in manifest["classes"] if c["split"] == "test")
    moved["split"] = "train"                       # a class moved from test to train
    (store / "manifest.json").write_text(json.dumps(manifest))
    message = one_line_error(capsys, ["data", "check", str(store)])
    assert "manifest.json: content differs from its manifest_sha256" in message
    with pytest.raises(SmatError, match="content differs from its manifest_sha256"):
        Store(store)
    del manifest["manifest_sha256"]                # removing the hash does not pass the check either
    (store / "manifest.json").write_text(json.dumps(manifest))
    assert "no manifest_sha256" in one_line_error(capsys, ["data", "check", str(store)])


def test_a_class_folder_or_image_reached_twice_is_refused(data, tmp_path, capsys):
    raw = tmp_path / "raw"
    shutil.copytree(data / "raw", raw)
    (raw / "class9").rename(tmp_path / "class9")
    (raw / "class9").symlink_to(raw / "class0")
    message = one_line_error(capsys, ["data", "convert", "imagefolder", str(raw), "--out", str(tmp_path / "s")])
    assert "class9: the same class folder as" in message and "class0" in message
    (raw / "class9").unlink()
    (tmp_path / "class9").rename(raw / "class9")
    os.link(raw / "class1" / "0.png", raw / "class9" / "9.png")
    message = one_line_error(capsys, ["data", "convert", "imagefolder", str(raw), "--out", str(tmp_path / "s")])
    assert "9.png: the same image as" in message and "class1/0.png" in message
    (raw / "class9" / "9.png").unlink()
    (raw / "class8").rename(tmp_path / "elsewhere")  # a linked folder that is not another class is fine
    (raw / "class8").symlink_to(tmp_path / "elsewhere")
    assert main(["data", "convert", "imagefolder", str(raw), "--out", str(tmp_path / "s")]) == 0


# --- what a result read: store pixels, episode file, model file; tables of one model per label ------------------------

def _evaluate(data: Path, out: Path, *, model: str = "tiny.pt", episodes: str = "episodes.json",
              store: str = "store", label: str = "Pre") -> list[str]:
    return ["evaluate", "--model", f"pretrained:{data / model}", "--episodes", str(data / episodes), "--store",
            str(data / store), "--out", str(out), "--label", label, "--limit", "2", "--device", "cpu"]


@pytest.mark.parametrize("damage", ["zeroed", "rolled"])
def test_store_pixels_changed_after_conversion_are_an_error_not_a_chance_result(data, tmp_path, capsys, damage):
    store = tmp_path / "store"
    shutil.copytree(data / "store", store)
    images = np.load(store / "images.npy", mmap_mode="r+")
    if damage == "zeroed":
        images[:] = 0
    else:                                                     # every image one row on: labels no longer fit
        images[:] = np.roll(np.array(images), 1, axis=0)
    images.flush()
    del images
    out = tmp_path / "e.csv"
    message = one_line_error(capsys, ["evaluate", "--model", f"pretrained:{data / 'tiny.pt'}", "--episodes",
                                      str(data / "episodes.json"), "--store", str(store), "--out", str(out),
                                      "--device", "cpu"])
    assert f"{store}: the pixels of class 'class" in message and "of images.npy) differ from the sha256" in message
    assert not out.exists() and not out.with_suffix(".json").exists()
    assert "differ from the sha256" in one_line_error(capsys, ["data", "check", str(store)])


def test_a_store_without_class_hashes_is_refused_by_evaluation(data, tmp_path, capsys):
    from smat.data.store import manifest_digest

    store = tmp_path / "store"
    shutil.copytree(data / "store", store)
    manifest = json.loads((store / "manifest.json").read_text())
    del manifest["class_sha256"]                              # as an older smat wrote it
    manifest["manifest_sha256"] = manifest_digest(manifest)
    (store / "manifest.json").write_text(json.dumps(manifest))
    assert Store(store).classes                               # readable for other uses
    message = one_line_error(capsys, _evaluate(data, tmp_path / "e.csv", store=str(store)))
    assert "no class_sha256" in message and "re-create the store with `smat data convert`" in message


def test_an_episode_file_replaced_during_the_run_is_not_the_one_recorded(data, tmp_path, monkeypatch):
    """The file is replaced after it was read (while the model loads): the result records the sha256 of the
    bytes that were parsed, and its rows are those episodes."""
    import hashlib

    import smat.evaluation.evaluate as evaluate

    episodes = tmp_path / "episodes.json"
    shutil.copy(data / "episodes.json", episodes)
    parsed = hashlib.sha256(episodes.read_bytes()).hexdigest()
    real_load = evaluate.load_model_with_info

    def replace_then_load(*args, **kwargs):
        assert main(["episodes", "sample", "--store", str(data / "store"), "--split", "test", "--n", "40",
                     "--ways", "2", "--shots", "1", "--queries", "2", "--out", str(tmp_path / "other.json")]) == 0
        os.replace(tmp_path / "other.json", episodes)
        return real_load(*args, **kwargs)

    monkeypatch.setattr(evaluate, "load_model_with_info", replace_then_load)
    summary = evaluate.evaluate(f"pretrained:{data / 'tiny.pt'}", episodes, data / "store", limit=2,
                                out=tmp_path / "e.csv", device="cpu", progress=False)
    assert hashlib.sha256(episodes.read_bytes()).hexdigest() != parsed
    assert summary["provenance"]["episodes_sha256"] == parsed
    assert {row["query_size"] for row in csv.DictReader(open(tmp_path / "e.csv"))} == {"2"}    # 2 ways x 1 query


def test_a_model_file_replaced_while_it_loads_is_an_error(data, tmp_path, capsys, monkeypatch):
    import smat.methods.checkpoint as checkpoint

    model = tmp_path / "tiny.pt"
    shutil.copy(data / "tiny.pt", model)
    real_load = checkpoint.load_model

    def load_then_replace(*args, **kwargs):
        loaded = real_load(*args, **kwargs)
        torch.manual_seed(1)
        save_checkpoint(model, ARCH, create_backbone(ARCH).vit.state_dict(), source="test", sha256=None,
                        meta={"image_size": 32})
        return loaded

    monkeypatch.setattr(checkpoint, "load_model", load_then_replace)
    message = one_line_error(capsys, _evaluate(tmp_path, tmp_path / "e.csv", episodes=str(data / "episodes.json"),
                                               store=str(data / "store")))
    assert f"{model}: the model file changed while it was being read" in message
    assert not (tmp_path / "e.csv").exists()


@pytest.fixture(scope="module")
def two_datasets(data, tmp_path_factory):
    """A second store ("other", from the same images), a second model and a second episode file of each store."""
    root = tmp_path_factory.mktemp("identities")
    assert main(["data", "convert", "imagefolder", str(data / "raw"), "--out", str(root / "store2"), "--role", "id",
                 "--domain", "other"]) == 0
    torch.manual_seed(1)
    save_checkpoint(root / "tiny2.pt", ARCH, create_backbone(ARCH).vit.state_dict(), source="test", sha256=None,
                    meta={"image_size": 32})
    shutil.copy(data / "tiny.pt", root / "tiny.pt")
    shutil.copytree(data / "store", root / "store")
    for store, name, seed in (("store", "episodes.json", 0), ("store2", "episodes2.json", 0),
                              ("store", "reseeded.json", 5)):
        assert main(["episodes", "sample", "--store", str(root / store), "--split", "test", "--n", "4", "--ways",
                     "2", "--shots", "1", "--queries", "1", "--seed", str(seed), "--out", str(root / name)]) == 0
    return root


def _table(out: Path, evals: list[Path]) -> list[str]:
    return ["tables", "table1", "--eval", *map(str, evals), "--id-datasets", *sorted({_dataset(e) for e in evals}),
            "--out-dir", str(out)]


def _dataset(csv_path: Path) -> str:
    return next(csv.DictReader(open(csv_path)))["dataset"]


def test_tables_refuse_two_models_under_one_label_or_two_episode_files_for_one_dataset(two_datasets, tmp_path,
                                                                                       capsys):
    w = two_datasets
    run = {name: tmp_path / f"{name}.csv" for name in ("a_raw", "a_other", "b_raw", "b_other", "a_reseeded")}
    for name, args in {"a_raw": {}, "a_other": {"store": "store2", "episodes": "episodes2.json"},
                       "b_raw": {"model": "tiny2.pt", "label": "B"},
                       "b_other": {"model": "tiny2.pt", "label": "B", "store": "store2", "episodes": "episodes2.json"},
                       "a_reseeded": {"label": "B", "episodes": "reseeded.json"}}.items():
        assert main(_evaluate(w, run[name], **args)) == 0
    sha = {name: json.loads(run[name].with_suffix(".json").read_text())["provenance"] for name in run}

    # The normal table: one model per label, one episode file per dataset.
    assert main(_table(tmp_path / "good", [run["a_raw"], run["a_other"], run["b_raw"], run["b_other"]])) == 0
    assert (tmp_path / "good" / "table1.md").is_file()

    # Column "B" from two models: tiny2.pt on "raw", tiny.pt on "other".
    mixed = tmp_path / "b_mixed.csv"
    assert main(_evaluate(w, mixed, label="B", store="store2", episodes="episodes2.json")) == 0
    message = one_line_error(capsys, _table(tmp_path / "t1", [run["a_raw"], run["b_raw"], mixed]))
    assert (f"{run['b_raw']} and {mixed} come from different model files for label 'B' (sha256 "
            f"{sha['b_raw']['model_sha256'][:12]} vs {sha['a_raw']['model_sha256'][:12]})") in message
    assert not (tmp_path / "t1").exists()

    # Row "raw" from two episode files.
    message = one_line_error(capsys, _table(tmp_path / "t2", [run["a_raw"], run["a_reseeded"]]))
    assert (f"{run['a_raw']} and {run['a_reseeded']} come from different episode files for dataset 'raw' (sha256 "
            f"{sha['a_raw']['episodes_sha256'][:12]} vs {sha['a_reseeded']['episodes_sha256'][:12]})") in message
    # Each result records what it read, hashed as it was read.
    assert sha["a_raw"]["episodes_sha256"] == sha256_file(w / "episodes.json")
    assert sha["a_raw"]["model_sha256"] == sha256_file(w / "tiny.pt")
    assert sha["a_raw"]["store_manifest_sha256"] == json.loads((w / "store" / "manifest.json").read_text())[
        "manifest_sha256"]


# --- full disk, killed writers, concurrent runs -------------------------------------------------------------------

@contextlib.contextmanager
def file_size_limit(n_bytes: int):
    """Writes beyond `n_bytes` fail with EFBIG, as they would with ENOSPC on a full disk (torch's zip writer
    then reports "enforce fail at inline_container", as on a full disk)."""
    old_limit = resource.getrlimit(resource.RLIMIT_FSIZE)
    old_handler = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (n_bytes, old_limit[1]))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, old_limit)
        signal.signal(signal.SIGXFSZ, old_handler)


def writer_cases(d: Path, o: Path) -> dict[str, list[str]]:
    store, tiny, episodes = str(d / "store"), str(d / "tiny.pt"), str(d / "episodes.json")
    return {
        "data convert (numpy)": ["data", "convert", "imagefolder", str(d / "raw"), "--out", str(o / "store")],
        "episodes sample (json)": ["episodes", "sample", "--store", store, "--split", "test", "--n", "40",
                                   "--ways", "2", "--out", str(o / "e.json")],
        "fetch (torch.save)": ["fetch", tiny, "--arch", ARCH, "--out", str(o / "f.pt")],
        "pretrain (torch.save)": ["pretrain", "--store", store, "--out", str(o / "p.pt"), "--device", "cpu",
                                  "--set", "batch_size=4", "--set", "epochs=1", "--set", "low_res_epochs=0",
                                  "--set", "checkpoint_every_steps=1"],
        "train (yaml, json, torch.save)": ["train", "--config", CI_TRAINING, "--store", store, "--pretrained", tiny,
                                           "--out", str(o / "run"), "--device", "cpu"],
        "evaluate (csv, json)": ["evaluate", "--model", f"pretrained:{tiny}", "--episodes", episodes, "--store", store,
                                 "--out", str(o / "e.csv"), "--device", "cpu", "--limit", "20"],
        "tables (csv, md, tex)": ["tables", "reference", "--out-dir", str(o / "tables")],
    }


@pytest.mark.parametrize("name", list(writer_cases(Path("/d"), Path("/o"))))
def test_a_full_disk_is_one_line_and_leaves_nothing_behind(data, tmp_path, capsys, name):
    out = tmp_path / "out"
    out.mkdir()
    args = writer_cases(data, out)[name]
    with file_size_limit(1024):
        message = one_line_error(capsys, args)
    err = [message]
    # One message for every writer; the store's also says how much space its images need.
    disk = "not written: no space left" if "convert" not in name else "not enough disk space for the store"
    assert disk in err[0] and str(out) in err[0], err
    leftovers = [p for p in out.rglob("*") if p.name.endswith(".tmp")]
    assert not leftovers


KILLED_WRITER = """
import os, signal, sys
from smat.io import atomic_dir, atomic_path
opener = atomic_dir if sys.argv[1] == "folder" else atomic_path
with opener(sys.argv[2]) as tmp:
    (tmp / "x").write_bytes(b"1" * 1000) if sys.argv[1] == "folder" else tmp.write_bytes(b"1" * 1000)
    os.kill(os.getpid(), signal.SIGKILL)
"""


def _killed_writer(kind: str, path: Path) -> list[Path]:
    result = subprocess.run([sys.executable, "-c", KILLED_WRITER, kind, str(path)], cwd=ROOT)
    assert result.returncode == -signal.SIGKILL
    left = sorted(path.parent.glob(f".{path.name}.*.tmp"))
    assert len(left) == 1
    return left


def test_the_next_run_removes_what_a_killed_writer_left(data, tmp_path):
    left = _killed_writer("file", tmp_path / "e.json")
    assert main(["episodes", "sample", "--store", str(data / "store"), "--split", "test", "--n", "3", "--ways", "2",
                 "--out", str(tmp_path / "e.json")]) == 0
    assert not left[0].exists() and (tmp_path / "e.json").is_file()
    left = _killed_writer("folder", tmp_path / "store")
    assert main(["data", "convert", "imagefolder", str(data / "raw"), "--out", str(tmp_path / "store")]) == 0
    assert not left[0].exists() and Store(tmp_path / "store").classes


def test_train_removes_what_a_killed_run_left_in_its_out(data, tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    left = _killed_writer("file", out / "best.partial.pt")   # a file the rerun, already done, never writes again
    finished = {name: out / name for name in ("expert_masks.npz", "train_log.jsonl", "best.pt", "summary.json")}
    for path in finished.values():                          # a finished run (of another config: refused)
        path.write_bytes(b"{}")
    assert main(["train", "--config", CI_TRAINING, "--store", str(data / "store"), "--pretrained",
                 str(data / "tiny.pt"), "--out", str(out), "--set", "validation.episodes=0"]) == 2
    assert not left[0].exists() and all(path.read_bytes() == b"{}" for path in finished.values())


def test_a_live_writers_temporary_file_is_kept(tmp_path):
    with atomic_path(tmp_path / "a.json") as first:
        first.write_text("first")
        with atomic_path(tmp_path / "a.json") as second:       # another writer of the same file meanwhile
            assert first.exists()
            second.write_text("second")
        assert first.exists()
    assert (tmp_path / "a.json").read_text() == "first"
    assert not list(tmp_path.glob(".*.tmp"))


def test_a_second_train_into_the_same_out_is_refused(data, tmp_path, capsys):
    out = tmp_path / "run"
    with run_lock(out, "smat train"):                    # the first run, still going
        message = one_line_error(capsys, ["train", "--config", CI_TRAINING, "--store", str(data / "store"),
                                          "--pretrained", str(data / "tiny.pt"), "--out", str(out)])
    assert f"{out}: another `smat train` is running into this folder" in message
    assert list(out.iterdir()) == []


# --- the workflow -----------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("edit, named", [
    ("episodes: {test: {n: 60, seed: 3}, hps: {n: 2, seed: 3}}", "episodes.hps.seed equals episodes.test.seed (3)"),
    ("evaluation: {finetune: [none, full], lr_grid: [1.0e-3, .nan]}", "config.evaluation.lr_grid[1]=nan: not a finite"),
])
def test_the_workflow_refuses_contradictory_or_nonfinite_settings(tmp_path, edit, named):
    import yaml

    config = yaml.safe_load((ROOT / "config" / "ci.yaml").read_text())
    config.update(yaml.safe_load(edit))
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(config))
    result = subprocess.run([sys.executable, "-m", "snakemake", "--snakefile", str(ROOT / "Snakefile"), "--directory",
                             str(tmp_path / "work"), "-n", "all_tables", "--configfile", str(path)],
                            capture_output=True, text=True, timeout=300)
    output = result.stdout + result.stderr
    assert result.returncode != 0 and named in output, output[-2000:]
    assert not (tmp_path / "work" / "resources").exists()

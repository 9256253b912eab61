"""Pre-training of the tiny ViT: runs on real stores, uses train classes only, resumes exactly, refuses OOD."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from smat.cli import main
from smat.config_loader import load_config
from smat.data.store import convert_imagefolder
from smat.io import SmatError
from smat.models.backbones import create_backbone
from smat.models.pretrained import load_pretrained, read_checkpoint
from smat.training.pretrain import PretrainConfig, pretrain

ROOT = Path(__file__).resolve().parent.parent
# 2 epochs x 2 steps of 12 images over the 24 train images of the store below, the first epoch at 16 px;
# patch dropout on, so that the resume test covers the random draws of the model too.
TINY = ["epochs=2", "batch_size=12", "warmup_epochs=0.5", "patch_drop_rate=0.5", "low_res_size=16",
        "low_res_epochs=1"]


def _make_store(tmp: Path, name: str, splits: dict[str, list[str]] | None, role: str = "id") -> Path:
    """A real store converted from PNG folders: class c has 6 images of its own colour and stripe period."""
    rng = np.random.default_rng(len(name))
    src = tmp / f"raw-{name}"
    classes = [c for names in (splits or {"test": [f"c{i}" for i in range(5)]}).values() for c in names]
    for index, cls in enumerate(classes):
        folder = src / cls
        folder.mkdir(parents=True)
        stripes = (np.arange(32) // (2 + index) % 2)[None, :, None]
        colour = np.array([40 * index % 256, 255 - 30 * index, 90])
        for i in range(6):
            image = stripes * colour + rng.integers(0, 40, (32, 32, 3))
            Image.fromarray(image.clip(0, 255).astype(np.uint8)).save(folder / f"{i}.png")
    if splits:
        (src / "splits.json").write_text(json.dumps(splits))
    out = tmp / name
    convert_imagefolder(src, out, role=role, domain=name)
    return out


@pytest.fixture(scope="module")
def stores(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("stores")
    id_store = _make_store(tmp, "shapes", {"train": ["a", "b", "c", "d"], "val": ["e"], "test": ["f", "g"]})
    ood_store = _make_store(tmp, "unseen", None, role="ood")
    return id_store, ood_store


@pytest.fixture(scope="module")
def pretrained(stores, tmp_path_factory):
    """One uninterrupted run of the tiny settings."""
    out = tmp_path_factory.mktemp("pretrain") / "tiny.pt"
    pretrain([stores[0]], out, config=None, overrides=TINY, device="cpu")
    return out


def test_pretrain_writes_a_backbone_checkpoint_from_train_classes_only(pretrained):
    out = pretrained
    assert not out.with_name("tiny.pt.partial").exists()

    record = read_checkpoint(out)
    assert record["arch"] == "vit_tiny_patch4_32" and record["source"] == "pretrain"
    meta = record["meta"]
    assert meta["n_classes"] == 4 and meta["n_images"] == 24  # the 4 train classes x 6 images, nothing else
    assert meta["steps"] == 4 and meta["config"]["batch_size"] == 12
    assert meta["stores"][0]["domain"] == "shapes" and meta["stores"][0]["n_train_classes"] == 4
    assert len(meta["stores"][0]["fingerprint"]) == 12
    assert meta["provenance"]["seed"] == 0 and "smat_version" in meta["provenance"]

    backbone, _ = load_pretrained(out)
    torch.manual_seed(0)
    initial = create_backbone("vit_tiny_patch4_32").vit.state_dict()
    trained = backbone.vit.state_dict()
    assert trained.keys() == initial.keys()
    assert not torch.equal(trained["blocks.0.attn.qkv.weight"], initial["blocks.0.attn.qkv.weight"])
    assert backbone(torch.randn(2, 3, 32, 32)).shape == (2, backbone.feature_dim)


def test_interrupted_runs_resume_to_identical_weights(tmp_path, stores, pretrained):
    id_store, _ = stores
    pieces = tmp_path / "pieces.pt"
    partial = tmp_path / "pieces.pt.partial"
    # Stopped in the middle of epoch 2, as a time-limited job would be; the resume state is on disk.
    pretrain([id_store], pieces, config=None, overrides=TINY + ["max_steps_per_run=3"], device="cpu")
    assert not pieces.exists()
    assert torch.load(partial, weights_only=True)["step"] == 3
    with pytest.raises(SmatError, match="other settings"):  # a changed setting must not resume silently
        pretrain([id_store], pieces, config=None, overrides=TINY + ["lr=0.01"], device="cpu")
    pretrain([id_store], pieces, config=None, overrides=TINY, device="cpu")  # the same command, rerun
    assert not partial.exists()

    a, b = read_checkpoint(pretrained)["state_dict"], read_checkpoint(pieces)["state_dict"]
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


def test_a_rerun_regenerates_the_weights_file_byte_for_byte(tmp_path, stores, pretrained):
    """The default workflow fetches a committed backbone by sha256: `smat pretrain` must reproduce it."""
    from safetensors.torch import load_file

    first, second = tmp_path / "first.safetensors", tmp_path / "second.safetensors"
    for name, weights in (("first.pt", first), ("second.pt", second)):
        assert main(["pretrain", "--store", str(stores[0]), "--out", str(tmp_path / name), "--device", "cpu",
                     "--weights-out", str(weights), *[f"--set={o}" for o in TINY]]) == 0
    assert first.read_bytes() == second.read_bytes()
    exported = load_file(str(first))
    in_checkpoint = read_checkpoint(pretrained)["state_dict"]
    assert exported.keys() == in_checkpoint.keys()
    assert all(torch.equal(exported[k], in_checkpoint[k]) for k in exported)


def test_refuses_stores_without_train_classes_and_bad_settings(tmp_path, stores):
    id_store, ood_store = stores
    out = tmp_path / "x.pt"
    with pytest.raises(SmatError, match=r"unseen.*no train classes"):
        pretrain([id_store, ood_store], out, config=None, overrides=TINY, device="cpu")
    with pytest.raises(SmatError, match="pass each store once"):
        pretrain([id_store, id_store], out, config=None, overrides=TINY, device="cpu")
    with pytest.raises(SmatError, match="fewer than batch_size 64"):
        pretrain([id_store], out, config=None, overrides=["batch_size=64"], device="cpu")
    with pytest.raises(SmatError, match="images are 32 px but pre-training runs at 64 px"):
        pretrain([id_store], out, config=None, overrides=TINY + ["image_size=64"], device="cpu")
    with pytest.raises(SmatError, match="low_res_size 32: expected a size between 1 and image_size"):
        pretrain([id_store], out, config=None, overrides=TINY + ["low_res_size=32"], device="cpu")
    with pytest.raises(SmatError, match="low_res_epochs 3: expected 0..epochs"):
        pretrain([id_store], out, config=None, overrides=TINY + ["low_res_epochs=3"], device="cpu")
    for bad, message in (("lr=-0.1", "lr=-0.1: must be > 0"), ("seed=-2", "seed=-2: must be an integer"),
                         ("label_smoothing=1.5", r"label_smoothing=1.5: must be in \[0, 1\]")):
        with pytest.raises(SmatError, match=message):
            pretrain([id_store], out, config=None, overrides=TINY + [bad], device="cpu")
    with pytest.raises(SmatError, match="unknown key.*epoch"):
        pretrain([id_store], out, config=None, overrides=["epoch=3"], device="cpu")
    assert not out.exists()
    assert main(["pretrain", "--store", str(ood_store), "--out", str(out)]) == 2


@pytest.mark.parametrize("lr", ["10.0", "1e30"])
def test_a_diverging_run_stops_and_writes_no_backbone(tmp_path, stores, lr):
    out = tmp_path / "diverged.pt"
    with pytest.raises(SmatError, match=r"pre-training diverged \(.* is not finite\) at step \d+: stopped, nothing "
                                        r"written"):
        pretrain([stores[0]], out, config=None, overrides=TINY + [f"lr={lr}", "grad_clip=0"], device="cpu")
    assert not out.exists()


def test_a_backbone_checkpoint_with_nan_weights_is_refused(tmp_path, pretrained):
    record = torch.load(pretrained, weights_only=True)
    record["state_dict"]["norm.weight"][0] = float("nan")
    torch.save(record, tmp_path / "nan.pt")
    with pytest.raises(SmatError, match="tensor norm.weight holds NaN or infinity"):
        load_pretrained(tmp_path / "nan.pt")


def test_shipped_configs_load_and_embedded_is_the_default():
    assert load_config(PretrainConfig, ROOT / "config/pretrain/embedded.yaml") == PretrainConfig()
    ci = load_config(PretrainConfig, ROOT / "config/pretrain/ci.yaml")
    assert ci.arch == PretrainConfig().arch and ci.epochs < PretrainConfig().epochs

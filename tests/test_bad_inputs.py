"""Hostile but realistic input to every `smat` sub-command: a missing input, a bad value, an output that
cannot be written, and the silent-wrong-result cases (NaN weights, diverging runs). Each must end with exit
status 2 and exactly one line `smat: error: ...` that names the file, key or value, with nothing written."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from smat.cli import main
from smat.models.backbones import create_backbone
from smat.models.pretrained import save_checkpoint

ROOT = Path(__file__).resolve().parents[1]
ARCH = "vit_tiny_patch4_32"


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    root = tmp_path_factory.mktemp("bad_inputs")
    rng = np.random.default_rng(0)
    for c in range(6):
        (root / "raw" / f"class{c}").mkdir(parents=True)
        for i in range(6):
            pixels = rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(root / "raw" / f"class{c}" / f"{i}.png")
    assert main(["data", "convert", "imagefolder", str(root / "raw"), "--out", str(root / "store"),
                 "--role", "id"]) == 0
    torch.manual_seed(0)
    save_checkpoint(root / "tiny.pt", ARCH, create_backbone(ARCH).vit.state_dict(), source="test", sha256=None,
                    meta={"image_size": 32})
    nan = torch.load(root / "tiny.pt", weights_only=True)
    nan["state_dict"]["cls_token"].fill_(float("nan"))
    torch.save(nan, root / "nan.pt")
    assert main(["episodes", "sample", "--store", str(root / "store"), "--split", "test", "--n", "2",
                 "--ways", "2", "--shots", "1", "--queries", "1", "--out", str(root / "episodes.json")]) == 0
    (root / "a_file").write_text("not a folder")
    return root


def cases(r: Path) -> dict[str, tuple[list[str], str]]:
    """name: (arguments, a fragment the one-line message must contain)."""
    store, tiny, episodes, blocked = str(r / "store"), str(r / "tiny.pt"), str(r / "episodes.json"), r / "a_file"
    train = ["train", "--config", str(ROOT / "config" / "training" / "ci.yaml"), "--store", store, "--pretrained", tiny]
    evaluate = ["evaluate", "--episodes", episodes, "--store", store, "--device", "cpu"]
    return {
        "build-embedded: unwritable --out": (["data", "build-embedded", "--out", str(blocked / "x")],
                                             "is not a folder"),
        "build-embedded: bad seed": (["data", "build-embedded", "--out", str(r / "e"), "--seed", "-1"], "--seed -1"),
        "convert: missing source": (["data", "convert", "imagefolder", str(r / "nope"), "--out", str(r / "s")],
                                    "nope: source folder not found"),
        "convert: bad size": (["data", "convert", "imagefolder", str(r / "raw"), "--out", str(r / "s"),
                               "--image-size", "0"], "--image-size 0"),
        "convert tfrecords: no spec": (["data", "convert", "tfrecords", str(r / "raw"), "--out", str(r / "s")],
                                       "dataset_spec.json: dataset specification not found"),
        "convert cifar: not cifar": (["data", "convert", "cifar", str(r / "raw"), "--out", str(r / "s")],
                                     "neither CIFAR-10's test_batch"),
        "check: missing store": (["data", "check", str(r / "nope")], "nope"),
        "episodes: missing store": (["episodes", "sample", "--store", str(r / "nope"), "--split", "test",
                                     "--out", str(r / "e.json")], "nope"),
        "episodes: n 0": (["episodes", "sample", "--store", store, "--split", "test", "--n", "0", "--out",
                           str(r / "e.json")], "--n 0"),
        "fetch: mistyped path": (["fetch", "weights/dino.pth", "--out", str(r / "f.pt")],
                                 "weights/dino.pth: no such file"),
        "fetch: unknown arch": (["fetch", tiny, "--arch", "vit_huge", "--out", str(r / "f.pt")], "vit_huge"),
        "import: not a torch file": (["import", "pmf", str(r / "a_file"), "--out", str(r / "i.pt")], "a_file"),
        "pretrain: negative lr": (["pretrain", "--store", store, "--out", str(r / "p.pt"), "--set", "lr=-1"],
                                  "lr=-1.0: must be > 0"),
        "pretrain: unwritable --out": (["pretrain", "--store", store, "--out", str(blocked / "p.pt")],
                                       "is not a folder"),
        "train: missing config": (["train", "--config", str(r / "nope.yaml"), "--store", store, "--pretrained", tiny,
                                   "--out", str(r / "t")], "nope.yaml: config file not found"),
        "train: negative lr": ([*train, "--out", str(r / "t"), "--set", "optim.delta_lr=-1e-3"], "delta_lr=-0.001"),
        "train: NaN backbone": ([*train[:-1], str(r / "nan.pt"), "--out", str(r / "t")], "holds NaN or infinity"),
        "train: unwritable --out": ([*train, "--out", str(blocked / "t")], "is not a folder"),
        "select-lr: missing model": (["select-lr", "--model", str(r / "nope.pt"), "--episodes", episodes, "--store",
                                      store, "--finetune", "full", "--out", str(r / "lr.json")], "nope.pt"),
        "select-lr: bad grid": (["select-lr", "--model", f"pretrained:{tiny}", "--episodes", episodes, "--store", store,
                                 "--finetune", "full", "--grid", "-1", "--out", str(r / "lr.json")], "--grid"),
        "evaluate: missing model": ([*evaluate, "--model", str(r / "nope.pt"), "--out", str(r / "x.csv")], "nope.pt"),
        "evaluate: NaN backbone": ([*evaluate, "--model", f"pretrained:{r / 'nan.pt'}", "--out", str(r / "x.csv")],
                                   "cls_token holds NaN or infinity"),
        "evaluate: unwritable --out": ([*evaluate, "--model", f"pretrained:{tiny}", "--out", str(blocked / "x.csv")],
                                       "is not a folder"),
        "evaluate: bad image size": ([*evaluate, "--model", f"pretrained:{tiny}", "--image-size", "big", "--out",
                                      str(r / "x.csv")], "--image-size big"),
        "compare: missing file": (["compare", str(r / "a.csv"), str(r / "b.csv")], "a.csv"),
        "tables: missing eval": (["tables", "table1", "--eval", str(r / "a.csv"), "--id-datasets", "x",
                                  "--ood-datasets", "y", "--out-dir", str(r / "tables")], "a.csv"),
        "figures: missing input": (["figures", "pareto", "--inputs", str(r / "a.csv"), "--id-datasets", "x",
                                    "--ood-datasets", "y", "--out-prefix", str(r / "fig")], "a.csv"),
    }


CASE_NAMES = list(cases(Path("/x")))


@pytest.mark.parametrize("name", CASE_NAMES)
def test_every_failure_is_one_line_naming_the_input(inputs, capsys, name):
    args, fragment = cases(inputs)[name]
    before = sorted(p.name for p in inputs.iterdir())
    assert main(args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("smat: error: "), err
    assert fragment in err[0]
    assert sorted(p.name for p in inputs.iterdir()) == before         # nothing written next to the inputs

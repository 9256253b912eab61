"""No input runs code or writes outside its output, and no output replaces an input.

* Every loader of a file that may hold a pickle gets one whose unpickling would create a marker folder: the
  command must end in one line (exit 2) and the marker must never appear.
* A name read from a file (a store's domain, a list file's image path) never becomes a path outside the data.
* Every command refuses, before any work, an output that is one of its inputs (same path, symbolic or hard
  link, a derived name such as EVAL.json), lies inside an input folder, holds an input, or exists as a FIFO or
  device; the inputs are left byte for byte as they were.
"""

from __future__ import annotations

import json
import os
import pickle
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from smat.cli import main
from smat.data.store import manifest_digest
from tests.test_hostile_inputs import one_line_error, tiny_world

ROOT = Path(__file__).resolve().parents[1]
ARCH = "vit_tiny_patch4_32"
CI_TRAINING = str(ROOT / "config" / "training" / "ci.yaml")


class Payload:
    """Unpickling it calls os.mkdir(marker): proof that the file ran code."""

    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self):
        return (os.mkdir, (self.marker,))


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return tiny_world(tmp_path_factory.mktemp("security"), n_classes=6, n_episodes=2)


# --- payloads in every loader ------------------------------------------------------------------------------------

def _torch_payload(path: Path, marker: Path, record: dict | None = None) -> str:
    torch.save({**(record or {}), "payload": Payload(marker)}, path)
    return str(path)


def payload_cases(d: Path, work: Path, marker: Path) -> dict[str, list[str]]:
    store, tiny, episodes = str(d / "store"), str(d / "tiny.pt"), str(d / "episodes.json")
    evil = _torch_payload(work / "evil.pt", marker, {"format": "smat-model/1"})
    (work / "run").mkdir()
    _torch_payload(work / "run" / "resume.pt", marker, {"format": "smat-resume/2"})
    (work / "run" / "train_log.partial.jsonl").write_text("")       # with its log, a resume state is read
    _torch_payload(work / "p.pt.partial", marker, {"format": "smat-pretrain-partial/1"})
    cifar = work / "cifar"
    cifar.mkdir()
    (cifar / "test_batch").write_bytes(pickle.dumps({b"data": Payload(marker), b"labels": [0]}))
    (cifar / "batches.meta").write_bytes(pickle.dumps({b"label_names": [b"a"]}))
    cifar_meta = work / "cifar_meta"
    cifar_meta.mkdir()
    (cifar_meta / "test_batch").write_bytes(pickle.dumps({b"data": np.zeros((1, 3072), np.uint8), b"labels": [0]}))
    (cifar_meta / "batches.meta").write_bytes(pickle.dumps({b"label_names": [Payload(marker)]}))
    train = ["train", "--config", CI_TRAINING, "--store", store, "--device", "cpu", "--set", "validation.episodes=0"]
    return {
        "train: resume.pt": [*train, "--pretrained", tiny, "--out", str(work / "run")],
        "train: --pretrained": [*train, "--pretrained", evil, "--out", str(work / "run2")],
        "evaluate: model checkpoint": ["evaluate", "--model", evil, "--episodes", episodes, "--store", store,
                                       "--out", str(work / "e.csv"), "--device", "cpu"],
        "evaluate: backbone": ["evaluate", "--model", f"pretrained:{evil}", "--episodes", episodes, "--store", store,
                               "--out", str(work / "e.csv"), "--device", "cpu"],
        "select-lr: model checkpoint": ["select-lr", "--model", evil, "--episodes", episodes, "--store", store,
                                        "--finetune", "full", "--out", str(work / "lr.json"), "--device", "cpu"],
        "fetch: weights file": ["fetch", evil, "--arch", ARCH, "--out", str(work / "f.pt")],
        "import pmf": ["import", "pmf", evil, "--out", str(work / "i.pt")],
        "import smat-official": ["import", "smat-official", evil, "--out", str(work / "i.pt")],
        "pretrain: OUT.partial": ["pretrain", "--store", store, "--out", str(work / "p.pt"), "--device", "cpu",
                                  "--set", "batch_size=4"],
        "convert cifar: test_batch": ["data", "convert", "cifar", str(cifar), "--out", str(work / "c")],
        "convert cifar: batches.meta": ["data", "convert", "cifar", str(cifar_meta), "--out", str(work / "c")],
    }


PAYLOAD_CASES = ["train: resume.pt", "train: --pretrained", "evaluate: model checkpoint", "evaluate: backbone",
                 "select-lr: model checkpoint", "fetch: weights file", "import pmf", "import smat-official",
                 "pretrain: OUT.partial", "convert cifar: test_batch", "convert cifar: batches.meta"]


@pytest.mark.parametrize("name", PAYLOAD_CASES)
def test_a_planted_pickle_never_runs(data, tmp_path, capsys, name):
    marker = tmp_path / "MARKER"
    cases = payload_cases(data, tmp_path, marker)
    assert sorted(cases) == sorted(PAYLOAD_CASES)
    args = cases[name]
    message = one_line_error(capsys, args)
    assert not marker.exists(), f"{name}: the file ran code"
    assert str(tmp_path) in message and "posix.mkdir" in message      # names the file and what it holds


def test_a_planted_router_extra_never_runs(tmp_path, capsys):
    from test_import import HEADS, official_smat_files   # a tiny SMAT checkpoint in the authors' layout

    checkpoint, _, _, _ = official_smat_files(tmp_path)
    marker = tmp_path / "MARKER"
    extra = _torch_payload(tmp_path / "router_extra.pt", marker)
    message = one_line_error(capsys, ["import", "smat-official", str(checkpoint), "--router-extra", extra, "--heads",
                                      str(HEADS), "--out", str(tmp_path / "m.pt")])
    assert not marker.exists() and "router_extra.pt: refused" in message and "posix.mkdir" in message


def test_the_payload_would_run_under_plain_unpickling(tmp_path):
    """The check above means something: the same file runs its code when unpickled without restriction."""
    marker = tmp_path / "MARKER"
    torch.load(_torch_payload(tmp_path / "evil.pt", marker), weights_only=False)
    assert marker.is_dir()


def test_a_resume_state_still_resumes(data, tmp_path):
    """Restricted loading reads what training writes: a run cut after its first resume point continues."""
    out = tmp_path / "run"
    args = ["train", "--config", CI_TRAINING, "--store", str(data / "store"), "--pretrained", str(data / "tiny.pt"),
            "--device", "cpu", "--out", str(out), "--set", "epochs=1", "--set", "tasks_per_epoch=4",
            "--set", "meta_batch=2", "--set", "validation.episodes=0", "--set", "checkpoint.every_tasks=2"]
    from smat.training.resume import load_resume, save_resume

    out.mkdir()
    save_resume(out / "probe.pt", {"run_id": "x", "rng": {"sampler": np.random.default_rng(0).bit_generator.state},
                                   "progress": {"epoch": 0}, "log_offset": 0, "model": {"w": torch.ones(2)}})
    state = load_resume(out / "probe.pt")
    assert state["rng"]["sampler"] == np.random.default_rng(0).bit_generator.state
    (out / "probe.pt").unlink()
    assert main(args) == 0 and (out / "best.pt").is_file() and (out / "train_log.jsonl").is_file()
    assert not (out / "resume.pt").exists()


# --- names read from files -----------------------------------------------------------------------------------------

def test_a_store_domain_is_never_a_path(data, tmp_path, capsys):
    store = tmp_path / "store"
    shutil.copytree(data / "store", store)
    manifest = json.loads((store / "manifest.json").read_text())
    manifest["domain"] = "../../escaped"
    manifest["manifest_sha256"] = manifest_digest(manifest)       # a consistent edit: only the name is wrong
    (store / "manifest.json").write_text(json.dumps(manifest))
    out = tmp_path / "deep" / "er" / "run"
    message = one_line_error(capsys, ["train", "--config", CI_TRAINING, "--store", str(store), "--pretrained",
                                      str(data / "tiny.pt"), "--out", str(out), "--device", "cpu"])
    assert "'../../escaped' is not a plain name" in message
    assert not list(tmp_path.rglob("escaped*"))
    message = one_line_error(capsys, ["data", "convert", "imagefolder", str(data / "raw"), "--out",
                                      str(tmp_path / "s"), "--domain", "../x"])
    assert "'../x' is not a plain name" in message and not (tmp_path / "s").exists()


@pytest.mark.parametrize("line", ["../../../etc/passwd", "/etc/passwd", "apple/../../x"])
def test_a_list_file_cannot_point_outside_the_dataset(tmp_path, capsys, line):
    (tmp_path / "food" / "meta").mkdir(parents=True)
    (tmp_path / "food" / "meta" / "test.txt").write_text(f"{line}\n")
    message = one_line_error(capsys, ["data", "convert", "food101", str(tmp_path / "food"), "--out",
                                      str(tmp_path / "s")])
    assert "test.txt, line 1" in message and "not a relative path inside the dataset" in message


# --- outputs against inputs ----------------------------------------------------------------------------------------

def collision_cases(d: Path, w: Path) -> dict[str, tuple[list[str], str]]:
    """name: (arguments, fragment of the message). `w` holds copies of the inputs that a case may collide with."""
    store, tiny, episodes = str(w / "store"), str(w / "tiny.pt"), str(w / "episodes.json")
    evaluate = ["evaluate", "--model", f"pretrained:{tiny}", "--store", store, "--device", "cpu"]
    return {
        "evaluate: OUT.json is the episode file": ([*evaluate, "--episodes", episodes, "--out", str(w / "episodes.csv")],
                                                   "is also an input"),
        "evaluate: --out is the model": ([*evaluate, "--episodes", episodes, "--out", tiny], "is also an input"),
        "evaluate: --out a symlink to the model": ([*evaluate, "--episodes", episodes, "--out", str(w / "link.csv")],
                                                   "is also an input"),
        "evaluate: --out a hard link of the episodes": ([*evaluate, "--episodes", episodes, "--out",
                                                         str(w / "hard.csv")], "is also an input"),
        "evaluate: --out a FIFO": ([*evaluate, "--episodes", episodes, "--out", str(w / "fifo")], "a FIFO"),
        "evaluate: --out a link to /dev/null": ([*evaluate, "--episodes", episodes, "--out", str(w / "null")],
                                               "a character device"),
        "evaluate: --out a folder": ([*evaluate, "--episodes", episodes, "--out", str(w / "folder")], "a folder"),
        "evaluate: --out inside the store": ([*evaluate, "--episodes", episodes, "--out",
                                              str(w / "store" / "manifest.csv")], "inside the input folder"),
        "select-lr: --out is the episodes": (["select-lr", "--model", f"pretrained:{tiny}", "--episodes", episodes,
                                              "--store", store, "--finetune", "full", "--out", episodes],
                                             "is also an input"),
        "episodes: --out the store's manifest": (["episodes", "sample", "--store", store, "--split", "test", "--out",
                                                  str(w / "store" / "manifest.json")], "inside the input folder"),
        "fetch: --out is the source": (["fetch", tiny, "--arch", ARCH, "--out", tiny], "is also an input"),
        "import: --out is the checkpoint": (["import", "pmf", tiny, "--out", tiny], "is also an input"),
        "pretrain: --weights-out is --out": (["pretrain", "--store", store, "--out", str(w / "p.pt"),
                                              "--weights-out", str(w / "p.pt")], "two outputs of the command"),
        "pretrain: --out is the config": (["pretrain", "--store", store, "--config", str(w / "cfg.yaml"), "--out",
                                           str(w / "cfg.yaml")], "is also an input"),
        "train: --config inside --out": (["train", "--config", str(w / "run" / "config.yaml"), "--store", store,
                                          "--pretrained", tiny, "--out", str(w / "run")], "inside the output folder"),
        "train: --out is a store": (["train", "--config", str(w / "cfg.yaml"), "--store", store, "--pretrained", tiny,
                                     "--out", store], "is also an input"),
        "convert: --out inside the source": (["data", "convert", "imagefolder", str(w / "raw"), "--out",
                                              str(w / "raw" / "store")], "inside the input folder"),
        "build-embedded: --out a FIFO": (["data", "build-embedded", "--out", str(w / "fifo")], "a FIFO"),
        "tables: an eval CSV is the table": (["tables", "table1", "--eval", str(w / "t" / "table1.csv"),
                                              "--id-datasets", "x", "--ood-datasets", "y", "--out-dir", str(w / "t")],
                                             "is also an input"),
        "tables: an eval summary is the provenance": (["tables", "table2", "--eval", str(w / "t" / "table2.csv"),
                                                       "--id-datasets", "x", "--ood-datasets", "y", "--out-dir",
                                                       str(w / "t")], "is also an input"),
        "figures: an input is PREFIX.pdf": (["figures", "pareto", "--inputs", str(w / "fig.pdf"), "--id-datasets", "x",
                                             "--ood-datasets", "y", "--out-prefix", str(w / "fig")], "is also an input"),
    }


@pytest.fixture
def workspace(data, tmp_path):
    w = tmp_path / "w"
    w.mkdir()
    shutil.copytree(data / "store", w / "store")
    shutil.copytree(data / "raw", w / "raw")
    for name in ("tiny.pt", "episodes.json"):
        shutil.copy(data / name, w / name)
    (w / "link.csv").symlink_to(w / "tiny.pt")
    os.link(w / "episodes.json", w / "hard.csv")
    os.mkfifo(w / "fifo")
    (w / "null").symlink_to("/dev/null")
    (w / "folder").mkdir()
    (w / "cfg.yaml").write_text("epochs: 1\n")
    (w / "run").mkdir()
    (w / "run" / "config.yaml").write_text("method: pmf\n")
    (w / "t").mkdir()
    for name in ("table1.csv", "table2.csv", "table2.json"):
        (w / "t" / name).write_text("x\n")
    (w / "fig.pdf").write_text("x\n")
    return w


def _snapshot(folder: Path) -> dict[str, tuple]:
    """Every entry under `folder`: its kind, and for files their bytes."""
    snapshot = {}
    for path in sorted(folder.rglob("*")):
        if path.is_symlink():
            snapshot[str(path)] = ("link", os.readlink(path))
        elif path.is_fifo():
            snapshot[str(path)] = ("fifo",)
        elif path.is_file():
            snapshot[str(path)] = ("file", path.read_bytes())
        else:
            snapshot[str(path)] = ("folder",)
    return snapshot


@pytest.mark.parametrize("name", list(collision_cases(Path("/d"), Path("/w"))))
def test_no_output_replaces_or_enters_an_input(data, workspace, capsys, name):
    args, fragment = collision_cases(data, workspace)[name]
    before = _snapshot(workspace)
    message = one_line_error(capsys, args)
    assert fragment in message
    assert _snapshot(workspace) == before
    assert Path("/dev/null").is_char_device()


def test_an_input_that_is_a_fifo_is_refused_instead_of_blocking(data, tmp_path, capsys):
    os.mkfifo(tmp_path / "episodes.json")
    store = tmp_path / "store"
    shutil.copytree(data / "store", store)
    message = one_line_error(capsys, ["evaluate", "--model", f"pretrained:{data / 'tiny.pt'}", "--episodes",
                                      str(tmp_path / "episodes.json"), "--store", str(store), "--out",
                                      str(tmp_path / "e.csv"), "--device", "cpu"])
    assert "episodes.json: not a regular file" in message
    (store / "images.npy").unlink()
    os.mkfifo(store / "images.npy")
    message = one_line_error(capsys, ["episodes", "sample", "--store", str(store), "--split", "test", "--ways", "2",
                                      "--out", str(tmp_path / "e.json")])
    assert "images.npy: not a regular file" in message

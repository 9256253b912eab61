"""Data-parallel meta-training (METHOD §11): two gloo processes under torchrun train what one process trains,
a killed two-process run resumes to the same end, bad launches are one-line errors, and the workflow starts
torchrun for a job with several GPUs.

Equality is measured per tensor as ‖a − b‖ / max(‖a‖, ‖b‖, 1e-3·√n). With one task per process (B = N = 2)
the sums of the gradients are the same two-operand sums as in one process, so the runs are equal bit for bit.
With two tasks per process (B = 4, 8 tasks) each process adds its two tasks first, a different order of
rounding: PMF stays within 1e-6 (measured 2.5e-7), SMAT within 1e-6 (measured 3.9e-7) except its router,
which AdamW trains: where the per-task router gradients nearly cancel, AdamW's normalised step turns their
rounding into a visible difference (measured 5.1e-6 on the router's LayerNorm biases), hence 2e-5 there.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from test_training import CI_CONFIG, REPO, SIZE, make_store

from smat.data.loader import EpisodeTensors
from smat.io import SmatError
from smat.methods.registry import build_model
from smat.methods.sparsity import realised_sparsity
from smat.models.backbones import create_backbone
from smat.models.pretrained import save_checkpoint
from smat.methods.checkpoint import read_model_checkpoint
from smat.training.resume import load_resume
from smat.methods.config import GateConfig
from smat.training.config import TrainConfig
from smat.training.distributed import launched_world_size, process_device
from smat.training.loop import seeded_global_rng, train

BASE = [f"image_size={SIZE}", "experts=2", "tau=0.5", "grad_alignment.interval=4"]
RUNS = {                                 # name: (overrides, tolerance of the parameters, of the router's)
    "smat-b2": (BASE, 0.0, 0.0),
    "smat-b4": (BASE + ["meta_batch=4", "epochs=1"], 1e-6, 2e-5),
    "smat-b4-substeps": (BASE + ["meta_batch=4", "epochs=1", "optim.constraint_substeps=4"], 1e-6, 2e-5),
    "pmf-b4": (BASE + ["method=pmf", "meta_batch=4", "epochs=1"], 1e-6, None),
}
NOT_DIVISIBLE = BASE + ["meta_batch=3", "tasks_per_epoch=6"]
ENV = {**{k: v for k, v in os.environ.items() if k not in ("WORLD_SIZE", "RANK", "LOCAL_RANK")},
       "OMP_NUM_THREADS": "1"}
TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"]

# Runs several `smat train` commands in one two-process gloo group (one torchrun start instead of one each),
# after a check of the gradient all-reduce's rule for missing gradients.
DRIVER = """
import json, sys
import torch, torch.distributed as dist
from smat.cli import main
from smat.training.distributed import all_reduce_gradients

dist.init_process_group("gloo")
rank = dist.get_rank()
params = [torch.nn.Parameter(torch.zeros(2)) for _ in range(3)]     # a gradient on rank 0 only, on both, on none
if rank == 0:
    params[0].grad = torch.ones(2)
params[1].grad = torch.full((2,), rank + 1.0)
all_reduce_gradients(params)
grads = [None if p.grad is None else p.grad.tolist() for p in params]
codes = [main(args) for args in json.loads(sys.argv[1])]
with open(f"{sys.argv[2]}/rank{rank}.json", "w") as handle:
    json.dump({"grads": grads, "codes": codes}, handle)
dist.destroy_process_group()
"""


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("distributed")
    stores = [make_store(root / name, name, seed) for seed, name in enumerate(["alpha", "beta"])]
    torch.manual_seed(0)
    backbone = create_backbone("vit_tiny_patch4_32", image_size=SIZE)
    pretrained = root / "pretrained.pt"
    save_checkpoint(pretrained, "vit_tiny_patch4_32", dict(backbone.vit.state_dict()), source="test", sha256=None,
                    meta={"image_size": SIZE})
    return {"root": root, "stores": stores, "pretrained": pretrained}


def train_args(tiny, out: Path, overrides: list[str]) -> list[str]:
    args = ["train", "--config", str(CI_CONFIG), "--store", *map(str, tiny["stores"]), "--pretrained",
            str(tiny["pretrained"]), "--out", str(out), "--device", "cpu"]
    for item in overrides:
        args += ["--set", item]
    return args


def torchrun(args: list[str], **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run(TORCHRUN + args, cwd=REPO, env=ENV, capture_output=True, text=True, timeout=300, **kwargs)


@pytest.fixture(scope="module")
def two_processes(tiny):
    """Every run of RUNS and the not-divisible one, each as two processes of one torchrun start."""
    root = tiny["root"] / "two"
    root.mkdir()
    commands = [train_args(tiny, root / name, overrides) for name, (overrides, _, _) in RUNS.items()]
    commands.append(train_args(tiny, root / "not-divisible", NOT_DIVISIBLE))
    driver = root / "driver.py"
    driver.write_text(DRIVER)
    done = torchrun([str(driver), json.dumps(commands), str(root)])
    assert done.returncode == 0, done.stderr[-3000:]
    ranks = [json.loads((root / f"rank{r}.json").read_text()) for r in range(2)]
    return {"root": root, "ranks": ranks, "stderr": done.stderr}


def relative_difference(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    return (a - b).norm().item() / max(a.norm().item(), b.norm().item(), 1e-3 * a.numel() ** 0.5)


def numbers(record, prefix: str = "") -> dict:
    """A log record flattened to {dotted key: value}, so that its numbers can be compared with a tolerance."""
    if isinstance(record, dict):
        return {k: v for key, value in record.items() for k, v in numbers(value, f"{prefix}{key}.").items()}
    if isinstance(record, list):
        return {k: v for i, value in enumerate(record) for k, v in numbers(value, f"{prefix}{i}.").items()}
    return {prefix.rstrip("."): record}


def assert_same_log(one: Path, two: Path, exact: bool) -> None:
    a, b = (p.read_text().splitlines() for p in (one, two))
    if exact:
        assert a == b
        return
    assert len(a) == len(b)                                     # rank 0 alone writes: no line twice
    for line_a, line_b in zip(a, b):
        record_a, record_b = numbers(json.loads(line_a)), numbers(json.loads(line_b))
        assert record_a.keys() == record_b.keys()
        for key, value in record_a.items():
            if isinstance(value, float):
                assert record_b[key] == pytest.approx(value, rel=1e-5, abs=1e-5), key
            else:
                assert record_b[key] == value, key


# --- two processes train what one process trains -------------------------------------------------------------

@pytest.mark.parametrize("name", list(RUNS))
def test_two_processes_train_what_one_process_trains(tiny, two_processes, name):
    overrides, tolerance, router_tolerance = RUNS[name]
    one = tiny["root"] / f"one-{name}"
    train(CI_CONFIG, tiny["stores"], tiny["pretrained"], one, overrides=overrides, device="cpu")
    two = two_processes["root"] / name
    # The same files (one checkpoint each, nothing per process); the same log, written once.
    assert sorted(p.name for p in two.rglob("*")) == sorted(p.name for p in one.rglob("*"))
    assert_same_log(one / "train_log.jsonl", two / "train_log.jsonl", exact=tolerance == 0)
    for checkpoint in ("best.pt", "last.pt"):
        a, _ = read_model_checkpoint(one / checkpoint)
        b, _ = read_model_checkpoint(two / checkpoint)
        assert a["progress"]["best_epoch"] == b["progress"]["best_epoch"]
        assert a["state_dict"].keys() == b["state_dict"].keys()
        for key, tensor in a["state_dict"].items():          # every parameter and buffer
            limit = router_tolerance if key.startswith("router.") else tolerance
            assert relative_difference(tensor, b["state_dict"][key]) <= limit, key
    if name.startswith("smat"):
        assert np.load(one / "expert_masks.npz").files == np.load(two / "expert_masks.npz").files


def test_gradients_are_summed_and_a_missing_one_stays_missing(two_processes):
    for rank in two_processes["ranks"]:
        assert rank["grads"] == [[1.0, 1.0], [3.0, 3.0], None]


def test_a_meta_batch_the_processes_do_not_divide_is_a_one_line_error(two_processes, tiny):
    assert [rank["codes"][-1] for rank in two_processes["ranks"]] == [2, 2]
    lines = [line for line in two_processes["stderr"].splitlines() if "meta_batch=3" in line]
    assert lines and all(line == lines[0] for line in lines)
    assert lines[0].startswith("smat: error: meta_batch=3 is not divisible by the 2 processes; ")
    assert lines[0].endswith("equal share of every meta-batch")
    assert not (two_processes["root"] / "not-divisible").exists()


# --- kill -9 and resume ----------------------------------------------------------------------------------------

def child_pids(pid: int) -> list[int]:
    children = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            children.append(int(stat.parent.name))
    return children


def alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def test_kill_9_of_torchrun_stops_its_processes_and_the_same_command_resumes(tiny, two_processes):
    """torchrun's processes run in sessions of their own and outlive its kill -9: they notice and stop."""
    out = tiny["root"] / "killed"
    args = TORCHRUN + ["-m", "smat.cli"] + train_args(tiny, out, RUNS["smat-b2"][0])
    launcher = subprocess.Popen(args, cwd=REPO, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 240
    while not (out / "resume.pt").exists() and launcher.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    workers = child_pids(launcher.pid)
    launcher.send_signal(signal.SIGKILL)
    launcher.wait()
    assert len(workers) == 2
    while any(alive(pid) for pid in workers) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not any(alive(pid) for pid in workers), "the processes of a killed torchrun went on training"
    assert not {"best.pt", "train_log.jsonl", "expert_masks.npz"} & {p.name for p in out.iterdir()}, \
        "the run finished before it could be killed (or wrote a product under its final name early)"
    assert 0 < load_resume(out / "resume.pt")["progress"]["tasks_seen"] < 16

    done = torchrun(args[len(TORCHRUN):])
    assert done.returncode == 0, done.stderr[-3000:]
    uninterrupted = two_processes["root"] / "smat-b2"
    assert (out / "train_log.jsonl").read_bytes() == (uninterrupted / "train_log.jsonl").read_bytes()
    for name in ("best.pt", "last.pt"):
        a, _ = read_model_checkpoint(uninterrupted / name)
        b, _ = read_model_checkpoint(out / name)
        assert a["progress"] == b["progress"]
        assert all(torch.equal(a["state_dict"][k], b["state_dict"][k]) for k in a["state_dict"])
    assert (out / "expert_masks.npz").read_bytes() == (uninterrupted / "expert_masks.npz").read_bytes()
    assert not (out / "resume.pt").exists() and not list(out.glob("*.partial.*"))
    assert json.loads((out / "summary.json").read_text()) == json.loads((uninterrupted / "summary.json").read_text())


def test_a_resume_state_of_the_per_process_random_stream_is_refused(tmp_path):
    torch.save({"format": "smat-resume/1", "run_id": "old"}, tmp_path / "resume.pt")
    with pytest.raises(SmatError, match=r"smat-resume/1\), whose training drew its random numbers per process"):
        load_resume(tmp_path / "resume.pt")


# --- one task's state changes, replayed -----------------------------------------------------------------------

def test_replaying_a_task_changes_the_model_as_its_forward_does():
    """λ reset and spectral-norm vectors after a task equal those after its replay; the gates are its first draw."""
    torch.manual_seed(0)
    config = TrainConfig(image_size=SIZE, experts=2, tau=0.5, gates=GateConfig(noise_width=0.5))
    model = build_model(config, create_backbone("vit_tiny_patch4_32", image_size=SIZE)).train()
    with torch.no_grad():
        model.lagrangian.fill_(0.3)
        model.experts.log_alpha[0].fill_(-1.6)      # expert 0 about τ-sparse, expert 1 dense: resets vary by draw
        model.experts.delta.normal_(0, 1e-2)
    g = torch.Generator().manual_seed(0)
    episode = EpisodeTensors(torch.randn(6, 3, SIZE, SIZE, generator=g), torch.arange(3).repeat(2),
                             torch.randn(6, 3, SIZE, SIZE, generator=g), torch.arange(3).repeat(2), 3)
    start = {k: v.clone() for k, v in model.state_dict().items()}
    device, lambdas = torch.device("cpu"), set()
    for seed in range(4):
        model.load_state_dict(start)
        with seeded_global_rng(seed, device):
            gates = model.experts.gates(training=True)
        model.load_state_dict(start)
        with seeded_global_rng(seed, device):
            metrics = model.task_forward(episode, 10).metrics
        assert metrics["sparsity"] == realised_sparsity(gates).tolist()
        after_forward = {k: v.clone() for k, v in model.state_dict().items()}
        model.load_state_dict(start)
        with seeded_global_rng(seed, device):
            model.replay_task_state_()
        for key, value in model.state_dict().items():
            assert torch.equal(value, after_forward[key]), key
        assert not torch.equal(after_forward["router.block.fc1.parametrizations.weight.0._u"],
                               start["router.block.fc1.parametrizations.weight.0._u"])
        lambdas.add(round(after_forward["lagrangian"][0].item(), 6))
    assert lambdas == {0.0, 0.3}                    # some draws reset λ_0, others keep it


# --- launch ---------------------------------------------------------------------------------------------------

def test_devices_of_several_processes(monkeypatch):
    assert process_device("cpu", 2) == torch.device("cpu")
    if not torch.cuda.is_available():
        assert process_device("auto", 2) == torch.device("cpu")
    with pytest.raises(SmatError, match="--device cuda:1: one device for 2 processes"):
        process_device("cuda:1", 2)
    monkeypatch.setenv("WORLD_SIZE", "two")
    with pytest.raises(SmatError, match="WORLD_SIZE='two'"):
        launched_world_size()


def test_the_workflow_runs_torchrun_for_a_job_with_several_gpus(tmp_path):
    config = yaml.safe_load((REPO / "config" / "ci.yaml").read_text())
    config["compute"] = {"device": "auto", "gpu": True, "gpus_per_job": 2}
    path = tmp_path / "two_gpus.yaml"
    path.write_text(yaml.safe_dump(config))
    dry = subprocess.run([sys.executable, "-m", "snakemake", "--snakefile", str(REPO / "Snakefile"), "--directory",
                          str(tmp_path), "-n", "-p", "all", "--configfile", str(path)],
                         capture_output=True, text=True, timeout=300)
    assert dry.returncode == 0, dry.stderr[-3000:]
    commands = [line for line in dry.stdout.splitlines() if " smat.cli train " in line]
    assert commands and all(line.startswith("Shell command: OMP_NUM_THREADS=1 torchrun --standalone "
                                            "--nproc-per-node 2 -m smat.cli train --config ") for line in commands)
    assert "gpu=2, nodes=1" in dry.stdout

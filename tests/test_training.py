"""Meta-training: schedule and optimiser groups, `smat train` outputs, kill -9 resume, bad input (METHOD §1.10-1.11)."""

import hashlib
import json
import logging
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from smat.config_loader import load_config, load_yaml, to_dict
from smat.data.episodes import make_sampler
from smat.data.loader import EpisodeTensors, load_episode
from smat.data.store import Store
from smat.data.transforms import train_transform
from smat.io import SmatError
from smat.methods.registry import build_model
from smat.methods.checkpoint import load_model
from smat.models.backbones import create_backbone
from smat.models.pretrained import load_pretrained, save_checkpoint
from smat.methods.checkpoint import read_model_checkpoint
from smat.training.resume import load_resume
from smat.training.config import TrainConfig
from smat.training.alignment_probe import gradient_alignment
from smat.training.loop import train
from smat.training.optim import build_optimisers, lr_multiplier, set_epoch_lr

REPO = Path(__file__).resolve().parents[1]
CI_CONFIG = REPO / "config" / "training" / "ci.yaml"
SIZE = 16
FAST = [f"image_size={SIZE}", "experts=2", "tau=0.5", "grad_alignment.interval=4"]


def make_store(root: Path, domain: str, seed: int, splits=(("train", 8), ("val", 5), ("test", 3)),
               n_images: int = 10) -> Path:
    """A store whose classes are noisy colour templates: learnable, not trivial."""
    rng = np.random.default_rng(seed)
    classes, images, offset = [], [], 0
    for split, n in splits:
        for i in range(n):
            template = np.kron(rng.uniform(0, 255, (SIZE // 4, SIZE // 4, 3)), np.ones((4, 4, 1)))
            noisy = template[None] + rng.normal(0, 70, (n_images, SIZE, SIZE, 3))
            images.append(np.clip(noisy, 0, 255).astype(np.uint8))
            classes.append({"name": f"{split}{i}", "split": split, "n_images": n_images, "offset": offset,
                            "group": None})
            offset += n_images
    root.mkdir(parents=True)
    np.save(root / "images.npy", np.concatenate(images))
    digest = hashlib.sha256((root / "images.npy").read_bytes()).hexdigest()
    (root / "manifest.json").write_text(json.dumps({
        "format": "smat-store/1", "domain": domain, "image_size": SIZE, "hierarchy": "flat", "classes": classes,
        "excluded": [], "skipped_images": [], "source": "test", "provenance": {}, "images_sha256": digest}))
    return root



@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("training")
    stores = [make_store(root / name, name, seed) for seed, name in enumerate(["alpha", "beta"])]
    torch.manual_seed(0)
    pretrained = root / "pretrained.pt"
    backbone = create_backbone("vit_tiny_patch4_32", image_size=SIZE)
    save_checkpoint(pretrained, "vit_tiny_patch4_32", dict(backbone.vit.state_dict()), source="test", sha256=None,
                    meta={"image_size": SIZE})
    return {"root": root, "stores": stores, "pretrained": pretrained}


def cli_train(data, out: Path, *extra: str) -> list[str]:
    args = [sys.executable, "-m", "smat.cli", "train", "--config", str(CI_CONFIG), "--store",
            *map(str, data["stores"]), "--pretrained", str(data["pretrained"]), "--out", str(out), "--device", "cpu"]
    for item in FAST + list(extra):
        args += ["--set", item]
    return args


# One thread per training process: no oversubscription when tests share the cores; every run (killed,
# resumed, uninterrupted) uses the same setting, so their numbers stay comparable bit for bit.
CLI_ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


def run_cli(args: list[str]) -> None:
    done = subprocess.run(args, cwd=REPO, env=CLI_ENV, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]


@pytest.fixture(scope="module")
def finished_run(data):
    out = data["root"] / "run_a"
    run_cli(cli_train(data, out))
    return out


# --- schedule and optimisers ----------------------------------------------------------------------------------

def test_schedule_follows_hf_cosine_with_warmup_and_the_epoch0_rule():
    assert [lr_multiplier(e, 5, 50) for e in range(6)] == pytest.approx([0, 0.2, 0.4, 0.6, 0.8, 1.0])
    assert lr_multiplier(24, 5, 50) == pytest.approx(0.5 * (1 + math.cos(math.pi * 19 / 45)))   # ≈ 0.621
    config = TrainConfig()
    model = build_model(config.__class__(), create_backbone("vit_tiny_patch4_32"))
    optimisers = build_optimisers(model, config.optim)
    assert set_epoch_lr(optimisers, 0, config.schedule) == {"delta": 1e-6, "masks": 1e-6, "lagrangian": 1e-6,
                                                             "router": 0.0}
    assert set_epoch_lr(optimisers, 2, config.schedule) == pytest.approx(
        {"delta": 0.4e-4, "masks": 0.4e6, "lagrangian": 0.4 * 2e-3, "router": 0.4e-4})


def test_optimiser_groups_follow_the_spec_table():
    config = TrainConfig()
    model = build_model(config, create_backbone("vit_tiny_patch4_32"))
    optimisers = build_optimisers(model, config.optim)
    groups = {g["name"]: g for g in optimisers.sgd.param_groups}
    settings = {name: (g["base_lr"], g["momentum"], g["weight_decay"]) for name, g in groups.items()}
    assert settings == {"delta": (1e-4, 0.9, 1e-4), "masks": (1e6, 0, 0), "lagrangian": (2e-3, 0, 0)}
    router = optimisers.router.param_groups[0]
    assert isinstance(optimisers.router, torch.optim.AdamW)
    assert (router["base_lr"], router["weight_decay"]) == (1e-4, 1e-2)
    assert len(router["params"]) == len(list(model.router.parameters()))
    assert [(name, len(params), norm) for name, params, norm in optimisers.clip] == [
        ("masks", 1, 5.0), ("router", len(router["params"]), 1.0)]
    pmf = build_model(TrainConfig(method="pmf"), create_backbone("vit_tiny_patch4_32"))
    pmf_optimisers = build_optimisers(pmf, config.optim)
    (group,) = pmf_optimisers.sgd.param_groups
    assert (group["base_lr"], group["momentum"], group["weight_decay"]) == (5e-5, 0.9, 0.0)
    assert len(group["params"]) == len(list(pmf.parameters())) and pmf_optimisers.router is None


def test_paper_and_embedded_configs_load():
    paper = load_config(TrainConfig, REPO / "config" / "training" / "paper.yaml")
    assert paper == TrainConfig(image_size=128, switches=paper.switches)            # METHOD §8's numbers throughout
    embedded = load_config(TrainConfig, REPO / "config" / "training" / "embedded.yaml")
    assert embedded.tasks_per_epoch % embedded.meta_batch == 0


@pytest.mark.parametrize("name", ["ci", "embedded", "paper"])
def test_training_configs_state_only_what_differs_from_the_defaults(name):
    """A key equal to its default, or one the workflow sets per model, would be a second source for it."""
    path = REPO / "config" / "training" / f"{name}.yaml"
    defaults = to_dict(TrainConfig())

    def restated(data, default, prefix=""):
        for key, value in data.items():
            if isinstance(value, dict):
                yield from restated(value, default[key], f"{prefix}{key}.")
            elif value == default[key] or (isinstance(value, list) and tuple(value) == default[key]):
                yield prefix + key

    data = load_yaml(path)
    assert not {"method", "tau", "experts", "seed", "switches"} & set(data)
    assert list(restated(data, defaults)) == []


# --- smat train -------------------------------------------------------------------------------------------------

def test_train_writes_every_output(finished_run, data):
    out = finished_run
    assert all((out / name).is_file() for name in ("best.pt", "train_log.jsonl", "expert_masks.npz", "summary.json"))
    assert not (out / "resume.pt").exists() and not list(out.glob("*.partial.*"))
    assert json.loads((out / "summary.json").read_text())["method"] == "smat"
    assert sorted(p.name for p in (out / "val_episodes").iterdir()) == ["alpha.json", "beta.json"]
    records = [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]
    train_records = [r for r in records if r["kind"] == "train"]
    assert [r["task"] for r in train_records] == list(range(2, 17, 2))
    for key in ("loss", "ce", "kd", "acc", "lr", "temperature", "sparsity", "expected_density", "gate_band",
                "lambda", "alpha", "alpha_entropy", "grad_norm"):
        assert key in train_records[0]
    for key in ("sparsity", "expected_density", "gate_band", "lambda", "alpha"):
        assert len(train_records[0][key]) == 2, key
    assert all(0 <= b <= 1 for r in train_records for b in r["gate_band"])
    assert 0 <= train_records[0]["alpha_entropy"] <= math.log(2) + 1e-6
    assert set(train_records[0]["grad_norm"]) == {"masks", "router"}
    assert [r["epoch"] for r in records if r["kind"] == "val"] == [0, 1]
    alignment = [r for r in records if r["kind"] == "grad_alignment"]
    assert [r["task"] for r in alignment] == [4, 8, 12, 16]
    assert all(r["group"] == "delta" and r["n_pairs"] == 1 and -1 <= r["mean_cos"] <= 1 for r in alignment)

    record, config = read_model_checkpoint(out / "best.pt")
    assert record["method"] == "smat" and record["backbone"]["arch"] == "vit_tiny_patch4_32"
    assert record["backbone"]["image_size"] == SIZE and len(record["backbone"]["pretrained_sha256"]) == 64
    assert config.image_size == SIZE and record["progress"]["best_epoch"] in (0, 1)
    assert "git_commit" in record["provenance"]
    model = load_model(str(out / "last.pt"), "cpu")
    assert model.method == "smat" and int(model.tasks_seen) == 16 and not model.training

    masks = np.load(out / "expert_masks.npz")
    expected = model.expert_masks()
    assert sorted(masks.files) == sorted(expected)
    for name, mask in expected.items():
        assert masks[name].dtype == bool and masks[name].shape == (2, *model.backbone.vit.get_parameter(name).shape)
        assert np.array_equal(masks[name], mask.numpy())


def test_collapsed_gates_are_warned_about_once_per_epoch(finished_run, data):
    """Gate and λ rates far above the time-scale rules (METHOD §1.13) close every gate at once; λ then stays 0
    and the masks never move again: the log and the run summary say so. The normal run says nothing."""
    out = data["root"] / "collapse"
    train(CI_CONFIG, data["stores"], data["pretrained"], out, device="cpu",
          overrides=FAST + ["optim.mask_lr=1e12", "optim.lagrangian_lr=1e4"])
    summary = json.loads((out / "summary.json").read_text())
    warnings = [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()
                if json.loads(line)["kind"] == "warning"]
    assert [w["epoch"] for w in warnings] == [1]
    assert summary["warnings"] == [w["message"] for w in warnings]
    assert "gates collapsed" in warnings[0]["message"] and "tau=0.5" in warnings[0]["message"]
    normal = json.loads((finished_run / "summary.json").read_text())
    assert normal["warnings"] == [] and 0 < normal["lambda_active_updates"] <= 8


def test_finished_run_reinvoked_is_a_no_op(finished_run, data, caplog):
    """A directory with every final file (best.pt, train_log.jsonl, expert_masks.npz) is finished: no marker."""
    stamps = {p.name: p.stat().st_mtime_ns for p in finished_run.iterdir() if p.is_file()}
    with caplog.at_level(logging.INFO, logger="smat.training.loop"):
        train(CI_CONFIG, data["stores"], data["pretrained"], finished_run, overrides=FAST, device="cpu")
    assert stamps == {p.name: p.stat().st_mtime_ns for p in finished_run.iterdir() if p.is_file()}
    assert [r.getMessage() for r in caplog.records if "already trained" in r.getMessage()] == [
        f"{finished_run}: already trained (expert_masks.npz, train_log.jsonl, best.pt exist); nothing to do"]
    with pytest.raises(SmatError, match="different config"):
        train(CI_CONFIG, data["stores"], data["pretrained"], finished_run, overrides=FAST + ["seed=1"], device="cpu")


def test_kill_9_then_rerun_resumes_and_ends_equal_to_an_uninterrupted_run(finished_run, data):
    out = data["root"] / "run_killed"
    args = cli_train(data, out)
    process = subprocess.Popen(args, cwd=REPO, env=CLI_ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 240
    while not (out / "resume.pt").exists() and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert not {"best.pt", "train_log.jsonl", "expert_masks.npz"} & {p.name for p in out.iterdir()}, \
        "the run finished before it could be killed (or wrote a product under its final name early)"
    assert (out / "train_log.partial.jsonl").is_file()
    interrupted_at = load_resume(out / "resume.pt")["progress"]["tasks_seen"]
    assert 0 < interrupted_at < 16
    run_cli(args)
    assert (out / "train_log.jsonl").read_bytes() == (finished_run / "train_log.jsonl").read_bytes()
    for name in ("best.pt", "last.pt"):
        a, _ = read_model_checkpoint(finished_run / name)
        b, _ = read_model_checkpoint(out / name)
        assert a["progress"] == b["progress"]
        assert a["state_dict"].keys() == b["state_dict"].keys()
        assert all(torch.equal(a["state_dict"][k], b["state_dict"][k]) for k in a["state_dict"])
    assert (out / "expert_masks.npz").read_bytes() == (finished_run / "expert_masks.npz").read_bytes()
    assert not (out / "resume.pt").exists() and not list(out.glob("*.partial.*"))
    assert json.loads((out / "summary.json").read_text()) == json.loads((finished_run / "summary.json").read_text())


@pytest.mark.parametrize("outputs_deleted", [False, True], ids=["rerun", "rerun-after-snakemake-deleted-outputs"])
def test_a_run_cut_off_while_renaming_its_products_ends_equal_to_an_uninterrupted_run(finished_run, data, monkeypatch,
                                                                                      outputs_deleted):
    """Killed between the renames at the end: the rerun takes back what was renamed and finishes; if the renamed
    files are gone (Snakemake deletes a failed job's declared outputs), it trains again from the start."""
    out = data["root"] / f"run_cut_renaming_{outputs_deleted}"
    rename = Path.replace

    def killed_at_best(path, target):
        if path.name == "best.partial.pt":
            raise KeyboardInterrupt("killed")
        return rename(path, target)

    monkeypatch.setattr(Path, "replace", killed_at_best)
    with pytest.raises(KeyboardInterrupt):
        train(CI_CONFIG, data["stores"], data["pretrained"], out, overrides=FAST, device="cpu")
    monkeypatch.undo()
    assert (out / "expert_masks.npz").is_file() and (out / "train_log.jsonl").is_file()
    assert (out / "best.partial.pt").is_file() and not (out / "best.pt").exists() and (out / "resume.pt").is_file()
    if outputs_deleted:
        (out / "expert_masks.npz").unlink()
        (out / "train_log.jsonl").unlink()
    train(CI_CONFIG, data["stores"], data["pretrained"], out, overrides=FAST, device="cpu")
    assert (out / "train_log.jsonl").read_bytes() == (finished_run / "train_log.jsonl").read_bytes()
    assert (out / "expert_masks.npz").read_bytes() == (finished_run / "expert_masks.npz").read_bytes()
    a, _ = read_model_checkpoint(finished_run / "best.pt")
    b, _ = read_model_checkpoint(out / "best.pt")
    assert a["progress"] == b["progress"] and all(torch.equal(a["state_dict"][k], b["state_dict"][k])
                                                  for k in a["state_dict"])
    assert not (out / "resume.pt").exists() and not list(out.glob("*.partial.*"))


def test_short_run_lowers_the_query_loss(finished_run, data):
    """Mean query CE of the task loss on fixed augmented training episodes, before vs after 16 tasks."""
    config = load_config(TrainConfig, CI_CONFIG, FAST)
    backbone, _ = load_pretrained(data["pretrained"], SIZE)
    torch.manual_seed(config.seed)
    before = build_model(config, backbone).train()
    after = load_model(str(finished_run / "last.pt"), "cpu").train()
    rng, generator = np.random.default_rng(123), torch.Generator().manual_seed(0)
    transform = train_transform(SIZE, tuple(config.crop_scale))
    stores = [Store(p) for p in data["stores"]]
    episodes = [load_episode(s, make_sampler(s, "train", config.sampler).sample(rng), transform, generator)
                for s in stores for _ in range(4)]

    def query_ce(model):
        torch.manual_seed(0)
        return float(np.mean([model.meta_loss(e, 16)[1]["ce"] for e in episodes]))

    assert query_ce(after) < 0.8 * query_ce(before)


@pytest.mark.parametrize("overrides", [["method=pmf"], ["method=softmerge"],
                                       ["experts=1", "switches.mls=false", "switches.ie=false"]])
def test_baselines_and_dense_ablation_train_through_the_same_loop(data, overrides):
    out = data["root"] / ("run_" + "_".join(overrides).replace("=", "-"))
    train(CI_CONFIG, data["stores"], data["pretrained"], out, device="cpu",
          overrides=[f"image_size={SIZE}", "epochs=1", "tasks_per_epoch=4", "validation.episodes=1"] + overrides)
    record, config = read_model_checkpoint(out / "best.pt")
    assert record["method"] == config.method and (out / "train_log.jsonl").is_file()
    assert not (out / "expert_masks.npz").exists() and not list(out.glob("*.partial.*"))
    train_record = json.loads((out / "train_log.jsonl").read_text().splitlines()[0])
    assert train_record["sparsity"] == [] and train_record["lambda"] == []
    assert load_model(str(out / "best.pt"), "cpu").method == config.method


def test_a_model_checkpoint_with_nan_weights_is_refused(finished_run, tmp_path):
    record = torch.load(finished_run / "last.pt", weights_only=True)
    name = next(k for k, v in record["state_dict"].items() if v.is_floating_point())
    record["state_dict"][name].view(-1)[0] = float("inf")
    torch.save(record, tmp_path / "inf.pt")
    with pytest.raises(SmatError, match=f"tensor {name} holds NaN or infinity"):
        load_model(str(tmp_path / "inf.pt"), "cpu")


def test_non_finite_loss_stops_with_a_clear_error_and_keeps_the_last_checkpoint(data):
    out = data["root"] / "run_nan"
    with pytest.raises(SmatError, match="non-finite loss"):
        train(CI_CONFIG, data["stores"], data["pretrained"], out, device="cpu",
              overrides=FAST + ["checkpoint.every_tasks=2", "optim.delta_lr=1.0e+38", "switches.dt=false"])
    assert not (out / "best.pt").exists() and not (out / "train_log.jsonl").exists()
    assert load_resume(out / "resume.pt")["progress"]["tasks_seen"] >= 2


# --- bad input ------------------------------------------------------------------------------------------------

def test_store_without_train_classes_is_rejected(data):
    store = make_store(data["root"] / "ood_only", "ood_only", 7, splits=(("test", 6),))
    with pytest.raises(SmatError, match="no train classes"):
        train(CI_CONFIG, [store], data["pretrained"], data["root"] / "bad_store", overrides=FAST, device="cpu")


@pytest.mark.parametrize("override, message", [("method=maml", "method"), ("switches.foo=true", "unknown key"),
                                               ("tau=1.5", "tau"), ("experts=0", "experts"),
                                               ("optim.delta_lr=-1e-3", r"optim: delta_lr=-0.001: must be > 0"),
                                               ("optim.mask_lr=.inf", "optim.mask_lr: inf is not a finite number"),
                                               ("seed=-1", r"seed=-1: must be an integer in \[0, "),
                                               ("crop_scale=[0.5]", "expected 2 values"),
                                               ("teacher.kd_weight=1.5", r"kd_weight=1.5: must be in \[0, 1\]")])
def test_bad_overrides_are_clear_errors(data, override, message):
    with pytest.raises(SmatError, match=message):
        train(CI_CONFIG, data["stores"], data["pretrained"], data["root"] / "bad", overrides=[override], device="cpu")


# --- gradient alignment ---------------------------------------------------------------------------------------

def test_gradient_alignment_leaves_training_untouched():
    torch.manual_seed(0)
    config = TrainConfig(image_size=SIZE, experts=2)
    model = build_model(config, create_backbone("vit_tiny_patch4_32", image_size=SIZE)).train()
    with torch.no_grad():
        model.experts.delta.normal_(0, 1e-2)
        model.lagrangian.fill_(0.3)
    g = torch.Generator().manual_seed(0)
    episodes = [EpisodeTensors(torch.randn(6, 3, SIZE, SIZE, generator=g), torch.arange(3).repeat(2),
                               torch.randn(6, 3, SIZE, SIZE, generator=g), torch.arange(3).repeat(2), 3)
                for _ in range(3)]
    state = {k: v.clone() for k, v in model.state_dict().items()}
    rng = torch.get_rng_state()
    records = gradient_alignment(model, episodes, 10, merged=True, device=torch.device("cpu"))
    assert [(r["group"], r["n_pairs"], r["task"]) for r in records] == [("delta", 3, 10), ("merged", 3, 10)]
    assert all(-1 <= r["mean_cos"] <= 1 for r in records)
    assert torch.equal(torch.get_rng_state(), rng)
    assert all(torch.equal(state[k], v) for k, v in model.state_dict().items())
    assert all(p.grad is None for p in model.parameters())

"""The Snakemake workflow: a real end-to-end run of the tiny CI config (killed during meta-tuning, unlocked
and run again) and its HTML report, a user-added image-folder dataset flowing into every table, config
validation, the paper DAG without data, and the profiles. Lint and format: tests/test_snakefmt.py; the conda
environment: tests/test_conda_env.py."""

from __future__ import annotations

import argparse
import base64
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import yaml
from PIL import Image

from smat.config_loader import load_config
from smat.methods.checkpoint import load_model
from smat.training.config import TrainConfig

ROOT = Path(__file__).resolve().parents[1]
CI_CONFIG = ROOT / "config" / "ci.yaml"
FIGURES = ["pareto", "grad_alignment", "capacity_type", "capacity_depth", "dendrogram", "mask_overlap", "curves"]
RUN_TIMEOUT = 900  # seconds; a hung Snakemake must not hang the test suite

pytestmark = pytest.mark.slow


def snakemake_command(workdir: Path, *args: str) -> list[str]:
    return [sys.executable, "-m", "snakemake", "--snakefile", str(ROOT / "Snakefile"), "--directory", str(workdir),
            *args]


def snakemake(workdir: Path, *args: str, timeout: int = RUN_TIMEOUT) -> subprocess.CompletedProcess:
    """Run Snakemake to the end; on a time-out kill it with all its jobs (they would outlive it)."""
    process = subprocess.Popen(snakemake_command(workdir, *args), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                               text=True, start_new_session=True)
    try:
        stdout, stderr = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        kill_tree(process.pid)
        process.communicate()
        raise
    return subprocess.CompletedProcess(process.args, process.returncode, stdout, stderr)


def make_image_folder(root: Path, n_classes: int = 5, per_class: int = 6, size: int = 40) -> Path:
    """A class-per-folder dataset a user might bring: each class a colour and stripe frequency, with noise."""
    rng = np.random.default_rng(0)
    for c in range(n_classes):
        folder = root / f"class_{c}"
        folder.mkdir(parents=True)
        colour = rng.integers(0, 256, 3)
        stripes = (np.sin(np.arange(size) * (c + 1) * np.pi / size) > 0)[None, :, None]
        for i in range(per_class):
            noise = rng.normal(0, 20, (size, size, 3))
            image = np.clip(np.where(stripes, colour, 255 - colour) + noise, 0, 255).astype(np.uint8)
            Image.fromarray(image).save(folder / f"{i}.png")
    return root


def kill_tree(pid: int) -> None:
    """SIGKILL `pid` and every process below it, as `kill -9` of Snakemake and its jobs."""
    for process in descendants(pid):
        try:
            os.kill(process, signal.SIGKILL)
        except ProcessLookupError:
            pass


def descendants(pid: int) -> list[int]:
    """`pid` and every process below it (Linux /proc)."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(entry.name))
    found, todo = [], [pid]
    while todo:
        current = todo.pop()
        found.append(current)
        todo += children.get(current, [])
    return found


@pytest.fixture(scope="module")
def user_dataset_config(tmp_path_factory) -> Path:
    """A second config file that adds a user's image folder as an extra OOD dataset."""
    base = tmp_path_factory.mktemp("user_data")
    images = make_image_folder(base / "my_images")
    extra = base / "extra.yaml"
    extra.write_text(yaml.safe_dump({"datasets": {"my-set": {
        "role": "ood", "source": {"imagefolder": str(images)}, "image_size": 32,
        "episodes": {"ways": 5, "shots": 1, "queries": 3}}}}))
    return extra


def released_pmf(path: Path) -> Path:
    """A file in the layout of PMF's released checkpoint around a backbone of the CI's size (a registered one,
    as a real release's is), with its learned classifier scale and bias."""
    from smat.models.backbones import create_backbone

    torch.manual_seed(5)
    vit = create_backbone(read_ci_config()["backbone"]["arch"]).vit
    torch.save({"model": {"bias": torch.tensor([-0.1]), "scale_cls": torch.tensor([9.0]),
                          **{f"backbone.{n}": p.detach() for n, p in vit.named_parameters()}},
                "args": argparse.Namespace(epochs=100), "epoch": 99}, path)
    return path


@pytest.fixture(scope="module")
def released_config(tmp_path_factory) -> Path:
    """The authors' PMF as an extra Table 1 column (config `released`), as config/released.yaml does it."""
    base = tmp_path_factory.mktemp("released")
    path = base / "released.yaml"
    path.write_text(yaml.safe_dump({"released": {"pmf-release": {
        "format": "pmf", "checkpoint": str(released_pmf(base / "best.pth")), "label": "PMF (released)"}}}))
    return path


@pytest.fixture(scope="module")
def ci_run(tmp_path_factory, user_dataset_config, released_config):
    """Run `all_tables` on the CI config (+ the user dataset), kill -9 Snakemake and its jobs while a model
    is being meta-tuned (after its first validation wrote best.partial.pt, the model that becomes best.pt, which
    evaluation must not read before training finishes), then recover as the README says: the same command refuses to start (stale lock),
    `snakemake --unlock`, then the same command with --rerun-incomplete runs to completion."""
    workdir = tmp_path_factory.mktemp("ci_workflow")
    args = ["--cores", "2", "all_tables", "table1_released", "--configfile", str(CI_CONFIG), str(user_dataset_config),
            str(released_config)]
    process = subprocess.Popen(snakemake_command(workdir, *args), stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL, start_new_session=True)
    interrupted = None
    deadline = time.monotonic() + RUN_TIMEOUT
    try:
        while process.poll() is None and time.monotonic() < deadline:
            resumable = [path for path in sorted((workdir / "results" / "models").glob("**/resume.pt"))
                         if (path.parent / "best.partial.pt").exists()]
            if resumable:
                interrupted = resumable[0].parent
                lines_before = (interrupted / "train_log.partial.jsonl").read_text().count("\n")
                break
            time.sleep(0.05)
    finally:
        kill_tree(process.pid)
        process.wait()
    assert interrupted is not None, "the run never reached a meta-tuning resume point before it ended"

    blocked = snakemake(workdir, *args)
    unlock = snakemake(workdir, "--unlock")
    assert unlock.returncode == 0, unlock.stderr[-5000:]
    rerun = snakemake(workdir, *args, "--rerun-incomplete")
    assert rerun.returncode == 0, rerun.stderr[-5000:]
    return {"workdir": workdir, "args": args, "interrupted": interrupted, "lines_before": lines_before,
            "blocked": blocked, "rerun": rerun}


def read_config(path: Path) -> dict:
    return yaml.safe_load(path.read_text())


def read_ci_config() -> dict:
    return read_config(CI_CONFIG)


def test_rerun_after_kill_resumes_meta_tuning_and_keeps_results(ci_run):
    blocked = ci_run["blocked"]
    # The README's two reasons, whichever Snakemake checks first: the killed run's lock, or the files of a job
    # it cut off midway (an evaluation writes each dataset's CSV as it finishes it), marked incomplete.
    named = "Directory cannot be locked" in blocked.stderr or "IncompleteFilesException" in blocked.stderr
    assert blocked.returncode != 0 and named, blocked.stderr[-3000:]
    model_dir = ci_run["interrupted"]
    model_id = model_dir.relative_to(ci_run["workdir"] / "results" / "models").as_posix()
    job_log = (ci_run["workdir"] / "logs" / "meta_tune" / f"{model_id}.log").read_text()
    assert "resuming at task" in job_log
    records = [json.loads(line) for line in (model_dir / "train_log.jsonl").read_text().splitlines()]
    tasks = [r["task"] for r in records if r["kind"] == "train"]
    assert len(records) >= ci_run["lines_before"] > 0
    assert tasks == sorted(set(tasks)), "a resumed log must continue, not repeat or restart"
    # The declared products, under their final names; the temporary names and the resume state are gone.
    assert (model_dir / "best.pt").is_file() and (model_dir / "train_log.jsonl").is_file()
    assert not (model_dir / "resume.pt").exists() and not list(model_dir.glob("*.partial.*"))
    # Everything that read the model did so after the resumed training had finished.
    readers = sorted((ci_run["workdir"] / "results" / "eval" / model_id).glob("**/*.csv"))
    assert readers
    done = (model_dir / "best.pt").stat().st_mtime       # renamed last: the end of the training job
    assert all(path.stat().st_mtime >= done for path in readers)


def report_page(html: str, name: str) -> str:
    """The HTML page `name` as a Snakemake report embeds it (a base64 data URI)."""
    found = re.search(rf'"data:text/html;charset=utf8;filename={re.escape(name)};base64,([A-Za-z0-9+/=]+)"', html)
    assert found, f"{name} is not in the report"
    return base64.b64decode(found[1]).decode()


def test_the_full_report_renders_every_caption_table_and_the_landing_page(ci_run):
    """`snakemake all`, then `snakemake --report report.html` as the README shows them, on the CI run: no
    caption gives a Docutils system message, Table 1 and Table 2 are rendered tables, the landing page
    describes the run, and the figures' captions name their models."""
    workdir, configs = ci_run["workdir"], ci_run["args"][4:]
    everything = snakemake(workdir, "--cores", "2", "all", *configs, timeout=2 * RUN_TIMEOUT)
    assert everything.returncode == 0, everything.stderr[-3000:]
    result = snakemake(workdir, "--report", "report.html", *configs)
    assert result.returncode == 0, result.stderr[-3000:]
    html = (workdir / "report.html").read_text()
    messages = re.findall(r".*\((?:INFO/1|WARNING/2|ERROR/3|SEVERE/4)\).*", result.stdout + result.stderr)
    assert not messages and "System Message" not in html, messages

    table1 = report_page(html, "table1.html")
    assert "<table>" in table1 and "<td><b>ID Avg</b></td>" in table1 and "Test episodes per dataset:" in table1
    assert "<th>MLS</th>" in report_page(html, "table2.html") and "<table>" in report_page(html, "table_reference.html")
    assert '"results/tables/table1.csv"' in html                               # the tidy data beside it
    for figure in FIGURES:
        assert f'"results/figures/{figure}.png"' in html, figure
    assert "number of experts |M|" in html                                     # reST read |M| as a substitution
    main = read_ci_config()["models"]["smat"]
    assert f"SMAT (smat/tau~{main['tau']}/experts~{main['experts']}/seed~0)" in html
    description = re.search(r'var workflow_desc = "(.*?)";', html, re.S)[1]
    assert "This run" in description and "latin-greek" in description and "ci.yaml" in description


def test_tables_exist_and_parse(ci_run):
    tables = ci_run["workdir"] / "results" / "tables"
    config = read_ci_config()
    ids = [n for n, d in config["datasets"].items() if d["role"] == "id"]
    oods = [n for n, d in config["datasets"].items() if d["role"] == "ood"] + ["my-set"]

    table1 = pd.read_csv(tables / "table1.csv")
    assert list(dict.fromkeys(table1["row"])) == [*ids, "ID Avg", *oods, "OOD Avg"]
    expected = {f"{label}{suffix}" for label in ("Pre", "PMF", "SoftMerge", "SMAT", "PMF (released)")
                for mode, suffix in (("none", ""), ("full", "+full"), ("lora", "+LoRA"))
                if mode in config["evaluation"]["finetune"]}
    assert set(table1["column"]) == expected
    released = pd.read_csv(tables / "released" / "table1.csv")         # the fast path: nothing trained
    assert set(released["column"]) == {c for c in expected if c.startswith(("Pre", "PMF (released)"))}
    assert table1["mean"].between(0, 100).all() and (table1["n"] > 0).all()
    assert table1["best"].any()

    table2 = pd.read_csv(tables / "table2.csv")
    rows = [f"Row {r}" for r in config["models"]["ablation_rows"]]
    assert list(table2["label"]) == ["SMAT", *rows, "PMF"]
    assert table2[["id", "ood", "avg"]].apply(lambda c: c.between(0, 100)).all().all()
    smat = table2.iloc[0]
    assert all(bool(smat[s]) for s in ("mls", "meta", "dt", "ie"))
    assert not any(bool(table2.iloc[-1][s]) for s in ("mls", "meta", "dt", "ie"))
    assert (table2["n_ood_datasets"] == len(oods)).all()

    reference = pd.read_csv(tables / "table_reference.csv")
    assert {"table1", "table2"} == set(reference["table"])
    for name in ("table1", "table2", "table_reference"):
        assert "\\toprule" in (tables / f"{name}.tex").read_text()
        assert (tables / f"{name}.md").read_text().count("|") > 10


def test_user_dataset_flows_through_conversion_episodes_and_evaluation(ci_run):
    workdir = ci_run["workdir"]
    manifest = json.loads((workdir / "resources" / "data" / "my-set" / "manifest.json").read_text())
    assert manifest["image_size"] == 32 and len(manifest["classes"]) == 5
    assert {c["split"] for c in manifest["classes"]} == {"test"}
    episodes = json.loads((workdir / "results" / "episodes" / "my-set" / "test.json").read_text())
    assert all(len(e["classes"]) == 5 and all(len(s) == 1 for s in e["support"]) for e in episodes["episodes"])
    main = read_ci_config()["models"]["smat"]
    for model_id in ("pre", f"smat/tau~{main['tau']}/experts~{main['experts']}/seed~0"):
        rows = pd.read_csv(workdir / "results" / "eval" / model_id / "my-set" / "none.csv")
        assert (rows["dataset"] == "my-set").all() and len(rows) == len(episodes["episodes"])


def test_second_invocation_does_nothing(ci_run):
    again = snakemake(ci_run["workdir"], *ci_run["args"])
    assert again.returncode == 0, again.stderr[-3000:]
    assert "Nothing to be done" in again.stderr + again.stdout


def test_every_training_command_of_the_default_sweep_is_a_valid_training_config(tmp_path):
    """The `--set` overrides of each model (sweep points, baselines, all Table 2 rows) against the real
    training config, without training: the part of the wiring that the small CI run leaves out."""
    dry = snakemake(tmp_path, "-n", "-p", "all", timeout=300)
    assert dry.returncode == 0, dry.stderr[-3000:]
    commands = [line[line.index("smat train "):].split() for line in (dry.stdout + dry.stderr).splitlines()
                if "Shell command: smat train " in line]
    config = read_config(ROOT / "config" / "config.yaml")
    assert len(commands) == len(config["models"]["ablation_rows"]) + 2 + len(
        {(config["models"]["smat"]["tau"], config["models"]["smat"]["experts"]),
         *((t, m) for t in config["models"]["sweep"]["tau"] for m in config["models"]["sweep"]["experts"])})
    seen = set()
    for command in commands:
        training_yaml = Path(command[command.index("--config") + 1])
        sets = [command[i + 1] for i, word in enumerate(command) if word == "--set"]
        resolved = load_config(TrainConfig, training_yaml, sets)
        seen.add((resolved.method, resolved.tau, resolved.experts, tuple(vars(resolved.switches).values())))
    assert ("smat", 0.9, 8, (True, True, True, True)) in seen
    assert ("smat", 0.9, 1, (False, True, True, False)) in seen      # Table 2 row 5
    assert ("smat", 0.9, 8, (True, False, True, True)) in seen       # Table 2 row 4
    assert any(method == "pmf" for method, *_ in seen) and any(method == "softmerge" for method, *_ in seen)


def test_workflow_code_leaves_snakemake_state_alone():
    """Interrupted runs are Snakemake's business (`--unlock`, `--rerun-incomplete`): no rule
    file reads processes or touches Snakemake's own state. (Lint and format: tests/test_snakefmt.py.)"""
    for path in [ROOT / "Snakefile", *sorted((ROOT / "workflow" / "rules").glob("*.smk"))]:
        code = path.read_text()
        assert "/proc" not in code and ".snakemake" not in code, path


@pytest.mark.parametrize("change, named", [
    (lambda c: c.update(episode=c.pop("episodes")), "'episode' was unexpected"),
    (lambda c: c["models"]["smat"].update(tau=1.5), "1.5 is greater than or equal to the maximum of 1"),
    (lambda c: c["datasets"][next(iter(c["datasets"]))].update(role="train"), "'train' is not one of"),
])
def test_invalid_config_fails_before_any_job_naming_the_problem(tmp_path, change, named):
    config = read_ci_config()
    change(config)
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(config))
    result = snakemake(tmp_path / "work", "--cores", "1", "all_tables", "--configfile", str(path), timeout=300)
    assert result.returncode != 0
    assert "Error validating config file" in result.stderr and named in result.stderr
    assert not (tmp_path / "work" / "resources").exists() and not (tmp_path / "work" / "logs").exists()


def test_released_checkpoints_are_imported_and_join_table1(tmp_path):
    """config `released`: each file is imported by one rule and evaluated as an extra Table 1 column."""
    from test_import import official_smat_files

    smat_file, extra, _, _ = official_smat_files(tmp_path)
    pmf_file = released_pmf(tmp_path / "pmf.pth")
    config = read_ci_config()
    config["released"] = {
        "smat-release": {"format": "smat-official", "checkpoint": str(smat_file), "router_extra": str(extra),
                         "label": "SMAT (released)", "image_size": 32},
        "pmf-release": {"format": "pmf", "checkpoint": str(pmf_file), "label": "PMF (released)"},
    }
    path = tmp_path / "released.yaml"
    path.write_text(yaml.safe_dump(config))
    workdir = tmp_path / "work"
    dry = snakemake(workdir, "-n", "-p", "all_tables", "--configfile", str(path), timeout=300)
    assert dry.returncode == 0, dry.stderr[-3000:]
    assert f"smat import smat-official --router-extra {extra} --image-size 32 {smat_file}" in dry.stdout
    assert "results/eval/released/pmf-release/latin-greek/none.csv" in dry.stdout
    assert "--label 'SMAT (released)'" in dry.stdout
    # The import rule for real; evaluating an imported model is tests/test_import.py's business.
    target = "results/models/released/pmf-release/best.pt"
    real = snakemake(workdir, "--cores", "1", target, "--configfile", str(path), timeout=300)
    assert real.returncode == 0, real.stderr[-3000:]
    model = load_model(str(workdir / target), "cpu")
    assert model.method == "pmf" and model.head.scale.item() == 9.0

    config["released"]["pmf-release"]["router_extra"] = str(extra)
    path.write_text(yaml.safe_dump(config))
    bad = snakemake(tmp_path / "bad", "-n", "all_tables", "--configfile", str(path), timeout=300)
    assert bad.returncode != 0 and "released.pmf-release is format pmf: router_extra" in bad.stdout + bad.stderr

    # The shipped example merged into the paper config: the missing download is named with its source.
    paper = ["--configfile", str(ROOT / "config" / "paper.yaml"), str(ROOT / "config" / "released.yaml")]
    dry = snakemake(tmp_path / "paper", "-n", "all_tables", *paper, timeout=300)
    assert dry.returncode == 0, dry.stderr[-3000:]
    assert "best.pth not found; download the release from the Hugging Face model hushell/pmf_metadataset_dino" in \
        dry.stdout + dry.stderr


def test_exponent_literals_in_a_workflow_config_are_numbers(tmp_path):
    """`1e-3` as users write it (PyYAML's YAML 1.1 would make it a string the schema rejects)."""
    text = CI_CONFIG.read_text().replace("lr_grid: [0, 0.001]", "lr_grid: [0, 1e-3]")
    assert "1e-3" in text
    path = tmp_path / "exponent.yaml"
    path.write_text(text)
    dry = snakemake(tmp_path / "work", "-n", "-p", "all_tables", "--configfile", str(path), timeout=300)
    assert dry.returncode == 0, dry.stderr[-3000:]
    assert "--grid 0 0.001" in dry.stdout


def test_paper_dag_builds_without_data_and_lists_what_is_missing(tmp_path):
    paper = ["--configfile", str(ROOT / "config" / "paper.yaml")]
    dry = snakemake(tmp_path, "-n", "all_tables", *paper, timeout=300)
    assert dry.returncode == 0, dry.stderr[-3000:]
    output = dry.stdout + dry.stderr
    assert "These dataset sources do not exist" in output
    for missing in ("data/meta_dataset/ilsvrc_2012", "data/mnist", "data/domainnet/sketch", "data/stanford_cars"):
        assert str(tmp_path / missing) in output
    assert "hushell/meta_dataset_h5" in output and "Running the paper configuration" in output
    # The whole paper sweep is in the DAG, GPU jobs ask for a GPU, the backbone is fetched.
    assert "gpu=1" in output and "fetch_backbone" in output and "meta_tune" in output
    assert "convert_dataset" in output and "select_lr" in output

    real = snakemake(tmp_path, "--cores", "1", "all_tables", *paper, timeout=300)
    assert real.returncode != 0 and "These dataset sources do not exist" in real.stderr
    assert not (tmp_path / "logs").exists() and not (tmp_path / "resources").exists()


def paper_data_tree(root: Path) -> None:
    """Every dataset of config/paper.yaml, tiny, in its publisher's layout at the README's paths: Meta-Dataset
    domains as PMF's h5 files, CIFAR pickles, MNIST idx, Food-101/Pets lists, Stanford Cars' devkit .mat files,
    DomainNet image folders with their splits JSON. Five classes per OOD set (the variable-way sampler's
    minimum), two or three images per class."""
    from test_formats import (bilevel_spec, flat_spec, hierarchical_spec, write_cars, write_cifar, write_domain,
                              write_food101, write_image_folder_with_splits, write_mnist, write_pets)

    md = root / "data" / "meta_dataset"
    write_domain(md / "ilsvrc_2012", hierarchical_spec(), "pmf-h5")
    write_domain(md / "omniglot", bilevel_spec(), "pmf-h5")
    for name in ("aircraft", "cu_birds", "dtd", "quickdraw", "fungi", "vgg_flower"):
        write_domain(md / name, flat_spec(name, {"TRAIN": 6, "VALID": 5, "TEST": 5}, images=2), "pmf-h5")
    for name in ("traffic_sign", "mscoco"):
        write_domain(md / name, flat_spec(name, {"TRAIN": 0, "VALID": 0, "TEST": 5}, images=2), "pmf-h5")
    data = root / "data"
    write_cifar(data / "cifar-10-batches-py", 10, n_classes=5, per_class=2)
    write_cifar(data / "cifar-100-python", 100, n_classes=5, per_class=2)
    write_mnist(data / "mnist", per_class=2)
    write_food101(data / "food-101", n_classes=3, per_class=2)
    write_pets(data / "oxford-iiit-pet", n_classes=3, per_class=2)
    write_cars(data / "stanford_cars", n_classes=3, per_class=2)
    for domain in ("sketch", "clipart"):
        write_image_folder_with_splits(data / "domainnet" / domain, data / "domainnet" / f"{domain}_splits.json",
                                       {"train": 1, "valid": 1, "test": 3}, per_class=2)


def test_paper_dag_on_the_documented_data_layout_converts_every_dataset(tmp_path):
    """With every dataset where the README says, a dry run converts each with its format, then runs the
    whole paper DAG; the few-shot sets are evaluated at 224 px, Meta-Dataset at the model's 128."""
    paper_data_tree(tmp_path)
    dry = snakemake(tmp_path, "-n", "-p", "all_tables", "--configfile", str(ROOT / "config" / "paper.yaml"),
                    timeout=300)
    assert dry.returncode == 0, dry.stderr[-3000:]
    assert "These dataset sources do not exist" not in dry.stdout + dry.stderr
    config = read_config(ROOT / "config" / "paper.yaml")
    for name, dataset in config["datasets"].items():
        (kind, value), = dataset["source"].items()
        fmt = "pmf-h5" if kind == "meta_dataset" else kind
        assert f"smat data convert {fmt} " in dry.stdout and f"--domain {name} " in dry.stdout, name
    assert dry.stdout.count("smat data convert ") == len(config["datasets"])
    sizes = " ".join("224" if d.get("eval_image_size") == 224 else "model" for d in config["datasets"].values()
                     if d["role"] != "pretrain")
    assert f"--image-size {sizes} " in dry.stdout
    for rule in ("meta_tune", "meta_tune_dense", "select_lr", "evaluate", "table1", "table2"):
        assert f"rule {rule}:" in dry.stdout or f"localrule {rule}:" in dry.stdout, rule


PROFILES = {name: ROOT / "workflow" / "profiles" / name / "config.yaml" for name in ("local", "slurm", "paper")}


@pytest.mark.parametrize("profile", list(PROFILES))
def test_profiles_are_commented_and_request_gpus_the_plugin_way(profile):
    path = PROFILES[profile]
    settings = yaml.safe_load(path.read_text())
    lines = path.read_text().splitlines()
    for i, line in enumerate(lines):
        if line and not line.startswith((" ", "#")):  # a top-level entry: a comment must explain it
            assert lines[i - 1].startswith("#"), f"{path}: {line!r} has no comment above it"
    assert "--gres" not in str(settings.get("default-resources", "")) + str(settings.get("set-resources", ""))
    if profile == "slurm":
        assert settings["executor"] == "slurm"
        assert "slurm-status-command" not in settings       # the plugin's choice (sacct), except in tests/slurm
    if profile in ("local", "slurm"):
        assert settings["rerun-incomplete"] is True
    if profile == "paper":
        # Every rule that runs a job gets the paper's sizes (use rule ... as does not inherit them).
        rules = {"pretrain_backbone", "meta_tune", "meta_tune_dense", "select_lr", "evaluate", "build_embedded",
                 "convert_dataset", "sample_episodes"}
        assert set(settings["set-threads"]) == set(settings["set-resources"]) == rules

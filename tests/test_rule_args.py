"""smat.rule_args: what the workflow's rules pass to `smat`, on the project's real configs (defaults filled in
by the workflow's schema, as the Snakefile does). The expected strings are those of the workflow's dry runs."""

import copy
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from snakemake.utils import validate

from smat import rule_args
from smat.config_loader import exponents_as_numbers

REPO = Path(__file__).resolve().parents[1]
SCHEMA = REPO / "workflow" / "schemas" / "config.schema.yaml"
PAPER_GRID = "--grid 0 1e-06 1e-05 0.0001 0.001 0.01 0.1"
FEW_SHOT_GRID = "--grid 0 1e-07 5e-07 1e-06 1e-05 0.0001 0.001 0.01 0.1"


def workflow_config(name: str) -> dict:
    """config/NAME as the Snakefile sees it: numbers as numbers, the schema's defaults filled in."""
    config = yaml.safe_load((REPO / "config" / name).read_text())
    config.update(exponents_as_numbers(config))
    validate(config, str(SCHEMA))
    return config


@pytest.fixture(scope="module")
def default():
    return workflow_config("config.yaml")


@pytest.fixture(scope="module")
def paper():
    return workflow_config("paper.yaml")


def test_importing_rule_args_imports_no_torch():
    code = "import sys, smat.rule_args; print(sorted(m for m in sys.modules if m.split('.')[0] == 'torch'))"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"


def test_the_project_configs_pass_the_cross_key_checks(default, paper):
    assert rule_args.check_config(default) is None
    assert rule_args.check_config(paper) is None


@pytest.mark.parametrize("change, message", [
    (lambda c: c["episodes"]["hps"].update(seed=c["episodes"]["test"]["seed"]),
     "config: episodes.hps.seed equals episodes.test.seed (0): the fine-tuning lr would be chosen on the test "
     "episodes themselves; give hps another seed"),
    (lambda c: [d.update(role="ood") for d in c["datasets"].values()],
     "config: datasets has no dataset with role 'id'; meta-training needs at least one"),
    (lambda c: c["backbone"].update(pretrain={"datasets": ["ilsvrc_2012", "nowhere"]}),
     "config: backbone.pretrain.datasets names nowhere, which datasets does not define"),
    (lambda c: c["datasets"]["mnist"].update(role="pretrain"),
     "config: dataset(s) mnist have role pretrain but backbone.pretrain.datasets does not list them"),
    (lambda c: c["released"].update(x={"format": "pmf", "router_extra": "r.pt", "allow_missing_router": False}),
     "config: released.x is format pmf: router_extra and allow_missing_router are for smat-official"),
    (lambda c: c["paths"].update(meta_dataset=None),
     "config: dataset(s) ilsvrc_2012, aircraft, omniglot, cu_birds, dtd, quickdraw, fungi, vgg_flower, "
     "traffic_sign, mscoco use source.meta_dataset but paths.meta_dataset is not set"),
    (lambda c: c["evaluation"].update(lr_grid=[0, float("nan")]),
     "config.evaluation.lr_grid[1]=nan: not a finite number; every numeric setting must be finite"),
])
def test_a_broken_cross_key_rule_is_a_value_error_that_names_it(paper, change, message):
    config = copy.deepcopy(paper)
    change(config)
    with pytest.raises(ValueError) as excinfo:
        rule_args.check_config(config)
    assert str(excinfo.value).startswith(message)
    assert "\n" not in str(excinfo.value)


def test_dataset_lists_and_table_arguments(default, paper):
    assert rule_args.eval_datasets(default) == ["latin-greek", "cyrillic", "armenian-georgian", "syllabics",
                                                "sketches", "signs", "fractals", "digits"]
    assert rule_args.pretrain_datasets(default) == rule_args.datasets_of_role(default, "id")
    assert rule_args.dataset_args(default) == ("--id-datasets latin-greek cyrillic armenian-georgian syllabics "
                                               "--ood-datasets sketches signs fractals digits")
    assert len(rule_args.datasets_of_role(paper, "id")) == 8 and len(rule_args.datasets_of_role(paper, "ood")) == 10


def test_conversion_of_every_source_kind(default, paper):
    assert rule_args.source_format(default, "digits") == "imagefolder"
    assert rule_args.source_folder(default, "digits") == "resources/raw/embedded/digits"
    assert rule_args.conversion_args(default, "digits") == "--role ood"
    assert rule_args.conversion_args(default, "latin-greek") == "--role id"
    assert rule_args.conversion_inputs(default, "digits") == ({"raw": "resources/raw/embedded"}, None)
    # Meta-Dataset domains take their split from dataset_spec.json.
    assert rule_args.source_format(paper, "ilsvrc_2012") == "pmf-h5"
    assert rule_args.source_folder(paper, "ilsvrc_2012") == "data/meta_dataset/ilsvrc_2012"
    assert rule_args.conversion_args(paper, "ilsvrc_2012") == "--image-size 146"
    assert rule_args.conversion_args(paper, "cifar10") == "--role ood"
    assert rule_args.conversion_args(paper, "sketch") == (
        "--image-size 256 --role ood --splits data/domainnet/sketch_splits.json")
    config = copy.deepcopy(paper)
    config["datasets"]["sketch"]["splits"] = "my splits.json"
    assert rule_args.conversion_args(config, "sketch").endswith("--splits 'my splits.json'")


def test_a_missing_source_is_named_with_every_other_missing_one(paper, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)             # none of the paper's data is here
    missing = rule_args.missing_sources(paper)
    assert ("cifar10", "data/cifar-10-batches-py") in missing
    assert ("ilsvrc_2012", "data/meta_dataset/ilsvrc_2012") in missing
    assert ("sketch", "data/domainnet/sketch_splits.json") in missing
    inputs, message = rule_args.conversion_inputs(paper, "cifar10")
    assert inputs == {} and message == rule_args.missing_sources_message(missing)
    assert message.startswith("These dataset sources do not exist:\n")
    assert f"  cifar10: {tmp_path / 'data/cifar-10-batches-py'}\n" in message
    assert message.endswith("Or remove the dataset from the config's datasets.")
    (tmp_path / "data" / "cifar-10-batches-py").mkdir(parents=True)
    assert rule_args.conversion_inputs(paper, "cifar10") == ({"raw": "data/cifar-10-batches-py"}, None)
    (tmp_path / "data" / "meta_dataset" / "dtd").mkdir(parents=True)        # a domain without its spec
    assert ("dtd", "data/meta_dataset/dtd/dataset_spec.json") in rule_args.missing_sources(paper)


def test_episode_arguments(default, paper):
    assert rule_args.episode_args(paper, "ilsvrc_2012", "test") == "--n 600 --seed 0"
    assert rule_args.episode_args(paper, "sketch", "hps") == "--n 5 --seed 1 --ways 5 --shots 5 --queries 15"
    assert rule_args.episode_args(default, "digits", "test").endswith("--ways 5 --shots 1 --queries 10")


def test_lr_grid_and_evaluation_sizes(default, paper):
    assert rule_args.lr_grid_args(default) == "--grid 0 0.0001 0.001"
    assert rule_args.eval_size_args(default) == ""
    assert rule_args.lr_grid_args(paper) == " ".join([PAPER_GRID] * 13 + [FEW_SHOT_GRID] * 5)
    assert rule_args.eval_size_args(paper) == "--image-size " + " ".join(["model"] * 13 + ["224"] * 5)
    config = copy.deepcopy(paper)
    config["evaluation"]["lr_grid"] = None          # a dataset without a grid: the package's
    assert rule_args.lr_grid_args(config) == " ".join(["--grid default"] * 13 + [FEW_SHOT_GRID] * 5)


def test_evaluation_arguments(default):
    assert rule_args.evaluation_args(default, "SMAT (τ 0.9)", "none", []) == "--label 'SMAT (τ 0.9)'"
    lr = ["results/lr/pmf/seed~0/a/lora.json", "results/lr/pmf/seed~0/b/lora.json"]
    assert rule_args.evaluation_args(default, "PMF", "lora", lr) == f"--label PMF --lr-from {' '.join(lr)}"
    config = copy.deepcopy(default)
    config["evaluation"]["finetune_episodes"] = 50
    assert rule_args.evaluation_args(config, "PMF", "full", lr[:1]) == f"--label PMF --lr-from {lr[0]} --limit 50"


def test_train_command_alone_or_data_parallel(default):
    assert rule_args.smat_train_command(default, 4) == "smat train"
    config = copy.deepcopy(default)
    config["compute"]["gpus_per_job"] = 4
    assert rule_args.smat_train_command(config, 16) == (
        "OMP_NUM_THREADS=4 torchrun --standalone --nproc-per-node 4 -m smat.cli train")
    assert rule_args.smat_train_command(config, 2).startswith("OMP_NUM_THREADS=1 ")


def test_released_checkpoints(tmp_path, monkeypatch):
    released = yaml.safe_load((REPO / "config" / "released.yaml").read_text())["released"]
    assert released, "config/released.yaml lists the authors' checkpoints"
    monkeypatch.chdir(tmp_path)
    entry = {"format": "smat-official", "checkpoint": "ckpt/checkpoint.pt", "router_extra": "ckpt/router extra.pt",
             "allow_missing_router": True, "image_size": 224, "label": "SMAT (released)"}
    inputs, message = rule_args.released_inputs(entry, "smat", REPO)
    assert inputs == {} and message.startswith(f"config released.smat: {tmp_path / 'ckpt/checkpoint.pt'}, ")
    assert "szcjerry/meta-tuned-smat-vits" in message and message.endswith("or remove the entry")
    (tmp_path / "ckpt").mkdir()
    (tmp_path / "ckpt" / "checkpoint.pt").write_bytes(b"")
    (tmp_path / "ckpt" / "router extra.pt").write_bytes(b"")
    assert rule_args.released_inputs(entry, "smat", REPO) == (
        {"checkpoint": "ckpt/checkpoint.pt", "router_extra": "ckpt/router extra.pt"}, None)
    assert rule_args.released_import_args(entry, REPO) == (
        "smat-official --router-extra 'ckpt/router extra.pt' --allow-missing-router --image-size 224")
    pmf = {"format": "pmf", "checkpoint": "best.pth", "router_extra": None, "allow_missing_router": False,
           "image_size": None}
    assert rule_args.released_import_args(pmf, REPO) == "pmf"
    # A relative path that is not in the working directory is the project's file, if that exists.
    assert rule_args.project_path("config/paper.yaml", REPO) == str(REPO / "config" / "paper.yaml")
    assert rule_args.project_path("nowhere.pt", REPO) == "nowhere.pt"


def test_targets_and_paths():
    assert rule_args.all_tables()[:4] == [f"results/tables/table1.{s}" for s in ("csv", "md", "tex", "html")]
    assert len(rule_args.all_tables()) == 12
    figures = rule_args.all_figures()
    assert "results/figures/capacity_type.pdf" in figures and figures[-2:] == [
        "results/tables/anatomy.csv", "results/tables/anatomy.md"]
    assert rule_args.figure_prefix("results/figures/capacity_type.png") == "results/figures/capacity"
    assert rule_args.figure_prefix("results/figures/pareto.png") == "results/figures/pareto"
    assert rule_args.manifest("digits") == "resources/data/digits/manifest.json"
    assert rule_args.one_of(["smat/tau~0.9", "pmf"]) == r"smat/tau\~0\.9|pmf"
    assert rule_args.one_of([]) == "(?!)"

"""What the workflow's rules (workflow/rules/*.smk) pass to `smat`: argument strings, input dicts and the
messages of a bad config or a missing source, built from the workflow config dict (and wildcard values as
plain strings) alone, so that they can be tested without Snakemake.

Imported by every Snakemake run before any job starts: no torch here (nor anything that imports it).
"""

from __future__ import annotations

import os
import re
import shlex
from pathlib import Path
from typing import Any

from smat.analysis.figures import FIGURES, Figure
from smat.config_loader import nonfinite_keys
from smat.data.formats import SOURCE_FORMATS
from smat.evaluation.modes import NO_FINETUNING
from smat.releases import PUBLISHED_AT, SMAT_RELEASE

Config = dict[str, Any]

EMBEDDED_RAW = "resources/raw/embedded"     # the embedded domains, as image folders (rule build_embedded)

# --- datasets -------------------------------------------------------------------------------------------------

def datasets_of_role(config: Config, role: str) -> list[str]:
    return [name for name, dataset in config["datasets"].items() if dataset["role"] == role]


def eval_datasets(config: Config) -> list[str]:
    """The evaluated datasets, ID then OOD (role "pretrain" datasets only feed the pre-training)."""
    return datasets_of_role(config, "id") + datasets_of_role(config, "ood")


def pretrain_datasets(config: Config) -> list[str]:
    """The pre-training corpus (backbone.pretrain.datasets; default: the ID datasets)."""
    return config["backbone"].get("pretrain", {}).get("datasets") or datasets_of_role(config, "id")


def dataset_args(config: Config) -> str:
    """`--id-datasets ... --ood-datasets ...` of the table and figure commands, in config order."""
    return " ".join(["--id-datasets", *datasets_of_role(config, "id"),
                     "--ood-datasets", *datasets_of_role(config, "ood")])


def check_config(config: Config) -> None:
    """Cross-key rules that JSON-Schema cannot express: a ValueError naming the first one broken."""
    datasets = config["datasets"]
    if nonfinite := nonfinite_keys(config):
        raise ValueError(f"{nonfinite[0]}: not a finite number; every numeric setting must be finite")
    if config["episodes"]["hps"]["seed"] == config["episodes"]["test"]["seed"]:
        raise ValueError(
            f"config: episodes.hps.seed equals episodes.test.seed ({config['episodes']['test']['seed']}): the "
            "fine-tuning lr would be chosen on the test episodes themselves; give hps another seed")
    for name, entry in datasets.items():
        ((kind, _),) = entry["source"].items()
        if kind not in ("embedded", "meta_dataset") and kind not in SOURCE_FORMATS:
            raise ValueError(f"config: datasets.{name}.source: {kind!r} is not a source format; use embedded, "
                             f"meta_dataset or one of {', '.join(SOURCE_FORMATS)}")
    if not datasets_of_role(config, "id"):
        raise ValueError("config: datasets has no dataset with role 'id'; meta-training needs at least one "
                         "(set role: id on a dataset with train/val/test classes)")
    pretrain = pretrain_datasets(config)
    if unknown := [n for n in pretrain if n not in datasets]:
        raise ValueError(
            f"config: backbone.pretrain.datasets names {', '.join(unknown)}, which datasets does not define; "
            "add them to datasets (role: pretrain if they should not be evaluated)")
    if unused := [n for n, d in datasets.items() if d["role"] == "pretrain" and n not in pretrain]:
        raise ValueError(
            f"config: dataset(s) {', '.join(unused)} have role pretrain but backbone.pretrain.datasets does "
            "not list them; list them there or give them role id or ood")
    for name, entry in config["released"].items():
        if entry["format"] != SMAT_RELEASE and (entry["router_extra"] or entry["allow_missing_router"]):
            raise ValueError(
                f"config: released.{name} is format {entry['format']}: router_extra and allow_missing_router "
                f"are for {SMAT_RELEASE} checkpoints only; remove them")
    uses_md = [n for n, d in datasets.items() if "meta_dataset" in d["source"]]
    if uses_md and not config["paths"]["meta_dataset"]:
        raise ValueError(
            f"config: dataset(s) {', '.join(uses_md)} use source.meta_dataset but paths.meta_dataset is "
            "not set; set it to the folder of converted Meta-Dataset domains (config/README.md)")


# --- conversion -----------------------------------------------------------------------------------------------

def source_folder(config: Config, name: str) -> str:
    """The folder that `smat data convert` reads for dataset `name`."""
    ((kind, value),) = config["datasets"][name]["source"].items()
    if kind == "embedded":
        return f"{EMBEDDED_RAW}/{value}"
    if kind == "meta_dataset":
        return str(Path(config["paths"]["meta_dataset"]) / value)
    return value


def source_format(config: Config, name: str) -> str:
    """The `smat data convert` format of dataset `name`: its source key (embedded domains are image folders)."""
    ((kind, _),) = config["datasets"][name]["source"].items()
    if kind == "embedded":
        return "imagefolder"
    return config["paths"]["meta_dataset_format"] if kind == "meta_dataset" else kind


def missing_sources(config: Config) -> list[tuple[str, str]]:
    """(dataset, path) of every user-provided source (folder, Meta-Dataset spec, split file) that does not exist."""
    missing = []
    for name, dataset in config["datasets"].items():
        folder = Path(source_folder(config, name))
        if "embedded" not in dataset["source"] and not folder.is_dir():
            missing.append((name, str(folder)))
        elif "meta_dataset" in dataset["source"] and not (folder / "dataset_spec.json").is_file():
            missing.append((name, str(folder / "dataset_spec.json")))
        if dataset["splits"] and not Path(dataset["splits"]).is_file():
            missing.append((name, dataset["splits"]))
    return missing


def missing_sources_message(missing: list[tuple[str, str]]) -> str:
    lines = [f"  {name}: {os.path.abspath(path)}" for name, path in missing]
    return (
        "These dataset sources do not exist:\n" + "\n".join(lines) + "\n"
        "Download them before running the workflow (README, 'Running the paper configuration'):\n"
        "  * Meta-Dataset domains (source.meta_dataset): one folder per domain under paths.meta_dataset with "
        "its dataset_spec.json and one file per class: PMF's h5 files (hushell/meta_dataset_h5, "
        "paths.meta_dataset_format: pmf-h5) or the official conversion's TFRecords (tfrecords).\n"
        "  * cifar, mnist, food101, pets, cars: the dataset's folder as its publisher distributes it.\n"
        "  * Image folders (source.imagefolder), e.g. DomainNet sketch/clipart: <folder>/<class>/<image>; give a "
        "splits file "
        "(splits: key) or let role decide the classes.\n"
        "Or remove the dataset from the config's datasets."
    )


def conversion_inputs(config: Config, dataset: str) -> tuple[dict[str, str], str | None]:
    """(inputs of `convert_dataset`, None), or ({}, the message naming every missing source) when this
    dataset's own source is missing."""
    entry = config["datasets"][dataset]
    if "embedded" in entry["source"]:
        return {"raw": EMBEDDED_RAW}, None
    inputs = {"raw": source_folder(config, dataset)}
    if entry["splits"]:
        inputs["splits"] = entry["splits"]
    missing = missing_sources(config)
    if any(name == dataset for name, _ in missing):
        return {}, missing_sources_message(missing)
    return inputs, None


def conversion_args(config: Config, dataset: str) -> str:
    """Options of `smat data convert`: size, and the class split of formats without their own (the
    Meta-Dataset formats take theirs from dataset_spec.json)."""
    entry = config["datasets"][dataset]
    args = [f"--image-size {entry['image_size']}"] if entry["image_size"] else []
    if not SOURCE_FORMATS[source_format(config, dataset)].own_splits:
        # Without a splits file, a pre-training dataset is split into classes like an ID one.
        args.append(f"--role {'ood' if entry['role'] == 'ood' else 'id'}")
        if entry["splits"]:
            args.append(f"--splits {shlex.quote(entry['splits'])}")
    return " ".join(args)


def episode_args(config: Config, dataset: str, purpose: str) -> str:
    """`smat episodes sample` options: size and seed of this file, fixed N-way K-shot if configured."""
    settings = config["episodes"][purpose]
    args = [f"--n {settings['n']}", f"--seed {settings['seed']}"]
    if fixed := config["datasets"][dataset]["episodes"]:
        args += [f"--ways {fixed['ways']}", f"--shots {fixed['shots']}", f"--queries {fixed['queries']}"]
    return " ".join(args)


# --- training, released models ----------------------------------------------------------------------------------

def smat_train_command(config: Config, threads: int) -> str:
    """`smat train`, or with compute.gpus_per_job = N > 1 the same command as N torchrun processes on one
    node. They share the job's threads: each would otherwise inherit all of them (Snakemake's OMP_NUM_THREADS)."""
    processes = config["compute"]["gpus_per_job"]
    if processes == 1:
        return "smat train"
    per_process = max(1, threads // processes)
    return f"OMP_NUM_THREADS={per_process} torchrun --standalone --nproc-per-node {processes} -m smat.cli train"


def project_path(path: str, project: str | Path) -> str:
    """`path` as given if it exists (or is absolute), else the project's file of that name if that exists."""
    path, project = Path(path), Path(project)
    if path.is_absolute() or path.exists() or not (project / path).exists():
        return str(path)
    return str(project / path)


def released_inputs(entry: Config, name: str, project: str | Path) -> tuple[dict[str, str], str | None]:
    """(inputs of `import_released` for config `released.NAME`: the file and the router tensors if given, None),
    or ({}, where the release is published) when a file is missing."""
    inputs = {"checkpoint": project_path(entry["checkpoint"], project)}
    if entry["router_extra"]:
        inputs["router_extra"] = project_path(entry["router_extra"], project)
    if missing := [path for path in inputs.values() if not Path(path).is_file()]:
        return {}, (f"config released.{name}: {', '.join(map(os.path.abspath, missing))} not found; download the "
                    f"release from {PUBLISHED_AT[entry['format']]} and set its path, or remove the entry")
    return inputs, None


def released_import_args(entry: Config, project: str | Path) -> str:
    """`FORMAT [options]` of `smat import` for a config `released` entry."""
    args = [entry["format"]]
    if entry["router_extra"]:
        args.append(f"--router-extra {shlex.quote(project_path(entry['router_extra'], project))}")
    if entry["allow_missing_router"]:
        args.append("--allow-missing-router")
    if entry["image_size"]:
        args.append(f"--image-size {entry['image_size']}")
    return " ".join(args)


# --- lr selection, evaluation -----------------------------------------------------------------------------------
# One job per (model, fine-tuning mode) covers every dataset of eval_datasets, whose order pairs --episodes,
# --store, --out, --lr-from and --grid by position.

def lr_grid(config: Config, dataset: str) -> str:
    grid = config["datasets"][dataset]["lr_grid"] or config["evaluation"]["lr_grid"]
    return "--grid " + " ".join(f"{lr:g}" for lr in grid) if grid else ""


def lr_grid_args(config: Config) -> str:
    """`--grid` of `smat select-lr`: once if every dataset searches the same grid, else once per dataset
    (`default`: the package's grid, for a dataset without one while another has its own)."""
    grids = [lr_grid(config, dataset) for dataset in eval_datasets(config)]
    if len(set(grids)) == 1:
        return grids[0]
    return " ".join(grid or "--grid default" for grid in grids)


def eval_size_args(config: Config) -> str:
    """`--image-size` of the evaluation jobs: per dataset when one is evaluated at its own size."""
    sizes = [config["datasets"][dataset]["eval_image_size"] for dataset in eval_datasets(config)]
    if not any(sizes):
        return ""
    return "--image-size " + " ".join(str(size) if size else "model" for size in sizes)


def evaluation_args(config: Config, label: str, finetune: str, lr_files: list[str]) -> str:
    """`smat evaluate` options: the model's label, and with fine-tuning the selected lr files (and limit)."""
    args = [f"--label {shlex.quote(label)}"]
    if finetune != NO_FINETUNING:
        args.append(f"--lr-from {' '.join(lr_files)}")
        if config["evaluation"]["finetune_episodes"]:
            args.append(f"--limit {config['evaluation']['finetune_episodes']}")
    return " ".join(args)


# --- targets ----------------------------------------------------------------------------------------------------

def table_outputs(name: str) -> list[str]:
    return [f"results/tables/{name}.{suffix}" for suffix in ("csv", "md", "tex", "html")]


def all_tables() -> list[str]:
    return table_outputs("table1") + table_outputs("table2") + table_outputs("table_reference")


def all_figures() -> list[str]:
    """The figures, and the update-anatomy table that goes with its figure (anatomy.smk)."""
    figures = [path for figure in FIGURES.values() for path in figure_outputs(figure)]
    return figures + ["results/tables/anatomy.csv", "results/tables/anatomy.md"]


def figure_outputs(figure: Figure, ext: str | None = None) -> list[str]:
    """What `smat figures NAME` writes: results/figures/FILE{panel}.png and .pdf (or only `ext`) per panel."""
    exts = [ext] if ext else ["png", "pdf"]
    return [f"results/figures/{figure.file}{panel}.{e}" for panel in figure.panels for e in exts]


def figure_prefix(png: str) -> str:
    """PREFIX of `smat figures ... --out-prefix PREFIX`, from the first file it writes (PREFIX{panel}.png)."""
    (figure,) = [f for f in FIGURES.values() if figure_outputs(f, "png")[0] == png]
    return png.removesuffix(f"{figure.panels[0]}.png")


# --- paths, wildcards -------------------------------------------------------------------------------------------

def store(dataset: str) -> str:
    """The converted store of `dataset` (`smat data convert --out`)."""
    return f"resources/data/{dataset}"


def manifest(dataset: str) -> str:
    """The file that marks a complete store: what a reader of it waits for."""
    return f"{store(dataset)}/manifest.json"


def one_of(names) -> str:
    """A wildcard constraint that accepts exactly `names` (none: nothing)."""
    return "|".join(re.escape(str(name)) for name in names) or "(?!)"

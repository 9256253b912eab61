"""Helpers shared by every stage: datasets and their sources, the models of the sweep, target builders,
job resources and wildcard constraints. Rules live in the per-stage files; this file holds no rules."""

import os
import re
import shlex
from pathlib import Path

from snakemake.exceptions import WorkflowError
from snakemake.logging import logger

from smat.config import nonfinite_keys
from smat.experiment import model_set

# The project checkout: relative config paths that do not exist in the working directory are looked up here.
PROJECT = Path(workflow.basedir)


def project_path(path):
    """`path` as given if it exists (or is absolute), else the project's file of that name if that exists."""
    path = Path(path)
    if path.is_absolute() or path.exists() or not (PROJECT / path).exists():
        return str(path)
    return str(PROJECT / path)


# ----------------------------------------------------------------------------------------------- datasets

DATASETS = config["datasets"]
ID_DATASETS = [name for name, dataset in DATASETS.items() if dataset["role"] == "id"]
OOD_DATASETS = [name for name, dataset in DATASETS.items() if dataset["role"] == "ood"]
EVAL_DATASETS = ID_DATASETS + OOD_DATASETS  # role "pretrain" datasets only feed the pre-training
# The pre-training corpus (backbone.pretrain.datasets; default: the ID datasets), read on its train classes.
PRETRAIN_DATASETS = config["backbone"].get("pretrain", {}).get("datasets") or ID_DATASETS
EMBEDDED_RAW = "resources/raw/embedded"


def check_config():
    """Cross-key rules that JSON-Schema cannot express; runs before any job starts."""
    nonfinite = nonfinite_keys(config)
    if nonfinite:
        raise WorkflowError(f"{nonfinite[0]}: not a finite number; every numeric setting must be finite")
    if config["episodes"]["hps"]["seed"] == config["episodes"]["test"]["seed"]:
        raise WorkflowError(
            f"config: episodes.hps.seed equals episodes.test.seed ({config['episodes']['test']['seed']}): the "
            "fine-tuning lr would be chosen on the test episodes themselves; give hps another seed"
        )
    if not ID_DATASETS:
        raise WorkflowError(
            "config: datasets has no dataset with role 'id'; meta-training needs at least one "
            "(set role: id on a dataset with train/val/test classes)"
        )
    unknown = [n for n in PRETRAIN_DATASETS if n not in DATASETS]
    if unknown:
        raise WorkflowError(
            f"config: backbone.pretrain.datasets names {', '.join(unknown)}, which datasets does not define; "
            "add them to datasets (role: pretrain if they should not be evaluated)"
        )
    unused = [n for n, d in DATASETS.items() if d["role"] == "pretrain" and n not in PRETRAIN_DATASETS]
    if unused:
        raise WorkflowError(
            f"config: dataset(s) {', '.join(unused)} have role pretrain but backbone.pretrain.datasets does "
            "not list them; list them there or give them role id or ood"
        )
    for name, entry in config["released"].items():
        if entry["format"] != "smat-official" and (entry["router_extra"] or entry["allow_missing_router"]):
            raise WorkflowError(
                f"config: released.{name} is format {entry['format']}: router_extra and allow_missing_router "
                "are for smat-official checkpoints only; remove them"
            )
    uses_md = [n for n, d in DATASETS.items() if "meta_dataset" in d["source"]]
    if uses_md and not config["paths"]["meta_dataset"]:
        raise WorkflowError(
            f"config: dataset(s) {', '.join(uses_md)} use source.meta_dataset but paths.meta_dataset is "
            "not set; set it to the folder of converted Meta-Dataset domains (config/README.md)"
        )


def source_folder(name):
    """The folder that `smat data convert` reads for dataset `name`."""
    ((kind, value),) = DATASETS[name]["source"].items()
    if kind == "embedded":
        return f"{EMBEDDED_RAW}/{value}"
    if kind == "meta_dataset":
        return str(Path(config["paths"]["meta_dataset"]) / value)
    return value


def source_format(name):
    """The `smat data convert` format of dataset `name`: its source key (embedded domains are image folders)."""
    ((kind, _),) = DATASETS[name]["source"].items()
    if kind == "embedded":
        return "imagefolder"
    return config["paths"]["meta_dataset_format"] if kind == "meta_dataset" else kind


def missing_sources():
    """User-provided sources (folders, Meta-Dataset specs, split files) that do not exist."""
    missing = []
    for name, dataset in DATASETS.items():
        if "embedded" not in dataset["source"] and not Path(source_folder(name)).is_dir():
            missing.append((name, source_folder(name)))
        elif "meta_dataset" in dataset["source"] and not (Path(source_folder(name)) / "dataset_spec.json").is_file():
            missing.append((name, str(Path(source_folder(name)) / "dataset_spec.json")))
        if dataset["splits"] and not Path(dataset["splits"]).is_file():
            missing.append((name, dataset["splits"]))
    return missing


def missing_sources_message(missing):
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


def conversion_inputs(wildcards):
    """Inputs of `convert_dataset`. A missing user folder explains itself instead of failing as a bare
    missing input: a dry run lists it (the DAG still builds), a real run stops before any job starts."""
    dataset = DATASETS[wildcards.dataset]
    if "embedded" in dataset["source"]:
        return {"raw": EMBEDDED_RAW}
    inputs = {"raw": source_folder(wildcards.dataset)}
    if dataset["splits"]:
        inputs["splits"] = dataset["splits"]
    missing = [(n, p) for n, p in missing_sources() if n == wildcards.dataset]
    if not missing:
        return inputs
    if not workflow.dryrun:
        raise WorkflowError(missing_sources_message(missing_sources()))
    if not MISSING_REPORTED:
        logger.warning(missing_sources_message(missing_sources()))
        MISSING_REPORTED.append(True)
    return {}


MISSING_REPORTED = []  # the dry-run warning is shown once, not once per dataset


def conversion_args(wildcards):
    """Options of `smat data convert`: size, and the class split of formats without their own (the
    Meta-Dataset formats take theirs from dataset_spec.json)."""
    dataset = DATASETS[wildcards.dataset]
    args = [f"--image-size {dataset['image_size']}"] if dataset["image_size"] else []
    if source_format(wildcards.dataset) not in ("pmf-h5", "tfrecords"):
        # Without a splits file, a pre-training dataset is split into classes like an ID one.
        args.append(f"--role {'ood' if dataset['role'] == 'ood' else 'id'}")
        if dataset["splits"]:
            args.append(f"--splits {shlex.quote(dataset['splits'])}")
    return " ".join(args)


def eval_size_args():
    """`--image-size` of the evaluation jobs: per dataset when one is evaluated at its own size."""
    sizes = [DATASETS[dataset]["eval_image_size"] for dataset in EVAL_DATASETS]
    if not any(sizes):
        return ""
    return "--image-size " + " ".join(str(size) if size else "model" for size in sizes)


def store(dataset):
    return f"resources/data/{dataset}"


def manifest(dataset):
    return f"resources/data/{dataset}/manifest.json"


def lr_grid(dataset):
    grid = DATASETS[dataset]["lr_grid"] or config["evaluation"]["lr_grid"]
    return "--grid " + " ".join(f"{lr:g}" for lr in grid) if grid else ""


def episode_args(wildcards):
    """`smat episodes sample` options: size and seed of this file, fixed N-way K-shot if configured."""
    settings = config["episodes"][wildcards.purpose]
    args = [f"--n {settings['n']}", f"--seed {settings['seed']}"]
    fixed = DATASETS[wildcards.dataset]["episodes"]
    if fixed:
        args += [f"--ways {fixed['ways']}", f"--shots {fixed['shots']}", f"--queries {fixed['queries']}"]
    return " ".join(args)


# ------------------------------------------------------------------------------------------------ weights

BACKBONE = config["backbone"]["arch"]
PRETRAINED = f"resources/pretrained/{BACKBONE}.pt"

# -------------------------------------------------------------------------------------------------- models
# The package defines which models a config trains and where each appears (smat/experiment.py): every
# model id is also its path under results/models/ and results/eval/.

SEEDS = config["training"]["seeds"]
MODEL_SET = model_set(config["models"], SEEDS, config["released"])
MODELS = MODEL_SET.models  # model id -> smat.experiment.Model: label, method, training settings (None: Pre)
TABLE1_IDS = MODEL_SET.table1
TABLE2_IDS = MODEL_SET.table2
TRAINED_IDS = MODEL_SET.trained
RELEASED_IDS = MODEL_SET.released  # imported by `smat import` (train.smk: import_released)
# Figures show the first seed: the main models and every SMAT point of the sweep.
FIGURE_IDS, FIGURE_SWEEP_IDS = MODEL_SET.figure_models(SEEDS[0])


def checkpoint(model_id):
    return PRETRAINED if model_id == "pre" else f"results/models/{model_id}/best.pt"


def done_marker(model_id):
    """Written last by `smat train`: the model directory holds a finished model."""
    return f"results/models/{model_id}/DONE"


def train_log(model_id):
    return f"results/models/{model_id}/train_log.jsonl"


def expert_masks(model_id):
    """Written by `smat train` for SMAT models with gates, before DONE."""
    return f"results/models/{model_id}/expert_masks.npz"


def trained(model_id):
    """What a reader of a model waits for: DONE for a meta-tuned model (best.pt and train_log.jsonl are
    written during training and are not declared outputs, see train.smk), the backbone for Pre, the imported
    checkpoint for a released model."""
    if model_id == "pre":
        return PRETRAINED
    return checkpoint(model_id) if model_id in RELEASED_IDS else done_marker(model_id)


RELEASED_SOURCES = {
    "smat-official": "the Hugging Face collection szcjerry/meta-tuned-smat-vits (checkpoint.pt)",
    "pmf": "the Hugging Face model hushell/pmf_metadataset_dino, or PMF's README links (best.pth / checkpoint.pth)",
}


def released_inputs(wildcards):
    """Inputs of `import_released`: the file (and the router tensors, if given). A missing file explains where
    the release is published instead of failing as a bare missing input."""
    entry = MODELS[f"released/{wildcards.name}"].released
    inputs = {"checkpoint": project_path(entry["checkpoint"])}
    if entry["router_extra"]:
        inputs["router_extra"] = project_path(entry["router_extra"])
    missing = [path for path in inputs.values() if not Path(path).is_file()]
    if missing:
        message = (
            f"config released.{wildcards.name}: {', '.join(map(os.path.abspath, missing))} not found; download the "
            f"release from {RELEASED_SOURCES[entry['format']]} and set its path, or remove the entry"
        )
        if not workflow.dryrun:
            raise WorkflowError(message)
        logger.warning(message)
        return {}
    return inputs


def released_import_args(name):
    """`smat import FORMAT [options]` for config `released.NAME`."""
    entry = MODELS[f"released/{name}"].released
    args = [entry["format"]]
    if entry["router_extra"]:
        args.append(f"--router-extra {shlex.quote(project_path(entry['router_extra']))}")
    if entry["allow_missing_router"]:
        args.append("--allow-missing-router")
    if entry["image_size"]:
        args.append(f"--image-size {entry['image_size']}")
    return " ".join(args)


def model_spec(model_id):
    """What `--model` takes: a checkpoint, or `pretrained:FILE` for Pre (no meta-training)."""
    return f"pretrained:{PRETRAINED}" if model_id == "pre" else checkpoint(model_id)


# One evaluation (and lr-selection) job per (model, fine-tuning mode) covers every dataset of EVAL_DATASETS,
# so each job starts Python and loads the model once. Its per-dataset files are in EVAL_DATASETS order, which
# pairs --episodes, --store, --out, --lr-from and --grid by position.


def per_dataset(pattern):
    """`pattern` for every evaluated dataset, its other wildcards left to the rule."""
    return expand(pattern, dataset=EVAL_DATASETS, allow_missing=True)


EVAL_STORES = [store(dataset) for dataset in EVAL_DATASETS]
EVAL_MANIFESTS = [manifest(dataset) for dataset in EVAL_DATASETS]


def evaluation_inputs(wildcards):
    inputs = {
        "model": trained(wildcards.model_id),
        "episodes": per_dataset("results/episodes/{dataset}/test.json"),
        "stores": EVAL_MANIFESTS,
    }
    if wildcards.finetune != "none":
        inputs["lr"] = [
            f"results/lr/{wildcards.model_id}/{dataset}/{wildcards.finetune}.json" for dataset in EVAL_DATASETS
        ]
    return inputs


def evaluation_args(wildcards, input):
    args = [f"--label {shlex.quote(MODELS[wildcards.model_id].label)}"]
    if wildcards.finetune != "none":
        args.append(f"--lr-from {' '.join(input.lr)}")
        if config["evaluation"]["finetune_episodes"]:
            args.append(f"--limit {config['evaluation']['finetune_episodes']}")
    return " ".join(args)


def lr_grid_args():
    """`--grid` of `smat select-lr`: once if every dataset searches the same grid, else once per dataset
    (`default`: the package's grid, for a dataset without one while another has its own)."""
    grids = [lr_grid(dataset) for dataset in EVAL_DATASETS]
    if len(set(grids)) == 1:
        return grids[0]
    return " ".join(grid or "--grid default" for grid in grids)


# ------------------------------------------------------------------------------------------------ targets

# `--id-datasets ... --ood-datasets ...` of the table and figure commands, in config order.
DATASET_ARGS = " ".join(["--id-datasets", *ID_DATASETS, "--ood-datasets", *OOD_DATASETS])


def eval_csvs(model_ids, finetunes=("none",), datasets=None):
    return [f"results/eval/{m}/{d}/{f}.csv" for m in model_ids for f in finetunes for d in (datasets or EVAL_DATASETS)]


def table_outputs(name):
    return [f"results/tables/{name}.{suffix}" for suffix in ("csv", "md", "tex", "html")]


FIGURES = [
    "pareto",
    "grad_alignment",
    "capacity_type",
    "capacity_depth",
    "dendrogram",
    "mask_overlap",
    "curves",
    "anatomy",
]


def all_tables():
    return table_outputs("table1") + table_outputs("table2") + table_outputs("table_reference")


def figure_prefix(wildcards, output):
    """PREFIX of `smat figures ... --out-prefix PREFIX`, which writes PREFIX.png (capacity: PREFIX_type.png)."""
    return re.sub(r"(_type)?\.png$", "", output[0])


def all_figures():
    """The figures, and the update-anatomy table that goes with its figure (anatomy.smk)."""
    figures = [f"results/figures/{name}.{ext}" for name in FIGURES for ext in ("png", "pdf")]
    return figures + ["results/tables/anatomy.csv", "results/tables/anatomy.md"]


def grad_alignment_models():
    """The lowest- and highest-τ SMAT models at the main model's |M| (METHOD §5.2)."""
    experts = MODELS[FIGURE_IDS["smat"]].settings["experts"]
    by_tau = sorted(
        (MODELS[i].settings["tau"], i) for i in FIGURE_SWEEP_IDS if MODELS[i].settings["experts"] == experts
    )
    return list(dict.fromkeys([by_tau[0][1], by_tau[-1][1]]))


# ---------------------------------------------------------------------------------------------- resources
# Each rule declares threads, runtime (minutes) and mem_mb sized for the embedded default; profiles replace
# them with set-threads and set-resources (the paper's sizes are in workflow/profiles/paper).


def per_attempt(amount):
    """`amount` on the first attempt, twice it on the second: a job retried after hitting its time or
    memory limit (--retries) asks for more."""
    return lambda wildcards, attempt: amount * attempt


# One GPU per deep-learning job (pre-training, meta-tuning, lr search, evaluation) when the config says the
# run uses GPUs; the Slurm executor turns it into --gpus=1, the local profile runs such jobs one at a time.
GPU = 1 if config["compute"]["gpu"] else 0
DEVICE = config["compute"]["device"]
# Meta-tuning may instead run as N data-parallel processes on one node, one GPU each (METHOD §11).
GPUS_PER_JOB = config["compute"]["gpus_per_job"]


def smat_train_command(threads):
    """`smat train`, or with compute.gpus_per_job = N > 1 the same command as N torchrun processes on one
    node. They share the job's threads: each would otherwise inherit all of them (Snakemake's OMP_NUM_THREADS)."""
    if GPUS_PER_JOB == 1:
        return "smat train"
    per_process = max(1, threads // GPUS_PER_JOB)
    return f"OMP_NUM_THREADS={per_process} torchrun --standalone --nproc-per-node {GPUS_PER_JOB} -m smat.cli train"


# ------------------------------------------------------------------------------------- wildcard constraints


def one_of(names):
    return "|".join(re.escape(str(name)) for name in names)


wildcard_constraints:
    dataset=one_of(DATASETS),
    model_id=one_of(MODELS),
    finetune="none|full|lora",
    purpose="test|hps",

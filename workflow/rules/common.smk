"""Helpers shared by every stage: datasets, the models of the sweep, small input functions, job resources and
wildcard constraints. Argument strings, messages and targets come from smat.rule_args; this file holds no rules."""

from pathlib import Path

from snakemake.exceptions import WorkflowError
from snakemake.logging import logger

from smat import rule_args
from smat.analysis.figures import FIGURES
from smat.evaluation.modes import FINETUNE_MODES, NO_FINETUNING, tuned_modes
from smat.experiment import model_set

# The project checkout: relative config paths that do not exist in the working directory are looked up here.
PROJECT = Path(workflow.basedir)
DATASETS = config["datasets"]
ID_DATASETS = rule_args.datasets_of_role(config, "id")
OOD_DATASETS = rule_args.datasets_of_role(config, "ood")
EVAL_DATASETS = rule_args.eval_datasets(config)  # role "pretrain" datasets only feed the pre-training
PRETRAIN_DATASETS = rule_args.pretrain_datasets(config)
EMBEDDED_RAW = rule_args.EMBEDDED_RAW
store, manifest, one_of = rule_args.store, rule_args.manifest, rule_args.one_of
MISSING_REPORTED = set()  # messages of missing user files already shown (missing_input)

# Cross-key rules that JSON-Schema cannot express, checked before any job starts (also the model set's, below).
try:
    rule_args.check_config(config)
except ValueError as err:
    raise WorkflowError(str(err)) from None


def project_path(path):
    return rule_args.project_path(path, PROJECT)


def missing_input(message):
    """A missing user file, explained: a dry run warns once (the DAG still builds), a real run stops at once."""
    if not workflow.dryrun:
        raise WorkflowError(message)
    if message not in MISSING_REPORTED:
        logger.warning(message)
        MISSING_REPORTED.add(message)
    return {}


def conversion_inputs(wildcards):
    inputs, missing = rule_args.conversion_inputs(config, wildcards.dataset)
    return missing_input(missing) if missing else inputs


BACKBONE = config["backbone"]["arch"]
PRETRAINED = f"resources/pretrained/{BACKBONE}.pt"

# The package defines which models a config trains and where each appears (smat/experiment.py): every
# model id is also its path under results/models/ and results/eval/.
SEEDS = config["training"]["seeds"]
try:
    MODEL_SET = model_set(config["models"], SEEDS, config["released"])
except ValueError as err:
    raise WorkflowError(f"config: {err}") from None
MODELS = MODEL_SET.models  # model id -> smat.experiment.Model: label, method, training settings (None: Pre)
TABLE1_IDS = MODEL_SET.table1
TABLE2_IDS = MODEL_SET.table2
TRAINED_IDS = MODEL_SET.trained
GATED_IDS = MODEL_SET.gated  # meta-tuned with expert gates: they also write expert_masks.npz (train.smk)
RELEASED_IDS = MODEL_SET.released  # imported by `smat import` (train.smk: import_released)
PRETRAINED_IDS = MODEL_SET.pretrained  # θ_pre itself (Pre)
# Figures show the first seed's models, by role (smat.experiment.ModelSet.figure_models).
FIGURE_MODELS = MODEL_SET.figure_models(SEEDS[0])


def model_file(model_id, name):
    """A product of `smat train` (best.pt, train_log.jsonl, expert_masks.npz), in the model's directory."""
    return f"results/models/{model_id}/{name}"


def checkpoint(model_id):
    """A model's file, and what its readers wait for: `smat train` gives best.pt its name last, when it finishes."""
    return PRETRAINED if model_id in PRETRAINED_IDS else model_file(model_id, "best.pt")


def released_inputs(wildcards):
    inputs, missing = rule_args.released_inputs(config["released"][wildcards.name], wildcards.name, PROJECT)
    return missing_input(missing) if missing else inputs


def model_spec(model_id):
    """What `--model` takes: a checkpoint, or `pretrained:FILE` for Pre (no meta-training)."""
    return f"pretrained:{PRETRAINED}" if model_id in PRETRAINED_IDS else checkpoint(model_id)


def per_dataset(pattern):
    """`pattern` for every evaluated dataset (in EVAL_DATASETS order), its other wildcards left to the rule."""
    return expand(pattern, dataset=EVAL_DATASETS, allow_missing=True)


EVAL_STORES = [store(dataset) for dataset in EVAL_DATASETS]
EVAL_MANIFESTS = [manifest(dataset) for dataset in EVAL_DATASETS]
DATASET_ARGS = rule_args.dataset_args(config)


def evaluation_inputs(wildcards):
    inputs = {"model": checkpoint(wildcards.model_id), "stores": EVAL_MANIFESTS}
    inputs["episodes"] = per_dataset("results/episodes/{dataset}/test.json")
    if wildcards.finetune != NO_FINETUNING:
        inputs["lr"] = [f"results/lr/{wildcards.model_id}/{d}/{wildcards.finetune}.json" for d in EVAL_DATASETS]
    return inputs


def eval_csvs(model_ids, finetunes=(NO_FINETUNING,), datasets=None):
    return [f"results/eval/{m}/{d}/{f}.csv" for m in model_ids for f in finetunes for d in (datasets or EVAL_DATASETS)]


all_tables, all_figures = rule_args.all_tables, rule_args.all_figures


# Each rule declares threads, runtime (minutes) and mem_mb sized for the embedded default; profiles replace
# them with set-threads and set-resources (the paper's sizes are in workflow/profiles/paper).
def per_attempt(amount):
    """`amount` on the first attempt, twice it on the second (--retries: a job that hit its limits asks more)."""
    return lambda wildcards, attempt: amount * attempt


# One GPU per deep-learning job (pre-training, meta-tuning, lr search, evaluation) when the config says the
# run uses GPUs; the Slurm executor turns it into --gpus=1, the local profile runs such jobs one at a time.
GPU = 1 if config["compute"]["gpu"] else 0
DEVICE = config["compute"]["device"]
# Meta-tuning may instead run as N data-parallel processes on one node, one GPU each (METHOD §11).
GPUS_PER_JOB = config["compute"]["gpus_per_job"]


wildcard_constraints:
    dataset=one_of(DATASETS),
    model_id=one_of(MODELS),
    finetune=one_of(FINETUNE_MODES),
    purpose="test|hps",

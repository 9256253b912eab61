"""Helpers shared by every stage: datasets and their sources, the models of the sweep, target builders,
job resources and wildcard constraints. Rules live in the per-stage files; this file holds no rules."""

import json
import os
import re
import shlex
from pathlib import Path

import pandas as pd
from snakemake.exceptions import WorkflowError
from snakemake.logging import logger
from snakemake.utils import Paramspace

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
    uses_md = [n for n, d in DATASETS.items() if "meta_dataset" in d["source"]]
    if uses_md and not config["paths"]["meta_dataset"]:
        raise WorkflowError(
            f"config: dataset(s) {', '.join(uses_md)} use source.meta_dataset but paths.meta_dataset is "
            "not set; set it to the folder of converted Meta-Dataset domains (config/README.md)"
        )


def source_folder(name):
    """The class-per-folder images that `smat data convert imagefolder` reads for dataset `name`."""
    source = DATASETS[name]["source"]
    if "embedded" in source:
        return f"{EMBEDDED_RAW}/{source['embedded']}"
    if "meta_dataset" in source:
        return str(Path(config["paths"]["meta_dataset"]) / source["meta_dataset"])
    return source["imagefolder"]


def missing_sources():
    """User-provided folders (image folders, Meta-Dataset domains, split files) that do not exist."""
    missing = []
    for name, dataset in DATASETS.items():
        if "embedded" not in dataset["source"] and not Path(source_folder(name)).is_dir():
            missing.append((name, source_folder(name)))
        if dataset["splits"] and not Path(dataset["splits"]).is_file():
            missing.append((name, dataset["splits"]))
    return missing


def missing_sources_message(missing):
    lines = [f"  {name}: {os.path.abspath(path)}" for name, path in missing]
    return (
        "These dataset sources do not exist:\n" + "\n".join(lines) + "\n"
        "Produce them before running the workflow (config/README.md, 'Preparing data'):\n"
        "  * Meta-Dataset domains (source.meta_dataset): one folder per domain under paths.meta_dataset, "
        "with one sub-folder of images per class and a splits.json; export them from the Meta-Dataset h5 "
        "files (hushell/meta_dataset_h5) with the recipe in config/README.md.\n"
        "  * Image folders (source.imagefolder), e.g. DomainNet sketch/clipart, Food-101, Oxford-IIIT Pets, "
        "Stanford Cars: download the dataset and arrange it as <folder>/<class>/<image>; give a splits file "
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
    dataset = DATASETS[wildcards.dataset]
    args = [f"--image-size {dataset['image_size']}"] if dataset["image_size"] else []
    if dataset["splits"]:
        args.append(f"--splits {shlex.quote(dataset['splits'])}")
    return " ".join(args)


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
# Every model has an id that is also its path under results/models/ and results/eval/; ids are known from
# the config alone, so each id maps to its training overrides and its label in tables.

SEEDS = config["training"]["seeds"]
MAIN_SMAT = config["models"]["smat"]
SWEEP = config["models"]["sweep"]
SMAT_POINTS = pd.DataFrame(
    [{"tau": MAIN_SMAT["tau"], "experts": MAIN_SMAT["experts"]}]
    + [{"tau": tau, "experts": experts} for tau in SWEEP["tau"] for experts in SWEEP["experts"]]
).drop_duplicates(ignore_index=True)
SMAT_SPACE = Paramspace(SMAT_POINTS)

# spec §2.2: Table 2 rows 2-5 switch one component off the main SMAT model; row 1 is the main SMAT model
# and row 6 is PMF, both trained anyway for Table 1.
ABLATION_ROWS = {
    2: {"switches.dt": False},
    3: {"switches.ie": False, "experts": 1},
    4: {"switches.meta": False},
    5: {"switches.mls": False, "switches.ie": False, "experts": 1},
}


def seeded(label, seed):
    """One label per model: with several seeds each seed is its own column."""
    return label if len(SEEDS) == 1 else f"{label} (seed {seed})"


def overrides(**values):
    return " ".join(f"--set {key}={str(value).lower() if isinstance(value, bool) else value}"
                    for key, value in values.items())


MODELS = {}  # model id -> {"label", "overrides" (None for Pre: not trained)}
MODELS["pre"] = {"label": "Pre", "overrides": None}
SMAT_IDS, MAIN_IDS, ABLATION_IDS = [], {}, []
for seed in SEEDS:
    for point in SMAT_POINTS.to_dict("records"):
        model_id = f"smat/{SMAT_SPACE.wildcard_pattern.format(**point)}/seed~{seed}"
        is_main = point == {"tau": MAIN_SMAT["tau"], "experts": MAIN_SMAT["experts"]}
        label = "SMAT" if is_main else f"SMAT tau={point['tau']:g} M={point['experts']}"
        MODELS[model_id] = {"label": seeded(label, seed),
                            "overrides": overrides(method="smat", **point, seed=seed)}
        SMAT_IDS.append(model_id)
        if is_main:
            MAIN_IDS.setdefault("smat", []).append(model_id)
    pmf_id = f"pmf/seed~{seed}"
    MODELS[pmf_id] = {"label": seeded("PMF", seed), "overrides": overrides(method="pmf", seed=seed)}
    MAIN_IDS.setdefault("pmf", []).append(pmf_id)
    softmerge_id = f"softmerge/experts~{config['models']['softmerge']['experts']}/seed~{seed}"
    MODELS[softmerge_id] = {
        "label": seeded("SoftMerge", seed),
        "overrides": overrides(method="softmerge", experts=config["models"]["softmerge"]["experts"], seed=seed),
    }
    MAIN_IDS.setdefault("softmerge", []).append(softmerge_id)
    for row in config["models"]["ablation_rows"]:
        ablation_id = f"ablation/row~{row}/seed~{seed}"
        switched = {"method": "smat", "tau": MAIN_SMAT["tau"], "experts": MAIN_SMAT["experts"], "seed": seed}
        switched.update(ABLATION_ROWS[row])
        MODELS[ablation_id] = {"label": seeded(f"Row {row}", seed), "overrides": overrides(**switched)}
        ABLATION_IDS.append(ablation_id)

TABLE1_IDS = ["pre", *MAIN_IDS["pmf"], *MAIN_IDS["softmerge"], *MAIN_IDS["smat"]]
TABLE2_IDS = [*MAIN_IDS["smat"], *ABLATION_IDS, *MAIN_IDS["pmf"]]
BASELINE_IDS = [i for i in MODELS if i != "pre" and i not in SMAT_IDS]
# Figures show the first seed: the main models and every SMAT point of the sweep.
FIGURE_IDS = {method: ids[0] for method, ids in MAIN_IDS.items()}
FIGURE_SWEEP_IDS = [i for i in SMAT_IDS if i.rsplit("~", 1)[1] == str(SEEDS[0])]


def checkpoint(model_id):
    return PRETRAINED if model_id == "pre" else f"results/models/{model_id}/best.pt"


def done_marker(model_id):
    """Written last by `smat train`: the model directory holds a finished model."""
    return f"results/models/{model_id}/DONE"


def trained(model_id):
    """Inputs of every consumer of a model: its checkpoint and, for meta-tuned models, DONE. best.pt exists
    from the first validation on, so a killed run leaves one behind; DONE makes Snakemake resume the
    training before anything reads the model."""
    if model_id == "pre":
        return [PRETRAINED]
    return [checkpoint(model_id), done_marker(model_id)]


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
    inputs = {"model": trained(wildcards.model_id), "episodes": per_dataset("results/episodes/{dataset}/test.json"),
              "stores": EVAL_MANIFESTS}
    if wildcards.finetune != "none":
        inputs["lr"] = [f"results/lr/{wildcards.model_id}/{dataset}/{wildcards.finetune}.json"
                        for dataset in EVAL_DATASETS]
    return inputs


def evaluation_args(wildcards, input):
    args = [f"--label {shlex.quote(MODELS[wildcards.model_id]['label'])}"]
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
    return [f"results/tables/{name}.{suffix}" for suffix in ("csv", "md", "tex")]


FIGURES = ["pareto", "grad_alignment", "capacity_type", "capacity_depth", "dendrogram", "mask_overlap", "curves"]


def all_tables():
    return table_outputs("table1") + table_outputs("table2") + table_outputs("table_reference")


def figure_prefix(wildcards, output):
    """PREFIX of `smat figures ... --out-prefix PREFIX`, which writes PREFIX.png (capacity: PREFIX_type.png)."""
    return re.sub(r"(_type)?\.png$", "", output[0])


def all_figures():
    return [f"results/figures/{name}.{ext}" for name in FIGURES for ext in ("png", "pdf")]


def grad_alignment_models():
    """The lowest- and highest-τ SMAT models at the main model's |M| (spec §5.2)."""
    taus = sorted(SMAT_POINTS.loc[SMAT_POINTS["experts"] == MAIN_SMAT["experts"], "tau"])
    return [f"smat/{SMAT_SPACE.wildcard_pattern.format(tau=tau, experts=MAIN_SMAT['experts'])}/seed~{SEEDS[0]}"
            for tau in dict.fromkeys([taus[0], taus[-1]])]


# ---------------------------------------------------------------------------------------------- resources

JOBS = config["compute"]["jobs"]


def runtime(kind):
    """Minutes for a job of `kind`; a retried job (`--retries`) gets proportionally more. An evaluation
    job covers every evaluated dataset, so its configured runtime is per dataset."""
    per_job = len(EVAL_DATASETS) if kind == "evaluate" else 1
    return lambda wildcards, attempt: JOBS[kind]["runtime"] * per_job * attempt


def mem_mb(kind):
    return lambda wildcards, attempt: JOBS[kind]["mem_mb"] * attempt


def gpus(kind):
    """One GPU per deep-learning job when compute.gpu is set (Slurm: --gpus), none otherwise."""
    return 1 if config["compute"]["gpu"] and kind in ("pretrain", "train", "evaluate") else 0


def gpu_model(kind):
    return (config["compute"]["gpu_model"] or "") if gpus(kind) else ""


DEVICE = config["compute"]["device"]

# ---------------------------------------------------------------------------------- interrupted-run recovery


def _other_workflow_processes():
    """Ids of live processes, other than this one and its ancestors, that run snakemake or smat in the
    working directory; None where /proc is unavailable (then nothing can be proven dead)."""
    proc = Path(os.sep, "proc")
    if not (proc / "self").exists():
        return None
    own, pid = set(), os.getpid()
    while pid > 1 and pid not in own:
        own.add(pid)
        try:
            pid = int((proc / str(pid) / "stat").read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            break
    here = os.path.realpath(os.getcwd())
    found = []
    for entry in proc.iterdir():
        if not entry.name.isdigit() or int(entry.name) in own:
            continue
        try:
            cwd = os.readlink(entry / "cwd")
            argv = (entry / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        names = [os.path.basename(arg.decode(errors="replace")) for arg in argv[:3]]
        if cwd == here and any("snakemake" in name or name == "smat" for name in names):
            found.append(int(entry.name))
    return found


def recover_from_killed_run():
    """After `kill -9` of Snakemake and its jobs, Snakemake's lock and its marks on the outputs of the
    killed jobs stay behind, and the same command refuses to run. When no snakemake or smat process is left
    in this directory and no killed job was a cluster job (which may still be running), remove both: every
    `smat` command writes its files atomically, so an output that exists is complete, and a job with a
    missing output (meta-tuning writes DONE last, and every reader of a model needs it) runs again;
    meta-tuning resumes from its checkpoint,
    which is not a declared output. workflow/profiles/README.md says what to do in the other cases."""
    state = Path(".snakemake")
    locks = sorted((state / "locks").glob("*.lock"))
    if not workflow.is_main_process or not locks:
        return
    marks = [path for path in (state / "incomplete").rglob("*") if path.is_file()]
    try:
        if any(json.loads(path.read_text()).get("external_jobid") for path in marks):
            return
    except (OSError, ValueError, AttributeError):
        return
    others = _other_workflow_processes()
    if others is None or others:
        return
    logger.warning(
        f"A previous run in this directory was killed: removing its stale lock and the incomplete marks of "
        f"its {len(marks)} interrupted output file(s); their jobs run again (meta-tuning resumes)."
    )
    for path in locks + marks:
        path.unlink()


# ------------------------------------------------------------------------------------- wildcard constraints


def one_of(names):
    return "|".join(re.escape(str(name)) for name in names)


wildcard_constraints:
    dataset=one_of(DATASETS),
    model_id=one_of(MODELS),
    finetune="none|full|lora",
    purpose="test|hps",

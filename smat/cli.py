"""The `smat` command line. Every workflow rule is one call of a command defined here.

Each sub-command parses its arguments and hands them to one function of the package; the heavy modules
are imported only when their command runs, so `smat --help` stays fast.
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import logging
import math
import os
import sys
from pathlib import Path

from smat import __version__
from smat.analysis.figures import FIGURES
from smat.config_loader import MAX_SEED
from smat.data.formats import SOURCE_FORMATS
from smat.evaluation.modes import FINETUNE_MODES, NO_FINETUNING, tuned_modes
from smat.io import SmatError, check_outputs, check_writable, disk_full_error, is_disk_full, run_lock
from smat.releases import PMF_RELEASE, SMAT_RELEASE

# Commands whose --out is a folder written as a whole (the others write files).
_FOLDER_OUTPUTS = {("data", "build-embedded"), ("data", "convert"), ("train", None)}


def _io_paths(args: argparse.Namespace) -> tuple[list[tuple[Path, str]], list[Path]]:
    """(outputs with their kind, inputs) of the command, derived output names included: compared by
    `check_outputs` before any work, so that no output replaces an input."""
    sub = getattr(args, "data_command", None)
    kind = "folder" if (args.command, sub) in _FOLDER_OUTPUTS else "file"
    # An --out given twice as written is left to the command's own message ("given twice", per-dataset pairing).
    outs = list(dict.fromkeys(Path(p) for p in _as_list(getattr(args, "out", None))))
    outputs = [(p, kind) for p in outs]
    if args.command in ("evaluate", "anatomy"):     # OUT.csv and its summary OUT.json
        outputs += [(p.with_suffix(".json"), "file") for p in outs]
    if args.command == "pretrain":              # the resume state of an interrupted run, the bare weights
        outputs += [(Path(args.out + ".partial"), "file")] + [(Path(p), "file") for p in _as_list(args.weights_out)]
    if args.command == "tables":
        name = "table_reference" if args.table == "reference" else args.table
        outputs += [(Path(args.out_dir) / f"{name}.{ext}", "file") for ext in ("csv", "md", "tex", "html",
                                                                              "provenance.json")]
    if args.command == "figures":
        outputs += [(Path(args.out_prefix + ext), "file") for ext in (".png", ".pdf")]
    inputs = [Path(p) for name in ("src", "splits", "store", "config", "pretrained", "checkpoint", "router_extra",
                                   "episodes", "lr_from", "inputs")
              for p in _as_list(getattr(args, name, None))]
    for spec in _as_list(getattr(args, "model", None)):
        inputs.append(Path(spec.removeprefix("pretrained:")))
    if args.command == "fetch" and not args.source.startswith(("http://", "https://")):
        inputs.append(Path(args.source.removeprefix("file://")))
    for p in _as_list(getattr(args, "eval", None)):  # tables read each CSV and its summary
        inputs += [Path(p), Path(p).with_suffix(".json")]
    return outputs, inputs


# Numeric arguments and their ranges, checked before any work (argparse accepts `nan`, `inf` and negatives).
_NUMBERS = {
    "seed": (lambda v: 0 <= v <= MAX_SEED, f"an integer in [0, {MAX_SEED}]"),
    "n": (lambda v: v >= 1, "at least 1"),
    "ways": (lambda v: v >= 2, "at least 2"),
    "shots": (lambda v: v >= 1, "at least 1"),
    "queries": (lambda v: v >= 1, "at least 1"),
    "heads": (lambda v: v >= 1, "at least 1"),
    "limit": (lambda v: v >= 1, "at least 1"),
    "n_episodes": (lambda v: v >= 1, "at least 1"),
    "image_size": (lambda v: v >= 1, "a positive number of pixels"),
    "lr": (lambda v: math.isfinite(v) and v >= 0, "a finite number >= 0"),
}


def _check_numbers(args: argparse.Namespace) -> None:
    for name, (ok, wanted) in _NUMBERS.items():
        value = getattr(args, name, None)
        if isinstance(value, (int, float)) and not ok(value):      # (evaluate's --image-size is a list)
            raise SmatError(f"--{name.replace('_', '-')} {value}: must be {wanted}")


class HelpFormatter(argparse.HelpFormatter):
    """`--help` of every command: descriptions wrapped, examples as written, each option's default after its
    help (unless it has none, i.e. None, False or [], or the help already names it)."""

    def _fill_text(self, text: str, width: int, indent: str) -> str:
        if text.startswith("example:"):
            return "".join(indent + line for line in text.splitlines(keepends=True))
        return super()._fill_text(text, width, indent)

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        default = action.default
        if (not action.option_strings or default is None or default is False or default == []
                or default is argparse.SUPPRESS or "default" in text):
            return text
        return f"{text} (default: %(default)s)"


def _example(*lines: str) -> str:
    """The epilog of a command: one or more example command lines."""
    return "example:\n" + "\n".join(f"  {line}" for line in lines)


def _data(args: argparse.Namespace) -> None:
    if args.data_command == "build-embedded":
        from smat.data.embedded import build_embedded

        build_embedded(Path(args.out), size=args.size, seed=args.seed)
    elif args.data_command == "convert":
        from smat.data.formats import ConvertOptions, convert_source

        convert_source(args.format, Path(args.src), Path(args.out), ConvertOptions(
            image_size=args.image_size, splits=args.splits, role=args.role, domain=args.domain, seed=args.seed,
            skip_bad=args.skip_bad, min_images=args.min_images, workers=args.workers))
    elif args.data_command == "check":
        from smat.data.store import Store, check_store

        problems = check_store(Path(args.store))
        if args.spec and not problems:
            from smat.data.meta_dataset import spec_problems

            problems = spec_problems(Store(Path(args.store)), Path(args.spec))
        if len(problems) == 1:
            raise SmatError(f"{args.store}: store check failed: {problems[0]}")
        if problems:      # one per line: a damaged store can have many
            raise SmatError(f"{args.store}: store check failed:\n  " + "\n  ".join(problems))
        print(f"{args.store}: OK" + (f" (matches {args.spec})" if args.spec else ""))


def _episodes(args: argparse.Namespace) -> None:
    from smat.data.episodes import sample_to_file

    sample_to_file(
        Path(args.store), split=args.split, n=args.n, seed=args.seed, out=Path(args.out),
        ways=args.ways, shots=args.shots, queries=args.queries,
    )


def _fetch(args: argparse.Namespace) -> None:
    from smat.models.pretrained import fetch

    fetch(args.source, Path(args.out), sha256=args.sha256, arch=args.arch)


def _import(args: argparse.Namespace) -> None:
    from smat.releases.official import import_pmf, import_smat_official

    sizes = {"arch": args.arch, "heads": args.heads, "image_size": args.image_size}
    if args.import_format == SMAT_RELEASE:
        import_smat_official(Path(args.checkpoint), Path(args.out), **sizes,
                             router_extra=Path(args.router_extra) if args.router_extra else None,
                             allow_missing_router=args.allow_missing_router)
    else:
        import_pmf(Path(args.checkpoint), Path(args.out), **sizes)


def _pretrain(args: argparse.Namespace) -> None:
    from smat.training.pretrain import pretrain

    pretrain([Path(s) for s in args.store], Path(args.out), config=args.config, overrides=args.set,
             device=args.device, weights_out=Path(args.weights_out) if args.weights_out else None)


def _train(args: argparse.Namespace) -> None:
    from smat.training.loop import train

    # One run per --out at a time. Under torchrun every process runs this: rank 0 holds the lock for them all.
    lock = run_lock(Path(args.out), "smat train") if os.environ.get("RANK", "0") == "0" else contextlib.nullcontext()
    with lock:
        train(Path(args.config), [Path(s) for s in args.store], Path(args.pretrained), Path(args.out),
              overrides=args.set, device=args.device)


def _evaluate(args: argparse.Namespace) -> None:
    from smat.evaluation.evaluate import evaluate_many

    evaluate_many(args.model, _paths(args.episodes), _paths(args.store), _paths(args.out), finetune=args.finetune,
                  lr=args.lr, lr_froms=_paths(args.lr_from) if args.lr_from else None, label=args.label,
                  limit=args.limit, device=args.device, image_sizes=_image_sizes(args.image_size))


def _select_lr(args: argparse.Namespace) -> None:
    from smat.evaluation.select_lr import select_lr_many

    select_lr_many(args.model, _paths(args.episodes), _paths(args.store), _paths(args.out), args.finetune,
                   grids=[_grid(g) for g in args.grid] if args.grid else [None],
                   n_episodes=args.n_episodes, device=args.device, image_sizes=_image_sizes(args.image_size))


def _image_sizes(values: list[str] | None) -> list[int | None]:
    """`--image-size 224` or per dataset `--image-size model 224 ...` ("model": the model's own size)."""
    if not values:
        return [None]
    try:
        sizes = [None if v == "model" else int(v) for v in values]
    except ValueError:
        raise SmatError(f"--image-size {' '.join(values)}: expected pixel counts or 'model'") from None
    if any(size is not None and size < 1 for size in sizes):
        raise SmatError(f"--image-size {' '.join(values)}: pixel counts must be at least 1")
    return sizes


def _paths(values: list[str]) -> list[Path]:
    return [Path(value) for value in values]


def _grid(values: list[str]) -> list[float] | None:
    """One `--grid`: learning rates, or `default` alone (the package's grid, for a dataset without its own)."""
    if values == ["default"]:
        return None
    try:
        grid = [float(lr) for lr in values]
    except ValueError:
        raise SmatError(f"--grid {' '.join(values)}: give learning rates (numbers), or `default` alone") from None
    if not all(math.isfinite(lr) and lr >= 0 for lr in grid):
        raise SmatError(f"--grid {' '.join(values)}: learning rates must be finite numbers >= 0")
    return grid


def _compare(args: argparse.Namespace) -> None:
    from smat.evaluation.compare import compare_files

    print(compare_files(Path(args.a), Path(args.b)))


def _anatomy(args: argparse.Namespace) -> None:
    from smat.analysis.anatomy import run

    run(args.model, Path(args.pretrained), args.datasets, args.roles, [Path(p) for p in args.episodes],
        [Path(p) for p in args.store], args.limit, Path(args.out), label=args.label, device=args.device)


def _tables(args: argparse.Namespace) -> None:
    from smat.analysis.tables import make_table

    make_table(args.table, [Path(p) for p in args.eval], id_datasets=args.id_datasets,
               ood_datasets=args.ood_datasets, out_dir=Path(args.out_dir))


def _figures(args: argparse.Namespace) -> None:
    from smat.analysis.figures import make_figure

    make_figure(args.figure, inputs=[Path(p) for p in args.inputs], out_prefix=Path(args.out_prefix),
                id_datasets=args.id_datasets, ood_datasets=args.ood_datasets)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="smat", formatter_class=HelpFormatter,
        description="Sparse MeTa-Tuning (SMAT) and its baselines: data, meta-tuning, evaluation, tables and "
        "figures. Every Snakemake rule of the workflow is one of these commands; `smat COMMAND --help` "
        "describes each.",
        epilog=_example("smat data build-embedded --out resources/raw/embedded --size ci",
                        "smat compare results/eval/pre/digits/none.csv results/eval/pmf/seed~0/digits/none.csv"))
    parser.add_argument("--version", action="version", version=f"smat {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    parser.add_argument("--debug", action="store_true",
                        help="show the traceback of an error (also with the environment variable SMAT_DEBUG=1)")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    device = argparse.ArgumentParser(add_help=False)
    device.add_argument("--device", default="auto", help="auto (CUDA if available), cpu, cuda or cuda:N")
    overrides = argparse.ArgumentParser(add_help=False)
    overrides.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                           help="override one config key (dotted for nested keys); repeatable")

    data = commands.add_parser("data", help="build, convert and check datasets", formatter_class=HelpFormatter,
                               description="Datasets as stores (manifest.json + images.npy, docs/ARCHITECTURE.md "
                               "'Files'): generate the embedded benchmark, convert raw data, check a store.",
                               epilog=_example("smat data check resources/data/latin-greek"))
    data.set_defaults(func=_data)
    data_commands = data.add_subparsers(dest="data_command", required=True, metavar="COMMAND")
    build = data_commands.add_parser(
        "build-embedded", help="generate the offline multi-domain benchmark", formatter_class=HelpFormatter,
        description="Generate the embedded benchmark (README, 'What the default run computes'): procedurally "
        "drawn domains written as class-per-folder PNGs with a splits.json each, like a raw download; "
        "`smat data convert imagefolder` then turns each domain into a store.",
        epilog=_example("smat data build-embedded --out resources/raw/embedded --size default --seed 0"))
    build.add_argument("--out", required=True,
                       help="folder to write: one sub-folder per domain, benchmark.json and sample grids")
    build.add_argument("--size", choices=["default", "ci"], default="default",
                       help="default: the full benchmark; ci: a tiny one for tests")
    build.add_argument("--seed", type=int, default=0, help="seed of the generator")
    convert = data_commands.add_parser(
        "convert", help="convert raw data into a dataset store", formatter_class=HelpFormatter,
        description="Convert a dataset, as its publisher distributes it, into a store: every image decoded "
        "once, optionally resized, with its class split recorded (config/README.md, `datasets`).",
        epilog=_example("smat data convert imagefolder my_images --out resources/data/my-set --image-size 32",
                        "smat data convert pmf-h5 data/meta_dataset/omniglot --out resources/data/omniglot "
                        "--image-size 146"))
    convert.add_argument("format", choices=list(SOURCE_FORMATS), help="; ".join(
        f"{name}: {source.description}" for name, source in SOURCE_FORMATS.items()))
    convert.add_argument("src", help="the dataset's folder, as downloaded (README: 'Running the paper configuration')")
    convert.add_argument("--out", required=True, help="store folder to write (replaced atomically)")
    convert.add_argument("--image-size", type=int, default=None,
                         help="store at N×N: shorter side to N, centre crop (default: keep the size; all "
                         "images must then have one square size)")
    convert.add_argument("--splits", default=None,
                         help="JSON with train/val/test class lists and optional groups (default: SRC/splits.json)")
    convert.add_argument("--role", choices=["id", "ood"], default="ood",
                         help="without a splits file: ood puts every class in test, id splits 60/15/25 at random")
    convert.add_argument("--domain", default=None, help="dataset name recorded in the store (default: folder name)")
    convert.add_argument("--seed", type=int, default=0, help="seed of the random class split of --role id")
    convert.add_argument("--skip-bad", action="store_true", help="skip unreadable images and report them")
    convert.add_argument("--workers", type=int, default=1,
                         help="processes that decode images; the store is the same byte for byte for any number")
    convert.add_argument("--min-images", type=int, default=2,
                         help="exclude classes with fewer images (listed in the manifest)")
    check = data_commands.add_parser(
        "check", help="verify a dataset store", formatter_class=HelpFormatter,
        description="Check a store's manifest and image array (shapes, counts, splits); with --spec, also "
        "against the Meta-Dataset specification it was converted from. Prints STORE: OK or every problem.",
        epilog=_example("smat data check resources/data/omniglot --spec data/meta_dataset/omniglot/dataset_spec.json"))
    check.add_argument("store", help="store folder (written by `smat data convert`)")
    check.add_argument("--spec", default=None,
                       help="a Meta-Dataset dataset_spec.json the store must match (classes per split, images)")

    episodes = commands.add_parser(
        "episodes", help="freeze evaluation episodes", formatter_class=HelpFormatter,
        description="Frozen episodes: sampled once per dataset and shared by every model, so that comparisons "
        "are paired (METHOD §3.4).",
        epilog=_example("smat episodes sample --store resources/data/digits --split test --out test.json"))
    episodes.set_defaults(func=_episodes)
    episode_commands = episodes.add_subparsers(dest="episodes_command", required=True, metavar="COMMAND")
    sample = episode_commands.add_parser(
        "sample", help="sample episodes once and write them to a file", formatter_class=HelpFormatter,
        description="Sample episodes from one split of a store and write their class and image ids to a JSON "
        "file, with the store's fingerprint. Without --ways: Meta-Dataset's variable-way variable-shot "
        "episodes (METHOD §3.1); with --ways, --shots and --queries: fixed N-way K-shot (METHOD §3.3).",
        epilog=_example("smat episodes sample --store resources/data/digits --split test --n 60 --seed 0 "
                        "--ways 5 --shots 1 --queries 10 --out results/episodes/digits/test.json"))
    sample.add_argument("--store", required=True, help="store folder to sample from")
    sample.add_argument("--split", required=True, choices=["train", "val", "test"], help="classes to sample from")
    sample.add_argument("--n", type=int, default=600, help="number of episodes")
    sample.add_argument("--seed", type=int, default=0, help="sampling seed")
    sample.add_argument("--ways", type=int, default=None, help="fixed N-way (default: variable way)")
    sample.add_argument("--shots", type=int, default=None, help="fixed K-shot (with --ways)")
    sample.add_argument("--queries", type=int, default=None, help="queries per class (with --ways)")
    sample.add_argument("--out", required=True, help="episode file (JSON) to write")

    fetch = commands.add_parser(
        "fetch", help="fetch pre-trained weights into a verified, normalised checkpoint",
        formatter_class=HelpFormatter,
        description="Download (or copy) pre-trained weights, check their sha256 and their fit to the "
        "backbone, and write a backbone checkpoint (docs/ARCHITECTURE.md 'Files').",
        epilog=_example("smat fetch config/pretrained/vit_tiny_patch4_32-embedded.safetensors "
                        "--out resources/pretrained/vit_tiny_patch4_32.pt",
                        "smat fetch dino_deitsmall16_pretrain.pth --arch vit_small_patch16_dino "
                        "--out resources/pretrained/vit_small_patch16_dino.pt"))
    fetch.set_defaults(func=_fetch)
    fetch.add_argument("source", help="hub name (timm/HF), http(s)/file URL, or local path")
    fetch.add_argument("--out", required=True, help="backbone checkpoint (.pt) to write")
    fetch.add_argument("--sha256", default=None, help="expected sha256 of the downloaded file (default: no check)")
    fetch.add_argument("--arch", default=None,
                       help="backbone name (default: the registry's entry for a registered source, else inferred "
                       "from the weights' shapes)")

    imported = argparse.ArgumentParser(add_help=False)
    imported.add_argument("checkpoint", help="the authors' released checkpoint file")
    imported.add_argument("--out", required=True, help="model checkpoint to write (replaced atomically)")
    imported.add_argument("--arch", default=None, help="registered backbone whose attention heads to use "
                          "(default: the one with the checkpoint's sizes)")
    imported.add_argument("--heads", type=int, default=None, help="attention heads, for sizes no backbone has")
    imported.add_argument("--image-size", type=int, default=None,
                          help="input size of evaluation (default: the size of the checkpoint's position grid)")
    import_ = commands.add_parser(
        "import", help="convert the authors' SMAT or PMF checkpoint into a model checkpoint",
        formatter_class=HelpFormatter,
        description="Convert a released checkpoint into a model checkpoint that `smat evaluate` reads like a "
        "trained one (METHOD §10).",
        epilog=_example("smat import pmf best.pth --out results/models/released/pmf-release/best.pt"))
    import_.set_defaults(func=_import)
    import_commands = import_.add_subparsers(dest="import_format", required=True, metavar="FORMAT")
    smat_official = import_commands.add_parser(
        SMAT_RELEASE, parents=[imported], help="checkpoint.pt of the official SMAT code (METHOD §10)",
        formatter_class=HelpFormatter,
        description="Import checkpoint.pt of the official SMAT code. Released files lack the router's keys "
        "and skill tokens: give them with --router-extra (METHOD §10).",
        epilog=_example("smat import smat-official checkpoint.pt --router-extra router.pt --image-size 128 "
                        "--out results/models/released/smat-release/best.pt"))
    smat_official.add_argument("--router-extra", default=None,
                               help="torch file with the router keys and skill tokens the checkpoint lacks")
    smat_official.add_argument("--allow-missing-router", action="store_true",
                               help="without them, use random stand-ins (a different model than the release)")
    import_commands.add_parser(
        PMF_RELEASE, parents=[imported], help="checkpoint.pth / best.pth of PMF's main.py",
        formatter_class=HelpFormatter,
        description="Import PMF's released checkpoint.pth or best.pth (backbone, classifier scale and bias).",
        epilog=_example("smat import pmf best.pth --out results/models/released/pmf-release/best.pt"))

    pretrain = commands.add_parser(
        "pretrain", parents=[device, overrides], help="pre-train the tiny ViT on the train classes of its corpus",
        formatter_class=HelpFormatter,
        description="Supervised pre-training of θ_pre (the embedded default's backbone) on the train classes "
        "of the given stores; deterministic: the same settings give the same weights bit for bit.",
        epilog=_example("smat pretrain --store resources/data/textures resources/data/sketches "
                        "--config config/pretrain/embedded.yaml --out resources/pretrained/vit_tiny_patch4_32.pt"))
    pretrain.set_defaults(func=_pretrain)
    pretrain.add_argument("--store", nargs="+", required=True, help="stores of the pre-training corpus")
    pretrain.add_argument("--config", default=None,
                          help="YAML of pre-training settings, e.g. config/pretrain/embedded.yaml (default: the "
                          "package's settings)")
    pretrain.add_argument("--out", required=True, help="backbone checkpoint (.pt) to write")
    pretrain.add_argument("--weights-out", default=None,
                          help="also write the bare weights as FILE.safetensors (byte-identical for equal weights)")

    train = commands.add_parser(
        "train", parents=[device, overrides], help="meta-tune (SMAT, PMF, SoftMerge)", formatter_class=HelpFormatter,
        description="Meta-tune θ_pre on episodes of the ID stores' train classes, selecting the checkpoint on "
        "their val classes. Writes best.pt, train_log.jsonl and expert_masks.npz (SMAT with gates) into --out, under "
        "temporary names until the run ends; an interrupted run resumes from its resume.pt, a finished one (all "
        "three there) is left as it is.",
        epilog=_example("smat train --config config/training/embedded.yaml --store resources/data/latin-greek "
                        "resources/data/cyrillic --pretrained resources/pretrained/vit_tiny_patch4_32.pt "
                        "--out results/models/smat/tau~0.9/experts~8/seed~0 --set method=smat --set tau=0.9"))
    train.set_defaults(func=_train)
    train.add_argument("--config", required=True,
                       help="YAML of meta-tuning settings (config/training/*.yaml; METHOD §8)")
    train.add_argument("--store", nargs="+", required=True, help="ID stores (train classes; val for selection)")
    train.add_argument("--pretrained", required=True,
                       help="backbone checkpoint θ_pre (`smat fetch` / `smat pretrain`)")
    train.add_argument("--out", required=True, help="model folder to write")

    # One or more datasets per call, so the model is loaded once: --episodes, --store and --out (and
    # --lr-from) take one value per dataset, paired by position.
    per_dataset = argparse.ArgumentParser(add_help=False)
    per_dataset.add_argument("--episodes", nargs="+", required=True, help="frozen episode file per dataset")
    per_dataset.add_argument("--store", nargs="+", required=True, help="store of each episode file")
    per_dataset.add_argument("--out", nargs="+", required=True, help="output file per dataset")
    per_dataset.add_argument("--image-size", nargs="+", default=None, metavar="N",
                             help="evaluation input size, once or per dataset ('model': the model's own; the "
                             "position table is resampled on the fly)")

    evaluate = commands.add_parser(
        "evaluate", parents=[device, per_dataset], help="evaluate a model on frozen episodes of one or more datasets",
        formatter_class=HelpFormatter,
        description="Evaluate one model on the frozen episodes of one or more datasets, without or with "
        "test-time fine-tuning (METHOD §3.4, §3.5); writes one row per episode to a CSV per dataset, with a "
        "JSON summary beside it.",
        epilog=_example("smat evaluate --model results/models/pmf/seed~0/best.pt --episodes "
                        "results/episodes/digits/test.json --store resources/data/digits --finetune none "
                        "--out results/eval/pmf/seed~0/digits/none.csv"))
    evaluate.set_defaults(func=_evaluate)
    evaluate.add_argument("--model", required=True, help="model checkpoint, or pretrained:FILE for Pre")
    evaluate.add_argument("--finetune", choices=list(FINETUNE_MODES), default=NO_FINETUNING,
                          help="test-time fine-tuning: none, all weights, or LoRA adapters")
    evaluate.add_argument("--lr", type=float, default=None, help="fine-tuning lr for every dataset")
    evaluate.add_argument("--lr-from", nargs="+", default=None,
                          help="JSON written by `smat select-lr`, one per dataset")
    evaluate.add_argument("--label", default=None, help="name of this model in tables (default: method)")
    evaluate.add_argument("--limit", type=int, default=None, help="evaluate the first N episodes only")

    select = commands.add_parser(
        "select-lr", parents=[device, per_dataset], help="pick the fine-tuning lr of each dataset",
        formatter_class=HelpFormatter,
        description="Fine-tune on the labelled hps episodes with every learning rate of the grid and write the "
        "best one per dataset to a JSON file, read by `smat evaluate --lr-from` (METHOD §3.5).",
        epilog=_example("smat select-lr --model results/models/pmf/seed~0/best.pt --episodes "
                        "results/episodes/digits/hps.json --store resources/data/digits --finetune full "
                        "--grid 0 0.0001 0.001 --out results/lr/pmf/seed~0/digits/full.json"))
    select.set_defaults(func=_select_lr)
    select.add_argument("--model", required=True, help="model checkpoint, or pretrained:FILE for Pre")
    select.add_argument("--finetune", choices=tuned_modes(), required=True,
                        help="fine-tuning mode whose learning rate is searched")
    select.add_argument("--grid", nargs="+", action="append", default=None, metavar="LR",
                        help="learning rates to try; give once for every dataset or once per dataset "
                             "(`default`: the package's grid)")
    select.add_argument("--n-episodes", type=int, default=5, help="episodes of each file to fine-tune on")

    compare = commands.add_parser(
        "compare", help="paired difference of two result CSVs with its 95%% CI", formatter_class=HelpFormatter,
        description="Mean accuracy difference B − A over the episodes both files share (the same frozen "
        "episodes: a paired comparison), with its 95% CI.",
        epilog=_example("smat compare results/eval/pre/digits/none.csv results/eval/pmf/seed~0/digits/none.csv"))
    compare.set_defaults(func=_compare)
    compare.add_argument("a", help="per-episode CSV of `smat evaluate`: the reference A")
    compare.add_argument("b", help="per-episode CSV of the same episodes: the model B compared with A")

    anatomy = commands.add_parser(
        "anatomy", parents=[device], help="where a model's update from θ_pre lies, and what each part is worth",
        formatter_class=HelpFormatter,
        description="Per tensor group (embeddings; per block attention, MLP, norms; final norm): the share of "
        "‖θ_task − θ_pre‖², each expert's open-gate fraction, and the paired accuracy change on ID and OOD "
        "datasets when that group's update alone is reverted to θ_pre (METHOD §5.6). Writes OUT (CSV) and "
        "OUT.json.",
        epilog=_example("smat anatomy --model results/models/pmf/seed~0/best.pt --pretrained "
                        "resources/pretrained/vit_tiny_patch4_32.pt --datasets latin-greek digits --roles id ood "
                        "--episodes results/episodes/{latin-greek,digits}/test.json --store "
                        "resources/data/{latin-greek,digits} --limit 10 --out results/anatomy/pmf/seed~0.csv"))
    anatomy.set_defaults(func=_anatomy)
    anatomy.add_argument("--model", required=True, help="model checkpoint (trained or imported)")
    anatomy.add_argument("--pretrained", required=True, help="the backbone checkpoint the model departs from (θ_pre)")
    anatomy.add_argument("--datasets", nargs="+", required=True, metavar="NAME", help="dataset names, in order")
    anatomy.add_argument("--roles", nargs="+", required=True, choices=["id", "ood"], help="role of each dataset")
    anatomy.add_argument("--episodes", nargs="+", required=True, help="frozen episode file of each dataset")
    anatomy.add_argument("--store", nargs="+", required=True, help="store of each dataset")
    anatomy.add_argument("--limit", type=int, default=10, help="the first N episodes of each file")
    anatomy.add_argument("--label", default=None, help="name of the model in the table (default: method)")
    anatomy.add_argument("--out", required=True, help="CSV to write (and OUT.json beside it)")

    datasets = argparse.ArgumentParser(add_help=False)
    datasets.add_argument("--id-datasets", nargs="*", default=[], metavar="NAME",
                          help="in-domain datasets, in row order (each must have results)")
    datasets.add_argument("--ood-datasets", nargs="*", default=[], metavar="NAME",
                          help="out-of-domain datasets, in row order (each must have results)")

    tables = commands.add_parser(
        "tables", parents=[datasets], help="build result tables", formatter_class=HelpFormatter,
        description="Write a table as tidy CSV, Markdown and LaTeX (+ provenance): table1 (accuracy per "
        "dataset and model), table2 (the ablations), reference (the paper's published numbers).",
        epilog=_example("smat tables table1 --eval results/eval/pre/digits/none.csv "
                        "results/eval/pmf/seed~0/digits/none.csv --ood-datasets digits --out-dir results/tables"))
    tables.set_defaults(func=_tables)
    tables.add_argument("table", choices=["table1", "table2", "reference", "anatomy"],
                        help="which table (anatomy: --eval takes the CSVs of `smat anatomy`)")
    tables.add_argument("--eval", nargs="*", default=[], help="per-episode CSVs from `smat evaluate`")
    tables.add_argument("--out-dir", required=True, help="folder to write TABLE.{csv,md,tex} into")

    figures = commands.add_parser(
        "figures", parents=[datasets], help="draw analysis figures", formatter_class=HelpFormatter,
        description="Draw one figure of METHOD §5 as PNG and PDF. pareto and dendrogram read eval CSVs (and "
        "need --id-datasets / --ood-datasets), curves and grad-alignment read train_log.jsonl files, capacity "
        "and mask-overlap one expert_masks.npz or a gated model checkpoint (trained or imported by `smat import "
        "smat-official`: the gate panels need no training).",
        epilog=_example("smat figures mask-overlap --inputs results/models/smat/tau~0.9/experts~8/seed~0/"
                        "expert_masks.npz --out-prefix results/figures/mask_overlap"))
    figures.set_defaults(func=_figures)
    figures.add_argument("figure", choices=list(FIGURES), help="which figure")
    figures.add_argument("--inputs", nargs="+", required=True, help="the files the figure reads (see above)")
    figures.add_argument("--out-prefix", required=True, help="writes PREFIX.png and PREFIX.pdf")
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run one command. Every failure is one line on stderr, `smat: error: ...` (exit 2 for input, disk and
    library errors, 1 for anything unforeseen); `--debug` or SMAT_DEBUG=1 shows the traceback instead."""
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    debug = args.debug or os.environ.get("SMAT_DEBUG", "") not in ("", "0")
    try:
        _check_numbers(args)
        outputs, inputs = _io_paths(args)
        check_outputs(outputs, inputs)
        for path, _ in outputs:            # before the work, so that hours of it are not lost to a read-only --out
            check_writable(path)
        args.func(args)
    except KeyboardInterrupt:
        print("smat: interrupted", file=sys.stderr)
        return 130
    except Exception as err:  # noqa: BLE001  (the one place that turns every failure into a message)
        if debug:
            raise
        print(f"smat: error: {describe_error(err)}", file=sys.stderr)
        return 2 if isinstance(err, (SmatError, OSError, RuntimeError, ValueError, MemoryError)) else 1
    return 0


def _as_list(value) -> list:
    return [] if value is None else value if isinstance(value, list) else [value]


_OS_HINTS = {
    errno.ENOSPC: "the disk is full: free space or write elsewhere",
    errno.EDQUOT: "the disk quota is exceeded: free space or write elsewhere",
    errno.EACCES: "permission denied: choose a path you may write, or fix its permissions",
    errno.EROFS: "the file system is read-only: write elsewhere",
    errno.ENOENT: "no such file or folder",
}


def describe_error(err: Exception) -> str:
    """One line for any exception: ours as they are, OS errors with the file and what to do, others by type."""
    if isinstance(err, SmatError):
        return str(err)
    if is_disk_full(err) and not isinstance(err, OSError):   # a writer outside smat.io's (torch's zip writer)
        return str(disk_full_error("a file", err))
    if isinstance(err, OSError) and err.errno in _OS_HINTS:
        where = err.filename or "a file"
        return f"{where}: {_OS_HINTS[err.errno]} ({err.strerror})"
    if isinstance(err, OSError):
        return f"{err.filename or 'a file'}: {err.strerror or err}"
    if isinstance(err, MemoryError) or "out of memory" in str(err).lower():
        return (f"out of memory ({type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}); use "
                "smaller episodes or batches, or a machine with more memory")
    text = str(err).strip().splitlines()
    detail = f"{type(err).__name__}: {text[0]}" if text else type(err).__name__
    if isinstance(err, (RuntimeError, ValueError)):
        return f"{detail} (run with --debug for the traceback)"
    return f"unexpected {detail}; please report it with the output of the same command with --debug"


if __name__ == "__main__":
    sys.exit(main())

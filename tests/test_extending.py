"""Each of the package's tables takes a new entry with no other edit (docs/ARCHITECTURE.md, "How to add ..."):
a source format, a fine-tuning mode and a figure registered at run time are used by the command line and the
workflow. (A method: tests/test_registry.py.)"""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest
import torch
import yaml
from PIL import Image
from test_evaluation import CPU, build_smat, toy  # noqa: F401  (fixtures)
from test_registry import dry_run_all

from smat import rule_args
from smat.analysis.figures import FIGURES, Figure, make_figure
from smat.cli import build_parser, main
from smat.data.episodes import load_episode_file
from smat.data.formats import SOURCE_FORMATS, SourceFormat
from smat.data.store import SourceClass, Store, write_store
from smat.evaluation.evaluate import EpisodeRunner
from smat.evaluation.modes import FINETUNE_MODES, FinetuneMode, tuned_modes

ROOT = Path(__file__).resolve().parent.parent


def flat_files(name, src, out, options):
    """A reader of a format the package does not know: CLASS-INDEX.png files in one folder, all test classes."""
    by_class: dict[str, list[Path]] = {}
    for path in sorted(src.glob("*.png")):
        by_class.setdefault(path.stem.rsplit("-", 1)[0], []).append(path)
    classes = [SourceClass(c, "test", None, paths) for c, paths in sorted(by_class.items())]
    return write_store(out, classes, domain=options.domain or name, source=src, image_size=options.image_size,
                       workers=options.workers)


def test_a_source_format_added_to_its_table_converts_and_is_wired(monkeypatch, tmp_path):
    monkeypatch.setitem(SOURCE_FORMATS, "flat", SourceFormat("flat", "CLASS-INDEX.png files", flat_files))
    src = tmp_path / "src"
    src.mkdir()
    for c, colour in (("a", (200, 0, 0)), ("b", (0, 0, 200))):
        for i in range(3):
            Image.new("RGB", (8, 8), tuple(min(255, v + 20 * i) for v in colour)).save(src / f"{c}-{i}.png")
    assert main(["data", "convert", "flat", str(src), "--out", str(tmp_path / "store"), "--image-size", "4"]) == 0
    store = Store(tmp_path / "store")
    assert [(c.name, c.split, c.n_images) for c in store.classes] == [("a", "test", 3), ("b", "test", 3)]
    assert store.image_size == 4 and store.domain == "flat"

    config = yaml.safe_load((ROOT / "config" / "config.yaml").read_text())
    config["datasets"] = {"x": {"role": "ood", "source": {"flat": str(src)}, "image_size": 4, "splits": None}}
    assert rule_args.source_format(config, "x") == "flat"
    assert rule_args.conversion_args(config, "x") == "--image-size 4 --role ood"   # no split of its own


def test_a_finetuning_mode_added_to_its_table_is_evaluated(monkeypatch, toy):  # noqa: F811
    """A mode that trains the backbone at a tenth of the searched lr: the CLI takes it, the evaluation runs it,
    and at lr × 0.1 it is the `full` mode at a tenth of the lr."""
    monkeypatch.setitem(FINETUNE_MODES, "full-slow", FinetuneMode("full-slow", "+slow", 0.1, trains="backbone"))
    assert "full-slow" in tuned_modes()
    store = Store(toy.store)
    episodes, meta = load_episode_file(toy.small, store)
    torch.manual_seed(0)
    model = build_smat()
    def run(mode, lr):
        return EpisodeRunner(model, store, mode, CPU, steps=3).run(episodes[:1], [0], meta["seed"], lr, progress=False)

    slow, full = run("full-slow", 1e-1), run("full", 1e-2)
    assert slow[0]["loss"] == pytest.approx(full[0]["loss"], rel=1e-5)
    args = build_parser().parse_args(["evaluate", "--model", "m.pt", "--episodes", "e.json", "--store", "s",
                                      "--out", "e.csv", "--finetune", "full-slow"])
    assert args.finetune == "full-slow"


def test_a_figure_added_to_its_table_is_drawn_and_gets_its_rule(monkeypatch, tmp_path):
    module = tmp_path / "toy_figure.py"
    module.write_text(textwrap.dedent("""
        def make(inputs, out_prefix, id_datasets, ood_datasets):
            for suffix in ("png", "pdf"):
                out_prefix.with_name(out_prefix.name + "." + suffix).write_text(" ".join(p.name for p in inputs))
    """))
    monkeypatch.syspath_prepend(str(tmp_path))
    entry = Figure("toy-figure", "toy_figure:make", models="trained", reads="train_log")
    monkeypatch.setitem(FIGURES, "toy-figure", entry)
    make_figure("toy-figure", [tmp_path / "a.jsonl"], tmp_path / "toy", [], [])
    assert (tmp_path / "toy.png").read_text() == "a.jsonl"
    assert "results/figures/toy_figure.png" in rule_args.all_figures()

    # The workflow, in a process of its own that registers the entry first: `all` has the figure's rule.
    plan = dry_run_all(tmp_path, 'from smat.analysis.figures import FIGURES, Figure\n'
                                 'FIGURES["toy-figure"] = Figure("toy-figure", "toy_figure:make", models="trained", '
                                 'reads="train_log")')
    line = next(line for line in plan.splitlines() if "smat figures toy-figure" in line)
    assert "results/models/pmf/seed~0/train_log.jsonl" in line and "--out-prefix results/figures/toy_figure" in line

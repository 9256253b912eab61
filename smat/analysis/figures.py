"""The figures (METHOD §5) as one table: `smat figures NAME` dispatches through it, and the workflow makes one
rule per entry from it (workflow/rules/figures.smk). Adding a figure is its module plus one entry here (and a
report caption, workflow/report/FILE.rst).

This module imports no plotting library at load time: the workflow reads the table when it starts.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from smat.io import SmatError


@dataclass(frozen=True)
class Figure:
    name: str                   # `smat figures NAME`
    maker: str                  # "module:function", make(inputs, out_prefix, id_datasets, ood_datasets)
    models: str                 # which models it shows: a role of `smat.experiment.ModelSet.figure_models`
    reads: str                  # what of each model: eval (CSVs without fine-tuning), train_log, expert_masks,
                                # or anatomy (the CSVs of `smat anatomy`)
    one_model: bool = False     # drawn from the first model of its role only
    panels: tuple[str, ...] = ("",)   # it writes out_prefix + panel + .png/.pdf for each panel

    @property
    def file(self) -> str:
        """Its file name under results/figures/ (without panel and suffix)."""
        return self.name.replace("-", "_")

    @property
    def needs_datasets(self) -> bool:
        return self.reads == "eval"


FIGURES: dict[str, Figure] = {f.name: f for f in (
    Figure("pareto", "smat.analysis.pareto:make", models="pareto", reads="eval"),
    Figure("grad-alignment", "smat.analysis.grad_alignment:make", models="alignment", reads="train_log"),
    Figure("capacity", "smat.analysis.capacity:make", models="gated", reads="expert_masks", one_model=True,
           panels=("_type", "_depth")),
    Figure("dendrogram", "smat.analysis.dendrogram:make", models="gated", reads="eval", one_model=True),
    Figure("mask-overlap", "smat.analysis.mask_overlap:make", models="gated", reads="expert_masks",
           one_model=True),
    Figure("curves", "smat.analysis.training_curves:make", models="trained", reads="train_log"),
    Figure("anatomy", "smat.analysis.anatomy:make", models="anatomy", reads="anatomy"),
)}


def make_figure(figure: str, inputs: Sequence[Path], out_prefix: Path, id_datasets: Sequence[str],
                ood_datasets: Sequence[str]) -> None:
    if figure not in FIGURES:
        raise SmatError(f"unknown figure {figure!r}; choose one of {', '.join(FIGURES)}")
    if not inputs:
        raise SmatError(f"{figure}: no input files given (--inputs)")
    module, function = FIGURES[figure].maker.split(":")
    make = getattr(importlib.import_module(module), function)
    make([Path(p) for p in inputs], Path(out_prefix), list(id_datasets), list(ood_datasets))

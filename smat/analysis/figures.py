"""`smat figures FIGURE`: dispatch to the module that draws it (one module per figure, METHOD §5)."""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

from smat.analysis import anatomy, capacity, curves, dendrogram, grad_alignment, mask_overlap, pareto
from smat.io import SmatError

# Each module's make(inputs, out_prefix, id_datasets, ood_datasets) writes out_prefix.{png,pdf}
# (capacity: out_prefix_type.* and out_prefix_depth.*).
FIGURES = {
    "pareto": pareto.make,               # eval CSVs without fine-tuning
    "grad-alignment": grad_alignment.make,   # train_log.jsonl files
    "capacity": capacity.make,           # one expert_masks.npz
    "dendrogram": dendrogram.make,       # eval CSVs of one SMAT model
    "mask-overlap": mask_overlap.make,   # one expert_masks.npz
    "curves": curves.make,               # train_log.jsonl files
    "anatomy": anatomy.make,             # CSVs of `smat anatomy`
}


def make_figure(figure: str, inputs: Sequence[Path], out_prefix: Path, id_datasets: Sequence[str],
                ood_datasets: Sequence[str]) -> None:
    if figure not in FIGURES:
        raise SmatError(f"unknown figure {figure!r}; choose one of {', '.join(FIGURES)}")
    if not inputs:
        raise SmatError(f"{figure}: no input files given (--inputs)")
    FIGURES[figure]([Path(p) for p in inputs], Path(out_prefix), list(id_datasets), list(ood_datasets))

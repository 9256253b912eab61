"""`smat select-lr`: the per-dataset fine-tuning learning rate, searched on a few labelled episodes (METHOD §3.5).

The workflow passes a separate frozen "hps" episode file, sampled from the test split with another seed, so
the episodes that choose the lr are not the ones it is then scored on (the released code reuses its test
loader; METHOD §3.4). The chosen lr is written to LR.json, which `smat evaluate --lr-from` reads.
One call may search several datasets (`select_lr_many`), each with its own grid; the model is loaded once.
"""

from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Sequence

from smat.device import resolve_device
from smat.evaluation.evaluate import (DatasetRun, EpisodeRunner, check_image_sizes, input_hashes,
                                      load_model_with_info, model_file, read_datasets)
from smat.evaluation.modes import tuned_modes
from smat.io import SmatError, provenance, write_json
from smat.methods.registry import display_name

log = logging.getLogger(__name__)

# Meta-Dataset grid of the SMAT tester; 0 = no fine-tuning (METHOD §3.5).
DEFAULT_GRID = (0.0, 1e-6, 1e-5, 1e-4, 1e-3, 1e-2, 0.1)


def best_lr(grid: Sequence[float], scores: Sequence[float | None]) -> float:
    """The lr with the highest score: strictly greater wins, so the first lr of a tie is kept (METHOD §3.5).
    A score of None (fine-tuning diverged) never wins."""
    best, best_score = None, -math.inf
    for lr, score in zip(grid, scores):
        if score is not None and score > best_score:
            best, best_score = lr, score
    if best is None:
        raise SmatError(f"--grid {list(grid)}: fine-tuning diverged (non-finite logits) at every learning rate; "
                        "add smaller ones, or 0 (no fine-tuning)")
    return best


def check_grid(grid: Sequence[float] | None) -> list[float]:
    """The grid to search (DEFAULT_GRID for None), checked."""
    grid = list(DEFAULT_GRID if grid is None else grid)
    if not grid:
        raise SmatError("--grid is empty: give at least one learning rate (e.g. 0 1e-5 1e-4 1e-3)")
    bad = [lr for lr in grid if not math.isfinite(lr) or lr < 0]
    if bad:
        raise SmatError(f"--grid: learning rate(s) {bad} must be finite numbers >= 0 (0 = no fine-tuning)")
    if len(set(grid)) != len(grid):
        raise SmatError(f"--grid {grid}: a learning rate is listed twice")
    return grid


def select_lr(model_spec: str, episodes_path: Path, store_path: Path, finetune: str,
              grid: Sequence[float] | None = None, n_episodes: int = 5, out: Path = Path("lr.json"),
              device: str = "auto", progress: bool = True) -> float:
    """Fine-tune on the first `n_episodes` episodes with every lr of `grid`; write LR.json, return the best lr.

    LR.json: {"dataset", "finetune", "grid", "scores": {str(lr): mean accuracy % or null if diverged}, "best_lr",
    "n_episodes",
    "model_id", "provenance"}. Every lr sees the same episodes with the same seeds, so the scores are paired.
    """
    return select_lr_many(model_spec, [episodes_path], [store_path], [out], finetune, grids=[grid],
                          n_episodes=n_episodes, device=device, progress=progress)[0]


def select_lr_many(model_spec: str, episodes_paths: Sequence[Path], store_paths: Sequence[Path],
                   outs: Sequence[Path], finetune: str, grids: Sequence[Sequence[float] | None] = (None,),
                   n_episodes: int = 5, device: str = "auto", progress: bool = True,
                   image_sizes: Sequence[int | None] = (None,)) -> list[float]:
    """`select_lr` on each (episodes, store) pair in turn with the model loaded once: pair i writes outs[i].

    `grids` holds one grid for every dataset, or one per dataset in the same order (None: DEFAULT_GRID).
    Every input is checked before the model is loaded. Returns the best lrs, in the same order.
    """
    if finetune not in tuned_modes():
        raise SmatError(f"--finetune {finetune!r}: the lr search is for {' or '.join(tuned_modes())} fine-tuning")
    if len(grids) not in (1, len(episodes_paths)):
        raise SmatError(f"--grid: given {len(grids)} times for {len(episodes_paths)} --episodes; give it once "
                        f"(for every dataset) or once per dataset, in the same order")
    grids = [check_grid(grid) for grid in grids]
    if len(grids) == 1:
        grids = grids * len(episodes_paths)
    if n_episodes < 1:
        raise SmatError(f"--n-episodes {n_episodes}: must be at least 1")
    model_file(model_spec)     # a missing model fails before the datasets are read
    torch_device = resolve_device(device)
    runs = read_datasets(episodes_paths, store_paths, outs, n_episodes, image_sizes)
    model, info = load_model_with_info(model_spec, torch_device)
    check_image_sizes(model, runs)
    runner = EpisodeRunner(model, runs[0].store, finetune, torch_device)
    return [_select_one(runner.on_store(run.store, run.image_size), run, grid, model_spec, info, progress)
            for run, grid in zip(runs, grids)]


def _select_one(runner: EpisodeRunner, run: DatasetRun, grid: list[float], model_spec: str, info: dict,
                progress: bool) -> float:
    """Score every lr of `grid` on one dataset's episodes; write its LR.json and return the best lr."""
    name, domain, finetune = display_name(info["method"]), run.store.domain, runner.finetune
    scores = []
    per_lr = runner.run_lrs(run.episodes, range(len(run.episodes)), int(run.meta.get("seed", 0)), grid,
                            progress=progress, desc=f"lr search {name} {domain} {finetune}")
    for lr, results in zip(grid, per_lr):     # every (lr, episode) pair fine-tuned in shared batches
        accuracy = sum(r["accuracy"] for r in results) / len(results)
        scores.append(None if math.isnan(accuracy) else accuracy)
        log.info("%s %s %s lr=%g: %s", name, domain, finetune, lr,
                 "diverged (non-finite logits)" if scores[-1] is None else f"{accuracy:.2f}%")
    chosen = best_lr(grid, scores)
    write_json(run.out, {
        "dataset": domain,
        "finetune": finetune,
        "grid": grid,
        "scores": {str(lr): score for lr, score in zip(grid, scores)},
        "best_lr": chosen,
        "n_episodes": len(run.episodes),
        "model_id": info["model_id"],
        "provenance": provenance(model=model_spec, episodes_file=str(run.episodes_path), **input_hashes(run, info),
                                 device=str(runner.device),
                                 finetune_batch=runner.budget_record()),
    })
    return chosen

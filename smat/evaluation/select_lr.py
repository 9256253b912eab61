"""`smat select-lr`: the per-dataset fine-tuning learning rate, searched on a few labelled episodes (spec §3.5).

The workflow passes a separate frozen "hps" episode file, sampled from the test split with another seed, so
the episodes that choose the lr are not the ones it is then scored on (the released code reuses its test
loader; spec §3.4). The chosen lr is written to LR.json, which `smat evaluate --lr-from` reads.
"""

from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Sequence

from smat.device import resolve_device
from smat.evaluation.evaluate import DISPLAY_NAMES, EpisodeRunner, load_episodes, load_model_with_info
from smat.io import SmatError, provenance, sha256_file, write_json

log = logging.getLogger(__name__)

# Meta-Dataset grid of the SMAT tester; 0 = no fine-tuning (spec §3.5).
DEFAULT_GRID = (0.0, 1e-6, 1e-5, 1e-4, 1e-3, 1e-2, 0.1)


def best_lr(grid: Sequence[float], scores: Sequence[float]) -> float:
    """The lr with the highest score: strictly greater wins, so the first lr of a tie is kept (spec §3.5)."""
    best, best_score = grid[0], scores[0]
    for lr, score in zip(grid[1:], scores[1:]):
        if score > best_score:
            best, best_score = lr, score
    return best


def select_lr(model_spec: str, episodes_path: Path, store_path: Path, finetune: str,
              grid: Sequence[float] | None = None, n_episodes: int = 5, out: Path = Path("lr.json"),
              device: str = "auto", progress: bool = True) -> float:
    """Fine-tune on the first `n_episodes` episodes with every lr of `grid`; write LR.json, return the best lr.

    LR.json: {"dataset", "finetune", "grid", "scores": {str(lr): mean accuracy %}, "best_lr", "n_episodes",
    "model_id", "provenance"}. Every lr sees the same episodes with the same seeds, so the scores are paired.
    """
    from smat.data.store import Store

    if finetune not in ("full", "lora"):
        raise SmatError(f"--finetune {finetune!r}: the lr search is for full or lora fine-tuning")
    grid = list(DEFAULT_GRID if grid is None else grid)
    if not grid:
        raise SmatError("--grid is empty: give at least one learning rate (e.g. 0 1e-5 1e-4 1e-3)")
    bad = [lr for lr in grid if not math.isfinite(lr) or lr < 0]
    if bad:
        raise SmatError(f"--grid: learning rate(s) {bad} must be finite numbers >= 0 (0 = no fine-tuning)")
    if len(set(grid)) != len(grid):
        raise SmatError(f"--grid {grid}: a learning rate is listed twice")
    if n_episodes < 1:
        raise SmatError(f"--n-episodes {n_episodes}: must be at least 1")
    torch_device = resolve_device(device)
    store = Store(Path(store_path))
    episodes, meta = load_episodes(episodes_path, store, n_episodes)
    model, info = load_model_with_info(model_spec, torch_device)
    runner = EpisodeRunner(model, store, finetune, torch_device)
    name = DISPLAY_NAMES.get(model.method, model.method)
    scores = []
    for lr in grid:
        results = runner.run(episodes, range(len(episodes)), int(meta.get("seed", 0)), lr, progress=progress,
                             desc=f"lr search {name} {store.domain} {finetune} lr={lr:g}")
        scores.append(sum(r["accuracy"] for r in results) / len(results))
        log.info("%s %s %s lr=%g: %.2f%%", name, store.domain, finetune, lr, scores[-1])
    chosen = best_lr(grid, scores)
    write_json(out, {
        "dataset": store.domain,
        "finetune": finetune,
        "grid": grid,
        "scores": {str(lr): score for lr, score in zip(grid, scores)},
        "best_lr": chosen,
        "n_episodes": len(episodes),
        "model_id": info["model_id"],
        "provenance": provenance(model=model_spec, episodes_file=str(episodes_path),
                                 episodes_sha256=sha256_file(episodes_path), device=str(torch_device)),
    })
    return chosen

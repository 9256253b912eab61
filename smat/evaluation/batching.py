"""How many episodes are fine-tuned in one batch (`smat.evaluation.finetune`).

A batch is bounded by episodes and by images: the padded images of one forward (clean and augmented support
of every episode: 2 · episodes · largest support). Episodes are sorted by support size before they are cut
into batches, so padding stays small; results do not depend on the batching.

* CPU: fixed bounds, `CPU_BUDGET` (measured in benchmarks/README.md: beyond them throughput no longer rises
  and memory does).
* CUDA: the largest batch that fits, found once per image size by fine-tuning copies of the run's largest
  episode for one step at 1, 2, 4, ... episodes until memory runs out (or `CUDA_MAX_EPISODES`). Should a
  batch still run out of memory, it is split in two and the bound lowered.

The bounds used are recorded in the provenance of every result file (`BatchBudget.record`).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Callable, Sequence


@dataclass
class BatchBudget:
    episodes: int       # most episodes per batch
    images: int         # most padded images per forward: 2 · episodes · largest support
    how: str            # "fixed" (CPU) or how it was measured

    def record(self) -> dict:
        return asdict(self)


CPU_BUDGET = BatchBudget(episodes=16, images=640, how="fixed (CPU)")
CUDA_MAX_EPISODES = 256


def plan_batches(support_sizes: Sequence[int], budget: BatchBudget) -> list[list[int]]:
    """Indices of `support_sizes` cut into batches within `budget`, smallest supports first."""
    batches: list[list[int]] = []
    batch: list[int] = []
    for index in sorted(range(len(support_sizes)), key=lambda i: support_sizes[i]):
        grown = batch + [index]
        if batch and (len(grown) > budget.episodes or
                      2 * len(grown) * max(support_sizes[i] for i in grown) > budget.images):
            batches.append(batch)
            grown = [index]
        batch = grown
    return batches + [batch] if batch else batches


def measure_cuda_budget(try_batch: Callable[[int], None], support_size: int, limit: int) -> BatchBudget:
    """The largest batch of episodes of `support_size` images for which `try_batch(n)` (one fine-tuning step
    of n copies of such an episode) does not run out of CUDA memory, doubling n up to `limit`."""
    import torch

    fits = 0
    n = 1
    while n <= min(limit, CUDA_MAX_EPISODES):
        try:
            try_batch(n)
        except torch.OutOfMemoryError:
            break
        finally:
            torch.cuda.empty_cache()
        fits, n = n, 2 * n
    if fits == 0:
        raise torch.OutOfMemoryError(f"one episode of {support_size} support images does not fit in CUDA memory")
    # Smaller episodes may fill the same images with more episodes; a batch that then runs out of memory is
    # split (EpisodeRunner).
    stop = min(limit, CUDA_MAX_EPISODES)
    return BatchBudget(episodes=CUDA_MAX_EPISODES, images=2 * fits * support_size,
                       how=f"measured on {torch.cuda.get_device_name()}: {fits} episodes of {support_size} "
                           f"support images fit (doubling, stopped at out-of-memory or {stop})")

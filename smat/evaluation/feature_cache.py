"""Embed each distinct image of an episode file once, for models whose features do not depend on the task.

Pre and PMF without fine-tuning run the same backbone weights on every episode, and frozen episodes share
many images, so each image is embedded once (batched, inference mode) and the features are looked up per
episode. Task-dependent models (SMAT, SoftMerge) and fine-tuning cannot use this.
"""

from __future__ import annotations

from typing import Callable, Sequence

import numpy as np
import torch
from torch import Tensor

from smat.progress import progress_bar

CHUNK = 256


class FeatureCache:
    """Features of the distinct (class id, image id) pairs of a list of episodes, on the model's device."""

    def __init__(self, rows: dict[tuple[int, int], int], features: Tensor) -> None:
        self.rows = rows
        self.features = features

    @classmethod
    def build(cls, embed: Callable[[Tensor], Tensor], store, episodes: Sequence, transform,
              device: torch.device, chunk: int = CHUNK, progress: bool = True) -> "FeatureCache":
        """`embed(x)` maps a normalised image batch on `device` to features; called on chunks of `chunk` images."""
        keys = sorted({(c, i) for episode in episodes for label, c in enumerate(episode.classes)
                       for part in (episode.support, episode.query) for i in part[label]})
        rows = {key: row for row, key in enumerate(keys)}
        parts = []
        with torch.inference_mode():
            for start in progress_bar(range(0, len(keys), chunk), desc="embedding test images", unit="chunk",
                              disable=not progress, leave=False):
                x = _load(store, keys[start:start + chunk], transform).to(device)
                parts.append(embed(x))
        return cls(rows, torch.cat(parts))

    def lookup(self, episode) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """(support_f, support_y, query_f, query_y) of an episode; labels follow `episode.classes` order."""
        support, support_y, query, query_y = [], [], [], []
        for label, c in enumerate(episode.classes):
            support += [self.rows[(c, i)] for i in episode.support[label]]
            support_y += [label] * len(episode.support[label])
            query += [self.rows[(c, i)] for i in episode.query[label]]
            query_y += [label] * len(episode.query[label])
        device = self.features.device
        as_index = lambda values: torch.tensor(values, dtype=torch.long, device=device)  # noqa: E731
        return (self.features[as_index(support)], as_index(support_y),
                self.features[as_index(query)], as_index(query_y))


def _load(store, keys: Sequence[tuple[int, int]], transform) -> Tensor:
    """Transformed images of `keys`, read from the store one class at a time (keys are sorted by class)."""
    batches, start = [], 0
    while start < len(keys):
        c = keys[start][0]
        end = start
        while end < len(keys) and keys[end][0] == c:
            end += 1
        batches.append(store.images(c, [i for _, i in keys[start:end]]))
        start = end
    return transform(np.concatenate(batches))

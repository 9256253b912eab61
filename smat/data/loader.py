"""Turn an episode (class and image ids) into support/query tensors ready for a model."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch
from torch import Tensor

from smat.data.episodes import Episode
from smat.data.store import Store


@dataclass
class EpisodeTensors:
    support_x: Tensor   # float (Ns, 3, S, S), normalised
    support_y: Tensor   # long (Ns,), labels 0..n_way-1
    query_x: Tensor
    query_y: Tensor
    n_way: int

    def to(self, device: torch.device | str) -> EpisodeTensors:
        return EpisodeTensors(self.support_x.to(device), self.support_y.to(device), self.query_x.to(device),
                              self.query_y.to(device), self.n_way)


def load_episode(store: Store, episode: Episode, transform: Callable[..., Tensor],
                 generator: torch.Generator | None = None) -> EpisodeTensors:
    """Read the episode's images (support, then query; class by class) and transform them in one batch.

    The label of an image is the index of its class in `episode.classes`. `generator` is passed to the
    transform (train transforms draw their random parameters from it); test transforms take none.
    """
    support = [store.images(c, ids) for c, ids in zip(episode.classes, episode.support)]
    query = [store.images(c, ids) for c, ids in zip(episode.classes, episode.query)]
    images = np.concatenate(support + query)
    x = transform(images) if generator is None else transform(images, generator)
    support_y = _labels([len(ids) for ids in episode.support])
    query_y = _labels([len(ids) for ids in episode.query])
    n_support = len(support_y)
    return EpisodeTensors(x[:n_support], support_y.to(x.device), x[n_support:], query_y.to(x.device),
                          len(episode.classes))


def _labels(counts: list[int]) -> Tensor:
    return torch.repeat_interleave(torch.arange(len(counts)), torch.tensor(counts, dtype=torch.long))

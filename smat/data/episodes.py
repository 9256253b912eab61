"""Episodes: which classes and which images form a few-shot task, how they are drawn, and episode files.

Two samplers share one implementation (METHOD §3.1):
* variable-way variable-shot (Meta-Dataset): classes from the store's hierarchy (flat, groups or DAG), query
  size q = min(max_query, min_c floor(n_c/2)), support size S = min(max_support, sum_c floor(beta*min(
  max_support_per_class, n_c - q)) + 1), imbalanced shots k_c = min(floor(p_c*(S - ways)) + 1, n_c - q);
* fixed ways (`ways=N`), optionally fixed shots (`shots=K`) and queries (`queries=Q`): N classes uniformly,
  no hierarchy; without Q the query rule with a fixed shot is q = min(max_query, min_c n_c - K).
  Classes with too few images for K shots + Q queries are dropped from the candidate pool with a warning
  (and listed in the episode file) instead of failing the whole dataset.

Every draw comes from one explicitly seeded numpy Generator, so a seed fixes the episodes. Evaluation episodes
are sampled once into a file (`smat episodes sample`) that every method reads.
"""

from __future__ import annotations

import logging
import math
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from smat.data.hierarchy import DagHierarchy, FlatHierarchy, GroupHierarchy, build_hierarchy
from smat.data.store import SPLITS, Store
from smat.io import SmatError, read_json_sha256, write_json

log = logging.getLogger(__name__)

FORMAT = "smat-episodes/1"
# Meta-Dataset's class-imbalance weights: n_c * exp(U(log 1/2, log 2)) (METHOD §3.1 rule 4).
MIN_LOG_WEIGHT, MAX_LOG_WEIGHT = math.log(0.5), math.log(2.0)


@dataclass
class Episode:
    classes: list[int]          # store class ids; the episode label of classes[i] is i
    support: list[list[int]]    # image ids per class
    query: list[list[int]]      # image ids per class


@dataclass(frozen=True)
class SamplerConfig:
    """Variable-way variable-shot limits (METHOD §3.1 defaults)."""

    min_ways: int = 5
    max_ways: int = 50
    max_query: int = 10
    max_support: int = 500
    max_support_per_class: int = 100

    def __post_init__(self) -> None:
        if not 2 <= self.min_ways <= self.max_ways:
            raise ValueError(f"need 2 <= min_ways <= max_ways, got min_ways={self.min_ways}, "
                             f"max_ways={self.max_ways}")
        if self.max_query < 1 or self.max_support_per_class < 1:
            raise ValueError("max_query and max_support_per_class must be at least 1")
        if self.max_support < self.max_ways:
            raise ValueError(f"max_support ({self.max_support}) must be at least max_ways ({self.max_ways}): "
                             "every class needs one support image")


class EpisodeSampler:
    """Draws episodes from one split of a store; built by `make_sampler`."""

    def __init__(self, store: Store, split: str, config: SamplerConfig, ways: int | None = None,
                 shots: int | None = None, queries: int | None = None) -> None:
        self.config, self.ways, self.shots, self.queries = config, ways, shots, queries
        self.n_images = np.array([c.n_images for c in store.classes], dtype=np.int64)
        self.hierarchy_kind = store.hierarchy if ways is None else "flat"
        self.dropped: list[int] = []  # classes left out of a fixed-way pool for having too few images
        class_ids = store.class_ids(split)
        try:
            self.classes = self._class_sampler(store, class_ids)
        except SmatError as err:
            raise SmatError(f"store {store.root}, split {split!r}: {err}") from None

    def _class_sampler(self, store: Store, class_ids: list[int]) -> FlatHierarchy | GroupHierarchy | DagHierarchy:
        """Variable way: the store's hierarchy (METHOD §3.1 rule 1). Fixed way: flat, over classes with enough
        images for the shots and queries."""
        ways, shots, queries = self.ways, self.shots, self.queries
        if ways is None:
            if shots is not None or queries is not None:
                raise SmatError("fixed shots or queries need a fixed number of ways (--ways)")
            return build_hierarchy(store, class_ids, self.config.min_ways)
        if ways < 2 or (shots is not None and shots < 1) or (queries is not None and queries < 1):
            raise SmatError(f"need ways >= 2, shots >= 1, queries >= 1; got {ways}, {shots}, {queries}")
        if shots is None and ways > self.config.max_support:
            raise SmatError(f"{ways} ways need max_support >= {ways} (one support image per class)")
        needed = (shots or 1) + (queries or 1)
        self.dropped = [c for c in class_ids if self.n_images[c] < needed]
        if self.dropped:
            log.warning("%s: %d class(es) with fewer than %d images left out of the candidate pool: %s",
                        store.root, len(self.dropped), needed,
                        ", ".join(store.classes[c].name for c in self.dropped[:10]))
        return FlatHierarchy([c for c in class_ids if self.n_images[c] >= needed], ways)

    def sample(self, rng: np.random.Generator) -> Episode:
        if self.ways is None:
            classes = self.classes.sample_classes(rng, self.config.min_ways, self.config.max_ways)
        else:
            classes = self.classes.sample_classes(rng, self.ways, self.ways)
        n = self.n_images[classes]
        q = self._query_size(n)
        shots = np.full(len(classes), self.shots) if self.shots is not None else self._variable_shots(rng, n, q)
        support, query = [], []
        for k, n_c in zip(shots.tolist(), n.tolist()):
            order = rng.permutation(n_c).tolist()  # METHOD §3.1 rule 5: first k_c support, next q query
            support.append(order[:k])
            query.append(order[k:k + q])
        return Episode(classes=classes, support=support, query=query)

    def _query_size(self, n: np.ndarray) -> int:
        if self.queries is not None:
            return self.queries
        if self.shots is not None:
            return int(min(self.config.max_query, (n - self.shots).min()))
        return int(min(self.config.max_query, (n // 2).min()))

    def _variable_shots(self, rng: np.random.Generator, n: np.ndarray, q: int) -> np.ndarray:
        remaining = n - q
        beta = rng.uniform()
        contributions = np.floor(beta * np.minimum(self.config.max_support_per_class, remaining) + 1)
        support_size = min(self.config.max_support, int(contributions.sum()))
        weights = n * np.exp(rng.uniform(MIN_LOG_WEIGHT, MAX_LOG_WEIGHT, size=len(n)))
        desired = np.floor(weights / weights.sum() * (support_size - len(n))).astype(np.int64) + 1
        return np.minimum(desired, remaining)

    def describe(self) -> dict[str, Any]:
        """How the episodes were drawn, for the episode file."""
        return {"ways": self.ways, "shots": self.shots, "queries": self.queries, "hierarchy": self.hierarchy_kind,
                "config": asdict(self.config), "dropped_classes": self.dropped}


def make_sampler(store: Store, split: str, config: SamplerConfig = SamplerConfig(), ways: int | None = None,
                 shots: int | None = None, queries: int | None = None) -> EpisodeSampler:
    """Variable-way variable-shot sampler when `ways` is None, else fixed N-way (K-shot, Q-query) sampler."""
    return EpisodeSampler(store, split, config, ways=ways, shots=shots, queries=queries)


def sample_episodes(store: Store, split: str, n: int, seed: int, ways: int | None = None, shots: int | None = None,
                    queries: int | None = None) -> list[Episode]:
    return _sample(store, split, n, seed, ways, shots, queries)[1]


def sample_to_file(store_root: str | os.PathLike, split: str, n: int, seed: int, out: str | os.PathLike,
                   ways: int | None = None, shots: int | None = None, queries: int | None = None) -> None:
    """Freeze `n` episodes of `split` in a JSON file; the same arguments always give the same bytes."""
    store = Store(store_root)
    sampler, episodes = _sample(store, split, n, seed, ways, shots, queries)
    write_episode_file(out, store, split, seed, sampler, episodes)
    log.info("%s: %d episodes of %s/%s (seed %d)", out, n, store.domain, split, seed)


def write_episode_file(out: str | os.PathLike, store: Store, split: str, seed: int, sampler: EpisodeSampler,
                       episodes: Sequence[Episode]) -> None:
    """The episode-file format: episodes of `store`'s `split`, with the seed and sampler that drew them."""
    write_json(out, {
        "format": FORMAT,
        "store": {"domain": store.domain, "fingerprint": store.fingerprint},
        "split": split, "seed": seed, "sampler": sampler.describe(),
        "episodes": [asdict(e) for e in episodes],
    }, indent=None)


def _sample(store: Store, split: str, n: int, seed: int, ways: int | None, shots: int | None, queries: int | None,
            config: SamplerConfig = SamplerConfig()) -> tuple[EpisodeSampler, list[Episode]]:
    if n < 1:
        raise SmatError(f"--n {n}: need at least one episode")
    sampler = make_sampler(store, split, config, ways=ways, shots=shots, queries=queries)
    rng = np.random.default_rng(seed)
    return sampler, [sampler.sample(rng) for _ in range(n)]


def load_episode_file(path: str | os.PathLike, store: Store) -> tuple[list[Episode], dict[str, Any]]:
    """Episodes of a file written by `sample_to_file`, checked against `store`; also returns the file's header,
    plus `file_sha256`: the sha256 of the bytes that were parsed (what a result records as its episode file)."""
    path = Path(path)
    data, file_sha256 = read_json_sha256(path)
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        raise SmatError(f"{path}: not an episode file (format {FORMAT!r}); create one with `smat episodes sample`")
    if missing := [k for k in ("store", "split", "seed", "sampler", "episodes") if k not in data]:
        raise SmatError(f"{path}: missing key(s) {', '.join(missing)}; re-create it with `smat episodes sample`")
    manifest = store.root / "manifest.json"
    sampled_from = data["store"] if isinstance(data["store"], dict) else {}
    if sampled_from.get("fingerprint") != store.fingerprint:
        raise SmatError(
            f"{path}: sampled from store {sampled_from.get('domain')!r} (fingerprint "
            f"{sampled_from.get('fingerprint')}), but {manifest} is {store.domain!r} (fingerprint "
            f"{store.fingerprint}): use the store the episodes were sampled from, or re-sample them with "
            f"`smat episodes sample --store {store.root}`")
    split = data["split"]
    if split not in SPLITS:
        raise SmatError(f"{path}: unknown split {split!r}; expected one of {', '.join(SPLITS)}")
    split_classes = set(store.class_ids(split))
    if not isinstance(data["episodes"], list) or not data["episodes"]:
        raise SmatError(f"{path}: 'episodes' must be a non-empty list; re-create it with `smat episodes sample`")
    episodes, first_of, repeat = [], {}, None
    for i, raw in enumerate(data["episodes"]):
        if problem := _episode_problem(raw, store, split, split_classes):
            raise SmatError(f"{path}: episode {i} does not match {manifest}: {problem}")
        key = (tuple(raw["classes"]), tuple(map(tuple, raw["support"])), tuple(map(tuple, raw["query"])))
        if (first := first_of.setdefault(key, i)) != i and repeat is None:
            repeat = (i, first)
        episodes.append(Episode(classes=raw["classes"], support=raw["support"], query=raw["query"]))
    # A repeated episode counts twice in the mean and narrows its CI. The sampler draws one by chance from a
    # small pool, so a repeat is accepted only in a file that its seed and sampler reproduce: not an edited one.
    if repeat and not _drawn_by_seed(data, store, episodes):
        raise SmatError(f"{path}: episode {repeat[0]} repeats episode {repeat[1]}, and the file is not what its seed "
                        "and sampler draw (edited?); re-create it with `smat episodes sample`")
    return episodes, {**{k: v for k, v in data.items() if k != "episodes"}, "file_sha256": file_sha256}


def _drawn_by_seed(data: dict[str, Any], store: Store, episodes: list[Episode]) -> bool:
    """Whether the file's seed and sampler settings draw exactly `episodes` (as `sample_to_file` does)."""
    sampler = data["sampler"] if isinstance(data["sampler"], dict) else {}
    try:
        drawn = _sample(store, data["split"], len(episodes), data["seed"], sampler.get("ways"), sampler.get("shots"),
                        sampler.get("queries"), SamplerConfig(**sampler.get("config", {})))[1]
    except (SmatError, TypeError, ValueError):
        return False
    return drawn == episodes


def _episode_problem(raw: Any, store: Store, split: str, split_classes: set[int]) -> str | None:
    if not isinstance(raw, dict) or set(raw) != {"classes", "support", "query"}:
        return "expected an object with keys classes, support, query"
    classes, support, query = raw["classes"], raw["support"], raw["query"]
    if not (_int_list(classes) and isinstance(support, list) and isinstance(query, list)
            and len(support) == len(query) == len(classes) and len(set(classes)) == len(classes)):
        return "classes must be distinct integers with one support and one query list each"
    if len(classes) < 2:
        return f"{len(classes)} way(s): an episode needs at least 2 classes (a 1-way task is always right)"
    for c, s, q in zip(classes, support, query):
        if not 0 <= c < len(store.classes):
            return f"class id {c} out of range (the store has {len(store.classes)} classes)"
        if c not in split_classes:
            info = store.classes[c]
            return f"class {c} ({info.name!r}) is a {info.split} class, not a {split} class"
        if not (_int_list(s) and _int_list(q) and s and q):
            return f"class {c}: support and query must be non-empty lists of image ids"
        ids = s + q
        if len(set(ids)) != len(ids) or min(ids) < 0 or max(ids) >= store.classes[c].n_images:
            return (f"class {c} ({store.classes[c].name!r}): image ids must be distinct and in "
                    f"0..{store.classes[c].n_images - 1}")
    return None


def _int_list(value: Any) -> bool:
    return isinstance(value, list) and all(isinstance(v, int) and not isinstance(v, bool) for v in value)

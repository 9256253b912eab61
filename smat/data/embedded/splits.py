"""Class splits of a domain: ID domains ~70/10/20 train/val/test by class, OOD domains test only.

Grouped (glyph) domains are split by group, like Omniglot's alphabets, so that a two-level sampler can
pick a group of the split and then 5..min(50, group size) of its classes.
"""

from __future__ import annotations

import numpy as np

SPLITS = ("train", "val", "test")
EVAL_FRACTIONS = {"val": 0.1, "test": 0.2}
MIN_CLASSES = 5  # a 5-way episode needs 5 classes in every split and in every group


def split_counts(n_classes: int, role: str) -> dict[str, int]:
    if role == "ood":
        return {"train": 0, "val": 0, "test": n_classes}
    counts = {s: max(MIN_CLASSES, round(f * n_classes)) for s, f in EVAL_FRACTIONS.items()}
    counts["train"] = n_classes - counts["val"] - counts["test"]
    if counts["train"] < MIN_CLASSES:
        raise ValueError(f"{n_classes} classes are too few for train/val/test splits of >= {MIN_CLASSES}")
    return {s: counts[s] for s in SPLITS}


def split_classes(class_names: list[str], role: str, rng: np.random.Generator) -> dict[str, list[str]]:
    """Random class split; each list keeps the order of `class_names`."""
    counts = split_counts(len(class_names), role)
    order = rng.permutation(len(class_names))
    bounds = np.cumsum([counts[s] for s in SPLITS])[:-1]
    chosen = {s: set(part.tolist()) for s, part in zip(SPLITS, np.split(order, bounds))}
    return {s: [c for i, c in enumerate(class_names) if i in chosen[s]] for s in SPLITS}


def plan_groups(
    n_classes: int, role: str, size_range: tuple[int, int], rng: np.random.Generator
) -> list[tuple[str, int]]:
    """(split, number of classes) for every group; group sizes lie in `size_range` and fill each split."""
    plan = []
    for split, count in split_counts(n_classes, role).items():
        plan += [(split, size) for size in _partition(count, *size_range, rng)]
    return plan


def _partition(total: int, low: int, high: int, rng: np.random.Generator) -> list[int]:
    if total == 0:
        return []
    fewest, most = -(-total // high), total // low
    if fewest > most:
        raise ValueError(f"cannot split {total} classes into groups of {low}..{high}")
    n_parts = int(np.clip(round(2 * total / (low + high)), fewest, most))
    sizes = np.full(n_parts, low)
    for _ in range(total - low * n_parts):
        open_parts = np.flatnonzero(sizes < high)
        sizes[rng.choice(open_parts)] += 1
    return sizes.tolist()


def grouped_splits(groups: dict[str, str], group_split: dict[str, str]) -> dict:
    """Splits of a grouped domain: every class goes where its group goes; `groups` is class -> group."""
    splits = {s: [c for c, g in groups.items() if group_split[g] == s] for s in SPLITS}
    return {**splits, "groups": dict(groups)}

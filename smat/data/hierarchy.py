"""Class hierarchies that decide which classes a variable-way episode draws (METHOD §3.1, rule 1).

* flat: the way count is uniform in [min_ways, min(max_ways, #classes)], classes uniform without replacement;
* groups (two-level, Omniglot alphabets): one group of the split first, then the flat rule inside it;
* dag (ImageNet-like WordNet graph): one internal node spanning 5..392 leaves of the split, all its leaves,
  sub-sampled to max_ways.

A DAG is `{node: [children, ...]}`; nodes that never appear as keys (or have no children) are leaves and must
be class names. Leaves are resolved against the classes of one split, so each split sees its own sub-graph.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

from smat.io import SmatError

# Meta-Dataset's MAX_SPANNING_LEAVES_ELIGIBLE: nodes spanning more leaves are too generic to be an episode.
MAX_SPANNING_LEAVES = 392


class FlatHierarchy:
    """Every class of the split is a candidate."""

    def __init__(self, class_ids: Sequence[int], min_ways: int) -> None:
        self.class_ids = np.asarray(class_ids, dtype=np.int64)
        if len(self.class_ids) < min_ways:
            raise SmatError(f"only {len(self.class_ids)} candidate classes, fewer than the {min_ways} ways an "
                            "episode needs (sample fewer ways, or from a split with more classes)")

    def sample_classes(self, rng: np.random.Generator, min_ways: int, max_ways: int) -> list[int]:
        return _uniform_subset(rng, self.class_ids, min_ways, max_ways)


class GroupHierarchy:
    """Two-level sampling: a group (superclass) uniformly among those with >= min_ways classes in the split."""

    def __init__(self, groups: dict[str, list[int]], min_ways: int) -> None:
        self.groups = [np.asarray(ids, dtype=np.int64) for _, ids in sorted(groups.items())
                       if len(ids) >= min_ways]
        if not self.groups:
            sizes = ", ".join(f"{name}: {len(ids)}" for name, ids in sorted(groups.items()))
            raise SmatError(f"no class group of the split has at least min_ways = {min_ways} classes "
                            f"(group sizes: {sizes or 'none'})")

    def sample_classes(self, rng: np.random.Generator, min_ways: int, max_ways: int) -> list[int]:
        group = self.groups[rng.integers(len(self.groups))]
        return _uniform_subset(rng, group, min_ways, max_ways)


class DagHierarchy:
    """Pick one eligible internal node uniformly; its leaves in the split are the episode's classes."""

    def __init__(self, dag: dict[str, list[str]], class_ids_by_name: dict[str, int], min_ways: int) -> None:
        leaves = leaf_sets(dag, class_ids_by_name)
        eligible = [(sorted(ids), node) for node, ids in leaves.items()
                    if dag.get(node) and min_ways <= len(ids) <= MAX_SPANNING_LEAVES]
        # Meta-Dataset sorts the eligible nodes by the sum of their leaf ids, which makes the draw reproducible.
        eligible.sort(key=lambda item: (sum(item[0]), item[0], item[1]))
        self.nodes = [np.array(ids, dtype=np.int64) for ids, _ in eligible]
        if not self.nodes:
            raise SmatError(f"no node of the class DAG spans between {min_ways} and {MAX_SPANNING_LEAVES} "
                            "classes of the split")

    def sample_classes(self, rng: np.random.Generator, min_ways: int, max_ways: int) -> list[int]:
        leaves = self.nodes[rng.integers(len(self.nodes))]
        if len(leaves) > max_ways:
            leaves = rng.choice(leaves, size=max_ways, replace=False)
        return [int(c) for c in leaves]


def build_hierarchy(store, class_ids: Sequence[int], min_ways: int) -> FlatHierarchy | GroupHierarchy | DagHierarchy:
    """The hierarchy of `store` (a `smat.data.store.Store`, which imports this module) restricted to `class_ids`
    (the classes of one split)."""
    if store.hierarchy == "groups":
        groups: dict[str, list[int]] = {}
        for c in class_ids:
            groups.setdefault(store.classes[c].group, []).append(c)
        return GroupHierarchy(groups, min_ways)
    if store.hierarchy == "dag":
        by_name = {store.classes[c].name: c for c in class_ids}
        return DagHierarchy(store.dag, by_name, min_ways)
    return FlatHierarchy(class_ids, min_ways)


def leaf_sets(dag: dict[str, list[str]], class_ids_by_name: dict[str, int]) -> dict[str, set[int]]:
    """For every node of `dag`, the ids of the leaves below it that are in `class_ids_by_name`."""
    memo: dict[str, set[int]] = {}

    def leaves(node: str) -> set[int]:
        if node not in memo:
            children = dag.get(node) or []
            if not children:
                memo[node] = {class_ids_by_name[node]} if node in class_ids_by_name else set()
            else:
                memo[node] = set().union(*(leaves(child) for child in children))
        return memo[node]

    for node in dag:
        leaves(node)
    return memo


def dag_problems(dag: object, class_names: Sequence[str], excluded: Sequence[str] = ()) -> list[str]:
    """Structural problems of a DAG description: wrong types, cycles, leaves that are neither classes nor
    `excluded` classes, and classes that are not leaves. An empty list means the DAG is usable."""
    if not isinstance(dag, dict) or not all(
            isinstance(node, str) and isinstance(kids, list) and all(isinstance(c, str) for c in kids)
            for node, kids in dag.items()):
        return ["'dag' must map node names to lists of child names"]
    problems = []
    names = set(class_names)
    children = {child for kids in dag.values() for child in kids}
    leaves = {node for node in set(dag) | children if not dag.get(node)}
    if unknown := sorted(leaves - names - set(excluded)):
        problems.append(f"dag leaves that are not classes: {', '.join(unknown[:10])}")
    if missing := sorted(names - leaves):
        problems.append(f"classes that are not leaves of the dag: {', '.join(missing[:10])}")
    if cycle := _find_cycle(dag):
        problems.append(f"the dag has a cycle: {' -> '.join(cycle)}")
    return problems


def _find_cycle(dag: dict[str, list[str]]) -> list[str] | None:
    done: set[str] = set()
    for root in dag:
        if root in done:
            continue
        path, stack = [root], [iter(dag[root])]
        while stack:
            child = next(stack[-1], None)
            if child is None:
                stack.pop()
                done.add(path.pop())
            elif child in path:
                return path[path.index(child):] + [child]
            elif child not in done:
                path.append(child)
                stack.append(iter(dag.get(child) or []))
    return None


def _uniform_subset(rng: np.random.Generator, class_ids: np.ndarray, min_ways: int, max_ways: int) -> list[int]:
    ways = rng.integers(min_ways, min(max_ways, len(class_ids)) + 1)
    return [int(c) for c in rng.choice(class_ids, size=ways, replace=False)]

"""The class split of a converted dataset (which classes are train, val and test): read from a splits file, or
drawn for a source without one. Every converter of a format without its own split uses it (METHOD §3.1).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from smat.data.hierarchy import dag_problems
from smat.io import SmatError, read_json


def read_splits(path: Path, src: Path, class_names: list[str]) -> tuple[dict[str, str], dict | None, dict | None]:
    """Class -> split from a splits JSON, plus its optional groups {class: group} and dag {node: [children]}."""
    data = read_json(path)
    if not isinstance(data, dict):
        raise SmatError(f"{path}: expected a JSON object with keys train, val, test")
    if unknown := sorted(set(data) - {"train", "val", "valid", "test", "groups", "dag"}):
        raise SmatError(f"{path}: unknown split name(s) {', '.join(map(repr, unknown))}; expected train, val "
                        "(or valid), test, and optionally groups and dag")
    if "val" in data and "valid" in data:
        raise SmatError(f"{path}: both 'val' and 'valid' are given; 'valid' is an alias of 'val', keep one")
    split_of: dict[str, str] = {}
    for key in ("train", "val", "valid", "test"):
        names = data.get(key, [])
        if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
            raise SmatError(f"{path}: '{key}' must be a list of class names")
        for name in names:
            if name in split_of:
                raise SmatError(f"{path}: class {name!r} is listed in more than one split")
            split_of[name] = "val" if key == "valid" else key
    if not_folders := sorted(set(split_of) - set(class_names)):
        raise SmatError(f"{path}: class(es) {_names(not_folders)} are not folders of {src}; fix the splits file")
    if unlisted := sorted(set(class_names) - set(split_of)):
        raise SmatError(f"{src}: class folder(s) {_names(unlisted)} are in no split of {path}; add them to the "
                        "splits file or remove the folders")
    groups, dag = data.get("groups") or None, data.get("dag") or None
    if groups and dag:
        raise SmatError(f"{path}: give either 'groups' or 'dag', not both")
    if groups:
        if not isinstance(groups, dict) or not all(isinstance(g, str) for g in groups.values()):
            raise SmatError(f"{path}: 'groups' must map class names to group names")
        if unknown := sorted(set(groups) - set(class_names)):
            raise SmatError(f"{path}: 'groups' names class(es) {_names(unknown)} that are not folders of {src}")
        if ungrouped := sorted(set(class_names) - set(groups)):
            raise SmatError(f"{path}: class(es) {_names(ungrouped)} have no entry in 'groups'")
    if dag and (problems := dag_problems(dag, class_names)):
        raise SmatError(f"{path}: invalid 'dag': {'; '.join(problems)}")
    return split_of, groups, dag


def default_splits(class_names: list[str], role: str, seed: int) -> dict[str, str]:
    """Class -> split without a splits file: every class a test class for an OOD dataset; else 60 / 15 / 25 %
    train / val / test, drawn with `seed`."""
    if role == "ood":
        return {name: "test" for name in class_names}
    n = len(class_names)
    n_train, n_val = n * 60 // 100, n * 15 // 100  # DomainNet convention: 345 classes -> 207 / 51 / 87
    order = np.random.default_rng(seed).permutation(n)
    return {class_names[i]: "train" if rank < n_train else "val" if rank < n_train + n_val else "test"
            for rank, i in enumerate(order)}


def _names(names: list[str], limit: int = 10) -> str:
    shown = ", ".join(map(repr, names[:limit]))
    return shown + (f" and {len(names) - limit} more" if len(names) > limit else "")

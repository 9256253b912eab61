"""Read the per-episode CSVs of `smat evaluate` and summarise them per (label, fine-tuning, dataset).

Shared by the tables, the Pareto figure and the dendrogram, so that every view of the results checks its
input the same way and computes the same mean and 95% CI (METHOD §3.4).
"""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path
from typing import Sequence

import numpy as np
import pandas as pd

from smat.evaluation.modes import FINETUNE_MODES
from smat.evaluation.results import check_same_sha256, read_results, recorded_inputs
from smat.evaluation.stats import summarize
from smat.io import SmatError
from smat.methods.registry import SWITCH_NAMES

log = logging.getLogger(__name__)

_TRUE = {"true", "1", "yes"}
_FALSE = {"false", "0", "no", ""}


def read_eval_csvs(paths: Sequence[Path]) -> pd.DataFrame:
    """All rows of `paths` in one frame, with a `source` column; checks values and duplicates.

    A (label, dataset, finetune) group must come from a single file: two files with the same group are two
    runs of one table cell, which is an error rather than something to average silently.
    """
    if not paths:
        raise SmatError("no eval CSV files given: pass the per-episode CSVs written by `smat evaluate`")
    results = pd.concat([_read_one(Path(path)) for path in paths], ignore_index=True)
    _check_same_inputs([Path(p) for p in paths], results)

    owners = results.groupby(["label", "dataset", "finetune"])["source"].unique()
    clashes = owners[owners.map(len) > 1]
    if len(clashes):
        (label, dataset, finetune), files = next(iter(clashes.items()))
        raise SmatError(
            f"label {label!r}, dataset {dataset!r}, finetune {finetune!r} appears in more than one file: "
            f"{', '.join(files)}; give each model a distinct --label or pass only one of these files"
        )
    repeated = results[results.duplicated(["label", "dataset", "finetune", "episode"], keep=False)]
    if len(repeated):
        row = repeated.iloc[0]
        raise SmatError(
            f"{row['source']}: episode {row['episode']} of label {row['label']!r}, dataset {row['dataset']!r}, "
            f"finetune {row['finetune']!r} appears more than once; re-run `smat evaluate` for this file"
        )
    return results


def _check_same_inputs(paths: list[Path], results: pd.DataFrame) -> None:
    """The files of one dataset (a table row) scored the same frozen episode file, and the files of one label (a
    table column) the same model file, by the sha256 their summaries record: the columns are then paired
    comparisons and each column is one model. Files without a summary are not checked."""
    recorded = {str(path): recorded_inputs(path) for path in paths}
    for column, sha_key, what, fix in (
            ("dataset", "episodes_sha256", "episode files", "evaluate every model on the same episode file"),
            ("label", "model_sha256", "model files", "one label is one model: give each model its own --label")):
        for value, sources in results.groupby(column, sort=False)["source"].unique().items():
            check_same_sha256([(Path(s), recorded[s].get(sha_key)) for s in sources], f"{what} for {column} {value!r}",
                              fix)


def _read_one(path: Path) -> pd.DataFrame:
    """One CSV, parsed by the reader of the format's owner (smat.evaluation.results), then checked."""
    rows = read_results(path)
    if not rows:
        raise SmatError(f"{path}: no episodes (header only); re-run `smat evaluate`")
    frame = pd.DataFrame(rows)
    for column in ("label", "dataset"):
        empty = frame[column].str.strip() == ""
        if empty.any():
            raise SmatError(f"{path}: line {int(empty.idxmax()) + 2}: empty {column!r}")
    bad_mode = ~frame["finetune"].isin(FINETUNE_MODES)
    if bad_mode.any():
        raise SmatError(f"{path}: finetune {frame.loc[bad_mode, 'finetune'].iloc[0]!r} is not one of "
                        f"{', '.join(FINETUNE_MODES)}")
    accuracy = frame["accuracy"]
    bad = ~np.isfinite(accuracy) | (accuracy < 0) | (accuracy > 100)
    if bad.any():
        line = int(bad.idxmax()) + 2
        raise SmatError(f"{path}: line {line}: accuracy {accuracy[line - 2]!r} is not a percentage in [0, 100]")
    for switch in SWITCH_NAMES:
        frame[switch] = [_parse_switch(v, path, switch) for v in frame[switch]]
    frame["source"] = str(path)
    return frame


def _parse_switch(value: str, path: Path, column: str) -> bool:
    """An ablation switch (METHOD §2.2); empty means "not applicable", which is shown as off."""
    text = value.strip().lower()
    if text in _TRUE:
        return True
    if text in _FALSE:
        return False
    raise SmatError(f"{path}: column {column!r}: {value!r} is not true/false")


def summarise(results: pd.DataFrame, by: Sequence[str] = ("label", "finetune", "dataset")) -> pd.DataFrame:
    """One row per group: mean accuracy, ci95 (1.96·std/√n, unbiased std; METHOD §3.4) and n (episodes)."""
    rows = []
    for key, group in results.groupby(list(by), sort=False):
        summary = summarize(group["accuracy"].tolist())
        ci95 = math.nan if summary.ci95 is None else summary.ci95   # one episode: no CI
        rows.append({**dict(zip(by, key)), "mean": summary.mean, "ci95": ci95, "n": summary.n})
    return pd.DataFrame(rows, columns=[*by, "mean", "ci95", "n"])


def check_datasets(results: pd.DataFrame, id_datasets: Sequence[str], ood_datasets: Sequence[str],
                   what: str) -> None:
    """Listed datasets must all have results (a typo would otherwise give an empty row); unlisted ones are
    left out with a warning (e.g. validation sets evaluated by the same rule)."""
    if not id_datasets and not ood_datasets:
        raise SmatError(f"{what}: pass the dataset names with --id-datasets and/or --ood-datasets")
    both = sorted(set(id_datasets) & set(ood_datasets))
    if both:
        raise SmatError(f"{what}: dataset(s) {', '.join(both)} listed in both --id-datasets and --ood-datasets")
    present = set(results["dataset"])
    absent = [d for d in [*id_datasets, *ood_datasets] if d not in present]
    if absent:
        raise SmatError(f"{what}: no results for dataset(s) {', '.join(absent)} in the given CSVs "
                        f"(found: {', '.join(sorted(present))}); check the names or evaluate them first")
    unlisted = sorted(present - set(id_datasets) - set(ood_datasets))
    if unlisted:
        log.warning("%s: leaving out dataset(s) %s: not in --id-datasets or --ood-datasets",
                    what, ", ".join(unlisted))


def parse_alpha(value: str, source: str) -> np.ndarray | None:
    """The router scores of one episode (JSON list), or None where the method has none (empty)."""
    if not value.strip():
        return None
    try:
        alpha = np.asarray(json.loads(value), dtype=float)
    except (json.JSONDecodeError, TypeError, ValueError):
        raise SmatError(f"{source}: alpha {value!r} is not a JSON list of numbers") from None
    if alpha.ndim != 1 or not np.isfinite(alpha).all():
        raise SmatError(f"{source}: alpha {value!r} is not a flat list of finite numbers")
    return alpha

"""The per-episode result files of `smat evaluate`: EVAL.csv (one row per episode) and EVAL.json (summary).

The column list is the contract of docs/ARCHITECTURE.md; tables, figures and `smat compare` read these files.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
from pathlib import Path
from typing import Any, Sequence

from smat.evaluation.stats import summarize
from smat.io import SmatError, atomic_open, folder_lock, read_json, sha256_file, write_json

EVAL_COLUMNS = (
    "label", "model_id", "method", "mls", "meta", "dt", "ie", "tau", "experts", "dataset", "finetune",
    "episode", "ways", "support_size", "query_size", "accuracy", "loss", "lr", "seconds", "alpha",
    "config_hash", "smat_version",
)
_INT_COLUMNS = ("episode", "ways", "support_size", "query_size")
_FLOAT_COLUMNS = ("accuracy", "loss", "lr", "seconds")


def summary_path(csv_path: Path) -> Path:
    """EVAL.json next to EVAL.csv."""
    return Path(csv_path).with_suffix(".json")


def write_results(rows: list[dict[str, Any]], out: Path, extra: dict[str, Any]) -> dict[str, Any]:
    """Write the CSV and its JSON summary (mean, ci95, n, seconds per episode, the CSV's sha256, plus `extra`);
    return the summary.

    Each file is written atomically, the JSON first, both under a lock on their folder: a complete CSV always
    has its own summary next to it, also when two commands write the same output at once (`read_summary`
    checks the pair by the sha256).
    """
    if not rows:
        raise SmatError(f"{out}: no episodes were evaluated, nothing to write")
    accuracy = summarize([row["accuracy"] for row in rows], what="episode accuracies")
    summary = {
        "label": rows[0]["label"],
        "model_id": rows[0]["model_id"],
        "method": rows[0]["method"],
        "dataset": rows[0]["dataset"],
        "finetune": rows[0]["finetune"],
        "lr": rows[0]["lr"],
        **accuracy.as_dict(),
        "loss": sum(row["loss"] for row in rows) / len(rows),
        "seconds_per_episode": sum(row["seconds"] for row in rows) / len(rows),
        **extra,
    }
    text = io.StringIO(newline="")
    writer = csv.DictWriter(text, fieldnames=EVAL_COLUMNS)
    writer.writeheader()
    for row in rows:
        writer.writerow({key: _csv_value(row[key]) for key in EVAL_COLUMNS})
    data = text.getvalue().encode("utf-8")
    summary["csv_sha256"] = hashlib.sha256(data).hexdigest()
    with folder_lock(Path(out).parent):
        write_json(summary_path(out), summary)
        with atomic_open(out, "wb") as handle:
            handle.write(data)
    return summary


def _csv_value(value: Any) -> Any:
    if value is None:
        return ""
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, (list, tuple)):
        return json.dumps([round(float(v), 6) for v in value])
    return value


def read_results(path: Path) -> list[dict[str, Any]]:
    """Rows of an EVAL.csv with numeric columns parsed; a clear SmatError for a missing or malformed file."""
    path = Path(path)
    try:
        with open(path, encoding="utf-8", newline="") as handle:
            reader = csv.DictReader(handle)
            missing = [c for c in EVAL_COLUMNS if c not in (reader.fieldnames or [])]
            if missing:
                raise SmatError(f"{path}: not a `smat evaluate` result file, missing column(s) {', '.join(missing)}")
            rows = list(reader)
    except FileNotFoundError:
        raise SmatError(f"{path}: file not found") from None
    for line, row in enumerate(rows, start=2):
        try:
            for key in _INT_COLUMNS:
                row[key] = int(row[key])
            for key in _FLOAT_COLUMNS:
                row[key] = float(row[key])
        except ValueError as err:
            raise SmatError(f"{path}, line {line}: {err}") from None
    return rows


def recorded_inputs(csv_path: Path) -> dict[str, Any]:
    """The provenance of a result's summary (the sha256 of its episode file, model, store ...); {} without one."""
    summary = read_summary(csv_path)
    provenance = summary.get("provenance") if isinstance(summary, dict) else None
    return provenance if isinstance(provenance, dict) else {}


def check_same_sha256(files: Sequence[tuple[Path, str | None]], what: str, fix: str) -> None:
    """SmatError naming both files and both hashes unless all (file, sha256) pairs agree on the sha256 of what
    they read (`what`: "episode files", ...); files that record none (older results) are not checked."""
    first: tuple[Path, str] | None = None
    for path, sha in files:
        if not sha:
            continue
        if first is None:
            first = (path, sha)
        elif sha != first[1]:
            raise SmatError(f"{first[0]} and {path} come from different {what} (sha256 {first[1][:12]} vs "
                            f"{sha[:12]}): {fix}")


def read_summary(csv_path: Path) -> dict[str, Any] | None:
    """The JSON summary next to a result CSV, or None if it is absent; an error if it describes another CSV."""
    path = summary_path(csv_path)
    if not path.exists():
        return None
    summary = read_json(path)
    expected = summary.get("csv_sha256") if isinstance(summary, dict) else None
    if expected and Path(csv_path).is_file() and sha256_file(csv_path) != expected:
        raise SmatError(f"{path}: summarises another version of {csv_path} (sha256 differs); re-run "
                        "`smat evaluate` for this output")
    return summary

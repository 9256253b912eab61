"""Read `train_log.jsonl` files of `smat train` and describe the model that wrote each (for legends).

A model is described by its method, τ and |M|: taken from the resolved training config `config.yaml` next to
the log when present, else from `key~value` folders of the model directory
(results/models/smat/tau~0.9/experts~8/seed~0/).
"""

from __future__ import annotations

import json
import os
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

from smat.analysis.eval_results import SWITCH_LABELS, SWITCHES
from smat.config import load_yaml
from smat.io import SmatError

METHOD_NAMES = {"pre": "Pre", "pmf": "PMF", "softmerge": "SoftMerge", "smat": "SMAT"}


@dataclass
class TrainingRun:
    path: Path
    method: str | None
    tau: float | None
    experts: int | None
    switched_off: list[str]
    records: list[dict] = field(repr=False)
    name: str = ""

    def of_kind(self, kind: str) -> list[dict]:
        return [r for r in self.records if r.get("kind") == kind]


def read_train_log(path: Path) -> list[dict]:
    path = Path(path)
    if not path.is_file():
        raise SmatError(f"{path}: training log not found")
    records = []
    with open(path, encoding="utf-8") as handle:
        for number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as err:
                raise SmatError(f"{path}:{number}: not a JSON object ({err})") from None
            if not isinstance(record, dict) or "kind" not in record:
                raise SmatError(f"{path}:{number}: expected a JSON object with a 'kind' key")
            records.append(record)
    if not records:
        raise SmatError(f"{path}: empty training log")
    return records


def describe_model(model_dir: Path) -> dict[str, Any]:
    """method, tau and experts of the model in `model_dir`, None where unknown or meaningless for the method
    (PMF has no experts and no sparsity target, SoftMerge and SMAT without gates no sparsity target), and
    the Table 2 switches that are off (SMAT ablations, spec §2.2)."""
    model_dir = Path(model_dir)
    config_path = model_dir / "config.yaml"
    config = load_yaml(config_path) if config_path.is_file() else {}
    from_path = dict(part.split("~", 1) for part in model_dir.parts if "~" in part)
    found = {key: config.get(key, from_path.get(key)) for key in ("method", "tau", "experts")}
    if found["method"] is None:   # results/models/{method}/...
        found["method"] = next((p for p in reversed(model_dir.parts) if p in METHOD_NAMES), None)
    try:
        tau = float(found["tau"]) if found["tau"] is not None else None
        experts = int(found["experts"]) if found["experts"] is not None else None
    except (TypeError, ValueError):
        raise SmatError(f"{model_dir}: tau {found['tau']!r} / experts {found['experts']!r} are not "
                        f"numbers (config.yaml or tau~/experts~ folders)") from None
    switches = config.get("switches") or {}
    switched_off = [name for name in SWITCHES if switches.get(name) is False] if found["method"] == "smat" else []
    if found["method"] in ("pre", "pmf"):
        tau = experts = None
    elif found["method"] == "softmerge" or "mls" in switched_off:
        tau = None
    return {"method": found["method"], "tau": tau, "experts": experts, "switched_off": switched_off}


def read_runs(paths: Sequence[Path]) -> list[TrainingRun]:
    """The runs of `paths`, each with a legend name that is unique among them."""
    if not paths:
        raise SmatError("no training logs given: pass train_log.jsonl files written by `smat train`")
    runs = [TrainingRun(Path(p), records=read_train_log(Path(p)), **describe_model(Path(p).parent)) for p in paths]
    for run in runs:
        parts = [METHOD_NAMES.get(run.method, run.method or "model")]
        if run.tau is not None:
            parts.append(f"τ={run.tau:g}")
        if run.experts is not None:
            parts.append(f"|M|={run.experts}")
        if run.switched_off:
            parts.append("w/o " + ",".join(SWITCH_LABELS[s] for s in run.switched_off))
        run.name = " ".join(parts)
    counts = Counter(run.name for run in runs)
    if max(counts.values()) > 1:   # e.g. seeds: tell them apart by their folders below the common one
        common = Path(os.path.commonpath([run.path.parent.resolve() for run in runs]))
        for run in runs:
            if counts[run.name] > 1:
                run.name = f"{run.name} ({run.path.parent.resolve().relative_to(common)})"
    return runs

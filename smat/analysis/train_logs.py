"""Read `train_log.jsonl` files of `smat train` and describe the model that wrote each (for legends).

A model is described by its method, τ and |M|, taken from the resolved training config `config.yaml` that
`smat train` writes next to the log.
"""

from __future__ import annotations

import json
import os
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

from smat.config_loader import load_yaml
from smat.io import SmatError
from smat.methods.registry import METHODS, SWITCH_LABELS, SWITCH_NAMES, display_name, sparsity_and_experts

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
    """method, tau and experts of the model in `model_dir`, from the resolved config.yaml that `smat train`
    writes next to its log; None where unknown or meaningless for the method (no experts without Table 2
    switches, as PMF; no sparsity target without gates), and the Table 2 switches turned off from the
    method's defaults (the ablations, METHOD §2.2)."""
    config_path = Path(model_dir) / "config.yaml"
    config = load_yaml(config_path) if config_path.is_file() else {}
    method = METHODS.get(config.get("method"))
    if method is None or not method.trained:
        return {"method": config.get("method"), "tau": None, "experts": None, "switched_off": []}
    switches = {name: getattr(method.switches, name) for name in SWITCH_NAMES} | (config.get("switches") or {})
    try:
        tau, experts = sparsity_and_experts(config)
    except (TypeError, ValueError):
        raise SmatError(f"{config_path}: tau {config.get('tau')!r} / experts {config.get('experts')!r} are not "
                        f"numbers") from None
    switched_off = [name for name in SWITCH_NAMES if getattr(method.switches, name) and not switches[name]]
    return {"method": method.name, "tau": tau, "experts": experts, "switched_off": switched_off}


def read_runs(paths: Sequence[Path]) -> list[TrainingRun]:
    """The runs of `paths`, each with a legend name that is unique among them."""
    if not paths:
        raise SmatError("no training logs given: pass train_log.jsonl files written by `smat train`")
    runs = [TrainingRun(Path(p), records=read_train_log(Path(p)), **describe_model(Path(p).parent)) for p in paths]
    for run in runs:
        parts = [display_name(run.method)]
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

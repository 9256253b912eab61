"""Model checkpoints (`best.pt`, `last.pt`) and the resume state of an interrupted run (`resume.pt`).

A model checkpoint is self-describing: `{"format": "smat-model/1", "method", "config", "backbone": {"arch",
"image_size", "pretrained_sha256"}, "state_dict", "progress", "provenance"}`; `smat.methods.load_model`
rebuilds the model from it alone (θ_pre is part of the state dict). The resume state adds everything needed
to continue bit for bit: optimiser and scaler states, the episode sampler's generator (every other random draw
of training is seeded per task, METHOD §11) and the length of the training log at that moment.

"smat-resume/2" came with the per-task seeds: a "smat-resume/1" state continued a per-process random stream
that this code no longer draws, so it is refused rather than resumed into a different run.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import torch

from smat.config import build_dataclass
from smat.io import SmatError, atomic_path, first_nonfinite, load_torch, load_torch_record, provenance
from smat.training.config import TrainConfig

MODEL_FORMAT = "smat-model/1"
RESUME_FORMAT = "smat-resume/2"
OLD_RESUME_FORMATS = ("smat-resume/1",)


def save_model_checkpoint(path: Path, model: torch.nn.Module, config: dict, backbone: dict,
                          progress: dict) -> None:
    state_dict = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    if bad := first_nonfinite(state_dict):
        raise SmatError(f"{path}: not written: tensor {bad} holds NaN or infinity after task "
                        f"{progress.get('tasks_seen')}, so training diverged; lower the learning rates (optim.*)")
    record = {"format": MODEL_FORMAT, "method": model.method, "config": config, "backbone": backbone,
              "state_dict": state_dict,
              "progress": progress, "provenance": _plain(provenance())}
    with atomic_path(path) as tmp:
        torch.save(record, tmp)


def _plain(record: dict) -> dict:
    """Plain JSON types only (e.g. torch's version string class), so `weights_only` loading accepts it."""
    return json.loads(json.dumps(record, default=str))


def read_model_checkpoint(path: Path) -> tuple[dict[str, Any], TrainConfig]:
    """(record, config) of a model checkpoint, with a clear error for anything else."""
    record = load_torch_record(path, "model checkpoint", MODEL_FORMAT,
                               f"pass a `smat train` checkpoint, or pretrained:{path} for a backbone checkpoint")
    from smat.methods.registry import TRAINED_METHODS

    if record.get("method") not in TRAINED_METHODS:
        raise SmatError(f"{path}: unknown method {record.get('method')!r}; known trained methods: "
                        f"{', '.join(TRAINED_METHODS)}")
    if bad := first_nonfinite(record.get("state_dict") or {}):
        raise SmatError(f"{path}: tensor {bad} holds NaN or infinity; the training run diverged. Retrain with "
                        "lower learning rates (optim.*)")
    config = build_dataclass(TrainConfig, record["config"], where=f"{path}: config")
    return record, config


def rng_state(sampler_rng: np.random.Generator) -> dict[str, Any]:
    return {"sampler": sampler_rng.bit_generator.state}


def restore_rng_state(state: dict[str, Any], sampler_rng: np.random.Generator) -> None:
    sampler_rng.bit_generator.state = state["sampler"]


def save_resume(path: Path, state: dict[str, Any]) -> None:
    with atomic_path(path) as tmp:
        torch.save({"format": RESUME_FORMAT, **state}, tmp)


def load_resume(path: Path) -> dict[str, Any]:
    # Plain types and tensors only, like every torch file read: a planted resume.pt cannot run code. (A
    # "smat-resume/1" state with numpy RNG state in it fails to load here; one without is named below.)
    fix = "delete it to restart the run"
    record = load_torch(path, "resume state", fix)
    if isinstance(record, dict) and record.get("format") in OLD_RESUME_FORMATS:
        raise SmatError(f"{path}: a resume state of an older smat ({record['format']}), whose training drew its "
                        f"random numbers per process, not per task (METHOD §11); it cannot be continued: {fix}")
    if not isinstance(record, dict) or record.get("format") != RESUME_FORMAT:
        raise SmatError(f"{path}: not a resume state (format {RESUME_FORMAT!r}); {fix}")
    return record

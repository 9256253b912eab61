"""The resume state of an interrupted run (`resume.pt`), "smat-resume/2": everything needed to continue bit for
bit: the model, optimiser and scaler states, the episode sampler's generator (every other random draw of
training is seeded per task, METHOD §11) and the length of the training log at that moment.

"smat-resume/2" came with the per-task seeds: a "smat-resume/1" state continued a per-process random stream
that this code no longer draws, so it is refused rather than resumed into a different run.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch

from smat.io import SmatError, atomic_path, load_torch

RESUME_FORMAT = "smat-resume/2"
OLD_RESUME_FORMATS = ("smat-resume/1",)


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

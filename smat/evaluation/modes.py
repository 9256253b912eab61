"""The test-time fine-tuning modes (METHOD §3.5) as one table: evaluation, the lr search, the tables' column
names, the CLI and the workflow's wildcards all read it. A mode trains the backbone's weights or LoRA adapters
(`smat.evaluation.finetune.Finetuner`, one branch each) at its lr multiplier; a new kind of trained tensors is a
new branch there.

No torch here: the workflow reads the table when it starts.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class FinetuneMode:
    name: str                   # `--finetune NAME`, the `finetune` column of the result CSVs
    suffix: str                 # appended to a model's label in Table 1 ("SMAT+full")
    lr_multiplier: float | None  # the searched lr is scaled by it; None: no fine-tuning, no lr search
    trains: str | None = None   # "backbone" (every backbone weight) or "lora" (adapters on q and v)

    @property
    def tunes(self) -> bool:
        return self.lr_multiplier is not None


# SMAT and Pre+LoRA train the adapters at 10 × the searched lr (METHOD §3.5). The released pmf-lora baseline
# has no ×10; here every method uses ×10, which only shifts where the lr search lands on its grid.
FINETUNE_MODES: dict[str, FinetuneMode] = {m.name: m for m in (
    FinetuneMode("none", "", None),
    FinetuneMode("full", "+full", 1.0, trains="backbone"),
    FinetuneMode("lora", "+LoRA", 10.0, trains="lora"),
)}
NO_FINETUNING = next(name for name, mode in FINETUNE_MODES.items() if not mode.tunes)


def tuned_modes() -> tuple[str, ...]:
    """The modes that fine-tune (read when asked: a mode may be registered at run time)."""
    return tuple(name for name, mode in FINETUNE_MODES.items() if mode.tunes)

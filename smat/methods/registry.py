"""The methods, as one table that configs, training, evaluation, tables and figures read.

A method is a `FewShotModel` subclass in its own module plus one `Method` entry in `METHODS`; the entry
order is the paper's column order (Table 1). Adding a method touches that module, this table and its tests
(docs/ARCHITECTURE.md). `build_model` makes a fresh model from a training config; `load_model(spec)` loads
a `smat train` checkpoint (`MODEL_DIR/best.pt`) or `pretrained:FILE` for Pre.

This module imports no torch at load time, so light commands (tables, figures, configs) stay fast.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass, fields
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch
    from torch import nn

    from smat.methods.base import FewShotModel
    from smat.training.config import TrainConfig

PRETRAINED_PREFIX = "pretrained:"


@dataclass
class Switches:
    """Table 2 switches (METHOD §2.2). Unset (null) = the method's default, filled in by `resolve_switches`."""
    mls: bool | None = None     # meta-learned sparsity: hard-concrete gates on the shared delta
    meta: bool | None = None    # support/query split; off: D = S ∪ Q serves as both
    dt: bool | None = None      # dense teachers: both KD terms (dense teacher and pre-trained model)
    ie: bool | None = None      # interpolated experts: router over M experts; off: one expert, alpha = 1


SWITCH_NAMES = tuple(f.name for f in fields(Switches))
SWITCH_LABELS = {"mls": "MLS", "meta": "Meta", "dt": "DT", "ie": "IE"}   # Table 2 column heads


@dataclass(frozen=True)
class Method:
    name: str                   # the `method:` of a training config and of a checkpoint
    display: str                # its name in tables, figures and progress bars
    model_class: str            # "module:Class" of its FewShotModel
    switches: Switches | None   # its Table 2 switches by default; None: not meta-trained (Pre)
    ablatable: bool = False     # may a config change its switches (the Table 2 rows are SMAT ablations)?

    @property
    def trained(self) -> bool:
        return self.switches is not None

    def load_class(self) -> type:
        module, name = self.model_class.split(":")
        return getattr(importlib.import_module(module), name)


# SMAT is Table 2 row 1 and PMF row 6; SoftMerge is dense experts with plain query CE (METHOD §2.1).
METHODS: dict[str, Method] = {m.name: m for m in (
    Method("pre", "Pre", "smat.methods.pre:Pre", switches=None),
    Method("pmf", "PMF", "smat.methods.pmf:PMF", Switches(mls=False, meta=False, dt=False, ie=False)),
    Method("softmerge", "SoftMerge", "smat.methods.softmerge:SoftMerge",
           Switches(mls=False, meta=True, dt=False, ie=True), ablatable=True),
    Method("smat", "SMAT", "smat.methods.smat:SMAT", Switches(mls=True, meta=True, dt=True, ie=True),
           ablatable=True),
)}
TRAINED_METHODS = tuple(name for name, method in METHODS.items() if method.trained)


def display_name(method: str | None) -> str:
    return METHODS[method].display if method in METHODS else (method or "model")


def column_rank(method: str | None) -> int:
    """Position of `method` in the paper's column order; unknown methods go last."""
    return list(METHODS).index(method) if method in METHODS else len(METHODS)


def sparsity_and_experts(config: dict) -> tuple[float | None, int | None]:
    """(τ, M) of a trained model's config dict; None where meaningless for the method: no experts without
    Table 2 switches (PMF), no sparsity target without gates (switches.mls off)."""
    method = METHODS.get(config.get("method"))
    if method is None or not method.trained:
        return None, None
    mls = (config.get("switches") or {}).get("mls")
    mls = method.switches.mls if mls is None else mls
    tau, experts = config.get("tau"), config.get("experts")
    return (float(tau) if mls and tau is not None else None,
            int(experts) if method.ablatable and experts is not None else None)


def resolve_switches(method: str, switches: Switches, experts: int) -> Switches:
    """Fill unset switches with the method's defaults and reject combinations that define no model."""
    if method not in TRAINED_METHODS:
        raise ValueError(f"method {method!r}: not a meta-trained method; known: {', '.join(TRAINED_METHODS)}")
    default = METHODS[method].switches
    resolved = Switches(**{name: getattr(default, name) if getattr(switches, name) is None
                           else getattr(switches, name) for name in SWITCH_NAMES})
    if not METHODS[method].ablatable and resolved != default:
        raise ValueError(f"switches {switches.__dict__}: {METHODS[method].display} has no ablation switches; "
                         f"leave them unset")
    if method == "softmerge" and (resolved.mls or not resolved.ie):
        raise ValueError("softmerge: switches.mls must be false and switches.ie true (dense experts "
                         "merged by the router); for a single dense delta use method smat with mls/ie false")
    if method == "smat":
        if not resolved.mls and resolved.ie:
            raise ValueError("switches mls=false with ie=true is not a Table 2 row (experts need gates); "
                             "set ie=false too for a dense delta, or method: softmerge for dense experts")
        if not resolved.ie and experts != 1:
            raise ValueError(f"switches.ie=false means a single expert with alpha = 1: set experts: 1 "
                             f"(got experts={experts})")
    return resolved


def build_model(config: "TrainConfig", backbone: "nn.Module") -> "FewShotModel":
    """A freshly initialised model of `config.method` around `backbone` (whose weights become θ_pre)."""
    return METHODS[config.method].load_class().from_config(backbone, config)


def load_model(spec: str, device: "torch.device | str") -> "FewShotModel":
    """The model in eval mode on `device`: a `smat train` checkpoint, or `pretrained:FILE` for Pre."""
    if spec.startswith(PRETRAINED_PREFIX):
        from smat.models.checkpoint import load_pretrained

        backbone, _ = load_pretrained(Path(spec[len(PRETRAINED_PREFIX):]))
        return METHODS["pre"].load_class()(backbone).to(device).eval()
    return load_trained(Path(spec), device)[0]


def load_trained(path: Path, device: "torch.device | str") -> "tuple[FewShotModel, dict]":
    """(model in eval mode on `device`, checkpoint record) of a `smat train` or `smat import` checkpoint, read once.

    Imported checkpoints describe their architecture in `backbone.spec` (smat.models.official). For models
    trained here the stored θ_pre position table gives the grid: a table at its pre-trained grid (DINO's 14x14
    for a 128-px run) is resampled per forward, as `load_pretrained` built it (METHOD §1.1)."""
    from smat.models.backbones import create_backbone
    from smat.models.checkpoint import table_grid
    from smat.training.checkpointing import read_model_checkpoint

    checkpoint, config = read_model_checkpoint(path)
    record = checkpoint["backbone"]
    grid = table_grid(checkpoint["state_dict"].get("backbone.vit.pos_embed"))    # None: load_state_dict names it
    backbone = create_backbone(record["arch"], record["image_size"], dynamic_img_size=True, spec=record.get("spec"),
                               grid=grid)
    model = build_model(config, backbone)
    model.load_state_dict(checkpoint["state_dict"])
    return model.to(device).eval(), checkpoint

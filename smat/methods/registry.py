"""The methods, as one table that configs, training, evaluation, tables and figures read.

A method is a `FewShotModel` subclass in its own module plus one `Method` entry in `METHODS`; the entry
order is the paper's column order (Table 1). Adding a method touches that module and this table
(docs/ARCHITECTURE.md). `build_model` makes a fresh model from a `ModelConfig`; `smat.methods.checkpoint`
loads saved ones.

This module imports no torch at load time, so light commands (tables, figures, configs) stay fast.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass, field, fields
from typing import TYPE_CHECKING, Any, Callable

if TYPE_CHECKING:
    from torch import nn

    from smat.methods.base import FewShotModel

PRETRAINED_PREFIX = "pretrained:"   # `--model pretrained:FILE`: Pre, the θ_pre file itself


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
    ablatable: bool = False     # may a config change its switches?
    # Settings that tell its models apart: they are its section of the workflow config's `models`, its model
    # ids (`smat/tau~0.9/experts~8/seed~0`) and, with their labels, the names of the sweep's points.
    id_settings: tuple[tuple[str, str], ...] = ()
    swept: bool = False         # the τ/|M| sweep (config `models.sweep`) varies this method's id settings
    table2_row: int | None = None           # Table 2 row of its main model (METHOD §2.2)
    ablations: dict[int, dict[str, Any]] = field(default_factory=dict)   # Table 2 rows that switch it
    release_formats: tuple[str, ...] = ()   # the `smat import` formats that hold a model of this method
    check_switches: Callable[[Switches, int], None] | None = None   # rules on its resolved switches and M

    @property
    def trained(self) -> bool:
        return self.switches is not None

    @property
    def gated(self) -> bool:
        """Do its models have expert gates (masks, capacity, expert similarity)?"""
        return bool(self.switches and self.switches.mls)

    def load_class(self) -> type:
        module, name = self.model_class.split(":")
        return getattr(importlib.import_module(module), name)


def _softmerge_switches(resolved: Switches, experts: int) -> None:
    if resolved.mls or not resolved.ie:
        raise ValueError("softmerge: switches.mls must be false and switches.ie true (dense experts "
                         "merged by the router); for a single dense delta use method smat with mls/ie false")


def _smat_switches(resolved: Switches, experts: int) -> None:
    if not resolved.mls and resolved.ie:
        raise ValueError("switches mls=false with ie=true is not a Table 2 row (experts need gates); "
                         "set ie=false too for a dense delta, or method: softmerge for dense experts")
    if not resolved.ie and experts != 1:
        raise ValueError(f"switches.ie=false means a single expert with alpha = 1: set experts: 1 "
                         f"(got experts={experts})")


# SMAT is Table 2 row 1 and PMF row 6; rows 2-5 switch one component of SMAT off (METHOD §2.2). SoftMerge is
# dense experts with plain query CE (METHOD §2.1).
METHODS: dict[str, Method] = {m.name: m for m in (
    Method("pre", "Pre", "smat.methods.pre:Pre", switches=None),
    Method("pmf", "PMF", "smat.methods.pmf:PMF", Switches(mls=False, meta=False, dt=False, ie=False),
           table2_row=6, release_formats=("pmf",)),
    Method("softmerge", "SoftMerge", "smat.methods.softmerge:SoftMerge",
           Switches(mls=False, meta=True, dt=False, ie=True), ablatable=True, id_settings=(("experts", "M"),),
           check_switches=_softmerge_switches),
    Method("smat", "SMAT", "smat.methods.smat:SMAT", Switches(mls=True, meta=True, dt=True, ie=True),
           ablatable=True, id_settings=(("tau", "tau"), ("experts", "M")), swept=True, table2_row=1,
           ablations={2: {"switches.dt": False},
                      3: {"switches.ie": False, "experts": 1},
                      4: {"switches.meta": False},
                      5: {"switches.mls": False, "switches.ie": False, "experts": 1}},
           release_formats=("smat-official",), check_switches=_smat_switches),
)}


def trained_methods() -> tuple[str, ...]:
    """The meta-trained methods, in column order (read when asked: a method may be registered at run time)."""
    return tuple(name for name, method in METHODS.items() if method.trained)


def _the_method(what: str, matches) -> Method:
    """The one method of the table for which `matches(method)` holds."""
    found = [m for m in METHODS.values() if matches(m)]
    if len(found) != 1:
        raise ValueError(f"the method table has {len(found)} methods that are {what}; it needs exactly one")
    return found[0]


def swept_method() -> Method:
    """The method whose settings the τ/|M| sweep varies (Fig. 3, the Pareto front)."""
    return _the_method("swept", lambda m: m.swept)


def table2_method(row: int) -> Method:
    return _the_method(f"Table 2 row {row}", lambda m: m.table2_row == row)


def method_of_release(release_format: str) -> Method:
    return _the_method(f"held by release format {release_format!r}", lambda m: release_format in m.release_formats)


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
    if method not in trained_methods():
        known = ", ".join(repr(m) for m in trained_methods())
        raise ValueError(f"method {method!r} is not one of {known} (the meta-trained methods)")
    default = METHODS[method].switches
    resolved = Switches(**{name: getattr(default, name) if getattr(switches, name) is None
                           else getattr(switches, name) for name in SWITCH_NAMES})
    if not METHODS[method].ablatable and resolved != default:
        raise ValueError(f"switches {switches.__dict__}: {METHODS[method].display} has no ablation switches; "
                         f"leave them unset")
    if METHODS[method].check_switches:
        METHODS[method].check_switches(resolved, experts)
    return resolved


def build_model(config, backbone: "nn.Module") -> "FewShotModel":
    """A freshly initialised model of `config.method` (a `smat.methods.config.ModelConfig`) around `backbone`
    (whose weights become θ_pre)."""
    return METHODS[config.method].load_class().from_config(backbone, config)

"""The set of models one experiment config trains and evaluates, and where each appears (Table 1, Table 2,
the τ/|M| sweep, the figures). The workflow asks this module instead of restating it.

Every model has an id that is also its path under results/models/ and results/eval/, e.g.
`smat/tau~0.9/experts~8/seed~0`; ids follow from the config's `models` and `training.seeds` alone.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Sequence

from smat.methods.registry import METHODS

# Table 2 rows 2-5 (METHOD §2.2) switch one component off the main SMAT model; row 1 is the main SMAT
# model and row 6 is PMF, both trained anyway for Table 1.
ABLATION_ROWS: dict[int, dict[str, Any]] = {
    2: {"switches.dt": False},
    3: {"switches.ie": False, "experts": 1},
    4: {"switches.meta": False},
    5: {"switches.mls": False, "switches.ie": False, "experts": 1},
}


@dataclass
class Model:
    label: str                              # its name in tables and figures
    method: str
    settings: dict[str, Any] | None = None  # `smat train --set` values; None: not trained (Pre, released)
    released: dict[str, Any] | None = None  # an entry of the config's `released`: imported, not trained

    def cli_overrides(self) -> str:
        """The settings as `--set key=value` arguments (YAML spelling of booleans)."""
        return " ".join(f"--set {key}={str(value).lower() if isinstance(value, bool) else value}"
                        for key, value in (self.settings or {}).items())


@dataclass
class ModelSet:
    models: dict[str, Model] = field(default_factory=dict)
    main: dict[str, list[str]] = field(default_factory=dict)   # method -> ids of its Table 1 model, per seed
    sweep: list[str] = field(default_factory=list)             # every SMAT id of the τ/|M| grid (main included)
    ablations: list[str] = field(default_factory=list)
    released: list[str] = field(default_factory=list)          # the authors' checkpoints, imported

    @property
    def table1(self) -> list[str]:
        """Table 1 columns in the paper's order (the registry's), then the released models."""
        return [model_id for method in METHODS for model_id in self.main.get(method, [])] + self.released

    @property
    def table2(self) -> list[str]:
        return [*self.main["smat"], *self.ablations, *self.main["pmf"]]

    @property
    def trained(self) -> list[str]:
        return [model_id for model_id, model in self.models.items() if model.settings is not None]

    def figure_models(self, seed: int) -> tuple[dict[str, str], list[str]]:
        """The figures' models, of one seed: the main model of each trained method, and the sweep's SMAT ids."""
        suffix = f"/seed~{seed}"
        main = {method: next(i for i in ids if i.endswith(suffix)) for method, ids in self.main.items()
                if method != "pre"}
        return main, [model_id for model_id in self.sweep if model_id.endswith(suffix)]


# What each `smat import` format holds (smat.models.official).
RELEASED_METHODS = {"smat-official": "smat", "pmf": "pmf"}


def model_set(models: dict[str, Any], seeds: Sequence[int], released: dict[str, Any] | None = None) -> ModelSet:
    """The models of a workflow config's `models` section (smat, softmerge, sweep, ablation_rows) for `seeds`,
    plus the imported checkpoints of its `released` section (ids released/NAME)."""
    main_smat = models["smat"]
    sweep = models.get("sweep") or {"tau": [], "experts": []}
    points = [(float(main_smat["tau"]), int(main_smat["experts"]))]
    for tau in sweep["tau"]:
        for experts in sweep["experts"]:
            if (float(tau), int(experts)) not in points:
                points.append((float(tau), int(experts)))
    unknown = sorted(set(models.get("ablation_rows", [])) - set(ABLATION_ROWS))
    if unknown:
        raise ValueError(f"models.ablation_rows: {unknown} are not Table 2 ablation rows; choose from "
                         f"{sorted(ABLATION_ROWS)}")
    result = ModelSet()
    result.models["pre"] = Model("Pre", "pre")
    result.main["pre"] = ["pre"]

    def add(model_id: str, model: Model, seed: int) -> str:
        model.label = model.label if len(seeds) == 1 else f"{model.label} (seed {seed})"
        result.models[model_id] = model
        return model_id

    for seed in seeds:
        for tau, experts in points:
            is_main = (tau, experts) == points[0]
            label = "SMAT" if is_main else f"SMAT tau={tau:g} M={experts}"
            model_id = add(f"smat/tau~{tau}/experts~{experts}/seed~{seed}",
                           Model(label, "smat", {"method": "smat", "tau": tau, "experts": experts, "seed": seed}),
                           seed)
            result.sweep.append(model_id)
            if is_main:
                result.main.setdefault("smat", []).append(model_id)
        result.main.setdefault("pmf", []).append(
            add(f"pmf/seed~{seed}", Model("PMF", "pmf", {"method": "pmf", "seed": seed}), seed))
        experts = models["softmerge"]["experts"]
        result.main.setdefault("softmerge", []).append(add(
            f"softmerge/experts~{experts}/seed~{seed}",
            Model("SoftMerge", "softmerge", {"method": "softmerge", "experts": experts, "seed": seed}), seed))
        for row in models.get("ablation_rows", []):
            settings = {"method": "smat", "tau": main_smat["tau"], "experts": main_smat["experts"], "seed": seed,
                        **ABLATION_ROWS[row]}
            result.ablations.append(add(f"ablation/row~{row}/seed~{seed}", Model(f"Row {row}", "smat", settings),
                                        seed))
    for name, entry in (released or {}).items():
        model_id = f"released/{name}"
        result.models[model_id] = Model(entry["label"], RELEASED_METHODS[entry["format"]], released=entry)
        result.released.append(model_id)
    return result

"""The set of models one experiment config trains and evaluates, and where each appears (Table 1, Table 2,
the τ/|M| sweep, the figures), built from the method table (`smat.methods.registry.METHODS`) alone: a method
registered there is trained, evaluated, tabled and drawn with no edit here. The workflow asks this module
instead of restating it.

Every model has an id that is also its path under results/models/ and results/eval/: the method, its id
settings and the seed, e.g. `smat/tau~0.9/experts~8/seed~0`; ids follow from the config's `models` and
`training.seeds` alone.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from itertools import product
from typing import Any, Sequence

from smat.methods.registry import METHODS, Method, method_of_release, swept_method, table2_method


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
    sweep: list[str] = field(default_factory=list)             # every id of the τ/|M| grid (main included)
    ablations: list[str] = field(default_factory=list)
    released: list[str] = field(default_factory=list)          # the authors' checkpoints, imported

    @property
    def table1(self) -> list[str]:
        """Table 1 columns in the paper's order (the registry's), then the released models."""
        return [model_id for method in METHODS for model_id in self.main.get(method, [])] + self.released

    @property
    def table2(self) -> list[str]:
        """Row 1 (the full method's main model), its ablations, row 6 (the method with every switch off)."""
        return [*self.main[table2_method(1).name], *self.ablations, *self.main[table2_method(6).name]]

    @property
    def trained(self) -> list[str]:
        return [model_id for model_id, model in self.models.items() if model.settings is not None]

    @property
    def gated(self) -> list[str]:
        """The trained models with expert gates (switches.mls on), which also write expert_masks.npz."""
        return [model_id for model_id in self.trained if self.models[model_id].settings.get(
            "switches.mls", METHODS[self.models[model_id].method].gated)]

    @property
    def pretrained(self) -> list[str]:
        """The models that are θ_pre itself: neither trained nor imported (Pre)."""
        return [model_id for model_id, model in self.models.items() if model.settings is None and not model.released]

    def figure_models(self, seed: int) -> dict[str, list[str]]:
        """The models of the figures (METHOD §5), of one seed, by what a figure shows:

        * `trained`: the main model of every meta-trained method (training curves);
        * `gated`: the main model of every method with expert gates (capacity, mask overlap, expert similarity);
        * `sweep`: every point of the τ/|M| sweep;
        * `pareto`: the sweep and the main model of every other method (the ID/OOD trade-off);
        * `alignment`: the sweep's lowest- and highest-τ points at the main model's |M| (METHOD §5.2);
        * `anatomy`: the trained main models and the sweep's other points (METHOD §5.6)."""
        mine = [model_id for model_id, model in self.models.items()       # Pre has no seed: every seed's
                if (model.settings or {}).get("seed", seed) == seed and not model.released]
        main = {method: next(i for i in ids if i in mine) for method, ids in self.main.items()}
        sweep = [i for i in self.sweep if i in mine]
        swept = swept_method()
        trained = [main[name] for name, method in METHODS.items() if method.trained and name in main]
        first, *rest = [key for key, _ in swept.id_settings]
        centre = self.models[main[swept.name]].settings
        line = sorted((self.models[i].settings[first], i) for i in sweep
                      if all(self.models[i].settings[key] == centre[key] for key in rest))
        return {
            "trained": trained,
            "gated": [main[name] for name, method in METHODS.items() if method.gated and name in main],
            "sweep": sweep,
            "pareto": sweep + [main[name] for name in METHODS if name != swept.name and name in main],
            "alignment": list(dict.fromkeys([line[0][1], line[-1][1]])),
            "anatomy": trained + [i for i in sweep if i not in trained],
        }


def _model_id(method: Method, values: dict[str, Any], seed: int) -> str:
    return "/".join([method.name, *(f"{key}~{values[key]}" for key, _ in method.id_settings), f"seed~{seed}"])


def _settings(method: Method, section: dict[str, Any], where: str) -> dict[str, Any]:
    """A method's id settings from its section of the config's `models`, as the config gives them."""
    keys = [key for key, _ in method.id_settings]
    unknown = sorted(set(section) - set(keys))
    missing = [key for key in keys if key not in section]
    if unknown or missing:
        raise ValueError(f"{where}: {method.display} takes exactly {keys or 'no settings'}; "
                         f"{'unknown ' + str(unknown) if unknown else 'missing ' + str(missing)}")
    return {key: section[key] for key in keys}


def model_set(models: dict[str, Any], seeds: Sequence[int], released: dict[str, Any] | None = None) -> ModelSet:
    """The models of a workflow config's `models` section for `seeds`: each meta-trained method's main model
    (its section of `models`, by method name), the sweep's grid of the swept method's settings, the Table 2
    rows listed in `ablation_rows`; plus Pre and the imported checkpoints of `released` (ids released/NAME)."""
    swept, full = swept_method(), table2_method(1)
    unknown = sorted(set(models.get("ablation_rows", [])) - set(full.ablations))
    if unknown:
        raise ValueError(f"models.ablation_rows: {unknown} are not Table 2 ablation rows; choose from "
                         f"{sorted(full.ablations)}")
    main = {name: _settings(method, models.get(name) or {}, f"models.{name}")
            for name, method in METHODS.items() if method.trained}
    grid = models.get("sweep") or {}
    axes = [grid.get(key) or [] for key, _ in swept.id_settings]
    points = [main[swept.name]] + [dict(zip([key for key, _ in swept.id_settings], values))
                                   for values in product(*axes)]
    points = [point for i, point in enumerate(points) if point not in points[:i]]

    result = ModelSet()
    untrained = [name for name, method in METHODS.items() if not method.trained]
    for name in untrained:
        result.models[name] = Model(METHODS[name].display, name)
        result.main[name] = [name]

    def add(method: Method, values: dict[str, Any], seed: int, label: str, extra: dict | None = None,
            model_id: str | None = None) -> str:
        model_id = model_id or _model_id(method, values, seed)
        label = label if len(seeds) == 1 else f"{label} (seed {seed})"
        result.models[model_id] = Model(label, method.name, {"method": method.name, **values, "seed": seed,
                                                            **(extra or {})})
        return model_id

    for seed in seeds:
        for name, method in METHODS.items():
            if not method.trained:
                continue
            if method.swept:
                for point in points:
                    label = method.display if point == main[name] else " ".join(
                        [method.display, *(f"{text}={point[key]:g}" for key, text in method.id_settings)])
                    result.sweep.append(add(method, point, seed, label))
            else:
                add(method, main[name], seed, method.display)
            result.main.setdefault(name, []).append(_model_id(method, main[name], seed))
        for row in models.get("ablation_rows", []):
            result.ablations.append(add(full, main[full.name], seed, f"Row {row}", full.ablations[row],
                                        model_id=f"ablation/row~{row}/seed~{seed}"))
    for name, entry in (released or {}).items():
        model_id = f"released/{name}"
        result.models[model_id] = Model(entry["label"], method_of_release(entry["format"]).name, released=entry)
        result.released.append(model_id)
    return result

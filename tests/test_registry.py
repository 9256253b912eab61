"""The method registry and the experiment's model set: one table read by configs, training and analysis."""

import pytest
import torch

from smat.config import load_config
from smat.experiment import ABLATION_ROWS, model_set
from smat.methods.registry import (METHODS, SWITCH_NAMES, TRAINED_METHODS, Switches, build_model, column_rank,
                                   display_name, resolve_switches)
from smat.models.backbones import create_backbone
from smat.training.config import TrainConfig
from smat.training.optim import build_optimisers

ARCH = "vit_tiny_patch4_32"


def test_registry_order_names_and_defaults():
    assert list(METHODS) == ["pre", "pmf", "softmerge", "smat"]          # Table 1's column order
    assert TRAINED_METHODS == ("pmf", "softmerge", "smat")
    assert [display_name(m) for m in METHODS] == ["Pre", "PMF", "SoftMerge", "SMAT"]
    assert display_name("mystery") == "mystery" and display_name(None) == "model"
    assert column_rank("smat") == 3 and column_rank("mystery") == 4
    assert resolve_switches("smat", Switches(), 8) == Switches(True, True, True, True)
    assert resolve_switches("pmf", Switches(), 8) == Switches(False, False, False, False)
    assert resolve_switches("smat", Switches(dt=False), 8) == Switches(True, True, False, True)
    with pytest.raises(ValueError, match="PMF has no ablation switches"):
        resolve_switches("pmf", Switches(meta=True), 8)
    with pytest.raises(ValueError, match="not a meta-trained method"):
        resolve_switches("pre", Switches(), 8)


def test_every_trained_method_builds_and_names_its_optimiser_groups():
    expected = {"pmf": (["pmf"], []), "softmerge": (["delta"], ["router"]),
                "smat": (["delta", "masks", "lagrangian"], ["router"])}
    for method in TRAINED_METHODS:
        config = load_config(TrainConfig, None, [f"method={method}", "image_size=32",
                                                 "experts=2"])
        torch.manual_seed(0)
        model = build_model(config, create_backbone(ARCH, 32))
        assert model.method == method and isinstance(model, METHODS[method].load_class())
        sgd, adamw = model.optimiser_groups(config.optim)
        assert ([g.name for g in sgd], [g.name for g in adamw]) == expected[method]
        trained = {id(p) for p in model.parameters() if p.requires_grad}
        grouped = [id(p) for g in sgd + adamw for p in g.params]
        assert sorted(grouped) == sorted(trained), f"{method}: every trainable tensor in exactly one group"
        optimisers = build_optimisers(model, config.optim)
        assert [g["name"] for g in optimisers.sgd.param_groups] == expected[method][0]


def test_unknown_method_in_a_config_lists_the_registry():
    from smat.io import SmatError

    with pytest.raises(SmatError, match="'maml' is not one of 'pmf', 'softmerge', 'smat'"):
        load_config(TrainConfig, None, ["method=maml"])


def test_model_set_ids_labels_and_tables():
    models = {"smat": {"tau": 0.9, "experts": 8}, "softmerge": {"experts": 4},
              "sweep": {"tau": [0.5, 0.9], "experts": [8, 2]}, "ablation_rows": [4, 2]}
    one = model_set(models, [0])
    assert list(one.models) == [
        "pre", "smat/tau~0.9/experts~8/seed~0", "smat/tau~0.5/experts~8/seed~0", "smat/tau~0.5/experts~2/seed~0",
        "smat/tau~0.9/experts~2/seed~0", "pmf/seed~0", "softmerge/experts~4/seed~0", "ablation/row~4/seed~0",
        "ablation/row~2/seed~0"]
    assert one.table1 == ["pre", "pmf/seed~0", "softmerge/experts~4/seed~0", "smat/tau~0.9/experts~8/seed~0"]
    assert one.table2 == ["smat/tau~0.9/experts~8/seed~0", "ablation/row~4/seed~0", "ablation/row~2/seed~0",
                          "pmf/seed~0"]
    assert one.models["smat/tau~0.5/experts~2/seed~0"].label == "SMAT tau=0.5 M=2"
    assert one.models["ablation/row~4/seed~0"].cli_overrides() == (
        "--set method=smat --set tau=0.9 --set experts=8 --set seed=0 --set switches.meta=false")
    assert one.models["pre"].settings is None and "pre" not in one.trained
    two = model_set(models, [0, 1])
    assert two.models["pmf/seed~1"].label == "PMF (seed 1)"
    main, sweep = two.figure_models(1)
    assert main["smat"] == "smat/tau~0.9/experts~8/seed~1" and all(i.endswith("seed~1") for i in sweep)
    assert set(ABLATION_ROWS) == {2, 3, 4, 5} and set(SWITCH_NAMES) == {"mls", "meta", "dt", "ie"}
    with pytest.raises(ValueError, match=r"\[7\] are not Table 2 ablation rows"):
        model_set({**models, "ablation_rows": [7]}, [0])

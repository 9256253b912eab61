"""The method table and the experiment's model set built from it: every check runs over every registered method,
and a method registered at run time (module + one entry, nothing else) is trained, tabled and drawn."""

import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from smat.config_loader import load_config
from smat.experiment import model_set
from smat.methods.registry import (METHODS, SWITCH_NAMES, Method, Switches, build_model, column_rank, display_name,
                                   resolve_switches, swept_method, table2_method, trained_methods)
from smat.models.backbones import create_backbone
from smat.training.config import TrainConfig
from smat.training.optim import build_optimisers

ROOT = Path(__file__).resolve().parent.parent
ARCH = "vit_tiny_patch4_32"

# A method defined here, not in the package: the table entry is all the package learns of it.
TOY = Method("toy", "Toy", "toy_method:Toy", Switches(mls=False, meta=False, dt=False, ie=False))
TOY_MODULE = '''
from smat.methods.pmf import PMF


class Toy(PMF):
    """PMF under another name: the smallest complete method."""
    method = "toy"
'''


@pytest.fixture
def toy(monkeypatch, tmp_path):
    (tmp_path / "toy_method.py").write_text(TOY_MODULE)
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setitem(METHODS, "toy", TOY)
    return tmp_path


def dry_run_all(workdir: Path, register: str) -> str:
    """The shell commands of `snakemake -n all` in `workdir` (the default config), run in a process that first
    executes `register` (Python that adds a table entry) with `workdir` on its import path."""
    code = "\n".join(["import sys", f"sys.path.insert(0, {str(workdir)!r})", register,
                       "from snakemake.cli import main", "sys.argv[0] = 'snakemake'", "main()"])
    plan = subprocess.run([sys.executable, "-c", code, "-n", "all", "--snakefile", str(ROOT / "Snakefile"),
                           "--directory", str(workdir), "--printshellcmds"], capture_output=True, text=True,
                          timeout=300)
    assert plan.returncode == 0, plan.stderr[-2000:]
    return plan.stdout


def check_entry(name: str) -> None:
    """What every entry of the table must satisfy."""
    method = METHODS[name]
    assert display_name(name) == method.display and column_rank(name) == list(METHODS).index(name)
    if not method.trained:
        assert name not in trained_methods()
        with pytest.raises(ValueError, match="not a meta-trained method|is not one of"):
            resolve_switches(name, Switches(), 8)
        return
    assert name in trained_methods()
    assert resolve_switches(name, Switches(), 8) == method.switches
    if not method.ablatable:
        flipped = Switches(meta=not method.switches.meta)
        with pytest.raises(ValueError, match=f"{method.display} has no ablation switches"):
            resolve_switches(name, flipped, 8)
    overrides = [f"method={name}", "image_size=32", "experts=2"]
    config = load_config(TrainConfig, None, overrides)
    torch.manual_seed(0)
    model = build_model(config, create_backbone(ARCH, 32))
    assert model.method == name and isinstance(model, method.load_class())
    sgd, adamw = model.optimiser_groups(config.optim)
    trained = {id(p) for p in model.parameters() if p.requires_grad}
    grouped = [id(p) for g in sgd + adamw for p in g.params]
    assert sorted(grouped) == sorted(trained), f"{name}: every trainable tensor in exactly one group"
    assert [g["name"] for g in build_optimisers(model, config.optim).sgd.param_groups] == [g.name for g in sgd]


@pytest.mark.parametrize("name", list(METHODS))
def test_every_registered_method_is_complete(name):
    check_entry(name)


def test_the_table_defines_the_papers_roles():
    assert list(METHODS)[0] == "pre" and not METHODS["pre"].trained           # Table 1 starts with Pre
    assert swept_method().gated and swept_method().table2_row == 1
    assert table2_method(1).switches == Switches(True, True, True, True)
    assert table2_method(6).switches == Switches(False, False, False, False)
    assert sorted(table2_method(1).ablations) == [2, 3, 4, 5] and set(SWITCH_NAMES) == {"mls", "meta", "dt", "ie"}
    for row, change in table2_method(1).ablations.items():          # each row switches exactly one component
        switched = [key for key, value in change.items() if key.startswith("switches.") and value is False]
        assert switched, row


def test_unknown_method_in_a_config_lists_the_registry():
    from smat.io import SmatError

    known = ", ".join(repr(m) for m in trained_methods())
    with pytest.raises(SmatError, match=f"'maml' is not one of {known}"):
        load_config(TrainConfig, None, ["method=maml"])


def test_model_set_ids_labels_and_tables():
    swept, full, off = swept_method(), table2_method(1), table2_method(6)
    models = {"sweep": {"tau": [0.5, 0.9], "experts": [8, 2]}, "ablation_rows": [4, 2],
              swept.name: {"tau": 0.9, "experts": 8}}
    for name, method in METHODS.items():
        if method.trained and name != swept.name:
            models[name] = {key: 4 for key, _ in method.id_settings}
    one = model_set(models, [0])
    main = f"{swept.name}/tau~0.9/experts~8/seed~0"
    assert one.table1 == ["pre" if not m.trained else next(i for i in one.models if i.startswith(f"{n}/"))
                          for n, m in METHODS.items()]
    assert one.sweep == [main, f"{swept.name}/tau~0.5/experts~8/seed~0", f"{swept.name}/tau~0.5/experts~2/seed~0",
                         f"{swept.name}/tau~0.9/experts~2/seed~0"]
    assert one.table2 == [main, "ablation/row~4/seed~0", "ablation/row~2/seed~0", one.main[off.name][0]]
    assert one.models[f"{swept.name}/tau~0.5/experts~2/seed~0"].label == f"{swept.display} tau=0.5 M=2"
    row4 = " ".join(f"--set {k}={str(v).lower()}" for k, v in full.ablations[4].items())
    assert one.models["ablation/row~4/seed~0"].cli_overrides() == (
        f"--set method={full.name} --set tau=0.9 --set experts=8 --set seed=0 {row4}")
    assert one.models["pre"].settings is None and "pre" not in one.trained
    two = model_set(models, [0, 1])
    assert two.models[main.replace("seed~0", "seed~1")].label == f"{swept.display} (seed 1)"
    roles = two.figure_models(1)
    assert roles["gated"] == [main.replace("seed~0", "seed~1")]
    assert all(i.endswith("seed~1") for role in roles.values() for i in role if i != "pre")
    assert roles["alignment"] == [f"{swept.name}/tau~0.5/experts~8/seed~1", f"{swept.name}/tau~0.9/experts~8/seed~1"]
    with pytest.raises(ValueError, match=r"\[7\] are not Table 2 ablation rows"):
        model_set({**models, "ablation_rows": [7]}, [0])
    with pytest.raises(ValueError, match=f"models.{swept.name}: {swept.display} takes exactly"):
        model_set({**models, swept.name: {"tau": 0.9}}, [0])


def test_a_method_registered_at_run_time_is_trained_tabled_and_drawn(toy):
    check_entry("toy")
    config = yaml.safe_load((ROOT / "config" / "config.yaml").read_text())
    models = model_set(config["models"], [0])
    assert "toy/seed~0" in models.trained and models.table1[-1] == "toy/seed~0"
    assert "toy/seed~0" in models.figure_models(0)["trained"] and "toy/seed~0" in models.figure_models(0)["pareto"]

    # The workflow, in a process of its own that registers the entry first: a dry run of `all`.
    plan = dry_run_all(toy, 'from smat.methods.registry import METHODS, Method, Switches\n'
                            'METHODS["toy"] = Method("toy", "Toy", "toy_method:Toy", Switches(False, False, False, False))')
    assert "--set method=toy --set seed=0" in plan                             # meta-tuned
    assert "results/eval/toy/seed~0/" in plan                                   # evaluated, tabled
    curves = next(line for line in plan.splitlines() if "smat figures curves" in line)
    assert "results/models/toy/seed~0/" in curves                               # drawn

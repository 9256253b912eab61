"""Shared infrastructure: strict configs with overrides, atomic writes, the CLI's error handling."""

from __future__ import annotations

import dataclasses
import subprocess
import sys
from typing import Literal

import pytest

from smat.cli import main
from smat.config import apply_overrides, build_dataclass, load_config
from smat.io import SmatError, atomic_open, read_json, stable_hash, write_json


@dataclasses.dataclass
class Inner:
    rate: float = 0.1
    enabled: bool = True


@dataclasses.dataclass
class Outer:
    method: Literal["smat", "pmf"] = "smat"
    steps: int = 10
    scale: tuple[float, float] = (0.08, 1.0)
    inner: Inner = dataclasses.field(default_factory=Inner)


def test_overrides_parse_yaml_scalars_and_nested_keys():
    data = apply_overrides({"inner": {"rate": 0.5}}, ["steps=3", "inner.enabled=false", "scale=[0.5, 1]"])
    assert data == {"inner": {"rate": 0.5, "enabled": False}, "steps": 3, "scale": [0.5, 1]}


def test_build_dataclass_coerces_nested_and_rejects_unknown_keys(tmp_path):
    cfg = build_dataclass(Outer, {"steps": 5, "scale": [0.5, 1], "inner": {"rate": 1}})
    assert cfg.steps == 5 and cfg.scale == (0.5, 1.0) and cfg.inner.rate == 1.0 and cfg.inner.enabled
    with pytest.raises(SmatError, match="unknown key.*stepz"):
        build_dataclass(Outer, {"stepz": 5})
    with pytest.raises(SmatError, match=r"inner\.rate.*number"):
        build_dataclass(Outer, {"inner": {"rate": "fast"}})
    with pytest.raises(SmatError, match="'softmerge' is not one of"):
        build_dataclass(Outer, {"method": "softmerge"})


def test_exponent_literals_are_numbers_in_files_and_overrides(tmp_path):
    """PyYAML (YAML 1.1) reads `1e-3` as a string; configs accept the spelling users write."""
    path = tmp_path / "exp.yaml"
    path.write_text("inner: {rate: 1e-3}\nscale: [5E-2, 1]\n")
    config = load_config(Outer, path, ["steps=20", "inner.rate=2e+1"])
    assert config.inner.rate == 20.0 and config.scale == (0.05, 1.0) and config.steps == 20
    assert load_config(Outer, path).inner.rate == 1e-3
    assert apply_overrides({}, ["name=e5", "version=1e"]) == {"name": "e5", "version": "1e"}   # not numbers


def test_fixed_length_tuples_reject_other_lengths():
    with pytest.raises(SmatError, match=r"scale: expected 2 values, got 3"):
        build_dataclass(Outer, {"scale": [0.1, 0.5, 1.0]})


def test_load_config_names_the_file(tmp_path):
    path = tmp_path / "train.yaml"
    path.write_text("steps: 7\nbogus: 1\n")
    with pytest.raises(SmatError, match=rf"{path}.*bogus"):
        load_config(Outer, path)
    path.write_text("steps: 7\n")
    assert load_config(Outer, path, ["inner.rate=0.2"]).inner.rate == 0.2


def test_atomic_open_keeps_old_content_when_the_write_fails(tmp_path):
    path = tmp_path / "out.json"
    write_json(path, {"a": 1})
    with pytest.raises(RuntimeError):
        with atomic_open(path) as handle:
            handle.write("half")
            raise RuntimeError("crash")
    assert read_json(path) == {"a": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["out.json"]


def test_stable_hash_is_order_independent():
    assert stable_hash({"a": 1, "b": [1, 2]}) == stable_hash({"b": [1, 2], "a": 1})
    assert stable_hash({"a": 1}) != stable_hash({"a": 2})


def test_cli_reports_user_errors_without_traceback(tmp_path, capsys):
    code = main(["data", "check", str(tmp_path / "missing")])
    assert code == 2
    err = capsys.readouterr().err
    assert "smat: error:" in err and "missing" in err and "Traceback" not in err


def test_console_script_help():
    out = subprocess.run([sys.executable, "-m", "smat.cli", "--help"], capture_output=True, text=True, check=True)
    for command in ("data", "episodes", "fetch", "pretrain", "train", "evaluate", "select-lr", "tables"):
        assert command in out.stdout

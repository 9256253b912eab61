"""Shared infrastructure: strict configs with overrides, atomic writes, the CLI's error handling."""

from __future__ import annotations

import dataclasses
import errno
import os
import subprocess
import sys
from typing import Literal

import pytest

from smat.cli import describe_error, main
from smat.config_loader import apply_overrides, build_dataclass, load_config
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


def test_an_output_that_cannot_be_written_fails_before_the_work(tmp_path, capsys):
    blocker = tmp_path / "a_file"
    blocker.write_text("x")
    code = main(["data", "build-embedded", "--out", str(blocker / "raw")])
    assert code == 2
    err = capsys.readouterr().err.strip()
    assert err == f"smat: error: {blocker / 'raw'}: {blocker} is not a folder; choose another output path"
    assert blocker.read_text() == "x"


@pytest.mark.skipif(os.geteuid() == 0, reason="root may write into a read-only folder")
def test_a_read_only_output_folder_fails_before_the_work(tmp_path, capsys):
    folder = tmp_path / "ro"
    folder.mkdir()
    folder.chmod(0o555)
    try:
        assert main(["data", "build-embedded", "--out", str(folder / "raw")]) == 2
        assert "cannot write in" in capsys.readouterr().err
    finally:
        folder.chmod(0o755)


@pytest.mark.parametrize("err, expected", [
    (OSError(errno.ENOSPC, "No space left on device", "/data/x.npy"),
     "/data/x.npy: the disk is full: free space or write elsewhere (No space left on device)"),
    (OSError(errno.EROFS, "Read-only file system", "/ro/x"), "/ro/x: the file system is read-only"),
    (RuntimeError("size mismatch for weight\nlong torch detail"), "RuntimeError: size mismatch for weight (run "
                                                                   "with --debug for the traceback)"),
    (KeyError("oops"), "unexpected KeyError: 'oops'; please report it"),
])
def test_every_failure_is_described_in_one_line(err, expected):
    text = describe_error(err)
    assert expected in text and "\n" not in text


def test_debug_shows_the_traceback(tmp_path):
    args = [sys.executable, "-m", "smat.cli", "data", "check", str(tmp_path / "missing")]
    plain = subprocess.run(args, capture_output=True, text=True)
    debug = subprocess.run(args, capture_output=True, text=True, env={**os.environ, "SMAT_DEBUG": "1"})
    assert plain.returncode == 2 and "Traceback" not in plain.stderr
    assert debug.returncode != 0 and "Traceback" in debug.stderr
    flag = subprocess.run(args[:3] + ["--debug"] + args[3:], capture_output=True, text=True)
    assert "Traceback" in flag.stderr


def test_console_script_help():
    out = subprocess.run([sys.executable, "-m", "smat.cli", "--help"], capture_output=True, text=True, check=True)
    for command in ("data", "episodes", "fetch", "pretrain", "train", "evaluate", "select-lr", "tables"):
        assert command in out.stdout

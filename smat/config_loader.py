"""Typed configuration from YAML: load, apply `--set key=value` overrides, build dataclasses strictly.

Unknown keys and wrong types are errors that name the file and the key, so a typo never silently falls
back to a default.
"""

from __future__ import annotations

import dataclasses
import math
import re
import types
import typing
from pathlib import Path
from typing import Any, TypeVar

import yaml

from smat.io import SmatError

T = TypeVar("T")


class _Loader(yaml.SafeLoader):
    """Safe YAML that also reads `1e-3` as a number: YAML 1.1 (PyYAML) needs a dot and a signed exponent
    (`1.0e-3`), and users write the YAML 1.2 / Python spelling."""


_EXPONENT_FLOAT = re.compile(r"^[-+]?(?:[0-9][0-9_]*(?:\.[0-9_]*)?|\.[0-9_]+)[eE][-+]?[0-9]+$")
_Loader.add_implicit_resolver("tag:yaml.org,2002:float", _EXPONENT_FLOAT, list("-+0123456789."))


def parse_yaml(text: str) -> Any:
    return yaml.load(text, Loader=_Loader)


def exponents_as_numbers(data: Any) -> Any:
    """`data` (as loaded by plain YAML 1.1, e.g. Snakemake's config) with strings like "1e-3" made numbers."""
    if isinstance(data, dict):
        return {key: exponents_as_numbers(value) for key, value in data.items()}
    if isinstance(data, list):
        return [exponents_as_numbers(value) for value in data]
    if isinstance(data, str) and _EXPONENT_FLOAT.match(data):
        return float(data.replace("_", ""))
    return data


def load_yaml(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    try:
        data = parse_yaml(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise SmatError(f"{path}: config file not found") from None
    except yaml.YAMLError as err:
        raise SmatError(f"{path}: not valid YAML ({err})") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise SmatError(f"{path}: expected a mapping at the top level, got {type(data).__name__}")
    return data


MAX_SEED = 2**32 - 1    # numpy's seed range


def check_ranges(config: Any, positive: tuple[str, ...] = (), non_negative: tuple[str, ...] = (),
                 fraction: tuple[str, ...] = (), seeds: tuple[str, ...] = ()) -> None:
    """ValueError naming the first setting of `config` out of its range: > 0, >= 0, in [0, 1], a seed.

    Also rejects NaN and infinity, which every comparison would otherwise let through or stop on silently.
    None (an optional setting left unset) is always accepted.
    """
    rules = [(positive, lambda v: v > 0, "> 0"), (non_negative, lambda v: v >= 0, ">= 0"),
             (fraction, lambda v: 0 <= v <= 1, "in [0, 1]"), (seeds, lambda v: 0 <= v <= MAX_SEED,
                                                              f"an integer in [0, {MAX_SEED}]")]
    for names, ok, wanted in rules:
        for name in names:
            value = getattr(config, name)
            if value is not None and not (math.isfinite(value) and ok(value)):
                raise ValueError(f"{name}={value}: must be {wanted}")


def nonfinite_keys(data: Any, where: str = "config") -> list[str]:
    """Dotted keys of `data` (parsed YAML: mappings, lists, scalars) holding NaN or infinity, as `KEY=VALUE`.

    Every typed config refuses them (`build_dataclass`); the workflow runs this on its whole config before any
    job starts, since JSON-Schema's bounds let NaN through.
    """
    if isinstance(data, dict):
        return [found for key, value in data.items() for found in nonfinite_keys(value, f"{where}.{key}")]
    if isinstance(data, list):
        return [found for i, value in enumerate(data) for found in nonfinite_keys(value, f"{where}[{i}]")]
    if isinstance(data, float) and not math.isfinite(data):
        return [f"{where}={data}"]
    return []


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply `a.b=value` strings; values are parsed as YAML scalars (so `true`, `0.9`, `[1, 2]` work)."""
    data = dict(data)
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise SmatError(f"--set {item!r}: expected KEY=VALUE")
        value = parse_yaml(raw)
        node = data
        parts = key.split(".")
        for part in parts[:-1]:
            child = node.get(part)
            child = dict(child) if isinstance(child, dict) else {}
            node[part] = child
            node = child
        node[parts[-1]] = value
    return data


def build_dataclass(cls: type[T], data: dict[str, Any], where: str = "config") -> T:
    """Instantiate dataclass `cls` from a mapping, recursing into nested dataclasses, rejecting unknown keys."""
    if not isinstance(data, dict):
        raise SmatError(f"{where}: expected a mapping, got {data!r}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        raise SmatError(f"{where}: unknown key(s) {', '.join(unknown)}; known keys: {', '.join(fields)}")
    kwargs = {}
    for name, value in data.items():
        kwargs[name] = _coerce(hints[name], value, f"{where}.{name}")
    try:
        return cls(**kwargs)
    except (TypeError, ValueError) as err:
        raise SmatError(f"{where}: {err}") from None


def _coerce(hint: Any, value: Any, where: str) -> Any:
    origin = typing.get_origin(hint)
    if dataclasses.is_dataclass(hint):
        return build_dataclass(hint, value, where)
    if origin in (typing.Union, types.UnionType):
        options = typing.get_args(hint)
        if value is None and type(None) in options:
            return None
        errors = []
        for option in options:
            if option is type(None):
                continue
            try:
                return _coerce(option, value, where)
            except SmatError as err:
                errors.append(str(err))
        raise SmatError(errors[0] if errors else f"{where}: invalid value {value!r}")
    if origin is typing.Literal:
        if value not in typing.get_args(hint):
            choices = ", ".join(repr(c) for c in typing.get_args(hint))
            raise SmatError(f"{where}: {value!r} is not one of {choices}")
        return value
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise SmatError(f"{where}: expected a list, got {value!r}")
        args = typing.get_args(hint) or (Any,)
        fixed = origin is tuple and Ellipsis not in args
        if fixed and len(value) != len(args):
            raise SmatError(f"{where}: expected {len(args)} values, got {len(value)} ({value!r})")
        hints = args if fixed else [args[0]] * len(value)
        items = [_coerce(h, v, f"{where}[{i}]") for i, (h, v) in enumerate(zip(hints, value))]
        return tuple(items) if origin is tuple else items
    if origin is dict:
        if not isinstance(value, dict):
            raise SmatError(f"{where}: expected a mapping, got {value!r}")
        return dict(value)
    if hint is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise SmatError(f"{where}: expected a number, got {value!r}")
        if not math.isfinite(value):
            raise SmatError(f"{where}: {value} is not a finite number")
        return float(value)
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise SmatError(f"{where}: expected an integer, got {value!r}")
        return value
    if hint is bool:
        if not isinstance(value, bool):
            raise SmatError(f"{where}: expected true or false, got {value!r}")
        return value
    if hint is str:
        if not isinstance(value, str):
            raise SmatError(f"{where}: expected a string, got {value!r}")
        return value
    return value


def load_config(cls: type[T], path: str | Path | None, overrides: list[str] | None = None) -> T:
    """Defaults of `cls`, updated by the YAML file at `path` (if any) and then by `--set` overrides."""
    data = load_yaml(path) if path else {}
    data = apply_overrides(data, overrides or [])
    return build_dataclass(cls, data, where=str(path) if path else "config")


def to_dict(config: Any) -> dict[str, Any]:
    return dataclasses.asdict(config)

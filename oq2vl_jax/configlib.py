"""Typed configs from YAML: nested frozen dataclasses, unknown keys and bad values rejected by name.

Every config section is a frozen dataclass. `from_dict` builds one from plain data (a parsed YAML
mapping), checking each key against the dataclass fields and each value against its annotation, and
reports the dotted path of anything wrong. `apply_overrides` applies `key.sub=value` strings from the
command line, where the value is parsed as YAML (so `3e-5`, `true`, `[1, 2]` work).
"""

from __future__ import annotations

import dataclasses
import os
import types
import typing
from typing import Any, Mapping, TypeVar

import yaml

from oq2vl_jax.cli import UserError

T = TypeVar("T")


class ConfigError(UserError, ValueError):
    """A config key or value is wrong; the message names it by its dotted path."""


def _check_value(value: Any, tp: Any, path: str) -> Any:
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if tp is Any:
        return value
    if dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        if not isinstance(value, Mapping):
            raise ConfigError(f"{path}: expected a mapping for {tp.__name__}, got {value!r}")
        return from_dict(tp, value, path)
    if origin in (typing.Union, types.UnionType):
        errors = []
        for arg in args:
            if arg is type(None):
                if value is None:
                    return None
                continue
            try:
                return _check_value(value, arg, path)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(f"{path}: {value!r} matches none of {tp}")
    if origin is typing.Literal:
        if value not in args:
            raise ConfigError(f"{path}: {value!r} is not one of {list(args)}")
        return value
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{path}: expected a list, got {value!r}")
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_check_value(v, args[0], f"{path}[{i}]") for i, v in enumerate(value))
        if len(args) != len(value):
            raise ConfigError(f"{path}: expected {len(args)} items, got {len(value)}")
        return tuple(_check_value(v, a, f"{path}[{i}]") for i, (a, v) in enumerate(zip(args, value)))
    if tp is float:
        if isinstance(value, str):  # YAML 1.1 reads "3e-5" (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{path}: expected a number, got {value!r}")
        return float(value)
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{path}: expected an integer, got {value!r}")
        return value
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{path}: expected true/false, got {value!r}")
        return value
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{path}: expected a string, got {value!r}")
        return value
    raise TypeError(f"{path}: unsupported annotation {tp}")


def from_dict(cls: type[T], data: Mapping[str, Any], path: str = "") -> T:
    """Builds dataclass `cls` from `data`, rejecting unknown keys and mistyped values."""
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        where = f" in {path}" if path else ""
        raise ConfigError(
            f"unknown config key(s){where}: {', '.join(unknown)} (known: {', '.join(sorted(fields))})"
        )
    kwargs = {}
    for name, value in data.items():
        kwargs[name] = _check_value(value, hints[name], f"{path}.{name}" if path else name)
    try:
        return cls(**kwargs)
    except (ValueError, TypeError) as e:
        if isinstance(e, ConfigError):
            raise
        raise ConfigError(f"{path or cls.__name__}: {e}") from e


def to_dict(cfg: Any) -> Any:
    """Plain-data form of a config (tuples become lists), suitable for YAML/JSON."""
    if dataclasses.is_dataclass(cfg):
        return {f.name: to_dict(getattr(cfg, f.name)) for f in dataclasses.fields(cfg)}
    if isinstance(cfg, (list, tuple)):
        return [to_dict(v) for v in cfg]
    return cfg


def set_path(data: dict, key: str, value: Any) -> dict:
    """Sets dotted `key` ("model.vision.image_size") in nested plain data, creating sections."""
    parts = key.strip().split(".")
    node = data
    for p in parts[:-1]:
        node = node.setdefault(p, {})
        if not isinstance(node, dict):
            raise ConfigError(f"override {key!r}: {p!r} is not a section")
    node[parts[-1]] = value
    return data


def apply_overrides(data: dict, overrides: list[str]) -> dict:
    """Applies `a.b.c=value` overrides to nested plain data; the value is parsed as YAML."""
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} is not of the form key=value")
        key, raw = item.split("=", 1)
        try:
            value = yaml.safe_load(raw)
        except yaml.YAMLError as e:
            raise ConfigError(f"override {item!r}: its value is not valid YAML ({e.problem})") from None
        set_path(data, key, value)
    return data


def load_yaml(path: str) -> dict:
    if not os.path.isfile(path):
        raise ConfigError(f"{path}: no such config file")
    with open(path, encoding="utf-8") as f:
        try:
            data = yaml.safe_load(f) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"{path}: not valid YAML: {' '.join(str(e).split())}") from None
        except UnicodeDecodeError:
            raise ConfigError(f"{path}: not a UTF-8 text file (is it a YAML config?)") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: top level must be a mapping")
    return data

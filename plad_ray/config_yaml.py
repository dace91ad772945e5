"""YAML to a tree of config dataclasses: the file, dotted `key=value` overrides, keys and types.

Generic over the dataclasses (plad_ray.config defines them and their rules); every error is a
one-line `ConfigError` naming the file or the key's dotted name.
"""

import dataclasses
import types
import typing
from pathlib import Path
from typing import Any

import yaml

from plad_ray.errors import ConfigError


def read_mapping(path: str) -> dict:
    """The YAML file's top-level mapping ({} for an empty file)."""
    file = Path(path)
    if not file.is_file():
        raise ConfigError(f"config file {path}: not found; pass an existing YAML file to --config")
    try:
        raw = yaml.safe_load(file.read_text()) or {}
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark else ""
        raise ConfigError(f"config file {path}{where}: not valid YAML ({getattr(e, 'problem', e)})") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"config file {path}: must be a mapping of keys to values")
    return raw


def apply_override(raw: dict, item: str) -> None:
    """Set `key.path=value` (the value parsed as YAML) in the raw mapping, creating sections on the way."""
    key, sep, value = item.partition("=")
    if not sep or not key:
        raise ConfigError(f"override {item!r}: must look like key.path=value, e.g. train.loss.beta=0.5")
    _set_dotted(raw, key.strip(), _parse_value(key, value))


def _parse_value(key: str, value: str) -> Any:
    try:
        return yaml.safe_load(value) if value != "" else ""
    except yaml.YAMLError:
        raise ConfigError(f"override {key}: value {value!r} is not valid YAML") from None


def _set_dotted(raw: dict, key: str, value: Any) -> None:
    node = raw
    parts = key.split(".")
    for part in parts[:-1]:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"override {key}: {part} is a value, not a section")
        node = child
    node[parts[-1]] = value


def build(cls, raw: Any, prefix: str):
    """An instance of dataclass `cls` from a mapping; unknown keys and wrong types name their dotted key."""
    where = prefix.rstrip(".") or "the top level"
    if not isinstance(raw, dict):
        raise ConfigError(f"config key {where}: must be a section (a mapping), got {raw!r}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(raw) - names)
    if unknown:
        raise ConfigError(
            f"config key {prefix}{unknown[0]}: unknown key; valid keys at {where} are: {', '.join(sorted(names))}"
        )
    kwargs = {}
    for name, value in raw.items():
        kwargs[name] = _coerce(hints[name], value, f"{prefix}{name}")
    return cls(**kwargs)


def _coerce(hint, value: Any, key: str) -> Any:
    if dataclasses.is_dataclass(hint):
        return build(hint, value if value is not None else {}, key + ".")
    origin = typing.get_origin(hint)
    if origin in (types.UnionType, typing.Union):
        args = typing.get_args(hint)
        if value is None and type(None) in args:
            return None
        (inner,) = [a for a in args if a is not type(None)]
        return _coerce(inner, value, key)
    if hint is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if hint is float and isinstance(value, str):
        try:  # PyYAML reads 1e-5 (no decimal point) as a string
            return float(value)
        except ValueError:
            pass
    if hint is dict and isinstance(value, dict):
        return dict(value)
    if origin is list and isinstance(value, list):
        (inner,) = typing.get_args(hint)
        return [_coerce(inner, item, f"{key}[{i}]") for i, item in enumerate(value)]
    if hint in (int, float, str, bool) and type(value) is hint:
        return value
    raise ConfigError(f"config key {key}: expected {_type_name(hint)}, got {value!r}")


def _type_name(hint) -> str:
    if typing.get_origin(hint) is list:
        return f"a list of {_type_name(typing.get_args(hint)[0]).split(' ', 1)[1]}s, e.g. [a, b]"
    return {int: "an integer", float: "a number", str: "a string", bool: "true or false", dict: "a mapping"}.get(
        hint, str(hint)
    )

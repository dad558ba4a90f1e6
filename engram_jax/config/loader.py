"""Reading configs: YAML files and packaged presets, `base:` inheritance, dotted overrides, and
the typed conversion into the dataclasses of `engram_jax.config.schema` with errors that name the
dotted key.

A config argument is a YAML path or the name of a packaged preset (`tiny`, `small.yaml`, ...: the
files of the repository's `configs/`, installed with the package as `engram_jax.presets`).
"""

from __future__ import annotations

import dataclasses
import importlib.resources
import pathlib
import types
import typing
from collections.abc import Mapping
from typing import Any

import yaml

from engram_jax.config.schema import Config, ConfigError, EngramConfig, ModelConfig

PRESETS_PACKAGE = "engram_jax.presets"


def preset_names() -> list[str]:
    """Names of the packaged presets (`configs/*.yaml` of the repository), sorted."""
    return sorted(p.name for p in importlib.resources.files(PRESETS_PACKAGE).iterdir()
                  if p.name.endswith(".yaml"))


def config_path(path_or_preset: str | pathlib.Path) -> pathlib.Path:
    """The YAML file of a path, or of a packaged preset's name (`tiny` or `tiny.yaml`).

    Raises:
      FileNotFoundError: neither a file nor a preset; the message lists the presets.
    """
    path = pathlib.Path(path_or_preset)
    if path.is_file():
        return path
    name = path.name if path.suffix == ".yaml" else f"{path.name}.yaml"
    if name in preset_names() and (path.parent == pathlib.Path(".")
                                   or path.parent.name == "configs"):
        with importlib.resources.as_file(importlib.resources.files(PRESETS_PACKAGE) / name) as p:
            return pathlib.Path(p)
    raise FileNotFoundError(f"config file {path} does not exist (packaged presets: "
                            f"{', '.join(n.removesuffix('.yaml') for n in preset_names())})")


def _dataclass_of(annotation) -> type | None:
    """The dataclass in `annotation` (a dataclass, or an optional one), else None."""
    if dataclasses.is_dataclass(annotation):
        return annotation
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        inner = [a for a in typing.get_args(annotation) if dataclasses.is_dataclass(a)]
        return inner[0] if len(inner) == 1 else None
    return None


def _coerce(value: Any, annotation, key: str) -> Any:
    """Checks a plain value against its field type, raising ConfigError naming the key. Ints and
    YAML's "1e-3"-style strings become floats where a float is expected; every element of a
    tuple field is checked (`layer_ids[0]='a': expected int`), and one string where a tuple of
    strings is expected is a tuple of one (`data.paths=corpus.txt`)."""
    options = (typing.get_args(annotation)
               if typing.get_origin(annotation) in (typing.Union, types.UnionType)
               else (annotation,))
    if value is None:
        if type(None) in options:
            return None
        raise ConfigError(f"{key}: must not be null")
    for option in options:
        origin = typing.get_origin(option) or option
        if origin is bool and isinstance(value, bool):
            return value
        if origin is int and isinstance(value, int) and not isinstance(value, bool):
            return value
        if origin is float and not isinstance(value, bool):
            if isinstance(value, (int, float)):
                return float(value)
            if isinstance(value, str):
                try:
                    return float(value)
                except ValueError:
                    pass
        if origin is str and isinstance(value, str):
            return value
        if origin is tuple:
            element = next((a for a in typing.get_args(option) if a is not Ellipsis), None)
            if element is str and isinstance(value, str):
                return (value,)
            if isinstance(value, (list, tuple)):
                if element is None:
                    return tuple(value)
                if dataclasses.is_dataclass(element):
                    return tuple(from_dict(element, item, prefix=f"{key}[{i}].")
                                 for i, item in enumerate(value))
                return tuple(_coerce(item, element, f"{key}[{i}]") for i, item in enumerate(value))
    names = " or ".join(getattr(o, "__name__", str(o)) for o in options)
    raise ConfigError(f"{key}={value!r}: expected {names}")


def from_dict(cls, values: Mapping[str, Any], prefix: str = ""):
    """Builds dataclass `cls` (nested dataclasses included) from a mapping.

    Unknown keys and wrongly-shaped sections raise `ConfigError` naming the dotted key.
    """
    where = prefix.rstrip(".") or cls.__name__
    if not isinstance(values, Mapping):
        raise ConfigError(f"{where}: expected a mapping, got {type(values).__name__}")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    unknown = sorted(set(values) - set(names))
    if unknown:
        raise ConfigError(f"unknown key {prefix}{unknown[0]} (known in {where}: "
                          f"{', '.join(names)})")
    kwargs = {}
    for name, value in values.items():
        nested = _dataclass_of(hints[name])
        if nested is not None and value is not None:
            value = from_dict(nested, value, prefix=f"{prefix}{name}.")
        else:
            value = _coerce(value, hints[name], f"{prefix}{name}")
        kwargs[name] = value
    try:
        return cls(**kwargs)
    except TypeError as err:
        raise ConfigError(f"{where}: {err}") from err


def merge_nested(base: Mapping, override: Mapping) -> dict:
    """`base` updated by `override`, merging nested mappings key by key."""
    out = dict(base)
    for key, value in override.items():
        if isinstance(value, Mapping) and isinstance(out.get(key), Mapping):
            out[key] = merge_nested(out[key], value)
        else:
            out[key] = value
    return out


def load_yaml(path: str | pathlib.Path, _seen: tuple = ()) -> dict:
    """Reads a YAML mapping (a path or a preset's name), with errors that name the file.

    A top-level `base: other.yaml` (relative to this file) is read first and this file's values
    are merged over it.
    """
    path = config_path(path)
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: not valid YAML: {err}") from err
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping at the top level")
    if "base" in data:
        base_path = (path.parent / str(data.pop("base"))).resolve()
        if base_path in _seen:
            raise ConfigError(f"{path}: 'base' chain loops back to {base_path}")
        data = merge_nested(load_yaml(base_path, _seen + (base_path,)), data)
    return data


def _load_section(path: str | pathlib.Path, section: str, cls):
    data = load_yaml(path)
    if section not in data:
        raise ConfigError(f"{path}: no '{section}' section")
    return from_dict(cls, data[section], prefix=f"{section}.")


def load_engram_config(path: str | pathlib.Path) -> EngramConfig:
    """Reads an `EngramConfig` from the `engram:` section of a YAML file."""
    return _load_section(path, "engram", EngramConfig)


def apply_overrides(data: dict, overrides: list[str]) -> dict:
    """Applies `dotted.key=value` overrides (values parsed as YAML) to a nested dict."""
    data = dict(data)
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} is not of the form dotted.key=value")
        key, raw = item.split("=", 1)
        try:
            value = yaml.safe_load(raw)
        except yaml.YAMLError as err:
            raise ConfigError(f"override {key}: cannot parse value {raw!r}: {err}") from err
        node = data
        parts = key.split(".")
        for depth, part in enumerate(parts[:-1]):
            child = node.get(part)
            if child is None:
                child = {}
            elif not isinstance(child, dict):
                raise ConfigError(f"override {key}: {'.'.join(parts[:depth + 1])} is not a section")
            node[part] = child = dict(child)
            node = child
        node[parts[-1]] = value
    return data


def load_config(path: str | pathlib.Path, overrides: list[str] = ()) -> Config:
    """Reads a full `Config` from a YAML preset, with `dotted.key=value` overrides."""
    return from_dict(Config, apply_overrides(load_yaml(path), list(overrides)))


def config_to_dict(config) -> dict:
    """A dataclass config as plain nested dicts and lists (YAML/JSON friendly)."""
    return _plain(dataclasses.asdict(config))


def _plain(value):
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


def load_model_config(path: str | pathlib.Path) -> ModelConfig:
    """Reads a `ModelConfig` from the `model:` section of a YAML preset."""
    return _load_section(path, "model", ModelConfig)

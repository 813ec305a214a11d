"""Typed configs: dataclass trees loaded from YAML with dotted `key.sub=value` overrides, checked
before anything starts (unknown keys and wrong types are errors that name the key)."""
from __future__ import annotations

import dataclasses
import re
import types
import typing
from pathlib import Path
from typing import Any, TypeVar

import yaml

T = TypeVar("T")


class ConfigError(ValueError):
    pass


def _coerce(tp: Any, value: Any, key: str) -> Any:
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        for a in args:
            if a is type(None):
                continue
            try:
                return _coerce(a, value, key)
            except ConfigError:
                continue
        raise ConfigError(f"{key}: {value!r} does not fit {tp}")
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping, got {type(value).__name__}")
        return build(tp, value, key)
    if tp is Any:
        return value
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}: expected a list, got {type(value).__name__}")
        (inner, *_) = typing.get_args(tp) or (Any,)
        return [_coerce(inner, v, f"{key}[{i}]") for i, v in enumerate(value)]
    if origin is dict or tp is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping, got {type(value).__name__}")
        return dict(value)
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if tp is float and isinstance(value, str):
        # PyYAML reads YAML 1.1, where `3e-3` or `1e-5` (no dot) is a string, not a float
        try:
            return float(value)
        except ValueError:
            raise ConfigError(f"{key}: expected float, got {value!r}") from None
    if tp in (int, float, str, bool):
        if not isinstance(value, tp) or (tp is int and isinstance(value, bool)):
            raise ConfigError(f"{key}: expected {tp.__name__}, got {value!r}")
        return value
    return value


def config_key(f: dataclasses.Field) -> str:
    """A field's key in YAML and overrides: its name, or `metadata["key"]` where the name cannot be one
    (`async` is a Python keyword: TrainConfig.async_ is the `async` section)."""
    return f.metadata.get("key", f.name)


def build(cls: type[T], data: dict, prefix: str = "") -> T:
    hints = typing.get_type_hints(cls)
    names = {config_key(f): f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - set(names))
    if unknown:
        where = f"{prefix}." if prefix else ""
        raise ConfigError(f"{', '.join(where + u for u in unknown)}: unknown config key"
                          f"{'s' if len(unknown) > 1 else ''}; {cls.__name__} has: {', '.join(sorted(names))}")
    kwargs = {names[k]: _coerce(hints[names[k]], v, f"{prefix}.{k}" if prefix else k) for k, v in data.items()}
    try:
        return cls(**kwargs)
    except ConfigError:
        raise
    except (ValueError, TypeError) as e:  # a section's own __post_init__ check: one line, no traceback
        msg = str(e)
        raise ConfigError(msg if not prefix or msg.startswith(prefix) else f"{prefix}: {msg}") from None


def apply_overrides(data: dict, overrides: list[str]) -> dict:
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r}: expected key.sub=value")
        key, raw = item.split("=", 1)
        node = data
        parts = key.split(".")
        for p in parts[:-1]:
            node = node.setdefault(p, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override {item!r}: {p} is not a mapping")
        node[parts[-1]] = yaml.safe_load(raw)
    return data


def load(cls: type[T], path: str | Path | None, overrides: list[str] | None = None) -> T:
    data: dict = {}
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"config file {p} not found")
        data = yaml.safe_load(p.read_text()) or {}
    return build(cls, apply_overrides(data, list(overrides or [])))


def to_dict(cfg: Any) -> Any:
    """The config as plain data under its YAML keys (what `build` reads back)."""
    if dataclasses.is_dataclass(cfg) and not isinstance(cfg, type):
        return {config_key(f): to_dict(getattr(cfg, f.name)) for f in dataclasses.fields(cfg)}
    if isinstance(cfg, (list, tuple)):
        return [to_dict(v) for v in cfg]
    if isinstance(cfg, dict):
        return {k: to_dict(v) for k, v in cfg.items()}
    return cfg


# a key, token or password: never printed or written (the config on stdout, run_dir/config.yaml)
_SECRET_KEY = re.compile(r"(?:^|_)(?:api_?key|token|password|passwd|secret)$", re.IGNORECASE)
REDACTED = "<redacted>"


def redacted(d: Any) -> Any:
    """A copy of a config dict (nested dicts and lists too) with every secret field's value replaced."""
    if isinstance(d, dict):
        return {k: REDACTED if isinstance(k, str) and _SECRET_KEY.search(k) and v else redacted(v)
                for k, v in d.items()}
    if isinstance(d, list):
        return [redacted(v) for v in d]
    return d

"""Typed JSON: frozen dataclasses read from parsed JSON by their type hints, strictly (every error names
the dotted key), and written back as plain dicts. The manifest's loader; no knowledge of bundles here."""
from __future__ import annotations

import dataclasses
import typing
from collections import abc
from typing import Any, Mapping, Union

from .config import IPIQAConfig

__all__ = ["ManifestError", "load_typed", "to_plain"]


class ManifestError(ValueError):
    """A manifest value is missing, unknown or invalid; ``key`` is its dotted path in ``manifest.json``."""

    def __init__(self, key: str, problem: str):
        self.key, self.problem = key, problem
        super().__init__(f"{key}: {problem}" if key else problem)



def _need(ok: bool, key: str, problem: str) -> None:
    if not ok:
        raise ManifestError(key, problem)



def to_plain(value: Any) -> Any:
    """Dataclasses, mappings and tuples -> JSON-ready dicts and lists."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: to_plain(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, Mapping):
        return {str(k): to_plain(v) for k, v in value.items()}
    if isinstance(value, (tuple, list)):
        return [to_plain(v) for v in value]
    return value


def _join(key: str, name: Any) -> str:
    return f"{key}.{name}" if key else str(name)


def load_typed(tp: Any, value: Any, key: str) -> Any:
    """``value`` (parsed JSON) as type ``tp``, checked; every error names ``key``, the path in the file."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if tp is Any:
        return value
    if origin is Union:  # Optional[X]
        if value is None:
            return None
        return load_typed(next(a for a in args if a is not type(None)), value, key)
    if tp is IPIQAConfig:
        _need(isinstance(value, Mapping), key, "must be an object")
        try:
            return IPIQAConfig.from_dict(value)
        except (TypeError, ValueError) as exc:
            raise ManifestError(key, str(exc)) from None
    if dataclasses.is_dataclass(tp):
        _need(isinstance(value, Mapping), key, f"must be an object, got {type(value).__name__}")
        fields = {f.name: f for f in dataclasses.fields(tp)}
        unknown = sorted(set(value) - set(fields))
        _need(not unknown, _join(key, unknown[0]) if unknown else key,
              "unknown key: the manifest was written by another ipiqa version")
        hints = typing.get_type_hints(tp)
        kwargs = {}
        for name, f in fields.items():
            if name not in value:
                required = f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
                _need(not required, _join(key, name), "missing (required)")
                continue
            kwargs[name] = value[name] if name == "root" else load_typed(hints[name], value[name], _join(key, name))
        try:
            return tp(**kwargs)
        except ManifestError as exc:
            raise ManifestError(_join(key, exc.key), exc.problem) from None
        except (TypeError, ValueError) as exc:
            raise ManifestError(key, str(exc)) from None
    if origin in (abc.Mapping, dict) or tp in (dict, Mapping):
        _need(isinstance(value, Mapping), key, f"must be an object, got {type(value).__name__}")
        item = args[1] if len(args) == 2 else Any
        return {k: load_typed(item, v, _join(key, k)) for k, v in value.items()}
    if origin is tuple:
        _need(isinstance(value, (list, tuple)), key, f"must be a list, got {type(value).__name__}")
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(load_typed(args[0], v, f"{key}[{i}]") for i, v in enumerate(value))
        _need(len(value) == len(args), key, f"must have {len(args)} items, got {len(value)}")
        return tuple(load_typed(a, v, f"{key}[{i}]") for i, (a, v) in enumerate(zip(args, value)))
    if tp is float:
        _need(isinstance(value, (int, float)) and not isinstance(value, bool), key, f"must be a number, got {value!r}")
        return float(value)
    if tp in (int, str, bool):
        ok = isinstance(value, tp) and (tp is bool or not isinstance(value, bool))
        _need(ok, key, f"must be {tp.__name__}, got {value!r}")
        return value
    raise TypeError(f"manifest loader has no rule for {tp!r} at {key}")  # a programming error, not user input

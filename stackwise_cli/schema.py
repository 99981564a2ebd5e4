"""Strict conversion between plain YAML/JSON data and the dataclasses of recipes and the manifest.

One small converter instead of a validation library: it rejects unknown keys, checks types (including
``Literal`` choices), and collects *every* problem with its key path before raising, so a user fixes a file
in one pass. A dataclass may define ``problems() -> list[tuple[str, str]]`` for cross-field checks; they are
reported with the same key paths.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from collections.abc import Mapping
from typing import Annotated, Any, Literal, Union, get_args, get_origin


class SchemaError(Exception):
    """Every problem found, each as ``(key path, message)``."""

    def __init__(self, problems: list[tuple[str, str]]):
        super().__init__("; ".join(f"{p}: {m}" if p else m for p, m in problems))
        self.problems = problems


@dataclasses.dataclass(frozen=True)
class OneOf:
    """``Annotated[str, OneOf(REGISTRY)]``: a name that must be a key of a registry, read when a value is checked, so
    an entry registered after the field was declared (a new objective, a test's toy one) is accepted at once."""

    registry: Mapping[str, Any]


def _join(path: str, key: str | int) -> str:
    if isinstance(key, int):
        return f"{path}[{key}]"
    return f"{path}.{key}" if path else key


def _describe(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


def _type_name(tp: Any) -> str:
    origin = get_origin(tp)
    if origin is Literal:
        return " | ".join(repr(a) for a in get_args(tp))
    if origin in (Union, types.UnionType):
        return " or ".join(_type_name(a) for a in get_args(tp))
    if tp is type(None):
        return "null"
    if origin is not None:
        return str(tp).replace("typing.", "")
    return getattr(tp, "__name__", str(tp))


def _one_of(choices: Any, value: Any, path: str, problems: list[tuple[str, str]]) -> None:
    if value not in choices:
        problems.append((path, f"must be one of {', '.join(repr(c) for c in choices)}, got {_describe(value)}"))


def _convert(tp: Any, value: Any, path: str, problems: list[tuple[str, str]]) -> Any:
    origin = get_origin(tp)
    if origin is Literal:
        _one_of(get_args(tp), value, path, problems)
        return value
    if origin is Annotated:
        inner, *extras = get_args(tp)
        before = len(problems)
        out = _convert(inner, value, path, problems)
        for extra in extras:
            if isinstance(extra, OneOf) and len(problems) == before:
                _one_of(list(extra.registry), value, path, problems)
        return out
    if origin in (Union, types.UnionType):
        args = get_args(tp)
        if value is None and type(None) in args:
            return None
        non_none = [a for a in args if a is not type(None)]
        if len(non_none) == 1:
            return _convert(non_none[0], value, path, problems)
        for arg in non_none:
            trial: list[tuple[str, str]] = []
            out = _convert(arg, value, path, trial)
            if not trial:
                return out
        problems.append((path, f"must be {_type_name(tp)}, got {_describe(value)}"))
        return value
    if dataclasses.is_dataclass(tp):
        return _from_mapping(tp, value, path, problems)
    if origin is list:
        (item,) = get_args(tp)
        if not isinstance(value, list):
            problems.append((path, f"must be a list, got {_describe(value)}"))
            return value
        return [_convert(item, v, _join(path, i), problems) for i, v in enumerate(value)]
    if origin is tuple:
        args = get_args(tp)
        if not isinstance(value, (list, tuple)) or len(value) != len(args):
            problems.append((path, f"must be a list of {len(args)} values, got {_describe(value)}"))
            return value
        return tuple(_convert(a, v, _join(path, i), problems) for i, (a, v) in enumerate(zip(args, value)))
    if origin is dict:
        key_tp, val_tp = get_args(tp)
        if not isinstance(value, dict):
            problems.append((path, f"must be a mapping, got {_describe(value)}"))
            return value
        return {str(k): _convert(val_tp, v, _join(path, str(k)), problems) for k, v in value.items()}
    if tp is Any:
        return value
    if tp is bool:
        if not isinstance(value, bool):
            problems.append((path, f"must be true or false, got {_describe(value)}"))
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            problems.append((path, f"must be an integer, got {_describe(value)}"))
        return value
    if tp is float:
        # YAML reads "3e-4" as a string (YAML 1.1 wants a dot); accept any spelling float() understands.
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            problems.append((path, f"must be a number, got {_describe(value)}"))
            return value
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            problems.append((path, f"must be a string, got {_describe(value)}"))
        return value
    raise TypeError(f"schema: unsupported type {tp!r} at {path}")


def _from_mapping(cls: type, data: Any, path: str, problems: list[tuple[str, str]]) -> Any:
    if data is None:
        data = {}
    if not isinstance(data, dict):
        problems.append((path, f"must be a mapping, got {_describe(data)}"))
        return None
    hints = typing.get_type_hints(cls, include_extras=True)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    before = len(problems)
    for key in data:
        if key not in fields:
            known = ", ".join(fields)
            problems.append((_join(path, str(key)), f"unknown key (known keys: {known})"))
    kwargs = {}
    for name, field in fields.items():
        if name in data:
            kwargs[name] = _convert(hints[name], data[name], _join(path, name), problems)
        elif field.default is dataclasses.MISSING and field.default_factory is dataclasses.MISSING:
            problems.append((_join(path, name), "required key is missing"))
    if len(problems) > before:
        return None
    try:
        obj = cls(**kwargs)
    except SchemaError as e:  # raised by problems() through __post_init__
        problems.extend((_join(path, p) if p else path, m) for p, m in e.problems)
        return None
    return obj


def from_data(cls: type, data: Any, path: str = "") -> Any:
    """Build dataclass ``cls`` from plain data, raising SchemaError with every problem found."""
    problems: list[tuple[str, str]] = []
    obj = _from_mapping(cls, data, path, problems)
    if problems:
        raise SchemaError(problems)
    return obj


def to_data(obj: Any) -> Any:
    """The plain (YAML/JSON-ready) form of a dataclass tree: dicts, lists, scalars; tuples become lists."""
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return {f.name: to_data(getattr(obj, f.name)) for f in dataclasses.fields(obj) if f.init}
    if isinstance(obj, (list, tuple)):
        return [to_data(v) for v in obj]
    if isinstance(obj, dict):
        return {k: to_data(v) for k, v in obj.items()}
    return obj


def check(obj: Any) -> None:
    """Call from ``__post_init__``: raise SchemaError if the object's ``problems()`` found any."""
    problems = obj.problems()
    if problems:
        raise SchemaError(problems)

"""Frozen dataclasses to JSON-ready values and back, guided by their type hints.

The functional core works on frozen dataclasses (a service spec, a rollout); the store
keeps them as JSON text. One codec for all of them means a stored rollout or revision
reads back as exactly what was written, strictly (an int is not a bool, a field nobody
declared is an error naming where it was), and a new field only needs a default.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from collections.abc import Mapping
from enum import Enum
from functools import cache
from typing import Any


class DecodeError(ValueError):
    """Stored data that does not fit the type it is read as; the message names where."""


def to_plain(value: Any, compared_only: bool = False) -> Any:
    """Dataclasses to dicts, tuples to lists, mappings to dicts; scalars as they are.

    With `compared_only`, fields declared with compare=False (where a value was written,
    say) are left out: what remains is what equality, and so a content hash, sees."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {
            f.name: to_plain(getattr(value, f.name), compared_only)
            for f in dataclasses.fields(value)
            if f.compare or not compared_only
        }
    if isinstance(value, tuple | list):
        return [to_plain(item, compared_only) for item in value]
    if isinstance(value, Mapping):
        return {str(key): to_plain(item, compared_only) for key, item in value.items()}
    if isinstance(value, Enum):
        return value.value
    return value


@cache
def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def from_plain(kind: Any, value: Any, path: str = "value") -> Any:
    """Rebuild a value of type `kind` from what to_plain made of it."""
    origin = typing.get_origin(kind)
    if kind is Any:
        return value
    if dataclasses.is_dataclass(kind):
        if not isinstance(value, Mapping):
            raise DecodeError(f"{path}: expected an object")
        hints = _hints(kind)
        known = {f.name for f in dataclasses.fields(kind) if f.init}
        unknown = set(value) - known
        if unknown:
            raise DecodeError(f"{path}: unknown field {sorted(unknown)[0]!r}")
        return kind(**{name: from_plain(hints[name], item, f"{path}.{name}") for name, item in value.items()})
    if origin is tuple:
        arguments = typing.get_args(kind)
        if not isinstance(value, list | tuple):
            raise DecodeError(f"{path}: expected a list")
        if len(arguments) == 2 and arguments[1] is Ellipsis:
            return tuple(from_plain(arguments[0], item, f"{path}[{i}]") for i, item in enumerate(value))
        if len(arguments) != len(value):
            raise DecodeError(f"{path}: expected {len(arguments)} items")
        return tuple(
            from_plain(a, item, f"{path}[{i}]")
            for i, (a, item) in enumerate(zip(arguments, value, strict=True))
        )
    if origin in (typing.Union, types.UnionType):
        for option in typing.get_args(kind):
            try:
                return from_plain(option, value, path)
            except DecodeError:
                continue
        raise DecodeError(f"{path}: {value!r} fits none of {kind}")
    if origin in (dict, Mapping, typing.Mapping) or kind is dict:
        key_type, value_type = typing.get_args(kind) or (str, Any)
        if not isinstance(value, Mapping):
            raise DecodeError(f"{path}: expected an object")
        return {
            from_plain(key_type, key, path): from_plain(value_type, item, f"{path}.{key}")
            for key, item in value.items()
        }
    if isinstance(kind, type) and issubclass(kind, Enum):
        try:
            return kind(value)
        except ValueError:
            raise DecodeError(f"{path}: {value!r} is not a {kind.__name__}") from None
    if kind is type(None):
        if value is not None:
            raise DecodeError(f"{path}: expected null")
        return None
    if kind is float:
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise DecodeError(f"{path}: expected a number")
        return float(value)
    if kind in (int, str, bool):
        if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
            raise DecodeError(f"{path}: expected {kind.__name__}")
        return value
    raise DecodeError(f"{path}: cannot decode {kind}")

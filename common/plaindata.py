"""Frozen dataclasses to JSON-ready values and back, guided by their type hints.

The functional core works on frozen dataclasses (a service spec, a rollout); the store
keeps them as JSON text. One codec for all of them means a stored rollout or revision
reads back as exactly what was written, and a new field only needs a default.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from collections.abc import Mapping
from functools import cache
from typing import Any, TypeVar

T = TypeVar("T")


class DecodeError(ValueError):
    """Stored data that does not fit the type it is read as."""


def to_plain(value: Any) -> Any:
    """Dataclasses to dicts, tuples to lists, mappings to dicts; scalars as they are."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: to_plain(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, tuple | list):
        return [to_plain(item) for item in value]
    if isinstance(value, Mapping):
        return {str(key): to_plain(item) for key, item in value.items()}
    return value


@cache
def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def from_plain(kind: Any, data: Any) -> Any:
    """Rebuild a value of type `kind` from what to_plain made of it."""
    origin = typing.get_origin(kind)
    if kind is Any:
        return data
    if origin in (typing.Union, types.UnionType):
        options = typing.get_args(kind)
        if data is None and type(None) in options:
            return None
        errors = []
        for option in options:
            if option is type(None):
                continue
            try:
                return from_plain(option, data)
            except (DecodeError, TypeError, ValueError) as error:
                errors.append(str(error))
        raise DecodeError(f"{data!r} fits none of {kind}: {'; '.join(errors)}")
    if dataclasses.is_dataclass(kind):
        if not isinstance(data, Mapping):
            raise DecodeError(f"{kind.__name__} needs an object, not {type(data).__name__}")
        hints = _hints(kind)
        names = {f.name for f in dataclasses.fields(kind)}
        unknown = set(data) - names
        if unknown:
            raise DecodeError(f"{kind.__name__} has no field(s) {sorted(unknown)}")
        return kind(**{name: from_plain(hints[name], value) for name, value in data.items()})
    if origin is tuple:
        arguments = typing.get_args(kind)
        if not isinstance(data, list | tuple):
            raise DecodeError(f"{kind} needs a list, not {type(data).__name__}")
        if len(arguments) == 2 and arguments[1] is Ellipsis:
            return tuple(from_plain(arguments[0], item) for item in data)
        return tuple(from_plain(argument, item) for argument, item in zip(arguments, data, strict=True))
    if origin in (dict, Mapping, typing.Mapping) or kind is dict:
        key_type, value_type = typing.get_args(kind) or (str, Any)
        if not isinstance(data, Mapping):
            raise DecodeError(f"{kind} needs an object, not {type(data).__name__}")
        return {from_plain(key_type, key): from_plain(value_type, value) for key, value in data.items()}
    if origin is list:
        (item_type,) = typing.get_args(kind) or (Any,)
        return [from_plain(item_type, item) for item in data]
    if kind is float and isinstance(data, int) and not isinstance(data, bool):
        return float(data)
    if isinstance(kind, type) and not isinstance(data, kind):
        raise DecodeError(f"{data!r} is not a {kind.__name__}")
    return data

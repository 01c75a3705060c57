"""A ServiceSpec as canonical JSON text and back: how the store keeps each revision.

The text holds every field that takes part in equality, with sorted keys and no spaces, so
two equal specs give the same text (the rollout history compares revisions by it) and
`spec_from_json(spec_to_json(spec)) == spec`. Where a value was written (`origin`, `field`)
is not kept: it only serves error messages while a file is read.
"""

from __future__ import annotations

import dataclasses
import json
import types
import typing
from typing import Any

from picoord.coordinator.workloads.spec import ServiceSpec

FORMAT_VERSION = 1
MAX_TEXT = 256 * 1024


class CodecError(ValueError):
    """Stored text that is not a spec this version can read."""


def _plain(value: object) -> object:
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: _plain(getattr(value, f.name)) for f in dataclasses.fields(value) if f.compare}
    if isinstance(value, tuple | list):
        return [_plain(item) for item in value]
    return value


def spec_to_json(spec: ServiceSpec) -> str:
    data = {"format": FORMAT_VERSION, "service": _plain(spec)}
    return json.dumps(data, sort_keys=True, separators=(",", ":"), ensure_ascii=False)


def spec_from_json(text: str) -> ServiceSpec:
    if len(text) > MAX_TEXT:
        raise CodecError(f"stored spec is larger than {MAX_TEXT} characters")
    try:
        data = json.loads(text)
    except json.JSONDecodeError as error:
        raise CodecError(f"stored spec is not JSON: {error}") from None
    if not isinstance(data, dict) or data.get("format") != FORMAT_VERSION:
        raise CodecError(f"stored spec is not format {FORMAT_VERSION}")
    return _decode(ServiceSpec, data.get("service"), "service")


def _decode(kind: Any, value: Any, path: str) -> Any:
    origin = typing.get_origin(kind)
    if dataclasses.is_dataclass(kind):
        if not isinstance(value, dict):
            raise CodecError(f"{path}: expected an object")
        hints = typing.get_type_hints(kind)
        known = {f.name for f in dataclasses.fields(kind) if f.compare}
        unknown = set(value) - known
        if unknown:
            raise CodecError(f"{path}: unknown field {sorted(unknown)[0]!r}")
        return kind(**{name: _decode(hints[name], item, f"{path}.{name}") for name, item in value.items()})
    if origin is tuple:
        arguments = typing.get_args(kind)
        if not isinstance(value, list):
            raise CodecError(f"{path}: expected a list")
        if len(arguments) == 2 and arguments[1] is Ellipsis:
            return tuple(_decode(arguments[0], item, f"{path}[{i}]") for i, item in enumerate(value))
        if len(arguments) != len(value):
            raise CodecError(f"{path}: expected {len(arguments)} items")
        return tuple(
            _decode(a, item, f"{path}[{i}]") for i, (a, item) in enumerate(zip(arguments, value, strict=True))
        )
    if origin in (typing.Union, types.UnionType):
        for option in typing.get_args(kind):
            try:
                return _decode(option, value, path)
            except CodecError:
                continue
        raise CodecError(f"{path}: {value!r} fits none of {kind}")
    if kind is type(None):
        if value is not None:
            raise CodecError(f"{path}: expected null")
        return None
    if kind is float:
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise CodecError(f"{path}: expected a number")
        return float(value)
    if kind in (int, str, bool):
        if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
            raise CodecError(f"{path}: expected {kind.__name__}")
        return value
    if kind is Any:
        return value
    raise CodecError(f"{path}: cannot decode {kind}")

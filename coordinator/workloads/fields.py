"""Walking one YAML mapping of a workload file: every key is mapped, warned about or refused.

Unlike cluster.yaml's reader (coordinator/apply/cluster_spec.py), importers of foreign formats meet
keys picoord does not support; each is declared, with why, as a warning (ignoring it does
not change what runs) or an error (it would). A key nobody declared is an error too, so a
typo or a newer field is never dropped in silence.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, TypeVar

from picoord.common.validation import FieldError

MAX_ITEMS = 512
T = TypeVar("T")


@dataclass(frozen=True)
class SpecWarning:
    """A field that was read but has no effect in picoord, and why."""

    field: str
    message: str

    def __str__(self) -> str:
        return f"{self.field}: {self.message}"


@dataclass
class Fields:
    """One mapping being read: knows its path, the keys used, and where warnings go."""

    path: str
    data: dict[str, Any]
    warnings: list[SpecWarning]
    used: set[str] = field(default_factory=set)

    def at(self, key: str) -> str:
        return f"{self.path}.{key}" if self.path else key

    def has(self, key: str) -> bool:
        return key in self.data

    def get(self, key: str, default: Any = None, required: bool = False) -> Any:
        self.used.add(key)
        if key not in self.data or self.data[key] is None:
            if required:
                raise FieldError(self.at(key), "is required")
            return default
        return self.data[key]

    def text(self, key: str, default: str | None = None, choices: tuple[str, ...] = ()) -> str:
        value = self.get(key, default, required=default is None)
        if isinstance(value, int | float) and not isinstance(value, bool):
            value = str(value)
        if not isinstance(value, str):
            raise FieldError(self.at(key), f"must be a string, not {type(value).__name__}")
        if choices and value not in choices:
            raise FieldError(self.at(key), f"{value!r} is not one of {', '.join(choices)}")
        return value

    def integer(self, key: str, default: int, minimum: int = 0, maximum: int = 1 << 31) -> int:
        value = self.get(key, default)
        if isinstance(value, bool) or not isinstance(value, int):
            raise FieldError(self.at(key), f"{value!r} is not a whole number")
        if not minimum <= value <= maximum:
            raise FieldError(self.at(key), f"{value} is outside {minimum}-{maximum}")
        return value

    def boolean(self, key: str, default: bool) -> bool:
        value = self.get(key, default)
        if not isinstance(value, bool):
            raise FieldError(self.at(key), f"{value!r} is not true or false")
        return value

    def mapping(self, key: str) -> Fields | None:
        value = self.get(key)
        return None if value is None else mapping(self.at(key), value, self.warnings)

    def items(self, key: str) -> list[Any]:
        value = self.get(key, [])
        return as_list(self.at(key), value)

    def each(self, key: str, read: Callable[[str, Any], T]) -> tuple[T, ...]:
        """`read(path, item)` for every item of the list under `key` (none if absent)."""
        return tuple(read(f"{self.at(key)}[{index}]", item) for index, item in enumerate(self.items(key)))

    def warn(self, key: str, message: str) -> None:
        """The key, if present, is ignored with a warning naming it."""
        self.used.add(key)
        if key in self.data:
            self.warnings.append(SpecWarning(self.at(key), message))

    def refuse(self, key: str, message: str, unless: Any = ...) -> None:
        """The key, if present (and not set to the harmless `unless`), is an error."""
        self.used.add(key)
        if key in self.data and not (unless is not ... and self.data[key] == unless):
            raise FieldError(self.at(key), message)

    def apply_table(self, table: Mapping[str, tuple[str, str]]) -> None:
        """Declared unsupported keys: {key: ("warn" | "error", why)}."""
        for key, (verdict, message) in table.items():
            if verdict == "warn":
                self.warn(key, message)
            else:
                self.refuse(key, message)

    def finish(self, extensions_warn: bool = False) -> None:
        """Any key nobody read is an error (Compose's `x-` extensions: a warning)."""
        for key in self.data:
            if key in self.used:
                continue
            if extensions_warn and key.startswith("x-"):
                self.warnings.append(SpecWarning(self.at(key), "extension field, ignored"))
                continue
            raise FieldError(self.at(key), "unknown field (picoord does not know it, so it refuses it)")


def mapping(path: str, value: Any, warnings: list[SpecWarning]) -> Fields:
    if not isinstance(value, dict):
        raise FieldError(path, f"must be a mapping, not {type(value).__name__}")
    for key in value:
        if not isinstance(key, str):
            raise FieldError(path, f"has a non-string key {key!r}")
    return Fields(path, value, warnings)


def as_list(path: str, value: Any, limit: int = MAX_ITEMS) -> list[Any]:
    if not isinstance(value, list):
        raise FieldError(path, f"must be a list, not {type(value).__name__}")
    if len(value) > limit:
        raise FieldError(path, f"has more than {limit} entries")
    return value


def argv(path: str, value: Any) -> tuple[str, ...]:
    """A command as a list of strings (numbers are written as text)."""
    items = []
    for index, item in enumerate(as_list(path, value)):
        if isinstance(item, bool) or not isinstance(item, str | int | float):
            raise FieldError(f"{path}[{index}]", f"{item!r} is not a string")
        items.append(str(item))
    return tuple(items)


def scalar_text(path: str, value: Any) -> str:
    """An env value: strings as they are, numbers as written; booleans must be quoted
    (YAML's `yes`/`true` turning into "True" is a classic surprise, so it is refused)."""
    if isinstance(value, bool):
        raise FieldError(path, f"{value!r} is a boolean; quote it to pass it as text")
    if isinstance(value, str):
        return value
    if isinstance(value, int | float):
        return str(value)
    raise FieldError(path, f"{value!r} is not a string")

"""Memory sizes, CPU amounts and durations as the three input formats write them.

The same suffix means different things in different tools, so the caller says whose
meaning applies: Docker (and so Compose/stack files) reads `512M` and `512Mi` alike as
512 MiB (its units.RAMInBytes is binary throughout), Kubernetes reads `512M` as 512*10^6
bytes and `512Mi` as 512 MiB. picoord's own `kind: Service` uses Kubernetes' meaning,
because that is the notation people copy between manifests. Results are plain ints
(bytes, millicores) so the scheduler compares numbers, never strings.
"""

from __future__ import annotations

import math
import re
from decimal import Decimal, InvalidOperation

from picoord.common.validation import FieldError

DOCKER = "docker"
KUBERNETES = "kubernetes"

_KIB = 1024
_BINARY = {"ki": _KIB, "mi": _KIB**2, "gi": _KIB**3, "ti": _KIB**4, "pi": _KIB**5, "ei": _KIB**6}
_DECIMAL = {"k": 10**3, "m": 10**6, "g": 10**9, "t": 10**12, "p": 10**15, "e": 10**18}
# Docker: k/m/g/t/p, optional i, optional b, any case; all binary.
_DOCKER_MEMORY = re.compile(r"^(\d+(?:\.\d+)?) ?([kmgtp])?i?b?$", re.IGNORECASE)
_KUBE_MEMORY = re.compile(r"^(\d+(?:\.\d+)?(?:[eE]\d+)?)(Ki|Mi|Gi|Ti|Pi|Ei|k|M|G|T|P|E)?$")
_DOCKER_POWERS = {"": 0, "k": 1, "m": 2, "g": 3, "t": 4, "p": 5}
_MEMORY_HINT = "use e.g. 256Mi or 1G"
MAX_MEMORY = _KIB**5  # 1 PiB: anything larger is a typo on a home lab

_CPU = re.compile(r"^(\d+(?:\.\d+)?)(m?)$")
MAX_MILLICORES = 1024 * 1000

_DURATION_PART = re.compile(r"(\d+(?:\.\d+)?)(ns|us|µs|ms|s|m|h)")
_DURATION_UNITS = {"ns": 1e-9, "us": 1e-6, "µs": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0, "h": 3600.0}
MAX_DURATION = 7 * 24 * 3600.0


def _quoted(value: object) -> str:
    return f'"{value}"' if isinstance(value, str) else repr(value)


def memory_bytes(field: str, value: object, meaning: str = KUBERNETES) -> int:
    """Bytes for a memory size: an int is bytes; a string carries a unit (see module doc)."""
    if isinstance(value, bool) or value is None:
        raise FieldError(field, f"{_quoted(value)} is not a memory size ({_MEMORY_HINT})")
    if isinstance(value, int):
        size = value
    elif isinstance(value, str):
        size = _memory_text(field, value.strip(), meaning)
    else:
        raise FieldError(field, f"{_quoted(value)} is not a memory size ({_MEMORY_HINT})")
    if size < 0:
        raise FieldError(field, f"{_quoted(value)} is negative")
    if size > MAX_MEMORY:
        raise FieldError(field, f"{_quoted(value)} is more than 1 PiB")
    return size


def _memory_text(field: str, text: str, meaning: str) -> int:
    error = FieldError(field, f"{_quoted(text)} is not a memory size ({_MEMORY_HINT})")
    if meaning == DOCKER:
        match = _DOCKER_MEMORY.match(text)
        if not match:
            raise error
        number, unit = match.groups()
        factor = _KIB ** _DOCKER_POWERS[(unit or "").lower()]
    else:
        match = _KUBE_MEMORY.match(text)
        if not match:
            raise error
        number, unit = match.groups()
        if unit and unit.endswith("i"):
            factor = _BINARY[unit.lower()]
        else:
            factor = _DECIMAL.get((unit or "").lower(), 1)
    try:
        amount = Decimal(number) * factor
    except InvalidOperation:
        raise error from None
    if amount > MAX_MEMORY:
        raise FieldError(field, f"{_quoted(text)} is more than 1 PiB")
    return math.ceil(amount)  # Kubernetes rounds fractional bytes up


def cpu_millicores(field: str, value: object) -> int:
    """Millicores for `250m`, `0.5`, `2` or a number (Compose's `cpus` and Kubernetes' `cpu`)."""
    hint = "use e.g. 250m, 0.5 or 2"
    if isinstance(value, bool) or not isinstance(value, int | float | str):
        raise FieldError(field, f"{_quoted(value)} is not a CPU amount ({hint})")
    text = value.strip() if isinstance(value, str) else repr(value)
    match = _CPU.match(text)
    if not match:
        raise FieldError(field, f"{_quoted(value)} is not a CPU amount ({hint})")
    number, milli = match.groups()
    amount = Decimal(number) if milli else Decimal(number) * 1000
    if amount != amount.to_integral_value():
        raise FieldError(field, f"{_quoted(value)} is finer than 1m (a thousandth of a core)")
    if amount > MAX_MILLICORES:
        raise FieldError(field, f"{_quoted(value)} is more than 1024 cores")
    return int(amount)


def duration_seconds(field: str, value: object) -> float:
    """Seconds for a Go-style duration (`5s`, `1m30s`, `100ms`) or a plain number of seconds."""
    hint = "use e.g. 5s, 1m30s or 500ms"
    if isinstance(value, bool) or not isinstance(value, int | float | str):
        raise FieldError(field, f"{_quoted(value)} is not a duration ({hint})")
    if isinstance(value, int | float):
        seconds = float(value)
    else:
        text = value.strip()
        if not text or _DURATION_PART.sub("", text) != "":
            raise FieldError(field, f"{_quoted(value)} is not a duration ({hint})")
        seconds = sum(float(n) * _DURATION_UNITS[unit] for n, unit in _DURATION_PART.findall(text))
    if not math.isfinite(seconds) or seconds < 0:
        raise FieldError(field, f"{_quoted(value)} is not a duration ({hint})")
    if seconds > MAX_DURATION:
        raise FieldError(field, f"{_quoted(value)} is longer than a week")
    return seconds


def format_bytes(size: int) -> str:
    """The shortest exact binary spelling, e.g. 268435456 -> 256Mi (for messages)."""
    for unit in ("Ei", "Pi", "Ti", "Gi", "Mi", "Ki"):
        factor = _BINARY[unit.lower()]
        if size and size % factor == 0:
            return f"{size // factor}{unit}"
    return str(size)

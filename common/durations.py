"""Durations as people type them (90s, 2m, 24h, 365d): one parser for coordctl's and the
coordinator's flags and for the coordinator's settings file; and instants as logs show them."""

from __future__ import annotations

import argparse
import datetime as dt
import re

_DURATION = re.compile(r"^(\d+(?:\.\d+)?)([smhd]?)$")
_UNIT_SECONDS = {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400}


class InvalidDuration(argparse.ArgumentTypeError, ValueError):
    """Not a positive duration; argparse shows the message as is."""


def parse_duration(text: str) -> float:
    """Seconds in `text`; a bare number counts as seconds."""
    match = _DURATION.fullmatch(text.strip()) if isinstance(text, str) else None
    if not match or float(match.group(1)) <= 0:
        raise InvalidDuration(f"invalid duration {text!r}: use e.g. 90s, 30m, 24h or 7d")
    return float(match.group(1)) * _UNIT_SECONDS[match.group(2)]


def format_duration(seconds: float) -> str:
    """Residual time as kubeadm prints it: 364d, 23h, 59m, 42s; the largest unit that fits."""
    value = int(seconds)
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if value >= size:
            return f"{value // size}{unit}"
    return f"{max(value, 0)}s"


def iso_utc(timestamp: float) -> str:
    """2026-11-27T10:00:00Z: how certificate ends appear in logs and in coordctl's output."""
    return dt.datetime.fromtimestamp(timestamp, dt.UTC).isoformat(timespec="seconds").replace("+00:00", "Z")

"""structlog set-up shared by both daemons: JSON lines for journald, or console output.

Under systemd, journald holds the daemon's stdout (it says so in JOURNAL_STREAM, the
device and inode of that stream): each event is one JSON line there, prefixed with its
syslog priority ("<3>" for errors) so journalctl -p filters them and journald keeps the
JSON alone in MESSAGE. On a terminal the events are human-readable lines on stderr; in a
pipe or file, JSON lines on stderr, so a command's own output on stdout stays clean.
"""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Mapping
from typing import TextIO

import structlog

from picoord.common.limits import LOG_REFUSALS_EVERY_SECONDS, LOG_TEXT

SECRET_KEYS = frozenset({"token", "secret", "password", "private_key"})


def _redact_secrets(_logger: object, _name: str, event: dict) -> dict:
    """Last line of defence: a secret passed as a log field is never written out."""
    for key in SECRET_KEYS.intersection(event):
        event[key] = "<redacted>"
    return event


def clipped(text: object, limit: int = LOG_TEXT) -> str:
    """At most `limit` characters of an untrusted value, and how much was cut.

    Whatever a node or a client sends is logged only through this (or after it was
    validated), so one request cannot write megabytes of log.
    """
    if isinstance(text, bytes):
        head = text[:limit].decode("utf-8", errors="replace")
        return head if len(text) <= limit else f"{head}...(+{len(text) - limit} bytes)"
    if not isinstance(text, str):
        text = str(text)
    if len(text) <= limit:
        return text
    return f"{text[:limit]}...(+{len(text) - limit} characters)"


class LogThrottle:
    """At most one log line per key (a node, a source address) every `every` seconds.

    `admit(key, now)` says whether to log now, and how many lines for that key were held
    back since the last one, so a flood shows up as one line with a count. Pure: the
    caller passes the clock. At most `max_keys` keys are remembered (the least recently
    logged go first), so a stream of new keys cannot grow it without end.
    """

    def __init__(self, every: float = LOG_REFUSALS_EVERY_SECONDS, max_keys: int = 4096) -> None:
        self.every = every
        self.max_keys = max_keys
        self._last: dict[str, float] = {}
        self._held: dict[str, int] = {}

    def admit(self, key: str, now: float) -> tuple[bool, int]:
        """(log this one?, lines held back before it)."""
        last = self._last.get(key)
        if last is not None and 0 <= now - last < self.every:
            self._held[key] = self._held.get(key, 0) + 1
            return False, 0
        held = self._held.pop(key, 0)
        self._last.pop(key, None)
        self._last[key] = now
        while len(self._last) > self.max_keys:
            oldest = next(iter(self._last))
            del self._last[oldest]
            self._held.pop(oldest, None)
        return True, held


LEVELS = ("debug", "info", "warning", "error", "critical")
# syslog priorities (sd-daemon(3) prefixes) of structlog's level names
PRIORITIES = {"debug": 7, "info": 6, "warning": 4, "warn": 4, "error": 3, "exception": 3, "critical": 2}


def journal_stream_is(environ: Mapping[str, str], stat: os.stat_result | None) -> bool:
    """Whether the stream `stat` describes is the one journald handed this service:
    JOURNAL_STREAM is "device:inode" of it. A child that inherited the variable but writes
    elsewhere (a terminal) does not match."""
    value = environ.get("JOURNAL_STREAM", "")
    device, _, inode = value.partition(":")
    if stat is None or not device.isdigit() or not inode.isdigit():
        return False
    return (int(device), int(inode)) == (stat.st_dev, stat.st_ino)


def log_output(journal: bool, terminal: bool, json_output: bool | None) -> tuple[str, str]:
    """(format, stream): ("json", "stdout") under journald, ("console", "stderr") on a
    terminal, ("json", "stderr") otherwise; `json_output` (config: log_json) overrides the format."""
    if journal:
        return ("json" if json_output is None or json_output else "console"), "stdout"
    if json_output is None:
        json_output = not terminal
    return ("json" if json_output else "console"), "stderr"


def check_level(level: str) -> str:
    """The level name in lower case; ValueError naming the choices for anything else."""
    name = level.strip().lower()
    if name not in LEVELS:
        raise ValueError(f"log level {level!r} is not one of {', '.join(LEVELS)}")
    return name


def _with_priority(_logger: object, method: str, line: str) -> str:
    return f"<{PRIORITIES.get(method, 6)}>{line}"


def _fstat(stream: TextIO) -> os.stat_result | None:
    try:
        return os.fstat(stream.fileno())
    except (OSError, ValueError):
        return None


def configure_logging(level: str = "info", json_output: bool | None = None) -> None:
    """Set up structlog for a daemon or a command: see the module docstring for where and how."""
    journal = journal_stream_is(os.environ, _fstat(sys.stdout))
    fmt, stream_name = log_output(journal, sys.stderr.isatty(), json_output)
    stream = sys.stdout if stream_name == "stdout" else sys.stderr
    processors = [
        structlog.contextvars.merge_contextvars,
        structlog.processors.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
        _redact_secrets,
        structlog.processors.format_exc_info,
        structlog.processors.JSONRenderer() if fmt == "json" else structlog.dev.ConsoleRenderer(),
    ]
    if journal:
        processors.append(_with_priority)
    structlog.configure(
        processors=processors,
        wrapper_class=structlog.make_filtering_bound_logger(logging.getLevelName(check_level(level).upper())),
        logger_factory=structlog.PrintLoggerFactory(file=stream),
        cache_logger_on_first_use=True,
    )

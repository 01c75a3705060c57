"""structlog set-up shared by both daemons: JSON lines for journald, or console output."""

from __future__ import annotations

import logging
import sys

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


def configure_logging(level: str = "info", json_output: bool | None = None) -> None:
    if json_output is None:
        json_output = not sys.stderr.isatty()
    renderer = structlog.processors.JSONRenderer() if json_output else structlog.dev.ConsoleRenderer()
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            _redact_secrets,
            structlog.processors.format_exc_info,
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(logging.getLevelName(level.upper())),
        logger_factory=structlog.PrintLoggerFactory(file=sys.stderr),
        cache_logger_on_first_use=True,
    )

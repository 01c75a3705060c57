"""structlog set-up shared by both daemons: JSON lines for journald, or console output."""

from __future__ import annotations

import logging
import sys

import structlog

SECRET_KEYS = frozenset({"token", "secret", "password", "private_key"})


def _redact_secrets(_logger: object, _name: str, event: dict) -> dict:
    """Last line of defence: a secret passed as a log field is never written out."""
    for key in SECRET_KEYS.intersection(event):
        event[key] = "<redacted>"
    return event


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

"""The `picoord-agent` executable. It keeps `rich` out of the agent process before anything
imports structlog, which would load it (about 4 MiB on a 1 GB Pi) for pretty tracebacks the
agent never shows; structlog falls back to plain ones."""

from __future__ import annotations

import sys


def main() -> None:
    sys.modules.setdefault("rich", None)  # type: ignore[assignment]
    from picoord.agent.cli import main as cli_main

    cli_main()

"""The `picoord-agent` executable. It keeps `rich` out of the agent process before anything
imports structlog, which would load it (about 4 MiB on a 1 GB Pi) for pretty tracebacks the
agent never shows; structlog falls back to plain ones."""

from __future__ import annotations

import os
import sys


def main() -> None:
    sys.modules.setdefault("rich", None)  # type: ignore[assignment]
    # gRPC's C core would log every failed handshake (several a second while the clock is
    # wrong) to the journal; the agent says why it cannot connect itself, once per attempt.
    os.environ.setdefault("GRPC_VERBOSITY", "NONE")
    from picoord.agent.cli import main as cli_main

    cli_main()

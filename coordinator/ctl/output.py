"""Rendering of coordctl listings: one view (a list of plain dicts) per listing, printed as
a table for people or as JSON/YAML for scripts."""

from __future__ import annotations

import datetime as dt
import json
import sys
from collections.abc import Callable, Sequence
from typing import Any

import yaml
from rich.console import Console
from rich.table import Table

from picoord.v1 import admin_pb2

FORMATS = ("table", "json", "yaml")
STATUS_NAMES = {
    admin_pb2.NODE_STATUS_READY: "Ready",
    admin_pb2.NODE_STATUS_NOT_READY: "NotReady",
    admin_pb2.NODE_STATUS_DOWN: "Down",
    admin_pb2.NODE_STATUS_UNSPECIFIED: "Unknown",
}
CERTIFICATE_STATE_NAMES = {
    admin_pb2.CERTIFICATE_STATE_UNSPECIFIED: "none",
    admin_pb2.CERTIFICATE_STATE_VALID: "valid",
    admin_pb2.CERTIFICATE_STATE_EXPIRED: "expired",
    admin_pb2.CERTIFICATE_STATE_REVOKED: "revoked",
}


def iso_time(timestamp: float) -> str | None:
    if not timestamp:
        return None
    return dt.datetime.fromtimestamp(timestamp, dt.UTC).isoformat(timespec="seconds").replace("+00:00", "Z")


def ago(timestamp: float, now: float) -> str:
    if not timestamp:
        return "never"
    seconds = max(0, int(now - timestamp))
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            return f"{seconds // size}{unit} ago"
    return f"{seconds}s ago"


def human_bytes(count: float) -> str:
    value = float(count)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(value) < 1024 or unit == "TiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    raise AssertionError("unreachable")


def node_view(node: admin_pb2.NodeSummary) -> dict[str, Any]:
    return {
        "name": node.name,
        "status": STATUS_NAMES[node.status],
        "arch": node.arch,
        "cpu_cores": node.cpu_cores,
        "memory_total_bytes": node.memory_total_bytes,
        "machine_model": node.machine_model,
        "os": node.os_name,
        "agent_version": node.agent_version,
        "last_seen": iso_time(node.last_seen),
        "connected": node.connected,
        "enrolled_at": iso_time(node.enrolled_at),
        "labels": dict(sorted(node.labels.items())),
        "certificate_state": CERTIFICATE_STATE_NAMES[node.certificate_state],
        "certificate_not_after": iso_time(node.certificate_not_after),
    }


Column = tuple[str, Callable[[dict[str, Any]], str]]


def emit(rows: Sequence[dict[str, Any]] | dict[str, Any], fmt: str, columns: Sequence[Column]) -> None:
    if fmt == "json":
        json.dump(rows, sys.stdout, indent=2, sort_keys=False)
        sys.stdout.write("\n")
    elif fmt == "yaml":
        yaml.safe_dump(rows, sys.stdout, sort_keys=False)
    else:
        console().print(table(rows if isinstance(rows, list) else [rows], columns))


def console() -> Console:
    """A console that never truncates columns when the output goes to a file or a pipe."""
    return Console(highlight=False, width=None if sys.stdout.isatty() else 400)


def table(rows: Sequence[dict[str, Any]], columns: Sequence[Column], title: str | None = None) -> Table:
    grid = Table(box=None, pad_edge=False, header_style="bold", title=title, title_justify="left")
    cells = [[render(row) for _, render in columns] for row in rows]
    for index, (heading, _) in enumerate(columns):
        # The first column names the row (a node): it never shrinks on a narrow terminal.
        widest = max([len(heading), *(len(line[index]) for line in cells)]) if index == 0 else None
        grid.add_column(heading, no_wrap=True, min_width=widest)
    for line in cells:
        grid.add_row(*line)
    return grid

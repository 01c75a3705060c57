"""Rendering of coordctl listings: one view (a list of plain dicts) per listing, printed as
a table for people or as JSON/YAML for scripts.

Everything shown comes from nodes, which the operator's terminal must not trust: table
cells are `rich.text.Text` (never markup) with control characters escaped, and plain lines
go through `escape_control`. JSON and YAML escape control characters themselves."""

from __future__ import annotations

import datetime as dt
import json
import re
import sys
from collections.abc import Callable, Iterable, Sequence
from typing import Any, TextIO

import yaml
from rich.console import Console
from rich.table import Table
from rich.text import Text

from picoord.common.durations import format_duration
from picoord.common.vocabulary import CertificateState
from picoord.coordinator.status import STATUS_NAMES
from picoord.v1 import admin_pb2

FORMATS = ("table", "json", "yaml")


# C0 controls (newline and tab included: a cell is one line), DEL, C1 controls (\x9b is a
# CSI on its own), and the Unicode marks that reorder or hide text (bidi embeddings,
# overrides and isolates, line separators, zero-width characters, the BOM), as in CVE-2021-42574.
_UNSAFE = re.compile(r"[\x00-\x1f\x7f-\x9f\u061c\u200b-\u200f\u2028-\u202e\u2060-\u2069\ufeff]")


def _escaped(match: re.Match[str]) -> str:
    code = ord(match.group())
    return f"\\x{code:02x}" if code <= 0xFF else f"\\u{code:04x}"


def escape_control(text: str) -> str:
    """`text` with every character a terminal would act on shown as a visible escape
    (ESC as the four characters `\\x1b`); everything else, markup brackets included, as is."""
    return _UNSAFE.sub(_escaped, text)


def echo(text: str, *, file: TextIO | None = None, flush: bool = False) -> None:
    """Print text that may hold a node's or the coordinator's words: escaped, except that
    its line breaks stay line breaks (a multi-line error message reads as lines)."""
    print("\n".join(escape_control(line) for line in text.split("\n")), file=file or sys.stdout, flush=flush)


def literal(text: object) -> Text:
    """A table cell: the escaped text, printed as it is (rich never reads markup in a Text)."""
    return Text(escape_control(str(text)))


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
        "pending_labels": dict(sorted(node.pending_labels.items())),
        "held": list(node.held),
        "role": node.role,
        "certificate_state": CertificateState.from_wire(node.certificate_state).value,
        "certificate_not_after": iso_time(node.certificate_not_after),
        "clock_offset_seconds": node.clock_offset_seconds if node.clock_offset_measured else None,
    }


def clock_offset_text(offset: float | None, threshold: float = 0.0) -> str:
    """3d behind, 2.5s ahead: the node's clock against the coordinator's; "-" when not
    measured or within `threshold` seconds."""
    if offset is None or abs(offset) <= threshold:
        return "-"
    size = abs(offset)
    amount = f"{size:.3g}s" if size < 60 else format_duration(size)
    return f"{amount} {'ahead' if offset > 0 else 'behind'}"


Column = tuple[str, Callable[[dict[str, Any]], str]]


def emit(rows: Sequence[dict[str, Any]] | dict[str, Any], fmt: str, columns: Sequence[Column]) -> None:
    if fmt == "json":
        json.dump(rows, sys.stdout, indent=2, sort_keys=False)
        sys.stdout.write("\n")
    elif fmt == "yaml":
        yaml.safe_dump(rows, sys.stdout, sort_keys=False)
    else:
        console().print(table(rows if isinstance(rows, list) else [rows], columns))


def emit_json_lines_array(rows: Iterable[dict[str, Any]]) -> None:
    """A JSON array written row by row as the rows come (`-o json` of a 5,000-node
    listing starts at once and never holds the whole text); the same JSON as `emit`."""
    sys.stdout.write("[")
    written = False
    for row in rows:
        sys.stdout.write(",\n  " if written else "\n  ")
        sys.stdout.write(json.dumps(row, indent=2).replace("\n", "\n  "))
        written = True
    sys.stdout.write("\n]\n" if written else "]\n")


def console() -> Console:
    """A console that never truncates columns when the output goes to a file or a pipe, and
    never reads markup or emoji codes in a string it is given."""
    return Console(highlight=False, markup=False, emoji=False, width=None if sys.stdout.isatty() else 400)


def table(rows: Sequence[dict[str, Any]], columns: Sequence[Column], title: str | None = None) -> Table:
    """Every cell goes through `literal`, so no listing can let a node's text reach the
    terminal as markup or control sequences."""
    grid = Table(box=None, pad_edge=False, header_style="bold", title=title, title_justify="left")
    cells = [[literal(render(row)) for _, render in columns] for row in rows]
    for index, (heading, _) in enumerate(columns):
        # The first column names the row (a node): it never shrinks on a narrow terminal.
        widest = max([len(heading), *(line[index].cell_len for line in cells)]) if index == 0 else None
        grid.add_column(Text(heading), no_wrap=True, min_width=widest)
    for line in cells:
        grid.add_row(*line)
    return grid

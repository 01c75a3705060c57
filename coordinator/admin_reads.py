"""The admin reads answered from a snapshot (admin_snapshot.py), `coordctl nodes` and `top`:
what each is called, how its answer is made from rows, the selector check, and where the
read replica answers them. One definition for the coordinator's servicer, the read
replica (admin_replica.py) and coordctl."""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from picoord.common import limits
from picoord.common.names import InvalidName, validate_labels
from picoord.v1 import admin_pb2


@dataclass(frozen=True)
class SnapshotRead:
    """One read: its Admin RPC, its one-byte name between the coordinator and the replica,
    and its answer's type and repeated field of rows."""

    method: str
    kind: bytes
    request_type: type[Any]
    answer_type: type[Any]
    rows_field: str

    def answer(self, rows: Sequence[Any], matched: int) -> Any:
        """The answer carrying `rows`, of `matched` rows that matched the selector."""
        return self.answer_type(**{self.rows_field: rows, "matched": matched})

    @property
    def rows_number(self) -> int:
        """The field number of the answer's rows, for the replica's work on the wire bytes."""
        return int(self.answer_type.DESCRIPTOR.fields_by_name[self.rows_field].number)


NODES = SnapshotRead("ListNodes", b"n", admin_pb2.ListNodesRequest, admin_pb2.ListNodesResponse, "nodes")
TOP = SnapshotRead("Top", b"t", admin_pb2.TopRequest, admin_pb2.TopResponse, "rows")
READS = {read.kind: read for read in (NODES, TOP)}


def replica_socket(admin_socket: Path) -> Path:
    """Where the admin read replica listens (admin_replica.py): beside the admin socket,
    where coordctl finds it."""
    return admin_socket.with_name(admin_socket.name + ".reads")


# The replica's sign of life: it touches its socket every REPLICA_BEAT seconds. A stopped
# replica's socket still accepts connections (the kernel queues them), so without this a
# call to it waits out coordctl's whole deadline; coordctl skips a socket silent longer.
REPLICA_BEAT = 0.25
REPLICA_SILENT_AFTER = 2.0


def replica_alive(socket: Path, now: float | None = None) -> bool:
    """Whether the replica at `socket` touched it within REPLICA_SILENT_AFTER seconds
    (wall clock, as the file's times are: a clock step makes it look stopped for a moment,
    and coordctl then asks the admin socket, which answers the same)."""
    try:
        touched = socket.stat().st_mtime
    except OSError:
        return False
    return abs((time.time() if now is None else now) - touched) <= REPLICA_SILENT_AFTER


def checked_selector(selector: Mapping[str, str]) -> dict[str, str]:
    """A request's label selector, checked as labels are; InvalidName names the selector."""
    wanted = dict(selector)
    if len(wanted) > limits.LABELS:
        raise InvalidName(f"selector: at most {limits.LABELS} labels, not {len(wanted)}")
    try:
        return validate_labels(wanted)
    except InvalidName as error:
        raise InvalidName(f"selector: {error}") from error

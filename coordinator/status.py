"""Node status from what the coordinator last heard: a pure function, table-tested.

Also the one place that names the node status and action outcome enums, for the wire,
coordctl and Prometheus alike (the workload and certificate enums are named in
common/vocabulary.py).
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum

from picoord.v1 import admin_pb2, agent_pb2


class Status(Enum):
    """A node's status; the value is its name everywhere it is shown."""

    READY = "Ready"
    NOT_READY = "NotReady"
    DOWN = "Down"


STATUS_TO_WIRE = {
    Status.READY: admin_pb2.NODE_STATUS_READY,
    Status.NOT_READY: admin_pb2.NODE_STATUS_NOT_READY,
    Status.DOWN: admin_pb2.NODE_STATUS_DOWN,
}
STATUS_NAMES = {wire: status.value for status, wire in STATUS_TO_WIRE.items()} | {
    admin_pb2.NODE_STATUS_UNSPECIFIED: "Unknown"
}
OUTCOME_NAMES = {
    agent_pb2.ACTION_OUTCOME_UNSPECIFIED: "running",
    agent_pb2.ACTION_OUTCOME_SUCCEEDED: "changed",
    agent_pb2.ACTION_OUTCOME_UNCHANGED: "unchanged",
    agent_pb2.ACTION_OUTCOME_FAILED: "FAILED",
    agent_pb2.ACTION_OUTCOME_REJECTED: "REJECTED",
    agent_pb2.ACTION_OUTCOME_PLANNED: "would change",
    agent_pb2.ACTION_OUTCOME_REVERTED: "REVERTED",
    agent_pb2.ACTION_OUTCOME_SKIPPED: "SKIPPED",
}


@dataclass(frozen=True)
class StatusTimeouts:
    """Seconds of silence after which a node stops being Ready, and then counts as Down."""

    not_ready_after: float = 20.0
    down_after: float = 60.0

    def __post_init__(self) -> None:
        if not 0 < self.not_ready_after <= self.down_after:
            raise ValueError("timeouts must satisfy 0 < heartbeat timeout <= down timeout")


def node_status(connected: bool, last_seen: float, now: float, timeouts: StatusTimeouts) -> Status:
    """Ready needs an open session and a recent message; Down needs a long silence."""
    if last_seen <= 0:
        return Status.DOWN
    silence = now - last_seen
    if connected and silence <= timeouts.not_ready_after:
        return Status.READY
    if silence <= timeouts.down_after:
        return Status.NOT_READY
    return Status.DOWN

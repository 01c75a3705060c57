"""Node status from what the coordinator last heard: a pure function, table-tested."""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum


class Status(Enum):
    READY = "Ready"
    NOT_READY = "NotReady"
    DOWN = "Down"


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

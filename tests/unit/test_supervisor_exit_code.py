"""The exit code a node reports for a replica: dockerd's, or after a restart by the
replica's policy (which clears dockerd's) the one of the run that ended."""

from __future__ import annotations

import pytest

from picoord.agent.runtime.model import ReplicaState
from picoord.agent.runtime.supervisor import exit_code_to_report


def state(status: str, exit_code: int, restarts: int) -> ReplicaState:
    return ReplicaState("crashy", 2, "crashy.3", "id", status, exit_code, restarts, "", "mcp:1")


@pytest.mark.parametrize(
    ("status", "exit_code", "restarts", "remembered", "reported"),
    [
        ("exited", 3, 0, 0, 3),
        ("restarting", 3, 1, 3, 3),
        ("running", 0, 1, 3, 3),  # started again: dockerd says 0, the run that ended said 3
        ("running", 0, 0, 3, 0),  # never restarted: nothing to report
        ("running", 0, 0, 0, 0),
        ("exited", 137, 2, 3, 137),  # dockerd's own word wins when it has one
    ],
)
def test_exit_code_to_report(
    status: str, exit_code: int, restarts: int, remembered: int, reported: int
) -> None:
    assert exit_code_to_report(state(status, exit_code, restarts), remembered) == reported

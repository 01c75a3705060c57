"""A replica is stopped with the grace of its own spec, even once it has left the assignment.

The agent stops a replica after the coordinator's assignment dropped it, so the spec is no
longer at hand: the grace travels with the container as Docker's StopTimeout.
"""

from __future__ import annotations

from typing import Any

import pytest

from picoord.agent.runtime.model import ContainerSpec, create_arguments, replica_state

SPEC = ContainerSpec(service="mcp", revision=1, replica="mcp.1", image="mcp:1")
LABELS = {
    "org.picoord.managed": "true",
    "org.picoord.service": "mcp",
    "org.picoord.revision": "1",
    "org.picoord.replica": "mcp.1",
}


@pytest.mark.parametrize(("grace", "stop_timeout"), [(2.0, 2), (10.0, 10), (0.0, 0), (2.7, 2)])
def test_the_container_keeps_its_stop_grace(grace: float, stop_timeout: int) -> None:
    spec = ContainerSpec(**{**SPEC.__dict__, "stop_grace": grace})
    assert create_arguments(spec)["stop_timeout"] == stop_timeout


@pytest.mark.parametrize(
    ("config", "expected"), [({"StopTimeout": 2}, 2.0), ({}, None), ({"StopTimeout": None}, None)]
)
def test_replica_state_reads_it_back(config: dict[str, Any], expected: float | None) -> None:
    inspect = {
        "Id": "c1",
        "Config": {"Labels": LABELS, "Image": "mcp:1", **config},
        "State": {"Status": "running"},
    }
    state = replica_state(inspect)
    assert state is not None and state.stop_grace == expected

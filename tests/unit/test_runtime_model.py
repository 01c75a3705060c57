"""Table tests of the runtime's pure parts: the create request built from a replica's spec,
what a container's inspect data says about it, and the health state machine."""

from __future__ import annotations

import pytest

from picoord.agent.runtime.health import HEALTHY, STARTING, UNHEALTHY, Health, observe
from picoord.agent.runtime.model import (
    ContainerSpec,
    Port,
    VolumeMount,
    create_arguments,
    host_config,
    replica_state,
)

BASE = ContainerSpec(service="mcp", revision=2, replica="mcp.1", image="reg:5000/mcp:2")


@pytest.mark.parametrize(
    ("changes", "key", "expected"),
    [
        ({}, "restart_policy", {"Name": "on-failure"}),
        ({"restart_max_attempts": 3}, "restart_policy", {"Name": "on-failure", "MaximumRetryCount": 3}),
        ({"restart": "always", "restart_max_attempts": 3}, "restart_policy", {"Name": "always"}),
        ({"memory_limit": 512 << 20}, "mem_limit", 512 << 20),
        ({"memory_reservation": 256 << 20}, "mem_reservation", 256 << 20),
        ({"cpu_limit_millis": 250}, "nano_cpus", 250_000_000),
        ({"gpus": 1}, "device_requests", [{"Driver": "", "Count": 1, "Capabilities": [["gpu"]]}]),
        ({"ports": (Port(8080, 18080), Port(9000))}, "port_bindings", {"8080/tcp": 18080}),
        ({"hosts": {"postgres": "10.0.0.5"}}, "extra_hosts", {"postgres": "10.0.0.5"}),
        (
            {"volumes": (VolumeMount("/mnt/gv0", "/data", True), VolumeMount("pgdata", "/var/lib/pg"))},
            "binds",
            {"/mnt/gv0": {"bind": "/data", "mode": "ro"}, "pgdata": {"bind": "/var/lib/pg", "mode": "rw"}},
        ),
    ],
)
def test_host_config(changes: dict[str, object], key: str, expected: object) -> None:
    assert host_config(ContainerSpec(**{**BASE.__dict__, **changes}))[key] == expected


@pytest.mark.parametrize("absent", ["mem_limit", "mem_reservation", "nano_cpus", "device_requests"])
def test_host_config_leaves_unset_limits_out(absent: str) -> None:
    assert absent not in host_config(BASE)


def test_create_arguments_label_the_replica_and_keep_image_defaults() -> None:
    arguments = create_arguments(BASE)
    assert arguments["name"] == "picoord-mcp.1-r2"
    assert arguments["labels"] == {
        "org.picoord.managed": "true",
        "org.picoord.service": "mcp",
        "org.picoord.revision": "2",
        "org.picoord.replica": "mcp.1",
    }
    assert "entrypoint" not in arguments and "command" not in arguments
    overridden = create_arguments(ContainerSpec(**{**BASE.__dict__, "command": ("/x",), "args": ("-v",)}))
    assert (overridden["entrypoint"], overridden["command"]) == (["/x"], ["-v"])


@pytest.mark.parametrize(
    ("labels", "expected_replica"),
    [
        ({"org.picoord.managed": "true", "org.picoord.service": "mcp", "org.picoord.revision": "3",
          "org.picoord.replica": "mcp.2"}, "mcp.2"),
        ({"org.picoord.managed": "false", "org.picoord.revision": "3"}, None),
        ({}, None),
        ({"org.picoord.managed": "true", "org.picoord.revision": "three"}, None),
    ],
)  # fmt: skip
def test_replica_state_only_for_picoord_containers(
    labels: dict[str, str], expected_replica: str | None
) -> None:
    inspect = {
        "Id": "abc",
        "Config": {"Labels": labels, "Image": "mcp:3"},
        "State": {"Status": "running", "ExitCode": 0, "StartedAt": "t"},
        "RestartCount": 2,
    }
    state = replica_state(inspect)
    assert (state.replica if state else None) == expected_replica
    if state:
        assert (state.revision, state.restarts, state.state) == (3, 2, "running")


@pytest.mark.parametrize(
    ("before", "succeeded", "since_start", "expected"),
    [
        (Health(), True, 0.0, Health(HEALTHY, 0, "out")),
        (Health(), False, 1.0, Health(STARTING, 0, "out")),  # inside the start period: not counted
        (Health(), False, 20.0, Health(STARTING, 1, "out")),
        (Health(STARTING, 2), False, 20.0, Health(UNHEALTHY, 3, "out")),
        (Health(HEALTHY, 0), False, 1.0, Health(HEALTHY, 1, "out")),  # start period only while starting
        (Health(HEALTHY, 2), False, 20.0, Health(UNHEALTHY, 3, "out")),
        (Health(UNHEALTHY, 5), True, 20.0, Health(HEALTHY, 0, "out")),
    ],
)
def test_health_transitions(before: Health, succeeded: bool, since_start: float, expected: Health) -> None:
    assert observe(before, succeeded, "out", since_start, start_period=10.0, retries=3) == expected

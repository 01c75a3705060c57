"""Table tests of what a node stops and starts to run exactly its assignment."""

from __future__ import annotations

import pytest

from picoord.agent.runtime.model import ContainerSpec, ReplicaState
from picoord.agent.runtime.supervisor import plan_node, plan_volumes, retry_delay, spec_from_wire
from picoord.v1 import workloads_pb2


def spec(replica: str, revision: int) -> ContainerSpec:
    return ContainerSpec(service="mcp", revision=revision, replica=replica, image="r:5000/mcp:1")


def state(replica: str, revision: int, status: str = "running") -> ReplicaState:
    return ReplicaState("mcp", revision, replica, f"id-{replica}-{revision}", status, 0, 0, "", "mcp")


@pytest.mark.parametrize(
    ("desired", "actual", "stop", "start"),
    [
        ([], [], [], []),
        ([spec("mcp.1", 1)], [], [], [("mcp.1", 1)]),
        ([spec("mcp.1", 1)], [state("mcp.1", 1)], [], []),
        # a new revision of a slot: the old container goes, the new one comes
        ([spec("mcp.1", 2)], [state("mcp.1", 1)], [("mcp.1", 1)], [("mcp.1", 2)]),
        # a replica the assignment no longer names (moved away, or a stale one after failover)
        ([], [state("mcp.3", 1)], [("mcp.3", 1)], []),
        # an exited container of a desired replica is dockerd's to restart, not recreated
        ([spec("mcp.1", 1)], [state("mcp.1", 1, "exited")], [], []),
        (
            [spec("mcp.1", 1), spec("mcp.2", 1)],
            [state("mcp.2", 1), state("mcp.9", 1)],
            [("mcp.9", 1)],
            [("mcp.1", 1)],
        ),
    ],
)
def test_plan_node(
    desired: list[ContainerSpec],
    actual: list[ReplicaState],
    stop: list[tuple[str, int]],
    start: list[tuple[str, int]],
) -> None:
    plan = plan_node(desired, actual)
    assert [(s.replica, s.revision) for s in plan.stop] == stop
    assert [(s.replica, s.revision) for s in plan.start] == start


def test_spec_from_wire_fills_docker_defaults() -> None:
    wire = workloads_pb2.ReplicaSpec(service="mcp", revision=3, replica="mcp.1", image="r:5000/mcp:3")
    converted = spec_from_wire(wire)
    assert (converted.restart, converted.stop_grace, converted.health.kind) == ("on-failure", 10.0, "none")
    assert (converted.health.interval, converted.health.timeout, converted.health.retries) == (5.0, 2.0, 3)


@pytest.mark.parametrize(
    ("previous", "delay"), [(0.0, 2.0), (2.0, 4.0), (16.0, 32.0), (32.0, 60.0), (60.0, 60.0)]
)
def test_a_failed_start_backs_off_up_to_a_minute(previous: float, delay: float) -> None:
    assert retry_delay(previous) == delay


@pytest.mark.parametrize(
    ("asked", "present", "unused", "remove", "gone"),
    [
        ([], {"pg"}, {"pg"}, (), ()),  # nothing asked: nothing removed, even a dangling one
        (["pg"], {"pg", "cache"}, {"pg", "cache"}, ("pg",), ()),  # only what was asked for
        (["pg"], {"pg"}, set(), (), ()),  # a container still uses it: it waits
        (["pg"], set(), set(), (), ("pg",)),  # already gone: reported, so it is forgotten
        (["pg", "old"], {"pg"}, {"pg"}, ("pg",), ("old",)),
    ],
)
def test_plan_volumes(asked, present, unused, remove, gone) -> None:
    plan = plan_volumes(asked, present, unused)
    assert (plan.remove, plan.gone) == (remove, gone)

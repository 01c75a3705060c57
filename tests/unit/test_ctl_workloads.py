"""coordctl's workload verbs without a coordinator: the words of `rollout`, the progress
line, and the exit code of a followed rollout (0 only when healthy at its revision)."""

from __future__ import annotations

import argparse
import json

import pytest
import yaml

from picoord.common.vocabulary import ReplicaHealth, ReplicaState, RolloutStatus
from picoord.coordinator.ctl.workloads import (
    UsageError,
    _rollout_words,
    cmd_ps,
    cmd_services,
    follow,
    progress_line,
)
from picoord.v1 import services_pb2


@pytest.mark.parametrize(
    ("words", "expected"),
    [
        (["mcp"], ("start", "mcp")),
        (["status", "mcp"], ("status", "mcp")),
        (["undo", "mcp"], ("undo", "mcp")),
        (["start", "status"], ("start", "status")),  # a service named like a verb
        (["status"], ("start", "status")),
    ],
)
def test_rollout_words(words: list[str], expected: tuple[str, str]) -> None:
    assert _rollout_words(words) == expected


@pytest.mark.parametrize("words", [["a", "b", "c"], ["rollback", "mcp"], ["mcp", "status"]])
def test_rollout_words_refused(words: list[str]) -> None:
    with pytest.raises(UsageError, match="use `rollout NAME`"):
        _rollout_words(words)


def info(status: str = "not rolled out", **fields: object) -> services_pb2.RolloutInfo:
    """A RolloutInfo with the status given by its word."""
    base = {"service": "mcp", "revision": 2, "desired": 3, "updated": 1, "healthy": 1, "available": 2}
    return services_pb2.RolloutInfo(**{**base, **fields}, status=RolloutStatus(status).wire)


@pytest.mark.parametrize(
    ("rollout", "line"),
    [
        (
            info(status="progressing", message="moving"),
            "mcp revision 2: 1/3 updated, 1 healthy, 2 available; progressing",
        ),
        (
            info(status="rolled back", rolling_back=True, message="mcp.7 failed"),
            "mcp rolling back to revision 2: 1/3 updated, 1 healthy, 2 available; rolled back (mcp.7 failed)",
        ),
    ],
)
def test_progress_line(rollout: services_pb2.RolloutInfo, line: str) -> None:
    assert progress_line(rollout) == line


@pytest.mark.parametrize(
    ("last", "code"),
    [
        (info(status="complete"), 0),
        (info(status="complete", rolling_back=True), 1),  # rolled back: not what was asked
        (info(status="paused"), 1),
        (info(status="failed"), 1),
    ],
)
def test_follow_exits_zero_only_when_healthy_at_the_new_revision(
    last: services_pb2.RolloutInfo, code: int, capsys: pytest.CaptureFixture[str]
) -> None:
    events = [
        services_pb2.RolloutEvent(note="starting mcp.4 on pi1 (revision 2)"),
        services_pb2.RolloutEvent(progress=last),
    ]
    assert follow(events, "table") == code
    assert "starting mcp.4 on pi1" in capsys.readouterr().out


class _Stub:
    """The Workloads API as coordctl calls it, answering from fixed replies."""

    def __init__(self, services: list[services_pb2.ServiceInfo], replicas: list[services_pb2.ReplicaInfo]):
        self.services, self.replicas = services, replicas

    def ListServices(self, request: object, timeout: float) -> services_pb2.ListServicesResponse:
        return services_pb2.ListServicesResponse(services=self.services)

    def ListReplicas(self, request: object, timeout: float) -> services_pb2.ListReplicasResponse:
        return services_pb2.ListReplicasResponse(replicas=self.replicas)


def _replica(state: str, health: str, **fields: object) -> services_pb2.ReplicaInfo:
    return services_pb2.ReplicaInfo(
        replica="mcp.1",
        service="mcp",
        revision=2,
        node="pi3",
        state=ReplicaState(state).wire,
        health=ReplicaHealth(health).wire,
        **fields,
    )


@pytest.mark.parametrize("output", ["json", "yaml"])
def test_ps_and_services_print_the_words(output: str, capsys: pytest.CaptureFixture[str]) -> None:
    stub = _Stub(
        [services_pb2.ServiceInfo(name="mcp", rollout_status=RolloutStatus.FAILING.wire)],
        [
            _replica("running", "no check", desired="replaced", node_unreachable=True),
            _replica("pulling", "-", desired="running"),
        ],
    )
    args = argparse.Namespace(output=output, name="mcp")
    assert cmd_services(stub, args) == 0
    assert cmd_ps(stub, args) == 0
    printed = capsys.readouterr().out
    if output == "json":
        services_part, ps_part = printed.split("\n]\n", 1)
        (service,) = json.loads(services_part + "\n]")
        listed = json.loads(ps_part)
    else:
        services_part, ps_part = printed.split("- replica:", 1)
        (service,) = yaml.safe_load(services_part)
        listed = yaml.safe_load("- replica:" + ps_part)
    assert service["rollout"] == "failing"
    assert [(r["state"], r["health"]) for r in listed] == [
        ("running (node unreachable)", "no check"),
        ("pulling", "-"),
    ]


def test_ps_table_shows_an_unreachable_node_and_the_desired_state(capsys: pytest.CaptureFixture[str]) -> None:
    stub = _Stub([], [_replica("running", "healthy", desired="replaced", node_unreachable=True)])
    assert cmd_ps(stub, argparse.Namespace(output="table", name="mcp")) == 0
    assert "running (node unreachable) (replaced)" in capsys.readouterr().out

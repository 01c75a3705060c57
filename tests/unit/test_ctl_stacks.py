"""`coordctl rollout STACK` without a coordinator: the stack's services roll one by one,
dependencies first, each only after the one before ended healthy; the first failure stops
the stack there, naming it; a service's own name wins over a stack's."""

from __future__ import annotations

import argparse
import json

import pytest

from picoord.common.vocabulary import RolloutStatus
from picoord.coordinator.ctl.cli import _staged_line
from picoord.coordinator.ctl.workloads import (
    UsageError,
    cmd_ps,
    cmd_rm,
    cmd_rollout,
    cmd_scale,
    removal_line,
    scale_words,
)
from picoord.coordinator.workloads.stacks import services_of
from picoord.v1 import admin_pb2, services_pb2

FAILED = "mcp-server.2 on pi2: check http failed"


def _done(name: str, status: RolloutStatus, rolling_back: bool = False) -> list[services_pb2.RolloutEvent]:
    return [
        services_pb2.RolloutEvent(note=f"rolling out revision 1 of {name}"),
        services_pb2.RolloutEvent(
            progress=services_pb2.RolloutInfo(
                service=name,
                revision=1,
                desired=1,
                healthy=1,
                status=status.wire,
                rolling_back=rolling_back,
                message="" if status == RolloutStatus.COMPLETE else FAILED,
                failures=[] if status == RolloutStatus.COMPLETE else [FAILED],
            )
        ),
    ]


class _Stub:
    def __init__(self, services: list[services_pb2.ServiceInfo], failing: str = "") -> None:
        self.services = services
        self.failing = failing
        self.rolled: list[str] = []

    def ListServices(self, request, timeout):
        return services_pb2.ListServicesResponse(services=self.services)

    def Rollout(self, request, timeout):
        self.rolled.append(request.name)
        if request.name == self.failing:
            return iter(_done(request.name, RolloutStatus.ROLLED_BACK, rolling_back=True))
        return iter(_done(request.name, RolloutStatus.COMPLETE))


def _args(*words: str, image: str = "") -> argparse.Namespace:
    return argparse.Namespace(
        words=list(words), image=image, detach=False, output="table", watch=False, to_revision=0
    )


MCP = [
    services_pb2.ServiceInfo(name="mcp-server", stack="mcp", dependencies=["postgres"]),
    services_pb2.ServiceInfo(name="postgres", stack="mcp"),
    services_pb2.ServiceInfo(name="other", stack="elsewhere"),
]


def test_a_stack_rolls_dependencies_first_and_exits_zero_when_all_are_healthy(
    capsys: pytest.CaptureFixture[str],
) -> None:
    stub = _Stub(MCP)
    assert cmd_rollout(stub, _args("mcp")) == 0
    assert stub.rolled == ["postgres", "mcp-server"]
    out = capsys.readouterr().out
    assert "stack/mcp: rolling postgres, mcp-server in this order" in out
    assert "stack/mcp: 2 services healthy" in out


def test_a_failure_stops_the_stack_there_naming_the_service_and_check(
    capsys: pytest.CaptureFixture[str],
) -> None:
    three = [*MCP, services_pb2.ServiceInfo(name="web", stack="mcp", dependencies=["mcp-server"])]
    stub = _Stub(three, failing="mcp-server")
    assert cmd_rollout(stub, _args("mcp")) == 1
    assert stub.rolled == ["postgres", "mcp-server"]  # web never started
    err = capsys.readouterr().err
    assert "failed: mcp-server.2 on pi2: check http failed" in err
    assert "stack/mcp: stopped at service/mcp-server; not rolled: web" in err


def test_a_service_named_like_a_stack_is_rolled_alone() -> None:
    stub = _Stub([*MCP, services_pb2.ServiceInfo(name="mcp", stack="")])
    assert cmd_rollout(stub, _args("mcp")) == 0
    assert stub.rolled == ["mcp"]


def test_one_service_of_a_stack_rolls_alone_with_its_image() -> None:
    stub = _Stub(MCP)
    assert cmd_rollout(stub, _args("mcp-server", image="mcp:2")) == 0
    assert stub.rolled == ["mcp-server"]


def test_a_name_that_is_neither_is_sent_as_a_service_for_the_coordinator_to_refuse() -> None:
    stub = _Stub(MCP)
    assert cmd_rollout(stub, _args("nothing")) == 0  # the stand-in completes any service
    assert stub.rolled == ["nothing"]


@pytest.mark.parametrize(
    ("name", "listed"),
    [
        ("mcp", ["mcp-server", "postgres"]),  # a stack: its services
        ("postgres", ["postgres"]),  # a service of a stack: itself
        (None, ["mcp-server", "postgres", "other"]),  # every service
        ("nothing", ["nothing"]),  # neither: sent, for the coordinator to refuse
        ("elsewhere", ["other"]),
    ],
)
def test_ps_lists_a_service_a_stack_or_everything(name: str | None, listed: list[str]) -> None:
    assert services_of(MCP, name) == listed


def test_ps_of_a_service_named_like_a_stack_lists_the_service() -> None:
    assert services_of([*MCP, services_pb2.ServiceInfo(name="mcp")], "mcp") == ["mcp"]


class _PsStub(_Stub):
    def ListReplicas(self, request, timeout):
        return services_pb2.ListReplicasResponse(
            replicas=[
                services_pb2.ReplicaInfo(
                    replica=f"{request.name}.1", service=request.name, node="pi1", revision=1
                )
            ]
        )


def test_ps_of_a_stack_prints_every_replica_of_it(capsys: pytest.CaptureFixture[str]) -> None:
    assert cmd_ps(_PsStub(MCP), argparse.Namespace(output="json", name="mcp")) == 0
    printed = json.loads(capsys.readouterr().out)
    assert [(r["replica"], r["service"], r["node"]) for r in printed] == [
        ("mcp-server.1", "mcp-server", "pi1"),
        ("postgres.1", "postgres", "pi1"),
    ]


@pytest.mark.parametrize(
    ("words", "pairs"),
    [(["mcp-server=5"], [("mcp-server", 5)]), (["a=0", "b=12"], [("a", 0), ("b", 12)])],
)
def test_scale_words(words: list[str], pairs: list[tuple[str, int]]) -> None:
    assert scale_words(words) == pairs


@pytest.mark.parametrize("word", ["mcp-server", "mcp-server=", "=5", "mcp-server=-1", "mcp-server=five"])
def test_scale_words_refused(word: str) -> None:
    with pytest.raises(UsageError, match="use `scale SERVICE=COUNT`"):
        scale_words([word])


class _ScaleStub:
    def Scale(self, request, timeout):
        unplaced = "2 replica(s) not placed: insufficient memory" if request.replicas > 3 else ""
        return services_pb2.ServiceInfo(
            name=request.name, desired=request.replicas, running=3, healthy=3, unplaced=unplaced
        )


def test_scale_exits_one_with_the_reason_when_the_count_cannot_be_placed(
    capsys: pytest.CaptureFixture[str],
) -> None:
    assert cmd_scale(_ScaleStub(), argparse.Namespace(pairs=["mcp-server=3"], output="table")) == 0
    assert capsys.readouterr().out == "service/mcp-server scaled to 3: 3 running, 3 healthy\n"
    assert cmd_scale(_ScaleStub(), argparse.Namespace(pairs=["mcp-server=5"], output="table")) == 1
    assert "cannot place all: 2 replica(s) not placed: insufficient memory" in capsys.readouterr().err


def _staged(change: str, stack: str = "mcp") -> admin_pb2.ServiceStaged:
    changed = change in ("added", "changed")
    return admin_pb2.ServiceStaged(
        name="postgres",
        changed=changed,
        image="postgres:15",
        mode="replicated",
        replicas=1,
        stack=stack,
        change=change,
    )


@pytest.mark.parametrize(
    ("staged", "dry_run", "line"),
    [
        (
            _staged("added"),
            False,
            "stack/mcp service/postgres recorded (new, 1 x postgres:15): "
            "roll it out with `coordctl rollout mcp`",
        ),
        (
            _staged("changed", stack=""),
            True,
            "service/postgres would be recorded (changed, 1 x postgres:15): "
            "roll it out with `coordctl rollout postgres`",
        ),
        (_staged("unchanged"), False, "stack/mcp service/postgres unchanged (1 x postgres:15)"),
        (
            _staged("dropped"),
            True,
            "stack/mcp service/postgres is no longer in the file: kept (--prune removes it)",
        ),
    ],
)
def test_what_apply_says_of_each_service(staged: admin_pb2.ServiceStaged, dry_run: bool, line: str) -> None:
    assert _staged_line(staged, dry_run) == line


KEPT = services_pb2.RemoveResponse(
    services=["mcp-server", "postgres"],
    replicas=["mcp-server.1@pi1", "postgres.1@ubuntu-desktop"],
    volumes_kept=["postgres_data"],
)


class _RmStub:
    def __init__(self, reply: services_pb2.RemoveResponse = KEPT) -> None:
        self.asked: list[services_pb2.RemoveRequest] = []
        self.reply = reply

    def Remove(self, request, timeout):
        self.asked.append(request)
        return self.reply


@pytest.mark.parametrize("dry_run", [True, False])
def test_rm_says_what_goes_and_what_is_kept(dry_run: bool, capsys: pytest.CaptureFixture[str]) -> None:
    stub = _RmStub()
    args = argparse.Namespace(kind="stack", target="mcp", dry_run=dry_run, volumes=False, output="table")
    assert cmd_rm(stub, args) == 0
    assert [(r.kind, r.name, r.dry_run, r.volumes) for r in stub.asked] == [("stack", "mcp", dry_run, False)]
    out = capsys.readouterr().out
    verb = "would be removed" if dry_run else "removed"
    assert f"service/mcp-server {verb}\nservice/postgres {verb}\n" in out
    assert "replica postgres.1@ubuntu-desktop " + ("would stop" if dry_run else "stops") in out
    assert "volume postgres_data kept" in out
    assert ("revision history kept" in out) is not dry_run


@pytest.mark.parametrize("dry_run", [True, False])
def test_rm_with_volumes_asks_for_them_and_says_which_go(
    dry_run: bool, capsys: pytest.CaptureFixture[str]
) -> None:
    stub = _RmStub(
        services_pb2.RemoveResponse(
            services=["postgres"], replicas=["postgres.1@pi3"], volumes_removed=["postgres_data@pi3"]
        )
    )
    args = argparse.Namespace(
        kind="service", target="postgres", dry_run=dry_run, volumes=True, output="table"
    )
    assert cmd_rm(stub, args) == 0
    assert [r.volumes for r in stub.asked] == [True]
    out = capsys.readouterr().out
    verb = "would be removed" if dry_run else "removed"
    assert f"  volume postgres_data@pi3 {verb} once no container uses it\n" in out
    assert "kept" not in out.replace("revision history kept", "")


@pytest.mark.parametrize(
    ("replica", "stops", "away", "line"),
    [
        ("web.1@pi1", "stops", set(), "  replica web.1@pi1 stops within its grace; its container goes"),
        ("web.1@pi1", "stops", {"pi2"}, "  replica web.1@pi1 stops within its grace; its container goes"),
        (
            "web.1@pi1",
            "would stop",
            {"pi1"},
            "  replica web.1@pi1 would stop when pi1 returns (pi1 is away); its container goes then",
        ),
    ],
)
def test_rm_says_when_a_replica_on_an_away_node_goes(
    replica: str, stops: str, away: set[str], line: str
) -> None:
    assert removal_line(replica, stops, away) == line


@pytest.mark.parametrize("option", [{"image": "mcp:2"}, {"detach": True}])
def test_image_and_detach_go_with_one_service_not_a_stack(option: dict[str, object]) -> None:
    stub = _Stub(MCP)
    args = _args("mcp")
    for key, value in option.items():
        setattr(args, key, value)
    with pytest.raises(UsageError, match="mcp is a stack"):
        cmd_rollout(stub, args)
    assert stub.rolled == []

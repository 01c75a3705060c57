"""Table tests of `coordctl rm`, pure and in the store: what a removal of a service or a
stack takes (services, replicas, the named volumes it keeps), what the next tick does with
the replicas of a removed service (stopped where their node is reachable, later where it
is away), and that the store keeps history and replica numbering across a re-apply."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from picoord.coordinator.controller.decide import SERVICE, STACK, decide, removal
from picoord.coordinator.controller.records import WorkloadRecords, stored
from picoord.coordinator.reconcile.reconciler import NodeStatus
from picoord.coordinator.rollout import planner
from picoord.coordinator.rollout.history import record as record_revision
from picoord.coordinator.rollout.replicas import HEALTHY, RUNNING
from picoord.coordinator.store import Store
from picoord.coordinator.workloads.reader import read_workloads
from picoord.coordinator.workloads.spec import ServiceSpec, VolumeMount
from tests.unit.controller.test_decide import NOW, facts, replica, service

DB = dataclasses.replace(
    service(status=planner.COMPLETE),
    name="postgres",
    stack="mcp",
    spec=ServiceSpec(
        name="postgres",
        image="postgres:15",
        volumes=(
            VolumeMount("volume", "/var/lib/postgresql/data", "postgres_data"),
            VolumeMount("bind", "/etc/x", "/srv/x"),
        ),
    ),
)
APP = dataclasses.replace(service(status=planner.COMPLETE), name="mcp-server", stack="mcp")
ALONE = service(status=planner.COMPLETE)  # "typo", no stack
SERVICES = {s.name: s for s in (DB, APP, ALONE)}
REPLICAS = [
    dataclasses.replace(replica("postgres.1", "1", node="pi3"), service="postgres"),
    dataclasses.replace(replica("mcp-server.1", "1", node="pi1"), service="mcp-server"),
    dataclasses.replace(replica("mcp-server.2", "2", node="pi2"), service="mcp-server"),
    replica("typo.1", "1", node="pi1"),
]


@pytest.mark.parametrize(
    ("kind", "name", "services", "replicas", "volumes"),
    [
        (
            STACK,
            "mcp",
            ("mcp-server", "postgres"),
            (("mcp-server.1", "pi1"), ("mcp-server.2", "pi2"), ("postgres.1", "pi3")),
            ("postgres_data",),
        ),
        (SERVICE, "postgres", ("postgres",), (("postgres.1", "pi3"),), ("postgres_data",)),
        (SERVICE, "typo", ("typo",), (("typo.1", "pi1"),), ()),
    ],
)
def test_what_a_removal_takes(kind, name, services, replicas, volumes) -> None:
    gone = removal(kind, name, SERVICES, REPLICAS)
    assert (gone.services, gone.replicas, gone.volumes_kept) == (services, replicas, volumes)


@pytest.mark.parametrize(
    ("kind", "name", "away_nodes", "away"),
    [
        (STACK, "mcp", {"pi1"}, ("pi1",)),
        (STACK, "mcp", {"pi1", "pi3", "pi9"}, ("pi1", "pi3")),  # pi9 holds none of them
        (SERVICE, "postgres", {"pi1"}, ()),  # postgres runs on pi3
        (SERVICE, "typo", set(), ()),
    ],
)
def test_a_removal_names_the_away_nodes_that_hold_its_replicas(kind, name, away_nodes, away) -> None:
    gone = removal(kind, name, SERVICES, REPLICAS, away_nodes)
    assert gone.away == away
    assert removal(kind, name, SERVICES, REPLICAS).replicas == gone.replicas  # the same replicas go


OLD_DB = dataclasses.replace(
    DB.spec, volumes=(VolumeMount("volume", "/data", "pg_old"), VolumeMount("tmpfs", "/tmp"))
)
ROLLING = [  # postgres mid-rollout: revision 1 on pi3 mounts pg_old, revision 2 on pi2 postgres_data
    dataclasses.replace(replica("postgres.1", "1", node="pi3", revision=1), service="postgres"),
    dataclasses.replace(replica("postgres.2", "1", node="pi2", revision=2), service="postgres"),
]


@pytest.mark.parametrize(
    ("kind", "name", "replicas", "specs", "removed"),
    [
        (STACK, "mcp", REPLICAS, None, (("pi3", "postgres_data"),)),  # only where a replica ran
        (SERVICE, "postgres", REPLICAS, None, (("pi3", "postgres_data"),)),
        (SERVICE, "typo", REPLICAS, None, ()),  # no named volume (a bind is never one)
        (SERVICE, "postgres", [], None, ()),  # never ran anywhere: no node holds it
        (  # each replica declares the volumes of the revision it runs
            SERVICE,
            "postgres",
            ROLLING,
            {("postgres", 1): OLD_DB},
            (("pi2", "postgres_data"), ("pi3", "pg_old")),
        ),
    ],
)
def test_with_volumes_a_removal_takes_the_named_volumes_its_replicas_declared(
    kind, name, replicas, specs, removed
) -> None:
    gone = removal(kind, name, SERVICES, replicas, specs=specs, volumes=True)
    assert gone.volumes_removed == removed
    assert gone.volumes_kept == ()
    kept = removal(kind, name, SERVICES, replicas, specs=specs)
    assert kept.volumes_removed == () and kept.replicas == gone.replicas


@pytest.mark.parametrize(
    ("kind", "name", "error", "says"),
    [
        (STACK, "nosuch", LookupError, "no stack 'nosuch'"),
        (STACK, "typo", LookupError, "no stack 'typo'"),  # a service is not a stack
        (SERVICE, "mcp", LookupError, "no service 'mcp'"),  # nor a stack a service
        ("volume", "x", ValueError, "remove a service or a stack"),
    ],
)
def test_what_cannot_be_removed(kind: str, name: str, error: type[Exception], says: str) -> None:
    with pytest.raises(error, match=says):
        removal(kind, name, SERVICES, REPLICAS)


def test_the_next_tick_stops_a_removed_services_replicas_on_reachable_nodes_only() -> None:
    running = [
        replica("typo.1", "1", RUNNING, node="pi1", health=HEALTHY),
        replica("typo.2", "2", RUNNING, node="pi2", health=HEALTHY),
    ]
    away = (
        NodeStatus("pi1", True, NOW - 1000),
        NodeStatus("pi2", False, NOW - 1000),
        NodeStatus("pi3", True, 0),
    )
    out = decide(facts(running, services={}, statuses=away))
    assert out.stops == (("typo.1", "service typo no longer exists"),)
    assert out.starts == ()
    back = decide(facts(running, services={}))  # pi2 is back
    assert ("typo.2", "service typo no longer exists") in back.stops


def test_the_store_keeps_history_and_numbering_and_a_reapply_revives(tmp_path: Path) -> None:
    store = Store(tmp_path / "state.db")
    try:
        records = WorkloadRecords(store)
        [spec] = read_workloads("kind: Service\nname: web\nimage: nginx:1\n").services
        records.apply([spec], NOW, "web.yaml", "site")
        history, _revision, _new = record_revision([], stored(spec), NOW, "rollout")
        rollout = planner.begin("web", 1, None, 1, spec.update, NOW)
        records.begin_rollout("web", history, rollout)
        [made] = records.add_replicas("web", 1, ["pi1"], NOW)
        records.remove(["web"], NOW + 1)
        assert records.services() == [] and records.service("web") is None
        assert [r.id for r in records.replicas("web")] == [made.id]  # stopped by the reconciler
        assert [r.number for r in records.history("web")] == [1]
        assert records.apply([spec], NOW + 2, "web.yaml", "site") == [True]  # revived: changed
        [revived] = records.services()
        assert revived.rollout is None and revived.stack == "site"
        [again] = records.add_replicas("web", 1, ["pi2"], NOW + 3)
        assert again.id != made.id  # a replica id is never reused
    finally:
        store.close()

"""The workload controller as the coordinator runs it (real SQLite store, real cluster view,
real pure core), with the test playing the agents: it reads each node's assignment from its
session's outbox and answers with replica reports, as an agent's supervisor would."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from picoord.common.images import ManifestError
from picoord.common.vocabulary import ReplicaState, RolloutStatus
from picoord.coordinator.cluster import Cluster, LiveSession
from picoord.coordinator.controller.controller import WorkloadController, WorkloadRefused
from picoord.coordinator.controller.records import WorkloadRecords
from picoord.coordinator.registry_client import RegistryUnreachable
from picoord.coordinator.status import StatusTimeouts
from picoord.coordinator.store import CertificateRecord, Store
from picoord.coordinator.telemetry import MetricsHistory
from picoord.coordinator.workloads.reader import read_workloads
from picoord.v1 import agent_pb2, node_pb2, workloads_pb2

NODES = ("pi1", "pi2", "pi3")
SPECS = """
apiVersion: picoord/v1
kind: Service
name: mcp
image: mcp:1
replicas: 3
ports: [{target: 8080, published: 8080}]
secrets: [{env: DATABASE_URL, secret: mcp-secrets, key: database-url}]
resources: {requests: {memory: 64Mi}}
placement: {max_per_node: 1}
health: {http: {path: /health, port: 8080}, interval: 1s, retries: 1}
update: {monitor: 0s}
depends_on: [postgres]
---
apiVersion: picoord/v1
kind: Service
name: postgres
image: postgres:15-alpine
ports: [{target: 5432}]
health: {tcp: {port: 5432}, interval: 1s, retries: 1}
update: {monitor: 0s}
"""


class Clock:
    def __init__(self) -> None:
        self.now = 1_000_000.0

    def __call__(self) -> float:
        return self.now


@dataclass
class Rig:
    controller: WorkloadController
    records: WorkloadRecords
    sessions: dict[str, LiveSession]
    clock: Clock
    running: dict[str, dict[str, workloads_pb2.ReplicaSpec]]  # node -> replica -> spec

    def assignments(self) -> None:
        """Take every assignment sent so far, as the agents would."""
        for node, session in self.sessions.items():
            while not session.outbox.empty():
                message = session.outbox.get_nowait()
                if message.WhichOneof("body") == "assignment":
                    self.running[node] = {spec.replica: spec for spec in message.assignment.replicas}

    def report(self, healthy: bool = True, generation: int = 1 << 62) -> None:
        """Every node reports what it was told to run, running and healthy (or not)."""
        health = workloads_pb2.REPLICA_HEALTH_HEALTHY if healthy else workloads_pb2.REPLICA_HEALTH_UNHEALTHY
        for node in self.sessions:
            reports = workloads_pb2.ReplicaReports(generation=generation)
            for spec in self.running.get(node, {}).values():
                reports.replicas.add(
                    service=spec.service, revision=spec.revision, replica=spec.replica,
                    state=ReplicaState.RUNNING.wire, health=health, message="ok" if healthy else "HTTP 404",
                )  # fmt: skip
            self.controller.on_reports(node, reports)

    async def settle(self, ticks: int = 4, healthy: bool = True) -> None:
        for _ in range(ticks):
            await self.controller.tick()
            self.assignments()
            self.report(healthy)
            self.clock.now += 1.0

    def images(self, service: str) -> dict[str, str]:
        return {
            node: spec.image
            for node, replicas in self.running.items()
            for spec in replicas.values()
            if spec.service == service
        }


@pytest.fixture
async def rig(tmp_path: Path) -> AsyncIterator[Rig]:
    store = Store(tmp_path / "state.db")
    clock = Clock()
    _, token = None, None
    cluster = Cluster(store, StatusTimeouts(), MetricsHistory(4), clock=clock)
    _, token = await cluster.create_token(3600.0, 0, "")
    sessions = {}
    for index, node in enumerate(NODES):
        await cluster.enroll(
            token.token_id, node, {}, CertificateRecord(f"c{index}", node, 1.0, 4e9, None), clock.now
        )
        session = LiveSession(node=node, serial=f"c{index}", address=f"10.0.0.{11 + index}")
        hardware = node_pb2.Hardware(arch="aarch64", memory_total_bytes=1 << 30, cpu_cores=4, hostname=node)
        await cluster.open_session(session, agent_pb2.Hello(agent_version="0", hardware=hardware))
        sessions[node] = session
    records = WorkloadRecords(store)
    controller = WorkloadController(cluster, records, clock=clock)
    for node in NODES:
        controller.on_session_open(node)
    records.apply(list(read_workloads(SPECS).services), clock.now, "test")
    try:
        yield Rig(controller, records, sessions, clock, {})
    finally:
        store.close()


async def test_a_rollout_refuses_a_missing_secret_and_starts_nothing(rig: Rig) -> None:
    with pytest.raises(WorkloadRefused, match="mcp-secrets"):
        await rig.controller.start_rollout("mcp")
    await rig.settle(2)
    assert rig.running == {} or all(not replicas for replicas in rig.running.values())
    assert rig.records.replicas() == []


async def test_first_rollout_places_dependencies_first_then_spreads_and_completes(rig: Rig) -> None:
    rig.records.put_secret("mcp-secrets", "database-url", b"postgresql://x@postgres/db", rig.clock.now)
    await rig.controller.start_rollout("mcp")
    await rig.controller.tick()
    rig.assignments()
    assert rig.images("postgres") and not rig.images("mcp")  # postgres is placed first
    await rig.settle(8)
    assert sorted(rig.images("mcp")) == list(NODES)  # one per node
    postgres_node = next(iter(rig.images("postgres")))
    for node in NODES:
        for spec in rig.running[node].values():
            if spec.service == "mcp":
                assert spec.env["DATABASE_URL"] == "postgresql://x@postgres/db"
                assert dict(spec.hosts) == {"postgres": f"10.0.0.{11 + NODES.index(postgres_node)}"}
            else:
                assert [(p.target, p.published) for p in spec.ports] == [(5432, 5432)]
    [mcp] = [s for s in await rig.controller.services_view() if s.name == "mcp"]
    assert (RolloutStatus.from_wire(mcp.rollout_status), mcp.healthy, mcp.desired) == ("complete", 3, 3)


async def test_a_revision_that_never_gets_healthy_is_rolled_back(rig: Rig) -> None:
    rig.records.put_secret("mcp-secrets", "database-url", b"x", rig.clock.now)
    await rig.controller.start_rollout("mcp")
    await rig.settle(8)
    await rig.controller.start_rollout("mcp", image="mcp:3")
    for _ in range(6):  # the new replica reports unhealthy; everything else stays healthy
        await rig.controller.tick()
        rig.assignments()
        for node, replicas in rig.running.items():
            reports = workloads_pb2.ReplicaReports(generation=1 << 62)
            for spec in replicas.values():
                bad = spec.image == "mcp:3"
                health = (
                    workloads_pb2.REPLICA_HEALTH_UNHEALTHY if bad else workloads_pb2.REPLICA_HEALTH_HEALTHY
                )
                reports.replicas.add(
                    service=spec.service, revision=spec.revision, replica=spec.replica,
                    state=ReplicaState.RUNNING.wire, health=health, message="HTTP 404" if bad else "ok",
                )  # fmt: skip
            rig.controller.on_reports(node, reports)
        rig.clock.now += 1.0
    await rig.settle(6)
    assert set(rig.images("mcp").values()) == {"mcp:1"}
    [info] = [e.progress async for e in rig.controller.follow("mcp", until_finished=False)]
    assert RolloutStatus.from_wire(info.status) == "rolled back" and info.revision == 1
    assert any("HTTP 404" in failure for failure in info.failures)


async def test_a_lost_node_is_replaced_after_the_grace_period_only(rig: Rig) -> None:
    rig.records.put_secret("mcp-secrets", "database-url", b"x", rig.clock.now)
    spec = read_workloads(
        SPECS.replace("replicas: 3", "replicas: 2").replace("placement: {max_per_node: 1}\n", "")
    )
    rig.records.apply(list(spec.services), rig.clock.now, "test")
    await rig.controller.start_rollout("mcp")
    await rig.settle(8)
    before = {r.id: r.node for r in rig.records.replicas("mcp")}
    lost = next(iter(before.values()))
    rig.sessions.pop(lost)  # its session is gone
    rig.controller.cluster.close_session(rig.controller.cluster.sessions[lost])
    rig.controller.on_session_closed(lost)
    await rig.settle(3)  # within the 5 s grace: nothing moves
    assert {r.id: r.node for r in rig.records.replicas("mcp") if not r.replaced} == before
    await rig.settle(6)  # past it: replaced elsewhere
    live = [r for r in rig.records.replicas("mcp") if not r.replaced and not r.stopping]
    assert len(live) == 2 and lost not in {r.node for r in live}


# --- digest pinning at rollout ----------------------------------------------------------
# The tag is resolved once per rollout, every replica gets that digest, a re-pushed tag
# rolls the new one, and a registry that cannot answer refuses the rollout, nothing changed.

FIRST = "sha256:" + "1" * 64
SECOND = "sha256:" + "2" * 64


class Registry:
    """Stands in for the HTTP call only: which digest each image's tag names now."""

    def __init__(self) -> None:
        self.tags: dict[str, str] = {}
        self.asked: list[str] = []
        self.down = False

    def __call__(self, image: str) -> str:
        self.asked.append(image)
        if self.down:
            raise RegistryUnreachable(f"{image}: the registry did not answer over verified TLS: refused")
        return self.tags.get(image, "")


def digests(rig: Rig, service: str) -> set[str]:
    return {
        spec.image_digest
        for replicas in rig.running.values()
        for spec in replicas.values()
        if spec.service == service
    }


@pytest.fixture
def registry(rig: Rig) -> Registry:
    fake = Registry()
    rig.controller.pin_image = fake
    rig.records.put_secret("mcp-secrets", "database-url", b"x", rig.clock.now)
    return fake


async def test_every_replica_runs_the_digest_resolved_once_and_a_repush_rolls_the_new_one(
    rig: Rig,
    registry: Registry,
) -> None:
    registry.tags = {"mcp:1": FIRST}  # postgres comes from elsewhere: by tag ("")
    lines = await rig.controller.start_rollout("mcp")
    assert registry.asked == ["mcp:1", "postgres:15-alpine"]  # once each, not per replica
    assert any(FIRST in line for line in lines)
    await rig.settle(8)
    assert digests(rig, "mcp") == {FIRST} and len(rig.images("mcp")) == len(NODES)
    assert digests(rig, "postgres") == {""}
    assert set(rig.images("mcp").values()) == {"mcp:1"}  # the tag is kept for display

    # the same tag again, nothing re-pushed: the same revision
    again = await rig.controller.start_rollout("mcp")
    assert again == [f"rolling out revision 1 of mcp (mcp:1 at {FIRST})"]

    registry.tags["mcp:1"] = SECOND  # re-pushed under the same tag
    lines = await rig.controller.start_rollout("mcp")
    assert lines == [f"rolling out revision 2 of mcp (mcp:1 at {SECOND})"]
    await rig.settle(12)
    assert digests(rig, "mcp") == {SECOND}  # every replica, on every node


async def test_a_registry_that_cannot_answer_refuses_the_rollout_and_changes_nothing(
    rig: Rig,
    registry: Registry,
) -> None:
    registry.down = True
    with pytest.raises(WorkloadRefused, match=r"did not answer.*nothing was changed"):
        await rig.controller.start_rollout("mcp")
    await rig.settle(2)
    assert rig.records.replicas() == []
    assert rig.records.history("mcp") == []


async def test_an_unknown_tag_is_refused_by_name(rig: Rig, registry: Registry) -> None:
    def missing(image: str) -> str:
        raise ManifestError(f"{image} (10.0.0.1:5000): the registry has no such image (HTTP 404)")

    rig.controller.pin_image = missing
    with pytest.raises(WorkloadRefused, match=r"mcp: cannot pin mcp:1 .*HTTP 404"):
        await rig.controller.start_rollout("mcp")


async def test_a_stop_ends_the_loop_at_once_not_after_its_longest_sleep(tmp_path: Path) -> None:
    """With nothing to do the loop sleeps CEILING (30 s) between ticks; a coordinator's
    shutdown (and so a restart under every Pi's session) must not wait that out."""
    store = Store(tmp_path / "state.db")
    try:
        clock = Clock()
        cluster = Cluster(store, StatusTimeouts(), MetricsHistory(4), clock=clock)
        controller = WorkloadController(cluster, WorkloadRecords(store), clock=clock)
        stop = asyncio.Event()
        running = asyncio.create_task(controller.run(stop))
        await asyncio.sleep(0.2)  # its first tick done, it sleeps
        assert not running.done()
        stop.set()
        await asyncio.wait_for(running, 2.0)
    finally:
        store.close()

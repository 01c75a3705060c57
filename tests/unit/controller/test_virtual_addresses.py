"""The controller sends each node the VRRP instances virtual_ips plans: nodes with a healthy
replica of the service take part, the holder an agent reports is preferred, and a node
whose replica turns unhealthy is left out. Real store and cluster view, the test playing
the agents (as tests/unit/controller/test_controller.py does)."""

from __future__ import annotations

import dataclasses
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from picoord.common.vocabulary import ReplicaState
from picoord.coordinator.cluster import Cluster, LiveSession
from picoord.coordinator.controller.controller import WorkloadController
from picoord.coordinator.controller.records import WorkloadRecords
from picoord.coordinator.networking.virtual_ips import FIRST_PRIORITY, HOLDER_PRIORITY
from picoord.coordinator.status import StatusTimeouts
from picoord.coordinator.store import CertificateRecord, Store
from picoord.coordinator.telemetry import MetricsHistory
from picoord.coordinator.workloads.reader import read_workloads
from picoord.v1 import agent_pb2, node_pb2, workloads_pb2
from tests.unit.controller.test_controller import Clock

NODES = ("pi1", "pi2", "pi3")
VIP = "10.0.0.200"
SPEC = """
apiVersion: picoord/v1
kind: Service
name: web
image: mcp:1
replicas: 2
ports: [{target: 8080, published: 8080}]
placement: {max_per_node: 1}
health: {http: {path: /health, port: 8080}, interval: 1s, retries: 1}
update: {monitor: 0s}
"""


class Agents:
    """The nodes' sessions, their last assignments, and what they report."""

    def __init__(self, controller: WorkloadController, sessions: dict[str, LiveSession]) -> None:
        self.controller, self.sessions = controller, sessions
        self.assigned: dict[str, workloads_pb2.NodeAssignment] = {}
        self.unhealthy: set[str] = set()  # replica ids
        self.held: dict[str, list[str]] = {}

    def take(self) -> None:
        for node, session in self.sessions.items():
            while not session.outbox.empty():
                message = session.outbox.get_nowait()
                if message.WhichOneof("body") == "assignment":
                    self.assigned[node] = message.assignment

    def report(self) -> None:
        for node in self.sessions:
            assignment = self.assigned.get(node, workloads_pb2.NodeAssignment())
            reports = workloads_pb2.ReplicaReports(
                generation=1 << 62, virtual_addresses_held=self.held.get(node, [])
            )
            for spec in assignment.replicas:
                health = (
                    workloads_pb2.REPLICA_HEALTH_UNHEALTHY
                    if spec.replica in self.unhealthy
                    else workloads_pb2.REPLICA_HEALTH_HEALTHY
                )
                reports.replicas.add(
                    service=spec.service, revision=spec.revision, replica=spec.replica,
                    state=ReplicaState.RUNNING.wire, health=health,
                )  # fmt: skip
            self.controller.on_reports(node, reports)

    async def settle(self, clock: Clock, ticks: int = 6) -> None:
        for _ in range(ticks):
            await self.controller.tick()
            self.take()
            self.report()
            clock.now += 1.0

    def priorities(self) -> dict[str, int]:
        return {
            node: item.priority
            for node, assignment in self.assigned.items()
            for item in assignment.virtual_addresses
            if item.address == VIP
        }

    def replica_nodes(self) -> dict[str, str]:
        return {spec.replica: node for node, a in self.assigned.items() for spec in a.replicas}


@pytest.fixture
async def rig(tmp_path: Path) -> AsyncIterator[tuple[Agents, Clock]]:
    store = Store(tmp_path / "state.db")
    clock = Clock()
    cluster = Cluster(store, StatusTimeouts(), MetricsHistory(4), clock=clock)
    _, token = await cluster.create_token(3600.0, 0, "")
    sessions = {}
    for index, node in enumerate(NODES):
        await cluster.enroll(
            token.token_id, node, {}, CertificateRecord(f"c{index}", node, 1.0, 4e9, None), clock.now
        )
        address = f"10.0.0.{11 + index}"
        session = LiveSession(node=node, serial=f"c{index}", address=address)
        interface = node_pb2.NetworkInterface(name="eth0", addresses=[f"{address}/24"], up=True)
        hardware = node_pb2.Hardware(
            arch="aarch64", memory_total_bytes=1 << 30, cpu_cores=4, hostname=node, interfaces=[interface]
        )
        await cluster.open_session(session, agent_pb2.Hello(agent_version="0", hardware=hardware))
        sessions[node] = session
    records = WorkloadRecords(store)
    controller = WorkloadController(cluster, records, clock=clock)
    for node in NODES:
        controller.on_session_open(node)
    [spec] = read_workloads(SPEC).services
    records.apply([dataclasses.replace(spec, address=VIP)], clock.now, "test", "web")
    await controller.start_rollout("web")
    agents = Agents(controller, sessions)
    try:
        yield agents, clock
    finally:
        store.close()


async def test_nodes_with_a_healthy_replica_announce_the_address(rig: tuple[Agents, Clock]) -> None:
    agents, clock = rig
    await agents.settle(clock)
    placed = set(agents.replica_nodes().values())
    assert len(placed) == 2
    assert set(agents.priorities()) == placed  # the third node takes no part
    for node in placed:
        [item] = agents.assigned[node].virtual_addresses
        assert item.source == agents.sessions[node].address and item.prefix_length == 24
        others = sorted(set(NODES) - {node})  # every other node of the subnet
        assert list(item.peers) == [agents.sessions[other].address for other in others]
        assert list(item.services) == ["web"]
    assert sorted(agents.priorities().values()) == [FIRST_PRIORITY - 1, FIRST_PRIORITY]


async def test_the_holder_is_preferred_and_an_unhealthy_node_drops_out(rig: tuple[Agents, Clock]) -> None:
    agents, clock = rig
    await agents.settle(clock)
    low = min(agents.priorities(), key=agents.priorities().__getitem__)  # VRRP elected the other...
    agents.held = {low: [VIP]}  # ...but say this one holds it (it was up first)
    await agents.settle(clock, 2)
    assert agents.priorities()[low] == HOLDER_PRIORITY
    [replica] = [r for r, node in agents.replica_nodes().items() if node == low]
    agents.unhealthy = {replica}
    await agents.settle(clock, 2)
    assert low not in agents.priorities()
    assert not agents.assigned[low].virtual_addresses

"""The supervisor's shell around the published-ports table: it loads what the assignment
says, reaches its own replicas at their container address, and acknowledges the
generation it applied (what leave-before-stop waits for)."""

from __future__ import annotations

from pathlib import Path

from picoord.agent.commands import CommandResult
from picoord.agent.networking.service_ports import ServicePortsApplier
from picoord.agent.runtime.model import ReplicaState
from picoord.agent.runtime.supervisor import Supervisor
from picoord.v1 import workloads_pb2

NODE = "10.0.0.11"


class Engine:
    """dockerd as the supervisor sees it: one running container, its address asked for."""

    def __init__(self, started_at: str = "t1") -> None:
        self.started_at = started_at
        self.asked: list[str] = []

    def replicas(self) -> list[ReplicaState]:
        return [ReplicaState("web", 1, "web.1", "c1", "running", 0, 0, self.started_at, "mcp:1")]

    def address(self, container_id: str, overlay: bool = False) -> str:
        """Its bridge address; for a replica on overlay networks, its docker_gwbridge one
        (the overlay address is out of the node's reach)."""
        self.asked.append(container_id)
        return f"{'172.18' if overlay else '172.17'}.0.{len(self.asked) + 1}"


def assignment(
    generation: int, with_replica: bool = True, overlay: bool = False
) -> workloads_pb2.NodeAssignment:
    message = workloads_pb2.NodeAssignment(generation=generation)
    if with_replica:
        replica = message.replicas.add(
            service="web", revision=1, replica="web.1", image="mcp:1", restart="no"
        )
        if overlay:
            replica.networks.add(name="web_default", aliases=["web"])
    ports = message.service_ports
    ports.node_address, ports.nodes[:] = NODE, [NODE, "10.0.0.12"]
    port = ports.ports.add(service="web", port=8080, protocol="tcp")
    port.endpoints.add(replica="web.1", address=NODE, port=61001, target=8080)
    port.endpoints.add(replica="web.2", address="10.0.0.12", port=61002, target=8080)
    return message


def supervisor(tmp_path: Path, engine: Engine | None) -> tuple[Supervisor, list[str], list[int]]:
    scripts: list[str] = []
    acked: list[int] = []
    applier = ServicePortsApplier(
        lambda script: scripts.append(script) or CommandResult(("nft",), 0, "", ""), lambda: None
    )
    made = Supervisor(
        tmp_path, "/nonexistent.sock", lambda r: acked.append(r.generation),
        engine_factory=(lambda _socket: engine) if engine else None, ports_applier=applier,
    )  # fmt: skip
    return made, scripts, acked


def test_a_local_replica_is_reached_at_its_container_and_the_generation_is_acknowledged(
    tmp_path: Path,
) -> None:
    engine = Engine()
    made, scripts, acked = supervisor(tmp_path, engine)
    made.assign(assignment(7))
    made.tick()
    assert "meta l4proto tcp dnat to 172.17.0.2:8080" in scripts[-1]
    assert "dnat to 10.0.0.12:61002" in scripts[-1]
    assert acked == [7]
    made.assign(assignment(8))
    made.tick()
    assert engine.asked == ["c1"] and len(scripts) == 1 and acked == [7, 8]  # same table: not loaded again
    engine.started_at = "t2"  # restarted by its restart policy: its address is asked again
    made.tick()
    assert engine.asked == ["c1", "c1"] and "dnat to 172.17.0.3:8080" in scripts[-1]


def test_a_node_without_replicas_answers_the_ports_and_acknowledges(tmp_path: Path) -> None:
    made, scripts, acked = supervisor(tmp_path, None)
    made.assign(assignment(9, with_replica=False))
    made.tick()
    assert "dnat to 10.0.0.12:61002" in scripts[-1] and acked == [9]
    assert list(tmp_path.iterdir()) == []  # no stored assignment: the kernel keeps the table


def test_a_local_replica_on_an_overlay_network_is_reached_through_docker_gwbridge(tmp_path: Path) -> None:
    engine = Engine()
    made, scripts, _ = supervisor(tmp_path, engine)
    made.assign(assignment(7, overlay=True))
    made.tick()
    assert "meta l4proto tcp dnat to 172.18.0.2:8080" in scripts[-1]

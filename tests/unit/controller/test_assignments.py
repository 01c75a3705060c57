"""What each node is told to run, from the seed's own MCP services: secrets resolved, ports
published for a named service, discovery entries pointing at healthy replicas first."""

from __future__ import annotations

from pathlib import Path

import pytest

from picoord.common.checks.workloads import check_replica_spec
from picoord.coordinator.controller.assignments import (
    Assigned,
    discovery_hosts,
    node_assignments,
    replica_spec,
    volume_requests,
)
from picoord.coordinator.workloads.reader import read_workloads
from picoord.v1 import workloads_pb2

EXAMPLES = Path(__file__).resolve().parents[3] / "examples"
SPECS = {spec.name: spec for spec in read_workloads((EXAMPLES / "mcp.yaml").read_text()).services}
SECRETS = {("mcp-secrets", "database-url"): "postgresql://mcp:pw@postgres:5432/mcp_db",
           ("mcp-secrets", "postgres-password"): "pw"}  # fmt: skip
ADDRESSES = {"pi1": "10.0.0.11", "pi2": "10.0.0.12", "desktop": "10.0.0.2"}


def test_mcp_replica_spec_is_what_the_agent_accepts() -> None:
    placed = Assigned("mcp.1", "mcp", 1, "pi1")
    message = replica_spec(SPECS["mcp"], placed, SECRETS, {"postgres": "10.0.0.2"}, publish_targets=False)
    check_replica_spec(message)  # the agent's own check
    assert message.env["DATABASE_URL"] == SECRETS[("mcp-secrets", "database-url")]
    assert message.env["MCP_HTTP_HOST"] == "0.0.0.0"
    assert [(p.target, p.published) for p in message.ports] == [(8080, 8080)]
    assert message.memory_reservation_bytes == 256 * 1024**2
    assert message.memory_limit_bytes == 512 * 1024**2
    assert message.cpu_limit_millis == 500
    assert message.health.kind == "tcp" and message.health.port == 8080
    assert dict(message.hosts) == {"postgres": "10.0.0.2"}


def test_a_named_service_publishes_its_ports_at_the_same_numbers() -> None:
    postgres = SPECS["postgres"].__class__(**{**SPECS["postgres"].__dict__, "ports": ()})
    assert (
        replica_spec(postgres, Assigned("postgres.1", "postgres", 1, "desktop"), SECRETS, {}, True).ports
        == []
    )
    with_port = replica_spec(
        SPECS["postgres"], Assigned("postgres.1", "postgres", 1, "desktop"), SECRETS, {}, True
    )
    assert [(p.target, p.published) for p in with_port.ports] == [
        (port.target, port.target) for port in SPECS["postgres"].ports
    ]


@pytest.mark.parametrize(
    ("replicas", "expected"),
    [
        ([], {}),
        ([(Assigned("postgres.1", "postgres", 1, "desktop"), False)], {"postgres": "10.0.0.2"}),
        # a healthy replica wins over an unhealthy one, whatever the ids
        (
            [
                (Assigned("postgres.1", "postgres", 1, "desktop"), False),
                (Assigned("postgres.2", "postgres", 1, "pi2"), True),
            ],
            {"postgres": "10.0.0.12"},
        ),
        # a node without a known address (no session) is skipped
        ([(Assigned("postgres.1", "postgres", 1, "gone"), True)], {}),
    ],
)
def test_discovery_hosts(replicas: list[tuple[Assigned, bool]], expected: dict[str, str]) -> None:
    assert discovery_hosts(SPECS["mcp"], replicas, ADDRESSES, SPECS) == expected


def test_a_health_claim_never_displaces_another_nodes_healthy_replica() -> None:
    """Issue 18, row 4: health is each node's word about its own replicas only, and among
    healthy replicas the coordinator's replica ids decide, so a node that calls its replica
    healthy wins a name lookup only over replicas their own nodes report unhealthy."""
    honest = (Assigned("postgres.1", "postgres", 1, "desktop"), True)
    liar = (Assigned("postgres.2", "postgres", 1, "pi2"), True)
    assert discovery_hosts(SPECS["mcp"], [liar, honest], ADDRESSES, SPECS) == {"postgres": "10.0.0.2"}


def test_node_assignments_leave_out_a_replica_whose_secret_is_missing() -> None:
    placed = [Assigned("mcp.1", "mcp", 1, "pi1"), Assigned("postgres.1", "postgres", 1, "desktop")]
    specs = {("mcp", 1): SPECS["mcp"], ("postgres", 1): SPECS["postgres"]}
    secrets = {("mcp-secrets", "postgres-password"): "pw"}
    by_node, problems = node_assignments(placed, specs, SPECS, {"postgres.1": True}, secrets, ADDRESSES)
    assert list(by_node) == ["desktop"]
    assert [m.replica for m in by_node["desktop"]] == ["postgres.1"]
    assert problems == [
        "mcp.1: secret mcp-secrets/database-url (for mcp's DATABASE_URL) is missing: "
        "coordctl secret create mcp-secrets database-url ..."
    ]
    assert isinstance(by_node["desktop"][0], workloads_pb2.ReplicaSpec)


def _mounting(*sources: str) -> workloads_pb2.ReplicaSpec:
    spec = workloads_pb2.ReplicaSpec(replica="db.1")
    for source in sources:
        spec.volumes.add(source=source, target="/data")
    return spec


@pytest.mark.parametrize(
    ("pending", "assigned", "reported_gone", "ask", "done"),
    [
        (["pg"], [], [], ["pg"], []),
        (["pg"], [], ["pg"], [], ["pg"]),  # the node says it is gone: forgotten
        (["pg"], [_mounting("pg")], [], [], []),  # a replica there mounts it again: not asked
        (["pg", "old"], [_mounting("/srv/old", "pg")], ["x"], ["old"], []),  # a bind is no volume
    ],
)
def test_volume_requests(pending, assigned, reported_gone, ask, done) -> None:
    assert volume_requests(pending, assigned, reported_gone) == (ask, done)

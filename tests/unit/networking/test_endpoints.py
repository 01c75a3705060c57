"""Which replicas stand behind each published port (coordinator/networking/endpoints.py)."""

from __future__ import annotations

import pytest

from picoord.common import limits
from picoord.common.checks.workloads import check_service_ports
from picoord.coordinator.controller.assignments import Assigned, replica_spec
from picoord.coordinator.networking.endpoints import (
    Member,
    endpoint_port,
    endpoint_ports,
    service_endpoints,
    service_ports_message,
)
from picoord.coordinator.workloads.reader import read_workloads
from picoord.coordinator.workloads.spec import ServiceSpec

ADDRESSES = {"pi1": "10.0.0.11", "pi2": "10.0.0.12", "pi3": "10.0.0.13", "v6": "fd00::5"}


def spec(name: str = "mcp", ports: str = "[{target: 8080, published: 8080}]") -> ServiceSpec:
    [found] = read_workloads(
        f"kind: Service\nname: {name}\nimage: mcp:1\nreplicas: 2\nports: {ports}\n"
    ).services
    return found


MCP = spec()
WEB = spec("web", "[{target: 80, published: 8080}]")  # the same published port as mcp
TWO = spec("two", "[{target: 80, published: 80}, {target: 443, published: 443}, {target: 9000}]")
INTERNAL = spec("postgres", "[{target: 5432}]")


def m(replica: str, node: str, serving: bool = True, revision: int = 1) -> Member:
    return Member(replica, replica.split(".")[0], revision, node, serving)


def ends(ports: list, port: int = 8080) -> list[tuple[str, str]]:  # type: ignore[type-arg]
    [found] = [p for p in ports if p.port == port]
    return [(e.replica, e.address) for e in found.endpoints]


@pytest.mark.parametrize(
    ("members", "expected"),
    [
        ([m("mcp.1", "pi1"), m("mcp.2", "pi2")], [("mcp.1", "10.0.0.11"), ("mcp.2", "10.0.0.12")]),
        (
            [m("mcp.1", "pi1"), m("mcp.2", "pi2", serving=False)],
            [("mcp.1", "10.0.0.11")],
        ),  # unhealthy / stopping
        ([m("mcp.1", "pi1"), m("mcp.2", "pi9")], [("mcp.1", "10.0.0.11")]),  # a node without a session
        ([m("mcp.1", "pi1"), m("mcp.2", "v6")], [("mcp.1", "10.0.0.11")]),  # IPv6 only: the tables are IPv4
        ([m("mcp.1", "pi1", serving=False)], []),  # nobody: the port is known, nothing answers
        ([m("mcp.3", "pi1"), m("mcp.1", "pi1")], [("mcp.1", "10.0.0.11"), ("mcp.3", "10.0.0.11")]),  # by id
    ],
)
def test_only_replicas_in_the_rotation_stand_behind_a_port(members: list[Member], expected: list) -> None:  # type: ignore[type-arg]
    ports, problems = service_endpoints(members, {("mcp", 1): MCP}, {"mcp": MCP}, ADDRESSES)
    assert ends(ports) == expected
    assert problems == []


def test_a_service_without_published_ports_gets_none() -> None:
    ports, _ = service_endpoints(
        [m("postgres.1", "pi1")], {("postgres", 1): INTERNAL}, {"postgres": INTERNAL}, ADDRESSES
    )
    assert ports == []


def test_a_port_published_twice_stays_with_the_first_service_by_name() -> None:
    members = [m("mcp.1", "pi1"), m("web.1", "pi2")]
    specs = {("mcp", 1): MCP, ("web", 1): WEB}
    ports, problems = service_endpoints(members, specs, {"mcp": MCP, "web": WEB}, ADDRESSES)
    assert ends(ports) == [("mcp.1", "10.0.0.11")]
    assert problems == ["web: port 8080/tcp is published by mcp already"]


def test_a_revision_still_running_keeps_its_old_port_until_it_goes() -> None:
    moved = spec(ports="[{target: 8080, published: 9090}]")
    members = [m("mcp.1", "pi1", revision=1), m("mcp.3", "pi2", revision=2)]
    ports, _ = service_endpoints(members, {("mcp", 1): MCP, ("mcp", 2): moved}, {"mcp": moved}, ADDRESSES)
    assert ends(ports, 8080) == [("mcp.1", "10.0.0.11")]
    assert ends(ports, 9090) == [("mcp.3", "10.0.0.12")]


def test_endpoint_ports_follow_the_replica_id_and_stay_in_the_range() -> None:
    assert endpoint_port("mcp", "mcp.7", 0, 1) == endpoint_port("mcp", "mcp.7", 0, 1)
    consecutive = {endpoint_port("mcp", f"mcp.{n}", i, 2) for n in range(1, 500) for i in range(2)}
    assert len(consecutive) == 998  # a service's replicas never share one
    assert all(limits.ENDPOINT_PORT_FIRST <= p <= limits.ENDPOINT_PORT_LAST for p in consecutive)
    assert set(endpoint_ports(TWO, "two.1")) == {(80, "tcp"), (443, "tcp")}  # unpublished 9000: none


def test_the_replica_binds_its_endpoint_on_its_node_address_only() -> None:
    message = replica_spec(TWO, Assigned("two.4", "two", 1, "pi1"), {}, {}, False, "10.0.0.11")
    bound = [(p.target, p.published, p.endpoint, p.bind_address) for p in message.ports]
    mapping = endpoint_ports(TWO, "two.4")
    assert bound == [
        (80, 80, mapping[(80, "tcp")], "10.0.0.11"),
        (443, 443, mapping[(443, "tcp")], "10.0.0.11"),
        (9000, 0, 0, ""),
    ]


def test_every_node_gets_every_port_with_its_own_address_and_the_agent_accepts_it() -> None:
    ports, _ = service_endpoints(
        [m("mcp.1", "pi1"), m("mcp.2", "pi2")], {("mcp", 1): MCP}, {"mcp": MCP}, ADDRESSES
    )
    message = service_ports_message(ports, "10.0.0.13", ADDRESSES)
    check_service_ports(message)
    assert message.node_address == "10.0.0.13"
    assert list(message.nodes) == ["10.0.0.11", "10.0.0.12", "10.0.0.13"]
    [port] = message.ports
    assert (port.service, port.port, port.protocol, len(port.endpoints)) == ("mcp", 8080, "tcp", 2)
    assert port.endpoints[0].port == endpoint_port("mcp", "mcp.1", 0, 1)
    assert port.endpoints[0].target == 8080


def test_a_published_port_among_the_endpoint_ports_is_refused_naming_the_field() -> None:
    from picoord.coordinator.workloads.reader import WorkloadError

    with pytest.raises(WorkloadError, match=r"ports: port 61500 is one of the endpoint ports 61000-63999"):
        spec(ports="[{target: 80, published: 61500}]")

"""Published ports answered on every node: which replicas stand behind each one (pure).

Swarm's routing mesh and Kubernetes' NodePort in picoord's terms: every published port of
every service is answered on every node's local addresses, forwarded in the kernel by the
node's `picoord_ports` nftables table (agent/networking/service_ports.py) to the healthy
replicas. Each replica binds its published container port on its own node's cluster address
only, at an endpoint port chosen here from `limits.ENDPOINT_PORT_FIRST..LAST` (61000-63999).

The endpoint port follows the replica's id (`mcp.7`: ids are never reused), not its slot:
during a rollout the old replica of a slot keeps serving until every node has stopped
sending it traffic, while its replacement (maybe on the same node) already starts, so the
two must not want the same port. Consecutive replicas of a service never share a port; two
services can collide on one node (a chance of about k^2/6000 with k endpoints on a node):
the second replica then fails to start and its replacement, with a new id, takes another
port (docs/service-ports.md).

A replica is in the rotation when it is available (running and healthy, or running without
a health check) and not being stopped: a replica the controller stops leaves every node's
rules first (controller/decide.py `leaving`).
"""

from __future__ import annotations

import ipaddress
import zlib
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

from picoord.common import limits
from picoord.coordinator.workloads.spec import PortMapping, ServiceSpec
from picoord.v1 import workloads_pb2

ENDPOINT_PORTS = limits.ENDPOINT_PORT_LAST - limits.ENDPOINT_PORT_FIRST + 1


@dataclass(frozen=True)
class Member:
    """A replica that may stand behind its service's published ports."""

    replica: str  # "mcp.7"
    service: str
    revision: int
    node: str
    in_rotation: bool  # available and not being stopped


@dataclass(frozen=True)
class Endpoint:
    replica: str
    node: str
    address: str  # the node's cluster address
    port: int  # the endpoint port there
    target: int  # the container port


@dataclass(frozen=True)
class Published:
    service: str
    port: int
    protocol: str
    endpoints: tuple[Endpoint, ...]  # in the rotation only, by replica id


def ipv4(address: str) -> str:
    """The address if it is IPv4 (the nodes' tables are `table ip`), else ""."""
    try:
        return address if ipaddress.ip_address(address).version == 4 else ""
    except ValueError:
        return ""


def published(spec: ServiceSpec) -> tuple[PortMapping, ...]:
    """The ports of a spec answered on every node."""
    return tuple(port for port in spec.ports if port.published)


def replica_number(replica: str) -> int:
    """The N of `service.N` (0 for an id of another shape)."""
    _, _, number = replica.rpartition(".")
    return int(number) if number.isdigit() else 0


def endpoint_port(service: str, replica: str, index: int, count: int) -> int:
    """The endpoint port of the `index`th of `count` published ports of `replica`: a function
    of the id alone, so every tick and every coordinator restart gives the same answer."""
    offset = zlib.crc32(service.encode()) + replica_number(replica) * max(count, 1) + index
    return limits.ENDPOINT_PORT_FIRST + offset % ENDPOINT_PORTS


def endpoint_ports(spec: ServiceSpec, replica: str) -> dict[tuple[int, str], int]:
    """(container port, protocol) -> endpoint port, for each published port of `spec`."""
    ports = published(spec)
    return {
        (port.target, port.protocol): endpoint_port(spec.name, replica, index, len(ports))
        for index, port in enumerate(ports)
    }


def service_endpoints(
    members: Iterable[Member],
    specs: Mapping[tuple[str, int], ServiceSpec],
    current: Mapping[str, ServiceSpec],
    addresses: Mapping[str, str],
) -> tuple[list[Published], list[str]]:
    """Every published port of the cluster with the replicas in its rotation, and a line for
    each port another service already publishes (the first service by name keeps it).

    The ports are those of the services' applied specs, plus those of revisions still running
    (a rollout that changes a published port serves the old one until its replicas go). A
    replica stands behind a port when its own revision publishes it, it is in the rotation and
    its node's IPv4 address is known (a node without a session cannot be reached anyway)."""
    members = sorted(members, key=lambda m: m.replica)
    wanted: dict[tuple[str, int], str] = {}
    problems: list[str] = []
    sources = [spec for _, spec in sorted(current.items())]
    sources += [specs[(m.service, m.revision)] for m in members if (m.service, m.revision) in specs]
    for spec in sources:
        for port in published(spec):
            key = (port.protocol, port.published)
            owner = wanted.setdefault(key, spec.name)
            if owner != spec.name:
                line = f"{spec.name}: port {port.published}/{port.protocol} is published by {owner} already"
                if line not in problems:
                    problems.append(line)
    behind: dict[tuple[str, int], list[Endpoint]] = {key: [] for key in wanted}
    for member in members:
        spec = specs.get((member.service, member.revision))
        address = ipv4(addresses.get(member.node, ""))
        if spec is None or not member.in_rotation or not address:
            continue
        ports = endpoint_ports(spec, member.replica)
        for port in published(spec):
            key = (port.protocol, port.published)
            if wanted.get(key) == member.service:
                endpoint = ports[(port.target, port.protocol)]
                behind[key].append(Endpoint(member.replica, member.node, address, endpoint, port.target))
    found = [
        Published(wanted[key], key[1], key[0], tuple(behind[key]))
        for key in sorted(wanted, key=lambda k: (k[1], k[0]))
    ]
    return found, problems


def service_ports_message(
    ports: Sequence[Published], node_address: str, addresses: Mapping[str, str]
) -> workloads_pb2.ServicePorts:
    """The wire form one node gets: every port, its own address, and every node's."""
    nodes = sorted({ipv4(address) for address in addresses.values()} - {""})
    message = workloads_pb2.ServicePorts(node_address=ipv4(node_address), nodes=nodes)
    for port in ports:
        entry = message.ports.add(service=port.service, port=port.port, protocol=port.protocol)
        for endpoint in port.endpoints:
            entry.endpoints.add(
                replica=endpoint.replica, address=endpoint.address, port=endpoint.port, target=endpoint.target
            )
    return message

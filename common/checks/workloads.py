"""Checks of the workload messages, run at both ends: the agent checks every replica it is
told to run before touching dockerd, and the coordinator checks what agents report before
it is stored, logged or shown.

A replica's values reach the Docker Engine API as data (never a command line), but an
image name, a bind source or an environment name is still checked here, so a hostile or
buggy coordinator message cannot mount /etc into a container or smuggle an option in.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass

from picoord.common import limits
from picoord.common.images import DIGEST
from picoord.common.validation import (
    FieldError,
    absolute_path,
    bind_source,
    env_name,
    hostname,
    image_reference,
    ip_address,
    port,
    safe_word,
    volume_name,
)
from picoord.common.vocabulary import ReplicaState
from picoord.v1 import workloads_pb2

MAX_REPLICAS_PER_NODE = limits.REPLICAS_PER_NODE
MAX_ENV = 256
MAX_ENV_VALUE = 32 * 1024
MAX_ARGV = 256
MAX_ARG = 4096
MAX_PORTS = 64
MAX_VOLUMES = 64
MAX_HOSTS = 256
MAX_VOLUME_REMOVALS = limits.VOLUME_REMOVALS
MAX_REPORT_TEXT = limits.REPLICA_MESSAGE
RESTART_POLICIES = ("no", "on-failure", "always", "unless-stopped")
PROBE_KINDS = ("http", "tcp", "exec", "none", "")
PROTOCOLS = ("tcp", "udp")
# Docker's network names: a letter or digit, then letters, digits, '_', '.', '-'
_NETWORK_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")


def _count(field: str, values: object, limit: int) -> None:
    if len(values) > limit:  # type: ignore[arg-type]
        raise FieldError(field, f"has more than {limit} entries")


def _name(field: str, value: str) -> str:
    """A service or replica name: what labels and container names are built from."""
    safe_word(field, value, 128)
    if not all(ch.isalnum() or ch in "._-" for ch in value):
        raise FieldError(field, f"{value!r} may only contain letters, digits, '.', '_' and '-'")
    return value


def _seconds(field: str, value: float, maximum: float = 24 * 3600) -> None:
    if not 0 <= value <= maximum:
        raise FieldError(field, f"{value!r} is not between 0 and {maximum:g} seconds")


def check_replica_spec(
    spec: workloads_pb2.ReplicaSpec, field: str = "replica", node: NodeMounts | None = None
) -> None:
    """Raise FieldError naming the first unacceptable field of one replica. On a node
    (`node` given) a bind source is held to the node's mount rules: no system tree or the
    agent's own state unless agent.toml allows the path."""
    _name(f"{field}.service", spec.service)
    _name(f"{field}.replica", spec.replica)
    if spec.revision < 1:
        raise FieldError(f"{field}.revision", "must be 1 or more")
    image_reference(f"{field}.image", spec.image)
    if spec.image_digest and not DIGEST.fullmatch(spec.image_digest):
        raise FieldError(f"{field}.image_digest", "is not sha256:<64 hex digits>")
    for name, values in (("command", spec.command), ("args", spec.args)):
        _count(f"{field}.{name}", values, MAX_ARGV)
        for index, value in enumerate(values):
            if len(value) > MAX_ARG or "\x00" in value:
                raise FieldError(f"{field}.{name}[{index}]", "is too long or contains a NUL byte")
    _count(f"{field}.env", spec.env, MAX_ENV)
    for key, value in spec.env.items():
        env_name(f"{field}.env", key)
        if len(value) > MAX_ENV_VALUE or "\x00" in value:
            raise FieldError(f"{field}.env.{key}", "is too long or contains a NUL byte")
    _count(f"{field}.ports", spec.ports, MAX_PORTS)
    for index, binding in enumerate(spec.ports):
        port(f"{field}.ports[{index}].target", binding.target)
        if binding.published:
            port(f"{field}.ports[{index}].published", binding.published)
        if binding.protocol not in PROTOCOLS:
            raise FieldError(f"{field}.ports[{index}].protocol", f"{binding.protocol!r} is not tcp or udp")
        if binding.endpoint:
            endpoint_port(f"{field}.ports[{index}].endpoint", binding.endpoint)
            ip_address(f"{field}.ports[{index}].bind_address", binding.bind_address)
        elif binding.bind_address:
            raise FieldError(f"{field}.ports[{index}].bind_address", "is set without an endpoint port")
    _count(f"{field}.volumes", spec.volumes, MAX_VOLUMES)
    for index, volume in enumerate(spec.volumes):
        where = f"{field}.volumes[{index}]"
        if volume.tmpfs:
            if volume.source:
                raise FieldError(f"{where}.source", "a tmpfs has no source")
        elif volume.source.startswith("/"):  # no /etc, /proc, /var/lib/picoord... into a container
            if node is None:
                bind_source(f"{where}.source", volume.source)
            else:
                bind_source(
                    f"{where}.source",
                    volume.source,
                    node=True,
                    allowed=node.allowed,
                    extra_trees=node.extra_trees,
                )
        else:
            volume_name(f"{where}.source", volume.source)
        absolute_path(f"{where}.target", volume.target)
    if spec.restart not in RESTART_POLICIES:
        raise FieldError(f"{field}.restart", f"{spec.restart!r} is not one of {', '.join(RESTART_POLICIES)}")
    _count(f"{field}.hosts", spec.hosts, MAX_HOSTS)
    for name, address in spec.hosts.items():
        hostname(f"{field}.hosts", name)
        ip_address(f"{field}.hosts.{name}", address)
    check_probe(spec.health, f"{field}.health")
    _seconds(f"{field}.stop_grace_seconds", spec.stop_grace_seconds, 3600)
    _count(f"{field}.networks", spec.networks, limits.NETWORKS_PER_REPLICA)
    names = set()
    for index, attachment in enumerate(spec.networks):
        where = f"{field}.networks[{index}]"
        network_name(f"{where}.name", attachment.name)
        if attachment.name in names:
            raise FieldError(f"{where}.name", f"{attachment.name!r} appears twice")
        names.add(attachment.name)
        _count(f"{where}.aliases", attachment.aliases, limits.NETWORK_ALIASES)
        for number, alias in enumerate(attachment.aliases):
            hostname(f"{where}.aliases[{number}]", alias)


def network_name(field: str, value: str) -> str:
    """A Docker network name as picoord makes them ("<stack>_<network>"): it reaches the
    Engine API as data, but is still held to Docker's own spelling and a length."""
    if not isinstance(value, str) or len(value) > limits.NETWORK_NAME or not _NETWORK_NAME.fullmatch(value):
        raise FieldError(
            field,
            f"{value!r} is not a network name (letters, digits, '_', '.', '-'; "
            f"at most {limits.NETWORK_NAME} characters)",
        )
    return value


def _network_names(field: str, names: Sequence[str]) -> None:
    _count(field, names, limits.OVERLAY_NETWORKS)
    for index, name in enumerate(names):
        network_name(f"{field}[{index}]", name)


def check_probe(probe: workloads_pb2.HealthProbe, field: str) -> None:
    if probe.kind not in PROBE_KINDS:
        raise FieldError(f"{field}.kind", f"{probe.kind!r} is not http, tcp, exec or none")
    if probe.kind in ("http", "tcp"):
        port(f"{field}.port", probe.port)
    if probe.kind == "http" and (not probe.path.startswith("/") or len(probe.path) > 1024):
        raise FieldError(f"{field}.path", f"{probe.path!r} is not an absolute URL path")
    if probe.kind == "exec" and not probe.argv:
        raise FieldError(f"{field}.argv", "an exec check needs a command")
    _count(f"{field}.argv", probe.argv, MAX_ARGV)
    for name in ("interval_seconds", "timeout_seconds", "start_period_seconds"):
        _seconds(f"{field}.{name}", getattr(probe, name), 3600)
    if probe.retries > 100:
        raise FieldError(f"{field}.retries", "at most 100")


@dataclass(frozen=True)
class NodeMounts:
    """What a node's own config says about paths (agent.toml's allow_mount_paths), and the
    agent's own trees that no container may bind."""

    allowed: tuple[str, ...] = ()
    extra_trees: tuple[str, ...] = ()


def check_assignment(assignment: workloads_pb2.NodeAssignment, node: NodeMounts | None = None) -> None:
    """The agent's check of a whole assignment: every replica, and no replica twice."""
    _count("assignment.replicas", assignment.replicas, MAX_REPLICAS_PER_NODE)
    seen: set[str] = set()
    for index, spec in enumerate(assignment.replicas):
        check_replica_spec(spec, f"assignment.replicas[{index}]", node)
        if spec.replica in seen:
            raise FieldError(f"assignment.replicas[{index}].replica", f"{spec.replica!r} appears twice")
        seen.add(spec.replica)
    _volume_names("assignment.remove_volumes", assignment.remove_volumes)
    _network_names("assignment.networks", [network.name for network in assignment.networks])
    if len({network.name for network in assignment.networks}) != len(assignment.networks):
        raise FieldError("assignment.networks", "names a network twice")
    _count("assignment.virtual_addresses", assignment.virtual_addresses, limits.VIRTUAL_ADDRESSES)
    router_ids: set[int] = set()
    for index, item in enumerate(assignment.virtual_addresses):
        check_virtual_address(item, f"assignment.virtual_addresses[{index}]")
        if item.router_id in router_ids:
            raise FieldError(
                f"assignment.virtual_addresses[{index}].router_id", f"{item.router_id} appears twice"
            )
        router_ids.add(item.router_id)

    if assignment.HasField("service_ports"):
        check_service_ports(assignment.service_ports)


def check_virtual_address(item: workloads_pb2.VirtualAddress, field: str) -> None:
    """One VRRP instance as keepalived.conf will hold it: every value a plain IPv4 address
    or a number in VRRP's range, so nothing else reaches the file."""
    _ipv4(f"{field}.address", item.address)
    _ipv4(f"{field}.source", item.source)
    if not 1 <= item.prefix_length <= 32:
        raise FieldError(f"{field}.prefix_length", f"{item.prefix_length} is not 1-32")
    if not 1 <= item.router_id <= 255:
        raise FieldError(f"{field}.router_id", f"{item.router_id} is not a VRRP router id (1-255)")
    if not 1 <= item.priority <= 254:
        raise FieldError(f"{field}.priority", f"{item.priority} is not a VRRP priority (1-254)")
    _count(f"{field}.peers", item.peers, limits.VIRTUAL_ADDRESS_PEERS)
    for index, peer in enumerate(item.peers):
        _ipv4(f"{field}.peers[{index}]", peer)
    _count(f"{field}.services", item.services, limits.VIRTUAL_ADDRESS_SERVICES)
    for index, service in enumerate(item.services):
        _name(f"{field}.services[{index}]", service)


def _ipv4(field: str, value: str) -> None:
    if len(value) > 15 or ip_address(field, value) != value or ":" in value:
        raise FieldError(field, f"{value!r} is not an IPv4 address in dotted form")


def endpoint_port(field: str, value: int) -> int:
    port(field, value)
    if not limits.ENDPOINT_PORT_FIRST <= value <= limits.ENDPOINT_PORT_LAST:
        raise FieldError(
            field,
            f"{value} is outside the endpoint ports {limits.ENDPOINT_PORT_FIRST}-{limits.ENDPOINT_PORT_LAST}",
        )
    return value


def check_service_ports(ports: workloads_pb2.ServicePorts, field: str = "assignment.service_ports") -> None:
    """The agent's check of the published ports it is to answer: every value reaches an nft
    ruleset, so each is a number, an address or a name of the safe alphabet."""
    if ports.node_address:
        ip_address(f"{field}.node_address", ports.node_address)
    _count(f"{field}.nodes", ports.nodes, limits.CLUSTER_NODES)
    for index, address in enumerate(ports.nodes):
        ip_address(f"{field}.nodes[{index}]", address)
    _count(f"{field}.ports", ports.ports, limits.PUBLISHED_PORTS)
    seen: set[tuple[str, int]] = set()
    for index, published in enumerate(ports.ports):
        where = f"{field}.ports[{index}]"
        _name(f"{where}.service", published.service)
        port(f"{where}.port", published.port)
        if published.protocol not in PROTOCOLS:
            raise FieldError(f"{where}.protocol", f"{published.protocol!r} is not tcp or udp")
        if (published.protocol, published.port) in seen:
            raise FieldError(f"{where}.port", f"{published.port}/{published.protocol} appears twice")
        seen.add((published.protocol, published.port))
        _count(f"{where}.endpoints", published.endpoints, limits.PORT_ENDPOINTS)
        for number, endpoint in enumerate(published.endpoints):
            at = f"{where}.endpoints[{number}]"
            _name(f"{at}.replica", endpoint.replica)
            ip_address(f"{at}.address", endpoint.address)
            endpoint_port(f"{at}.port", endpoint.port)
            port(f"{at}.target", endpoint.target)


def check_reports(reports: workloads_pb2.ReplicaReports) -> None:
    """The coordinator's check of what an agent says it runs: bounded and well-formed."""
    _count("replicas", reports.replicas, MAX_REPLICAS_PER_NODE)
    for index, report in enumerate(reports.replicas):
        where = f"replicas[{index}]"
        _name(f"{where}.service", report.service)
        _name(f"{where}.replica", report.replica)
        for name in ("container_id", "address", "state_word"):  # state and health are enums: any number reads
            if len(getattr(report, name)) > 128:
                raise FieldError(f"{where}.{name}", "is longer than 128 characters")
        if len(report.message) > MAX_REPORT_TEXT:
            raise FieldError(f"{where}.message", f"is longer than {MAX_REPORT_TEXT} characters")
    _volume_names("volumes_removed", reports.volumes_removed)
    _network_names("networks_present", reports.networks_present)
    _count("virtual_addresses_held", reports.virtual_addresses_held, limits.VIRTUAL_ADDRESSES)
    for index, address in enumerate(reports.virtual_addresses_held):
        _ipv4(f"virtual_addresses_held[{index}]", address)


def _volume_names(field: str, names: Sequence[str]) -> None:
    _count(field, names, MAX_VOLUME_REMOVALS)
    for index, name in enumerate(names):
        volume_name(f"{field}[{index}]", name)


def read_older_agents_states(reports: workloads_pb2.ReplicaReports) -> None:
    """Give a report from an agent older than the ReplicaState enum (it sends only the word,
    field 5) its state number, so a coordinator upgraded before its Pis does not read every
    replica as failed and roll services back. Call after check_reports."""
    for report in reports.replicas:
        if report.state == workloads_pb2.REPLICA_STATE_UNSPECIFIED and report.state_word:
            report.state = ReplicaState.from_word(report.state_word).wire

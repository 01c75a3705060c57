"""What each node must run, built from the coordinator's replica records: pure functions
from (revision specs, records, secrets, addresses) to one NodeAssignment per node.

A stack's services (overlay mode, workloads/networks.py) join their Swarm overlay networks
with their names as aliases: Docker's embedded DNS does discovery, nothing is published for
it, and a replica waits (is left out of its node's assignment) until the Swarm manager
reports its networks present.

In published-ports mode (chosen explicitly, or a service without a stack), discovery works
without an overlay network: a replica reaches another service of
its file by name through an /etc/hosts entry (Docker's extra_hosts) naming the node that
runs a replica of that service, healthy ones first, and a service that others name has
its container ports published on its node at the same numbers (so `postgres:5432` in the
seed's DATABASE_URL reaches postgres on whichever Pi runs it). Limits, documented in
docs/workloads.md: one address per name (no load balancing), an entry is fixed when the
container starts (a dependent picks up a moved service when it is next restarted or
updated), and a named service can run one replica per node (its ports are taken).
"""

from __future__ import annotations

from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass

from picoord.common import limits
from picoord.coordinator.networking.endpoints import endpoint_ports
from picoord.coordinator.workloads import networks
from picoord.coordinator.workloads.spec import EXEC, HTTP, TCP, TMPFS, ServiceSpec
from picoord.v1 import workloads_pb2

RESTARTS = {"none": "no", "on-failure": "on-failure", "always": "always"}


@dataclass(frozen=True)
class Assigned:
    """One replica record the node must run (not being stopped)."""

    replica: str
    service: str
    revision: int
    node: str


class MissingSecret(LookupError):
    """A revision names a secret key the store does not hold."""


def replica_spec(
    spec: ServiceSpec,
    placed: Assigned,
    secrets: Mapping[tuple[str, str], str],
    hosts: Mapping[str, str],
    publish_targets: bool,
    node_address: str = "",
) -> workloads_pb2.ReplicaSpec:
    """The wire form of one replica; secrets resolved into env (they travel only inside the
    node's mutual-TLS session). A published port is bound at the replica's endpoint port on
    its node's cluster address only (`node_address`); every node answers the published port
    itself (networking/endpoints.py)."""
    env = {variable.name: variable.value for variable in spec.env}
    for secret in spec.secrets:
        value = secrets.get((secret.secret, secret.key))
        if value is None:
            what = f"secret {secret.secret}/{secret.key} (for {spec.name}'s {secret.env})"
            raise MissingSecret(f"{what} is missing: coordctl secret create {secret.secret} {secret.key} ...")
        env[secret.env] = value
    message = workloads_pb2.ReplicaSpec(
        service=spec.name,
        revision=placed.revision,
        replica=placed.replica,
        image=spec.image,
        image_digest=spec.image_digest,
        command=list(spec.command or ()),
        args=list(spec.args or ()),
        env=env,
        memory_limit_bytes=spec.resources.memory_limit,
        memory_reservation_bytes=spec.resources.memory_request,
        cpu_limit_millis=spec.resources.cpu_limit,
        gpus=spec.resources.gpu_count,
        restart=RESTARTS.get(spec.restart.condition, "on-failure"),
        restart_max_attempts=spec.restart.max_attempts,
        hosts=dict(hosts),
        stop_grace_seconds=spec.stop_grace_period,
    )
    for attach in networks.attachments(spec):
        message.networks.add(name=attach.network, aliases=list(attach.aliases))
    endpoints = endpoint_ports(spec, placed.replica) if node_address else {}
    for port in spec.ports:
        published = port.published or (port.target if publish_targets else 0)
        binding = message.ports.add(target=port.target, published=published, protocol=port.protocol)
        endpoint = endpoints.get((port.target, port.protocol)) if port.published else None
        if endpoint is not None:
            binding.endpoint, binding.bind_address = endpoint, node_address
    for volume in spec.volumes:
        tmpfs = volume.type == TMPFS
        message.volumes.add(
            source="" if tmpfs else volume.source,
            target=volume.target,
            read_only=volume.read_only,
            tmpfs=tmpfs,
        )
    check = spec.health
    if check is not None:
        kind = {HTTP: "http", TCP: "tcp", EXEC: "exec"}[check.kind]
        message.health.CopyFrom(
            workloads_pb2.HealthProbe(
                kind=kind,
                port=check.port,
                path=check.path if check.kind == HTTP else "",
                argv=list(check.command),
                interval_seconds=check.interval,
                timeout_seconds=check.timeout,
                retries=check.retries,
                start_period_seconds=check.start_period,
            )
        )
    return message


def discovery_hosts(
    spec: ServiceSpec,
    replicas: Sequence[tuple[Assigned, bool]],
    addresses: Mapping[str, str],
    specs: Mapping[str, ServiceSpec],
) -> dict[str, str]:
    """name -> node address for every service `spec` references (and their aliases).

    `replicas` are (placed, healthy) pairs of every service; a healthy replica's node wins,
    then any placed one, by replica id so the choice is stable."""
    hosts: dict[str, str] = {}
    for name in spec.references:
        candidates = sorted(
            (
                (not healthy, placed.replica, placed.node)
                for placed, healthy in replicas
                if placed.service == name
            ),
        )
        for _, _, node in candidates:
            address = addresses.get(node)
            if address:
                hosts[name] = address
                other = specs.get(name)
                for alias in other.aliases if other else ():
                    hosts.setdefault(alias, address)
                break
    return hosts


def node_assignments(
    placed: Sequence[Assigned],
    specs: Mapping[tuple[str, int], ServiceSpec],
    current: Mapping[str, ServiceSpec],
    health: Mapping[str, bool],
    secrets: Mapping[tuple[str, str], str],
    addresses: Mapping[str, str],
    networks_present: Collection[str] = (),
) -> tuple[dict[str, list[workloads_pb2.ReplicaSpec]], list[str]]:
    """Every node's replicas, and a line per replica that cannot be built (a missing
    secret) or waits (a network the Swarm manager has not reported present): that replica
    is left out, the others go ahead."""
    referenced = {name for spec in current.values() if not spec.networks for name in spec.references}
    pairs = [(entry, health.get(entry.replica, False)) for entry in placed]
    by_node: dict[str, list[workloads_pb2.ReplicaSpec]] = {}
    problems: list[str] = []
    for entry in sorted(placed, key=lambda item: item.replica):
        spec = specs.get((entry.service, entry.revision))
        if spec is None:
            problems.append(f"{entry.replica}: revision {entry.revision} of {entry.service} is not stored")
            continue
        missing = networks.missing_networks(spec, networks_present)
        if missing:
            problems.append(
                f"{entry.replica}: waits for network {', '.join(missing)} (the Swarm manager creates it)"
            )
            continue
        overlay = bool(spec.networks)
        hosts = {} if overlay else discovery_hosts(spec, pairs, addresses, current)
        try:
            message = replica_spec(
                spec,
                entry,
                secrets,
                hosts,
                not overlay and entry.service in referenced,
                addresses.get(entry.node, ""),
            )
        except MissingSecret as error:
            problems.append(f"{entry.replica}: {error}")
            continue
        by_node.setdefault(entry.node, []).append(message)
    return by_node, problems


def volume_requests(
    pending: Sequence[str], assigned: Sequence[workloads_pb2.ReplicaSpec], reported_gone: Sequence[str]
) -> tuple[list[str], list[str]]:
    """Of the named volumes a node is to remove (coordctl rm --volumes): those to ask it for,
    and those it reported gone (done: forget them). A volume a replica assigned to the node
    mounts is not asked for: the service came back, or another one shares it. At most
    limits.VOLUME_REMOVALS at once (the agent's bound); the rest once those are done."""
    mounted = {volume.source for spec in assigned for volume in spec.volumes if volume.source}
    done = sorted(set(pending) & set(reported_gone))
    ask = sorted(set(pending) - set(done) - mounted)
    return ask[: limits.VOLUME_REMOVALS], done

"""A stack's networks: Swarm attachable overlay networks, decided here as pure functions.

A stack's services talk over the networks of their file (Compose `networks:`, one
`default` network when a service names none; a Kubernetes namespace is one `default`
network), created by a Swarm manager as attachable overlay networks named as `docker stack
deploy` names them (`<stack>_<network>`). Every replica joins its service's networks with
the service's names as aliases, so Docker's embedded DNS resolves them on every node, to
every replica, and follows a replica that moves. Nothing internal is published on a node.

That needs the stack's nodes in one Swarm: `overlay_refusal` says what to apply when they
are not. The other mode, `published-ports` (today's: /etc/hosts entries naming the node
and the referenced service's ports published there) is used only when the user chooses it
(`x-picoord: {network_mode: published-ports}`), or for services applied without a stack.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, replace

from picoord.coordinator.placement.constraints import NodeFacts, matches
from picoord.coordinator.workloads.spec import NetworkAttachment, ServiceSpec

OVERLAY = "overlay"
PUBLISHED_PORTS = "published-ports"
NETWORK_MODES = (OVERLAY, PUBLISHED_PORTS)
DEFAULT_NETWORK = "default"
# Labels on the networks picoord creates: how a manager tells its own from the others.
LABEL_MANAGED = "org.picoord.managed"
LABEL_STACK = "org.picoord.stack"


def network_name(stack: str, network: str) -> str:
    """Swarm's name for a stack's network (`docker stack deploy` spells it so)."""
    return f"{stack}_{network}"


def stack_networks(specs: Sequence[ServiceSpec], stack: str, mode: str) -> list[ServiceSpec]:
    """The specs as a stack records them: in overlay mode every service joins its networks
    by their Swarm names (the `default` network when it names none); in published-ports
    mode, or without a stack, none (no network: today's discovery)."""
    if not stack or mode == PUBLISHED_PORTS:
        return [replace(spec, networks=()) for spec in specs]
    named = []
    for spec in specs:
        attachments = spec.networks or (NetworkAttachment(DEFAULT_NETWORK),)
        named.append(
            replace(
                spec,
                networks=tuple(
                    replace(item, network=network_name(stack, item.network)) for item in attachments
                ),
            )
        )
    return named


@dataclass(frozen=True)
class Attach:
    """One network a replica joins, and the names it answers to there."""

    network: str
    aliases: tuple[str, ...]


def attachments(spec: ServiceSpec) -> list[Attach]:
    """The replica's networks, each with its service name, its Kubernetes names and the
    file's per-network aliases (each once, in that order)."""
    return [
        Attach(item.network, tuple(dict.fromkeys((spec.name, *spec.aliases, *item.aliases))))
        for item in spec.networks
    ]


def wanted_networks(specs: Iterable[ServiceSpec]) -> dict[str, bool]:
    """network -> encrypted, for every network a recorded service joins: what the Swarm
    manager is told to keep. Encrypted if any service's file said so."""
    wanted: dict[str, bool] = {}
    for spec in specs:
        for item in spec.networks:
            wanted[item.network] = wanted.get(item.network, False) or item.encrypted
    return dict(sorted(wanted.items()))


def missing_networks(spec: ServiceSpec, present: Iterable[str]) -> list[str]:
    """The networks of `spec` the manager has not reported present: its replicas wait for
    them (they would fail to start on a network that does not exist yet)."""
    have = set(present)
    return [item.network for item in spec.networks if item.network not in have]


def swarm_manager(swarm: Mapping[str, str]) -> str:
    """The manager that keeps the networks: the first by name ("" without a Swarm)."""
    return min((node for node, role in swarm.items() if role == "manager"), default="")


def candidate_nodes(spec: ServiceSpec, nodes: Iterable[NodeFacts]) -> list[str]:
    """Every node the spec's constraints allow, whatever its load (where it could run)."""
    return sorted(node.name for node in nodes if all(matches(c, node) for c in spec.placement.constraints))


def overlay_refusal(
    specs: Sequence[ServiceSpec], stack: str, nodes: Sequence[NodeFacts], swarm: Mapping[str, str]
) -> str:
    """Why an overlay stack cannot be applied ("" when it can): a node its services could be
    placed on (by their constraints) is not in the Swarm. The message gives the fix, a
    ClusterMembership document naming the nodes, and the other mode."""
    overlay = [spec for spec in specs if spec.networks]
    if not overlay:
        return ""
    outside: dict[str, list[str]] = {}
    for spec in overlay:
        for node in candidate_nodes(spec, nodes):
            if node not in swarm:
                outside.setdefault(node, []).append(spec.name)
    if not outside:
        return ""  # every node it could use is in the Swarm (or no node could take it yet)
    manager = swarm_manager(swarm)
    everyone = sorted({node.name for node in nodes})
    if not manager:
        manager = everyone[0] if everyone else "NODE"
    workers = [node for node in everyone if node != manager]
    lines = [f"{node} (for {', '.join(sorted(set(names)))})" for node, names in sorted(outside.items())]
    swarm_word = "the Swarm" if swarm else "a Swarm"
    why = f"its services can be placed on nodes that are not in {swarm_word}: {'; '.join(lines)}"
    document = "\n".join(
        [
            "kind: ClusterMembership",
            "name: swarm",
            "engine: swarm",
            f"manager: {manager}",
            f"workers: [{', '.join(workers)}]" if workers else "workers: []",
        ]
    )
    return (
        f"stack {stack!r} uses Swarm overlay networks, but {why}. Put the nodes in one Swarm "
        f"(coordctl apply -f this document), then deploy again:\n\n{document}\n\n"
        "or choose today's mode explicitly: `x-picoord: {network_mode: published-ports}` in the file "
        "(each service reached through its node's address; nothing is then kept internal)"
    )

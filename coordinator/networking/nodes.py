"""The cluster's nodes as virtual addresses see them (the shell's side: read from the
Cluster's sessions and hardware reports, handed to the pure virtual_ips functions)."""

from __future__ import annotations

from picoord.coordinator.cluster import Cluster
from picoord.coordinator.networking.virtual_ips import NodeNetwork, node_interface
from picoord.coordinator.status import Status


def node_networks(cluster: Cluster) -> list[NodeNetwork]:
    """Every node: Ready or not, and its cluster address (where its session comes from) with
    the prefix of the interface its hardware report shows holding it."""
    found = []
    for record in cluster.nodes():
        session = cluster.sessions.get(record.name)
        address = session.address if session else ""
        interfaces = [(item.name, list(item.addresses)) for item in cluster.hardware(record).interfaces]
        ready = cluster.status(record.name) is Status.READY
        found.append(NodeNetwork(record.name, ready, node_interface(address, interfaces)))
    return found

"""LoadBalancer virtual addresses (VIPs): which nodes announce each one, as MetalLB's layer 2
mode does, with keepalived's VRRP on the nodes. Pure functions over plain data.

A VIP leads to one or more services (a Kubernetes `type: LoadBalancer` Service, or the
services of a stack deployed with `--address`). Only nodes that are Ready, sit in the VIP's
subnet and run a healthy replica of one of its services take part: each runs one VRRP
instance for it, and VRRP elects one holder among them. Adverts go by unicast to every
other node of the subnet (those without an instance ignore them). A node whose replicas all turn
unhealthy, or that is lost, drops out (its instance goes, or its adverts stop) and another
takes the address within about three advert intervals.

The holder a node reports is given the highest priority, so a new assignment never moves
the address away from a node that still serves (no flapping); the others are ranked by how
many healthy replicas they run, then by name. Every instance is `nopreempt`: a node that
joins with a higher priority does not take the address from a working holder.

virtual_router_id: VRRP tells instances on one LAN apart by it (1-255). Each VIP takes its
address modulo 255, plus 1, which is distinct for any 255 consecutive addresses (a /24 never
collides); a collision goes to the next free id, in address order.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass, replace

from picoord.common.addresses import interface_holding
from picoord.common.validation import FieldError
from picoord.coordinator.workloads.spec import ServiceSpec, publishes
from picoord.coordinator.workloads.stacks import Applied

# High priorities: a backup takes over a priority-0 advert after its skew time,
# (256 - priority) / 256 s, so 253 answers in about 12 ms where 100 waited 0.6 s (clients
# unanswered in between, measured in a rollout here); master-down after a lost holder is
# 3 adverts + that skew too.
HOLDER_PRIORITY = 254  # the node that holds the address now (255 is VRRP's address owner)
FIRST_PRIORITY = 253  # the best-ranked of the others; each next one a step lower
WARMING_PRIORITY = 120  # the best-ranked node whose replicas have no health result yet
LOWEST_PRIORITY = 1
ROUTER_IDS = 255


@dataclass(frozen=True)
class NodeNetwork:
    """A node as VIPs see it: Ready or not, and its cluster address with the prefix of the
    interface that holds it ("10.213.0.3/24"; '' when the node did not report it)."""

    name: str
    ready: bool
    interface: str  # the cluster address with its prefix, e.g. "10.213.0.3/24"; '' unknown

    @property
    def address(self) -> str:
        return self.interface.split("/")[0] if self.interface else ""

    def network(self) -> ipaddress.IPv4Network | None:
        if not self.interface:
            return None
        try:
            found = ipaddress.ip_interface(self.interface)
        except ValueError:
            return None
        return found.network if isinstance(found.network, ipaddress.IPv4Network) else None


@dataclass(frozen=True)
class Announcement:
    """One node's VRRP instance for one VIP (the wire's VirtualAddress)."""

    address: str
    prefix_length: int
    router_id: int
    priority: int
    source: str  # the node's own cluster address
    peers: tuple[str, ...]  # the other taking-part nodes' cluster addresses
    services: tuple[str, ...]


def node_interface(address: str, interfaces: Iterable[tuple[str, Iterable[str]]]) -> str:
    """The cluster address with the prefix of the interface holding it, from a hardware
    report's (interface name, ["10.0.0.5/24", ...]) pairs; '' when no interface holds it."""
    found = interface_holding(address, interfaces)
    return f"{address}/{found[1]}" if found else ""


def router_ids(addresses: Iterable[str]) -> dict[str, int]:
    """address -> virtual_router_id: int(address) % 255 + 1, or the next free id on a
    collision (addresses taken in order). More than 255 VIPs cannot all get one: the rest
    are left out (check_virtual_address refuses the 256th)."""
    ids: dict[str, int] = {}
    used: set[int] = set()
    for address in sorted(set(addresses), key=lambda text: int(ipaddress.IPv4Address(text))):
        wanted = int(ipaddress.IPv4Address(address)) % ROUTER_IDS
        for step in range(ROUTER_IDS):
            candidate = (wanted + step) % ROUTER_IDS + 1
            if candidate not in used:
                used.add(candidate)
                ids[address] = candidate
                break
    return ids


def plan_announcements(
    vips: Mapping[str, Sequence[str]],
    nodes: Sequence[NodeNetwork],
    healthy: Iterable[tuple[str, str]],
    held: Mapping[str, Collection[str]],
    warming: Iterable[tuple[str, str]] = (),
) -> dict[str, list[Announcement]]:
    """node -> its VRRP instances. `vips`: address -> the services it leads to; `healthy`:
    (service, node) for each healthy replica; `held`: node -> the VIPs it reports holding;
    `warming`: (service, node) for each replica that runs and has no health result yet.

    A node with only warming replicas takes part below every healthy one (WARMING_PRIORITY
    and down): its keepalived is then already listening when a holder hands the address
    over (a keepalived started at that moment misses the priority-0 advert and waits its
    full master-down interval, about 3.6 s, measured in a rollout here)."""
    count = _counts(healthy)
    warm = _counts(warming)
    ids = router_ids(vips)
    plan: dict[str, list[Announcement]] = {}
    for address in sorted(vips, key=lambda text: int(ipaddress.IPv4Address(text))):
        services = tuple(sorted(set(vips[address])))
        ip = ipaddress.IPv4Address(address)
        taking_part = []  # (node, healthy replicas, warming replicas)
        for node in nodes:
            network = node.network()
            replicas = sum(count.get((service, node.name), 0) for service in services)
            starting = sum(warm.get((service, node.name), 0) for service in services)
            if not (node.ready and network is not None and ip in network and node.address != address):
                continue
            if replicas or starting:
                taking_part.append((node, replicas, starting))
        holders = sorted(
            node.name for node, ready, _ in taking_part if ready and address in held.get(node.name, ())
        )
        holder = holders[0] if holders else ""
        ranked = sorted(
            taking_part, key=lambda item: (item[0].name != holder, -item[1], -item[2], item[0].name)
        )
        serving = [item for item in ranked if item[1]]
        for node, replicas, _ in ranked:
            if node.name == holder:
                priority = HOLDER_PRIORITY
            elif replicas:
                rank = serving.index(next(item for item in serving if item[0] is node)) - (1 if holder else 0)
                priority = max(WARMING_PRIORITY + 1, FIRST_PRIORITY - rank)
            else:
                rank = [item[0] for item in ranked if not item[1]].index(node)
                priority = max(LOWEST_PRIORITY, WARMING_PRIORITY - rank)
            network = node.network()
            assert network is not None
            plan.setdefault(node.name, []).append(
                Announcement(
                    address=address,
                    prefix_length=network.prefixlen,
                    router_id=ids[address],
                    priority=priority,
                    source=node.address,
                    peers=_peers(node, ip, nodes),
                    services=services,
                )
            )
    return plan


def _counts(pairs: Iterable[tuple[str, str]]) -> dict[tuple[str, str], int]:
    count: dict[tuple[str, str], int] = {}
    for pair in pairs:
        count[pair] = count.get(pair, 0) + 1
    return count


def _peers(node: NodeNetwork, ip: ipaddress.IPv4Address, nodes: Sequence[NodeNetwork]) -> tuple[str, ...]:
    """Every other node in the VIP's subnet, taking part or not: adverts go to them all, so
    the list (and keepalived's unicast mode) stays put while nodes join and leave the
    election. keepalived re-initialises an instance that switches between unicast and
    multicast (an empty list), dropping the address for about 3 s: measured here."""
    return tuple(
        other.address
        for other in sorted(nodes, key=lambda item: item.name)
        if other.name != node.name and other.address and (net := other.network()) is not None and ip in net
    )


def vrrp_nodes(vips: Iterable[str], nodes: Sequence[NodeNetwork]) -> set[str]:
    """The nodes VRRP passes between: every node in a VIP's subnet, since adverts go to them
    all (_peers), whichever holds it. A default-deny firewall there must let VRRP in
    (coordinator/apply/cluster_ports.py)."""
    found: set[str] = set()
    for vip in vips:
        ip = ipaddress.ip_address(vip)
        found |= {node.name for node in nodes if (net := node.network()) is not None and ip in net}
    return found


def holders(vips: Iterable[str], held: Mapping[str, Collection[str]]) -> dict[str, list[str]]:
    """address -> the nodes that report holding it (one, unless VRRP is still settling)."""
    return {address: sorted(node for node, items in held.items() if address in items) for address in vips}


def check_virtual_address(
    field: str,
    address: str,
    owner: str,
    nodes: Sequence[NodeNetwork],
    taken: Mapping[str, str],
) -> str:
    """The VIP `owner` (a stack or service, as "stack mcp") asks for, or FieldError naming
    `field`: an IPv4 address inside a node's subnet, not a node's own address, and not the
    VIP of another owner (`taken`: address -> owner). With no node's subnet known yet
    (no node reported), only the form is checked."""
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        raise FieldError(field, f"{address!r} is not an IP address") from None
    if not isinstance(ip, ipaddress.IPv4Address):
        raise FieldError(field, f"{address}: virtual addresses are IPv4 (VRRP version 2)")
    if ip.is_loopback or ip.is_multicast or ip.is_unspecified or ip.is_link_local:
        raise FieldError(field, f"{address} is not an address a LAN can route to a node")
    for node in nodes:
        if node.address == str(ip):
            raise FieldError(field, f"{address} is node {node.name}'s own address; pick an unused one")
    networks = {str(node.network()): node.network() for node in nodes if node.network() is not None}
    if networks:
        inside = [network for network in networks.values() if network is not None and ip in network]
        if not inside:
            listed = ", ".join(sorted(networks))
            raise FieldError(
                field, f"{address} is outside the nodes' subnets ({listed}): no node could announce it"
            )
        for network in inside:
            assert network is not None
            if ip in (network.network_address, network.broadcast_address):
                raise FieldError(field, f"{address} is the network or broadcast address of {network}")
    other = taken.get(str(ip))
    if other and other != owner:
        raise FieldError(field, f"{address} is already the virtual address of {other}")
    if len(set(taken) | {str(ip)}) > ROUTER_IDS:
        raise FieldError(field, f"at most {ROUTER_IDS} virtual addresses (VRRP router ids) in one cluster")
    return str(ip)


def stack_addresses(
    specs: Sequence[ServiceSpec],
    existing: Mapping[str, Applied],
    stack: str,
    keeps_address: bool,
    nodes: Sequence[NodeNetwork],
) -> list[ServiceSpec]:
    """The file's specs with their virtual addresses settled and checked (FieldError naming
    where the file gave the address): a stack re-deployed without an address keeps the one
    its services have; every address must pass check_virtual_address against the addresses
    of services outside this apply."""
    if keeps_address and stack:
        kept = sorted(
            {held.spec.address for held in existing.values() if held.stack == stack and held.spec.address}
        )
        if len(kept) == 1:
            specs = [
                replace(spec, address=kept[0], address_field="the stack's address (kept)")
                if publishes(spec) and not spec.address
                else spec
                for spec in specs
            ]
    named = {spec.name for spec in specs}
    taken = {
        held.spec.address: _owner(name, held.stack)
        for name, held in sorted(existing.items())
        if held.spec.address and name not in named
    }
    checked = []
    for spec in specs:
        if spec.address:
            owner = _owner(spec.name, stack)
            field = spec.address_field or f"{spec.origin}.address"
            address = check_virtual_address(field, spec.address, owner, nodes, taken)
            taken.setdefault(address, owner)
        checked.append(spec)
    return checked


def _owner(service: str, stack: str) -> str:
    return f"stack {stack}" if stack else f"service {service}"

"""The ports the cluster itself needs between its nodes, checked against each planned firewall.

A default-deny FirewallPolicy on a Swarm node that forgets Swarm's ports does not fail at
once: the node stays "Ready" for a while, then its overlay traffic, gossip or manager
connection silently stops. So `apply` refuses such a policy before anything runs, naming
each missing rule and the line to add. What is needed, from every other node of the
cluster (by the address the coordinator sees it at, which is what Swarm advertises):

- on a Swarm manager: 2377/tcp (cluster management: workers and other managers dial it);
- on every Swarm node: 7946/tcp and 7946/udp (node gossip), 4789/udp (overlay VXLAN);
- on a node that may announce a virtual address: VRRP (IP protocol 112) from the other
  such nodes (keepalived's adverts, multicast 224.0.0.18 or unicast peers).

"The cluster's nodes" are those in a Swarm after this apply: the coordinator's record of
membership (NodeView.swarm_role) changed by this plan's init, join and leave steps. Each
policy is evaluated the way the backends load it (common/checks/firewall.py
`verdict_for`: first matching rule, else the default), so a rule allowing the whole LAN
counts, and so does a deny placed before the allow.

With `cluster_ports: allow` in the document, the planner adds what is missing instead
(`allow_rules`: one rule per peer address and need, ahead of the document's rules), from
the addresses the nodes have at this apply; a node whose address changes needs the file
applied again.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from picoord.common.checks.firewall import policy_spec, verdict_for
from picoord.v1 import actions_pb2

MANAGER, WORKER = "manager", "worker"
ADDED_COMMENT = "picoord cluster ports"
_PROTOCOLS = {
    "tcp": actions_pb2.PROTOCOL_TCP,
    "udp": actions_pb2.PROTOCOL_UDP,
    "vrrp": actions_pb2.PROTOCOL_VRRP,
}


@dataclass(frozen=True)
class Need:
    port: int  # 0: a portless protocol
    protocol: str  # "tcp" | "udp" | "vrrp"
    what: str
    managers_only: bool = False

    def __str__(self) -> str:
        return self.protocol.upper() if not self.port else f"{self.port}/{self.protocol}"


SWARM_NEEDS = (
    Need(2377, "tcp", "Swarm cluster management", managers_only=True),
    Need(7946, "tcp", "Swarm node gossip"),
    Need(7946, "udp", "Swarm node gossip"),
    Need(4789, "udp", "Swarm overlay network traffic (VXLAN)"),
)
VRRP_NEED = Need(0, "vrrp", "virtual addresses (VRRP, IP protocol 112)")


@dataclass(frozen=True)
class Member:
    """A node as this check sees it: its Swarm role after the apply ("" when in none),
    whether it may announce a virtual address, and its address ("" when unknown)."""

    name: str
    swarm_role: str = ""
    virtual_addresses: bool = False
    address: str = ""


@dataclass(frozen=True)
class PlannedPolicy:
    document: str  # "FirewallPolicy/cluster"
    node: str
    policy: actions_pb2.FirewallPolicy


@dataclass(frozen=True)
class Missing:
    document: str
    node: str
    role: str  # the node's role, for the message ("manager", "worker", "")
    peer: str
    address: str
    need: Need
    denied_by: int | None  # the index of the rule that denies it; None: the default

    def suggestion(self) -> str:
        """The rule to add to the document, as a YAML flow mapping."""
        source = ipaddress.ip_address(self.address).compressed
        port = f", port: {self.need.port}" if self.need.port else ""
        protocol = self.need.protocol
        comment = "vrrp" if protocol == "vrrp" else "swarm"
        return f"- {{action: allow, from: {source}{port}, protocol: {protocol}, comment: {comment}}}"


def swarm_roles_after(current: Mapping[str, str], kinds: Sequence[tuple[str, str]]) -> dict[str, str]:
    """The Swarm roles once a plan's membership steps ((node, step kind) in order) ran."""
    roles = dict(current)
    for node, kind in kinds:
        if kind == "swarm_init":
            roles[node] = MANAGER
        elif kind == "swarm_join":
            roles[node] = roles.get(node) or WORKER
        elif kind == "swarm_leave":
            roles.pop(node, None)
    return roles


def missing_rules(policies: Sequence[PlannedPolicy], members: Sequence[Member]) -> list[Missing]:
    """Every (policy, node, peer, need) the cluster needs and the policy would drop."""
    by_name = {member.name: member for member in members}
    missing: list[Missing] = []
    for planned in policies:
        me = by_name.get(planned.node, Member(planned.node))
        spec = policy_spec(planned.policy)
        for peer in members:
            if peer.name == me.name or not peer.address:
                continue
            needs: list[Need] = []
            if me.swarm_role and peer.swarm_role:
                needs += [n for n in SWARM_NEEDS if not n.managers_only or me.swarm_role == MANAGER]
            if me.virtual_addresses and peer.virtual_addresses:
                needs.append(VRRP_NEED)
            for need in needs:
                verdict, index = verdict_for(
                    spec.rules, spec.default_incoming, peer.address, need.port, need.protocol
                )
                if verdict != "allow":
                    missing.append(
                        Missing(
                            planned.document, me.name, me.swarm_role, peer.name, peer.address, need, index
                        )
                    )
    return missing


def allow_rules(missing: Sequence[Missing]) -> list[actions_pb2.FirewallRule]:
    """The rules that let in what `missing` lists, each (source, port, protocol) once."""
    wanted = dict.fromkeys((item.address, item.need.port, item.need.protocol) for item in missing)
    return [
        actions_pb2.FirewallRule(
            verdict=actions_pb2.FIREWALL_VERDICT_ALLOW,
            from_cidr=str(ipaddress.ip_network(address)),
            port_from=port,
            protocol=_PROTOCOLS[protocol],
            comment=ADDED_COMMENT,
        )
        for address, port, protocol in wanted
    ]


def refusal(missing: Sequence[Missing]) -> str:
    """The message `apply` refuses with: each missing rule, then the lines to add per document."""
    lines = ["a firewall policy would cut the cluster's own traffic between its nodes; nothing was changed:"]
    for item in missing:
        role = f" (swarm {item.role})" if item.role else ""
        by = f"rules[{item.denied_by}] denies it" if item.denied_by is not None else "the default denies it"
        lines.append(
            f"  {item.document} on {item.node}{role}: {item.need} from {item.peer} ({item.address}), "
            f"{item.need.what}: {by}"
        )
    for document in dict.fromkeys(item.document for item in missing):
        mine = [item for item in missing if item.document == document]
        lines.append(f"add to {document}'s rules (before any rule that denies them):")
        lines += [f"  {text}" for text in dict.fromkeys(item.suggestion() for item in mine)]
    lines.append(
        "or allow the nodes' whole network, e.g. `- {action: allow, from: 192.168.1.0/24}`, "
        "or say `cluster_ports: allow` in the policy to have these rules added from the nodes' addresses"
    )
    return "\n".join(lines)

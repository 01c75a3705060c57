"""The cluster's own ports against each planned firewall: Swarm's (2377/tcp on managers,
7946/tcp+udp and 4789/udp everywhere) and VRRP where virtual addresses are announced,
from every other member; refused by `plan` naming each missing rule and the line to add."""

from __future__ import annotations

import pytest

from picoord.coordinator.apply import cluster_ports
from picoord.coordinator.apply.action_planner import NodeView, PlanError, plan
from picoord.coordinator.apply.cluster_spec import parse_spec
from picoord.coordinator.placement.inputs import swarm_members
from picoord.v1 import actions_pb2 as pb
from picoord.v1 import admin_pb2, agent_pb2

ALLOW, DENY, TCP, UDP, VRRP = (
    pb.FIREWALL_VERDICT_ALLOW,
    pb.FIREWALL_VERDICT_DENY,
    pb.PROTOCOL_TCP,
    pb.PROTOCOL_UDP,
    pb.PROTOCOL_VRRP,
)
M, W = cluster_ports.MANAGER, cluster_ports.WORKER


def rule(
    source: str = "", port: int = 0, protocol: int = pb.PROTOCOL_ANY, verdict: int = ALLOW
) -> pb.FirewallRule:
    return pb.FirewallRule(verdict=verdict, from_cidr=source, port_from=port, protocol=protocol)


def policy(*rules: pb.FirewallRule, default: int = DENY) -> pb.FirewallPolicy:
    return pb.FirewallPolicy(default_incoming=default, rules=list(rules))


SWARM_PORTS = [rule("", 2377, TCP), rule("", 7946, TCP), rule("", 7946, UDP), rule("", 4789, UDP)]
THREE = [
    cluster_ports.Member("pi1", M, address="10.0.0.11"),
    cluster_ports.Member("pi2", W, address="10.0.0.12"),
    cluster_ports.Member("pi3", W, address="10.0.0.13"),
]


def missing_on(node: str, given: pb.FirewallPolicy, members=THREE) -> list[str]:
    planned = [cluster_ports.PlannedPolicy("FirewallPolicy/fw", node, given)]
    return [f"{m.need} from {m.peer}" for m in cluster_ports.missing_rules(planned, members)]


def gossip(*peers: str) -> list[str]:
    return [f"{need} from {peer}" for peer in peers for need in ("7946/tcp", "7946/udp", "4789/udp")]


def member(name: str, role: str = "", vip: bool = False, address: str = "") -> cluster_ports.Member:
    return cluster_ports.Member(name, role, vip, address)


VIPS = [member("pi1", M, True, "10.0.0.11"), member("pi2", W, True, "10.0.0.12")]
LAN = "10.0.0.0/24"
VXLAN = ["4789/udp from pi1", "4789/udp from pi3"]


@pytest.mark.parametrize(
    ("node", "given", "members", "missing"),
    [
        # a worker needs gossip and VXLAN from every other member, not 2377
        ("pi2", policy(), THREE, gossip("pi1", "pi3")),
        # a manager needs 2377/tcp too
        ("pi1", policy(rule("10.0.0.13")), THREE, ["2377/tcp from pi2", *gossip("pi2")]),
        # the nodes' network, the ports from anywhere, or default allow: nothing missing
        ("pi1", policy(rule(LAN)), THREE, []),
        ("pi1", policy(*SWARM_PORTS), THREE, []),
        ("pi2", policy(rule("", 7946), rule("", 4789, UDP)), THREE, []),  # any + port = tcp and udp
        ("pi1", policy(default=ALLOW), THREE, []),
        # first match wins: a deny ahead of the allow cuts; default allow with a deny cuts
        ("pi2", policy(rule("10.0.0.11", verdict=DENY), rule(LAN)), THREE, gossip("pi1")),
        ("pi2", policy(rule("", 4789, UDP, DENY), default=ALLOW), THREE, VXLAN),
        # the wrong protocol is no allow
        ("pi2", policy(rule(LAN, 0, TCP)), THREE, [n for n in gossip("pi1", "pi3") if "udp" in n]),
        # a node in no swarm needs nothing; nor does anyone from a peer in no swarm or offline
        ("pi2", policy(), [member("pi2", "", address="10.0.0.12"), THREE[0], THREE[2]], []),
        ("pi2", policy(rule("10.0.0.13")), [*THREE[:2], member("pi3", address="10.0.0.13")], gossip("pi1")),
        ("pi2", policy(rule("10.0.0.13")), [member("pi1", M), *THREE[1:]], []),
        # VRRP between nodes that announce virtual addresses, and only those
        ("pi2", policy(*SWARM_PORTS), [*VIPS, THREE[2]], ["VRRP from pi1"]),
        ("pi2", policy(*SWARM_PORTS, rule(LAN, 0, VRRP)), VIPS, []),
        ("pi2", policy(*SWARM_PORTS, rule("", 0, VRRP, DENY)), THREE, []),  # nobody announces one
    ],
)  # fmt: skip
def test_missing_rules(node, given, members, missing) -> None:
    assert missing_on(node, given, members) == missing


@pytest.mark.parametrize(
    ("current", "steps", "after"),
    [
        ({}, [("pi1", "swarm_init"), ("pi2", "swarm_join")], {"pi1": M, "pi2": W}),
        ({"pi1": M, "pi2": W}, [("pi2", "swarm_leave")], {"pi1": M}),
        ({"pi1": M}, [("pi1", "swarm_join")], {"pi1": M}),  # a join does not demote a manager
        ({"pi1": M}, [("pi2", "mount"), ("pi3", "kubeadm_join")], {"pi1": M}),
    ],
)
def test_swarm_roles_after_a_plan(current, steps, after) -> None:
    assert cluster_ports.swarm_roles_after(current, steps) == after


def record(node, kind, outcome=agent_pb2.ACTION_OUTCOME_SUCCEEDED, at=1.0, dry_run=False):
    return admin_pb2.ActionRecord(
        node=node, kind=kind, outcome=outcome, started_at=at, finished_at=at + 1, dry_run=dry_run
    )


@pytest.mark.parametrize(
    ("records", "roles"),
    [
        ([record("pi1", "swarm_init"), record("pi2", "swarm_join")], {"pi1": M, "pi2": W}),
        ([record("pi1", "swarm_init", at=1), record("pi1", "swarm_leave", at=5)], {}),  # left: in no Swarm
        ([record("pi1", "swarm_leave", at=5), record("pi1", "swarm_join", at=9)], {"pi1": W}),
        ([record("pi1", "kubeadm_init"), record("pi2", "k3s_agent")], {}),  # not Swarm
        ([record("pi1", "swarm_join", agent_pb2.ACTION_OUTCOME_FAILED)], {}),
        ([record("pi1", "swarm_join", agent_pb2.ACTION_OUTCOME_PLANNED, dry_run=True)], {}),
    ],
)
def test_swarm_members_are_the_swarm_actions_that_took_effect(records, roles) -> None:
    assert swarm_members(records) == roles


# ---------------------------------------------------------------- through plan()

INVENTORY = [
    NodeView("desktop", {}, "x86_64", "10.0.0.5"),
    NodeView("pi1", {}, "aarch64", "10.0.0.11"),
    NodeView("pi2", {}, "aarch64", "10.0.0.12"),
]
SWARM = """
kind: ClusterMembership
name: swarm
engine: swarm
manager: desktop
workers: [pi1, pi2]
"""
POLICY = """
kind: FirewallPolicy
name: pis
nodes: [pi1, pi2]
backend: nftables
rules:
  - {action: allow, port: 22, protocol: tcp}
"""


def refusal(text: str, inventory=INVENTORY) -> str:
    with pytest.raises(PlanError) as caught:
        plan(parse_spec(text), inventory)
    return str(caught.value)


def test_a_policy_on_nodes_joining_in_the_same_apply_is_refused_naming_rules_and_lines() -> None:
    said = refusal(SWARM + "---" + POLICY)
    assert "nothing was changed" in said
    assert (
        "FirewallPolicy/pis on pi1 (swarm worker): 7946/udp from desktop (10.0.0.5), Swarm node gossip: "
        "the default denies it"
    ) in said
    assert "FirewallPolicy/pis on pi2 (swarm worker): 4789/udp from pi1 (10.0.0.11)" in said
    assert "2377/tcp" not in said  # no manager behind this policy
    # the lines to add, each once, and they are valid rules of the document
    lines = [line.strip() for line in said.splitlines() if line.strip().startswith("- {action")]
    assert "- {action: allow, from: 10.0.0.5, port: 4789, protocol: udp, comment: swarm}" in lines
    assert len(lines) == len(set(lines)) == 3 * 3  # (desktop, pi1, pi2) x (7946 tcp, udp, 4789)
    fixed = POLICY.replace("rules:\n", "rules:\n" + "".join(f"  {line}\n" for line in lines))
    assert plan(parse_spec(SWARM + "---" + fixed), INVENTORY)


def test_the_manager_needs_2377_from_its_workers() -> None:
    manager_policy = POLICY.replace("[pi1, pi2]", "[desktop]")
    said = refusal(SWARM + "---" + manager_policy)
    assert "FirewallPolicy/pis on desktop (swarm manager): 2377/tcp from pi1 (10.0.0.11)" in said


def test_members_the_coordinator_already_made_count_without_a_membership_document() -> None:
    members = [NodeView(n.name, {}, n.arch, n.address, swarm_role=W) for n in INVENTORY]
    assert "on pi2 (swarm worker)" in refusal(POLICY, members)
    assert plan(parse_spec(POLICY), INVENTORY)  # in no swarm: nothing needed


def test_the_nodes_network_or_a_leave_in_the_same_apply_passes() -> None:
    lan = POLICY.replace("rules:\n", "rules:\n  - {action: allow, from: 10.0.0.0/24}\n")
    assert plan(parse_spec(SWARM + "---" + lan), INVENTORY)
    members = [NodeView(n.name, {}, n.arch, n.address, swarm_role=W) for n in INVENTORY]
    leave = SWARM + "state: absent\n"  # pi1 and pi2 leave before their firewall goes up
    assert plan(parse_spec(leave + "---" + POLICY), members)


def test_virtual_address_nodes_need_vrrp_between_them() -> None:
    inventory = [NodeView(n.name, {}, n.arch, n.address, virtual_addresses=True) for n in INVENTORY]
    said = refusal(POLICY, inventory)
    assert "VRRP from desktop (10.0.0.5), virtual addresses (VRRP, IP protocol 112)" in said
    assert "- {action: allow, from: 10.0.0.5, protocol: vrrp, comment: vrrp}" in said
    vrrp = POLICY.replace("rules:\n", "rules:\n  - {action: allow, from: 10.0.0.0/24, protocol: vrrp}\n")
    assert plan(parse_spec(vrrp), inventory)


def test_cluster_ports_allow_adds_just_the_missing_rules_ahead_of_the_documents() -> None:
    steps = plan(parse_spec(SWARM + "---" + POLICY + "cluster_ports: allow\n"), INVENTORY)
    policies = {step.node: step.action.firewall for step in steps if step.kind == "firewall"}
    added = [
        (r.from_cidr, r.port_from, r.protocol)
        for r in policies["pi1"].rules
        if r.comment == "picoord cluster ports"
    ]
    assert added == [
        (f"{address}/32", port, protocol)
        for address in ("10.0.0.5", "10.0.0.12")
        for port, protocol in ((7946, TCP), (7946, UDP), (4789, UDP))
    ]
    assert [r.port_from for r in policies["pi1"].rules][len(added) :] == [22]  # the document's, after
    # what the document already allows gets no rule of its own
    lan = POLICY.replace("rules:\n", "rules:\n  - {action: allow, from: 10.0.0.0/24}\n")
    steps = plan(parse_spec(SWARM + "---" + lan + "cluster_ports: allow\n"), INVENTORY)
    assert all(
        r.comment != "picoord cluster ports"
        for step in steps
        if step.kind == "firewall"
        for r in step.action.firewall.rules
    )


def test_cluster_ports_takes_check_or_allow() -> None:
    from picoord.coordinator.apply.cluster_spec import SpecError

    with pytest.raises(
        SpecError, match=r"FirewallPolicy/pis.cluster_ports: 'open' is not one of check, allow"
    ):
        parse_spec(POLICY + "cluster_ports: open\n")

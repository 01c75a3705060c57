"""A stack's Swarm overlay networks, as pure decisions: how a Compose file's networks map,
how a stack names them, when an apply is refused (nodes outside the Swarm) and with what
fix, which replicas wait for their network, and what a node is told to run."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest

from picoord.common.checks.workloads import check_assignment, check_replica_spec
from picoord.common.validation import FieldError
from picoord.coordinator.apply import cluster_spec
from picoord.coordinator.controller.assignments import Assigned, node_assignments
from picoord.coordinator.placement.constraints import NodeFacts
from picoord.coordinator.placement.inputs import swarm_members
from picoord.coordinator.placement.scheduler import Node, place
from picoord.coordinator.workloads import networks
from picoord.coordinator.workloads.reader import WorkloadError, read_workloads
from picoord.coordinator.workloads.spec import NetworkAttachment, placement_request
from picoord.v1 import admin_pb2, agent_pb2, workloads_pb2

EXAMPLES = Path(__file__).resolve().parents[3] / "examples"
SEED = (EXAMPLES / "seed-docker-stack.yml").read_text()


def _services(text: str) -> dict[str, tuple[NetworkAttachment, ...]]:
    return {spec.name: spec.networks for spec in read_workloads(text).services}


ONE = "services:\n  web:\n    image: mcp:1\n"


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (
            SEED,
            {
                "mcp-server": (NetworkAttachment("mcp-network"),),
                "postgres": (NetworkAttachment("mcp-network"),),
            },
        ),
        (ONE, {"web": (NetworkAttachment("default"),)}),
        (
            ONE + "    networks: [front]\nnetworks:\n  front:\n    driver: overlay\n"
            "    driver_opts: {encrypted: ''}\n",
            {"web": (NetworkAttachment("front", encrypted=True),)},
        ),
        (
            ONE + "    networks: [front]\nnetworks:\n  front: {encrypted: true}\n",
            {"web": (NetworkAttachment("front", encrypted=True),)},
        ),
        (
            ONE + "    networks:\n      front: {aliases: [api]}\n      back:\nnetworks:\n  front:\n  back:\n",
            {"web": (NetworkAttachment("front", aliases=("api",)), NetworkAttachment("back"))},
        ),
        (ONE + "networks:\n  unused: {driver: overlay}\n", {"web": (NetworkAttachment("default"),)}),
    ],
)
def test_compose_networks_map_to_attachments(text: str, expected: dict[str, object]) -> None:
    assert _services(text) == expected


@pytest.mark.parametrize(
    ("text", "field"),
    [
        (ONE + "    networks: [nope]\n", "services.web.networks.nope"),
        (ONE + "networks:\n  front: {driver: bridge}\n", "networks.front.driver"),
        (
            ONE + "networks:\n  front: {driver_opts: {com.docker.network.driver.mtu: '1400'}}\n",
            "networks.front.driver_opts",
        ),
        (ONE + "networks:\n  front: {external: true}\n", "networks.front.external"),
        (ONE + "networks:\n  Front_1: {}\n", "networks.Front_1"),
        (ONE + "x-picoord: {network_mode: mesh}\n", "x-picoord.network_mode"),
    ],
)
def test_bad_networks_are_refused_naming_the_field(text: str, field: str) -> None:
    with pytest.raises(WorkloadError) as raised:
        read_workloads(text)
    assert field in str(raised.value)


def test_the_file_may_choose_published_ports_mode() -> None:
    assert read_workloads(SEED).network_mode == networks.OVERLAY
    chosen = read_workloads(SEED + "x-picoord:\n  network_mode: published-ports\n")
    assert chosen.network_mode == networks.PUBLISHED_PORTS
    assert not any("x-picoord" in line for line in chosen.warning_lines())


SEED_SPECS = list(read_workloads(SEED).services)


@pytest.mark.parametrize(
    ("stack", "mode", "expected"),
    [
        ("mcp", networks.OVERLAY, ("mcp_mcp-network",)),
        ("mcp", networks.PUBLISHED_PORTS, ()),
        ("", networks.OVERLAY, ()),  # no stack: published-ports, as before
    ],
)
def test_a_stack_names_its_networks_as_docker_stack_deploy(
    stack: str, mode: str, expected: tuple[str, ...]
) -> None:
    for spec in networks.stack_networks(SEED_SPECS, stack, mode):
        assert tuple(item.network for item in spec.networks) == expected


def test_services_without_networks_join_the_stacks_default_network() -> None:
    [native] = read_workloads(ONE).services
    bare = replace(native, networks=())  # as a Kubernetes or picoord Service reads
    [named] = networks.stack_networks([bare], "shop", networks.OVERLAY)
    assert named.networks == (NetworkAttachment("shop_default"),)


def _facts(name: str, arch: str = "x86_64", swarm: bool = False) -> NodeFacts:
    return NodeFacts(name, arch=arch, hostname=name, swarm=swarm)


LAB = [_facts("pi1", "aarch64"), _facts("pi2", "aarch64"), _facts("ubuntu-desktop")]
STACK = networks.stack_networks(SEED_SPECS, "mcp", networks.OVERLAY)


@pytest.mark.parametrize(
    ("swarm", "nodes", "refused_for"),
    [
        ({"ubuntu-desktop": "manager", "pi1": "worker", "pi2": "worker"}, LAB, []),
        ({}, [], []),  # no node could take it yet: nothing to refuse
        ({}, LAB, ["pi1 (for mcp-server)", "pi2 (for mcp-server)", "ubuntu-desktop (for postgres)"]),
        ({"ubuntu-desktop": "manager", "pi1": "worker"}, LAB, ["pi2 (for mcp-server)"]),
        # a node no service of the stack can use need not be in the Swarm
        (
            {"ubuntu-desktop": "manager", "pi1": "worker", "pi2": "worker"},
            [*LAB, _facts("mac", "x86_64")],
            [],
        ),
    ],
)
def test_an_overlay_stack_is_refused_when_its_nodes_are_not_in_one_swarm(
    swarm: dict[str, str], nodes: list[NodeFacts], refused_for: list[str]
) -> None:
    said = networks.overlay_refusal(STACK, "mcp", nodes, swarm)
    if not refused_for:
        assert said == ""
        return
    for line in refused_for:
        assert line in said
    document = said.split("\n\n")[1]
    [parsed] = [cluster_spec.parse_document(0, doc, set()) for doc in cluster_spec.load_documents(document)]
    assert isinstance(parsed, cluster_spec.ClusterMembership) and parsed.engine == "swarm"
    manager = min(n for n, r in swarm.items() if r == "manager") if swarm else "pi1"
    assert parsed.manager == manager
    assert sorted((manager, *parsed.workers.names)) == sorted(n.name for n in nodes)
    assert "x-picoord: {network_mode: published-ports}" in said


def test_published_ports_mode_is_never_refused() -> None:
    chosen = networks.stack_networks(SEED_SPECS, "mcp", networks.PUBLISHED_PORTS)
    assert networks.overlay_refusal(chosen, "mcp", LAB, {}) == ""


def _action(
    node: str, kind: str, when: float, outcome: int = agent_pb2.ACTION_OUTCOME_SUCCEEDED
) -> admin_pb2.ActionRecord:
    return admin_pb2.ActionRecord(node=node, kind=kind, started_at=when, finished_at=when, outcome=outcome)


def test_swarm_members_follow_the_latest_membership_action() -> None:
    records = [
        _action("desk", "swarm_init", 1),
        _action("pi1", "swarm_join", 2),
        _action("pi2", "swarm_join", 2),
        _action("pi2", "swarm_leave", 3),
        _action("pi3", "swarm_join", 4, agent_pb2.ACTION_OUTCOME_FAILED),
        _action("pi4", "kubeadm_join", 4),
    ]
    assert swarm_members(records) == {"desk": "manager", "pi1": "worker"}
    assert networks.swarm_manager(swarm_members(records)) == "desk"
    assert networks.swarm_manager({}) == ""


def test_an_overlay_service_is_placed_on_swarm_nodes_only() -> None:
    [server] = [spec for spec in STACK if spec.name == "mcp-server"]
    nodes = [
        Node(_facts("pi1", "aarch64", swarm=True), memory_bytes=8 << 30, cpu_cores=4),
        Node(_facts("pi2", "aarch64"), memory_bytes=8 << 30, cpu_cores=4),
    ]
    assert set(place(nodes, [], placement_request(server, 2)).assignments) == {"pi1"}
    outside = place(nodes[1:], [], placement_request(server, 1))
    assert outside.unplaced == 1
    assert outside.reason == "0/1 nodes available: 1 not in the Swarm", outside.reason


# --- what nodes are told ----------------------------------------------------------------------

SPECS = {(spec.name, 1): spec for spec in STACK}
CURRENT = {spec.name: spec for spec in STACK}
PLACED = [
    Assigned("postgres.1", "postgres", 1, "ubuntu-desktop"),
    Assigned("mcp-server.1", "mcp-server", 1, "pi1"),
]
ADDRESSES = {"pi1": "10.0.0.11", "ubuntu-desktop": "10.0.0.2"}


def test_replicas_wait_until_the_manager_reports_their_network() -> None:
    by_node, lines = node_assignments(PLACED, SPECS, CURRENT, {}, {}, ADDRESSES, networks_present=())
    assert by_node == {}
    assert lines == [
        "mcp-server.1: waits for network mcp_mcp-network (the Swarm manager creates it)",
        "postgres.1: waits for network mcp_mcp-network (the Swarm manager creates it)",
    ]


def test_overlay_replicas_join_by_name_and_publish_nothing_internal() -> None:
    by_node, lines = node_assignments(
        PLACED, SPECS, CURRENT, {"postgres.1": True}, {}, ADDRESSES, networks_present=("mcp_mcp-network",)
    )
    assert lines == []
    [postgres] = by_node["ubuntu-desktop"]
    [server] = by_node["pi1"]
    for message in (postgres, server):
        check_replica_spec(message)
        assert dict(message.hosts) == {}  # no /etc/hosts entry naming a node
    assert [(n.name, list(n.aliases)) for n in postgres.networks] == [("mcp_mcp-network", ["postgres"])]
    assert [p.published for p in postgres.ports] == []  # referenced, yet not published
    assert [(p.target, p.published) for p in server.ports] == [(8080, 8080)]  # the file publishes it


def test_published_ports_mode_keeps_hosts_and_publishes_referenced_targets() -> None:
    chosen = networks.stack_networks(SEED_SPECS, "mcp", networks.PUBLISHED_PORTS)
    by_node, lines = node_assignments(
        PLACED, {(s.name, 1): s for s in chosen}, {s.name: s for s in chosen}, {}, {}, ADDRESSES
    )
    assert lines == []
    [server] = by_node["pi1"]
    assert dict(server.hosts) == {"postgres": "10.0.0.2"} and not server.networks


def test_the_manager_keeps_every_network_encrypted_if_any_file_says_so() -> None:
    plain = replace(STACK[0], networks=(NetworkAttachment("a_x"), NetworkAttachment("a_y")))
    secret = replace(STACK[1], networks=(NetworkAttachment("a_x", encrypted=True),))
    assert networks.wanted_networks([plain, secret]) == {"a_x": True, "a_y": False}


def test_the_agent_refuses_a_bad_network_in_an_assignment() -> None:
    assignment = workloads_pb2.NodeAssignment(networks=[workloads_pb2.OverlayNetwork(name="a;rm -rf")])
    with pytest.raises(FieldError) as raised:
        check_assignment(assignment)
    assert raised.value.field == "assignment.networks[0]"
    twice = workloads_pb2.NodeAssignment(networks=[workloads_pb2.OverlayNetwork(name="a_b")] * 2)
    with pytest.raises(FieldError):
        check_assignment(twice)
    bad_alias = workloads_pb2.ReplicaSpec(
        service="s", replica="s.1", revision=1, image="mcp:1", restart="no",
        networks=[workloads_pb2.NetworkAttachment(name="a_b", aliases=["not a name"])],
    )  # fmt: skip
    with pytest.raises(FieldError) as raised:
        check_replica_spec(bad_alias)
    assert raised.value.field == "replica.networks[0].aliases[0]"


def test_a_kubernetes_namespace_is_one_default_network_and_service_names_are_aliases() -> None:
    text = (
        (EXAMPLES / "seed-mcp-deployment.yaml")
        .read_text()
        .replace("  name: mcp-server\n", "  name: mcp-server\n  namespace: mcp\n", 1)
    )
    workloads = read_workloads(text)
    assert workloads.namespace == "mcp"
    [server] = networks.stack_networks(workloads.services, workloads.namespace, workloads.network_mode)
    assert [item.network for item in server.networks] == ["mcp_default"]
    [attach] = networks.attachments(server)
    assert attach.aliases == ("mcp-server", "mcp-service")  # the Deployment's and its Service's names

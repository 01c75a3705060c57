"""The apply planner: documents + inventory -> steps, with no I/O."""

import pytest

from picoord.coordinator.apply.action_planner import (
    FACT_SWARM_MANAGER_ADDRESS,
    FACT_SWARM_WORKER_TOKEN,
    FactRef,
    NodeView,
    PlanError,
    matches,
    plan,
)
from picoord.coordinator.apply.cluster_spec import parse_spec
from picoord.v1 import actions_pb2

INVENTORY = [
    NodeView("desktop", {}, "x86_64", "10.0.0.5"),
    NodeView("pi1", {"role": "storage"}, "aarch64", "10.0.0.11"),
    NodeView("pi2", {"role": "storage"}, "aarch64", "10.0.0.12"),
    NodeView("pi3", {}, "aarch64", "10.0.0.13"),
    NodeView("pi4", {}, "aarch64", ""),  # enrolled, not connected
]


def steps_of(text: str, inventory=INVENTORY):
    return plan(parse_spec(text), inventory)


@pytest.mark.parametrize(
    ("selector", "expected"),
    [
        ((("arch", "arm64"),), ["pi1", "pi2", "pi3", "pi4"]),
        ((("arch", "aarch64"),), ["pi1", "pi2", "pi3", "pi4"]),  # Docker's spelling means the same
        ((("kubernetes.io/arch", "amd64"),), ["desktop"]),
        ((("role", "storage"),), ["pi1", "pi2"]),
        ((("role", "storage"), ("hostname", "pi2")), ["pi2"]),
        ((("zone", "a"),), []),
    ],
)
def test_selectors(selector: tuple, expected: list[str]) -> None:
    assert [n.name for n in INVENTORY if matches(n, selector)] == expected


SWARM = """
kind: ClusterMembership
name: swarm
engine: swarm
manager: desktop
workers: [pi1, pi2, desktop]
"""


def test_swarm_membership_inits_the_manager_then_joins_workers_with_its_token() -> None:
    init, join1, join2 = steps_of(SWARM)
    assert (init.node, init.kind) == ("desktop", "swarm_init")
    assert init.action.swarm_init.advertise_address == "10.0.0.5"
    for step, node, address in ((join1, "pi1", "10.0.0.11"), (join2, "pi2", "10.0.0.12")):
        assert (step.node, step.kind, step.requires) == (node, "swarm_join", (init.id,))
        assert step.action.swarm_join.advertise_address == address
        assert dict(step.inputs) == {
            "swarm_join.manager_address": FactRef(init.id, FACT_SWARM_MANAGER_ADDRESS),
            "swarm_join.join_token": FactRef(init.id, FACT_SWARM_WORKER_TOKEN),
        }


@pytest.mark.parametrize(
    ("engine", "init_kind", "join_kind", "fields"),
    [
        ("kubeadm", "kubeadm_init", "kubeadm_join", {"api_server", "token", "ca_cert_hash"}),
        ("k3s", "k3s_server", "k3s_agent", {"server_url", "token"}),
    ],
)
def test_kubeadm_and_k3s_membership(engine: str, init_kind: str, join_kind: str, fields: set[str]) -> None:
    init, join = steps_of(SWARM.replace("swarm\nmanager", f"{engine}\nmanager").replace(", pi2, desktop", ""))
    assert (init.kind, join.kind, join.requires) == (init_kind, join_kind, (init.id,))
    assert {path.split(".")[1] for path, _ in join.inputs} == fields


def test_leaving() -> None:
    steps = steps_of(SWARM + "state: absent\n")
    assert [(s.node, s.kind) for s in steps] == [("pi1", "swarm_leave"), ("pi2", "swarm_leave")]


GLUSTER = """
kind: GlusterVolume
name: mcp-storage
replica: 3
bricks: [pi1:/data/gluster, pi2:/data/gluster, pi3:/data/gluster]
---
kind: Mount
name: mcp-data
type: glusterfs
source: pi1:/mcp-storage
target: /mnt/mcp
nodes: {selector: {role: storage}}
"""


def test_gluster_probes_then_creates_then_mounts() -> None:
    probe, volume, mount1, mount2 = steps_of(GLUSTER)
    assert (probe.node, probe.kind, list(probe.action.gluster_peer_probe.peers)) == (
        "pi1",
        "gluster_peer_probe",
        ["10.0.0.12", "10.0.0.13"],
    )
    assert volume.requires == (probe.id,)
    assert list(volume.action.gluster_volume.bricks) == [
        "10.0.0.11:/data/gluster",
        "10.0.0.12:/data/gluster",
        "10.0.0.13:/data/gluster",
    ]
    assert volume.action.gluster_volume.replica == 3 and volume.action.gluster_volume.start
    for step, node in ((mount1, "pi1"), (mount2, "pi2")):
        assert (step.node, step.requires) == (node, (volume.id,))
        assert step.action.mount.source == "10.0.0.11:/mcp-storage"  # node names become addresses
        assert step.action.mount.type == actions_pb2.MOUNT_TYPE_GLUSTERFS


def test_firewall_comes_last_on_its_node() -> None:
    steps = steps_of(GLUSTER + "---\nkind: FirewallPolicy\nname: f\nnodes: [pi1, pi3]\n")
    firewall_pi1 = next(s for s in steps if s.kind == "firewall" and s.node == "pi1")
    firewall_pi3 = next(s for s in steps if s.kind == "firewall" and s.node == "pi3")
    assert set(firewall_pi1.after) == {s.id for s in steps if s.node == "pi1" and s.kind != "firewall"}
    assert firewall_pi3.after == ()
    assert firewall_pi1.requires == ()  # ordering only: a failed mount does not keep the firewall open
    assert firewall_pi1.action.firewall.default_incoming == actions_pb2.FIREWALL_VERDICT_DENY


@pytest.mark.parametrize(
    ("text", "message"),
    [
        (SWARM.replace("pi2, desktop", "pi9"), "ClusterMembership/swarm.workers[1]: unknown node 'pi9'"),
        (SWARM.replace("manager: desktop", "manager: nowhere"), "manager: unknown node 'nowhere'"),
        (SWARM.replace("manager: desktop", "manager: pi4"), "node 'pi4' is not connected"),
        (
            GLUSTER.replace("pi3:/data", "pi4:/data"),
            "GlusterVolume/mcp-storage.bricks: node 'pi4' is not connected",
        ),
        (
            GLUSTER.replace("role: storage", "role: gpu"),
            "Mount/mcp-data.nodes: selector role=gpu matches no node",
        ),
        (
            "kind: FirewallPolicy\nname: a\nnodes: [pi1]\n---\nkind: FirewallPolicy\nname: b\nnodes: [pi1]\n",
            "FirewallPolicy/b and FirewallPolicy/a both set the firewall of node pi1",
        ),
        (
            SWARM
            + "---\n"
            + SWARM.replace("name: swarm", "name: other").replace("manager: desktop", "manager: pi3"),
            "ClusterMembership/other and ClusterMembership/swarm both set the member of swarm of node pi1",
        ),
    ],
)
def test_plan_errors(text: str, message: str) -> None:
    with pytest.raises(PlanError) as raised:
        steps_of(text)
    assert message in str(raised.value)


def test_the_agents_own_checks_run_at_plan_time() -> None:
    twice = (
        "kind: FirewallPolicy\nname: f\nnodes: [pi1]\nrules:\n"
        + "  - {action: allow, port: 22, protocol: tcp}\n" * 2
    )
    with pytest.raises(PlanError, match="FirewallPolicy/f on pi1: rules"):
        steps_of(twice)


def test_firewall_steps_get_time_for_their_confirm_window() -> None:
    from picoord.coordinator.apply.runner import step_timeout

    (step,) = steps_of("kind: FirewallPolicy\nname: f\nnodes: [pi1]\nconfirm_within_seconds: 200\n")
    assert step_timeout(step.kind, step.action) == 430
    (mount,) = steps_of("kind: Mount\nname: t\ntype: tmpfs\ntarget: /mnt/t\nnodes: [pi1]\n")
    assert step_timeout(mount.kind, mount.action) == 120


def test_an_offline_node_is_still_planned_when_its_address_is_not_needed() -> None:
    (step,) = steps_of("kind: Mount\nname: t\ntype: tmpfs\ntarget: /mnt/t\nnodes: [pi4]\n")
    assert (step.node, step.kind, step.action.mount.type) == ("pi4", "mount", actions_pb2.MOUNT_TYPE_TMPFS)

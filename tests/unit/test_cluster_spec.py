"""cluster.yaml reading: every document kind, the seed's firewall one-to-one, and bad input
rejected with the document and field named."""

from pathlib import Path

import pytest

from picoord.coordinator.apply.cluster_spec import (
    Brick,
    ClusterMembership,
    FirewallPolicy,
    GlusterVolume,
    Mount,
    NodeSet,
    Rule,
    SpecError,
    parse_spec,
)
from tests.examples import cluster_example

SEED_FIREWALL = """
kind: FirewallPolicy
name: cluster
nodes: {selector: {arch: arm64}}
default_incoming: deny
rules:
  - {action: allow, from: 192.168.10.0/24}   # Services VLAN
  - {action: allow, from: 192.168.20.0/24}   # Compute VLAN
  - {action: allow, port: 6443, protocol: tcp}          # API server
  - {action: allow, port: "2379:2380", protocol: tcp}   # etcd
  - {action: allow, port: 10250, protocol: tcp}         # kubelet
  - {action: allow, port: 10251, protocol: tcp}         # kube-scheduler
  - {action: allow, port: 10252, protocol: tcp}         # kube-controller
"""


def test_the_seed_firewall_is_expressible_one_to_one() -> None:
    (policy,) = parse_spec(SEED_FIREWALL)
    assert policy == FirewallPolicy(
        name="cluster",
        nodes=NodeSet(selector=(("arch", "arm64"),)),
        backend="ufw",
        default_incoming="deny",
        rules=(
            Rule("allow", from_cidr="192.168.10.0/24"),
            Rule("allow", from_cidr="192.168.20.0/24"),
            Rule("allow", port_from=6443, protocol="tcp"),
            Rule("allow", port_from=2379, port_to=2380, protocol="tcp"),
            Rule("allow", port_from=10250, protocol="tcp"),
            Rule("allow", port_from=10251, protocol="tcp"),
            Rule("allow", port_from=10252, protocol="tcp"),
        ),
    )


def test_all_kinds_in_one_file() -> None:
    documents = parse_spec(
        """
kind: ClusterMembership
name: swarm
engine: swarm
manager: desktop
workers: {selector: "arch=arm64"}
---
kind: GlusterVolume
name: mcp-storage
replica: 3
bricks: [pi1:/data/gluster, pi2:/data/gluster, pi3:/data/gluster]
---
kind: Mount
name: mcp-data
type: glusterfs
source: pi1:/mcp-storage
target: /mnt/mcp/../mcp
options: [defaults, _netdev]
nodes: [pi1, pi2]
persist: true
---
kind: FirewallPolicy
name: lan
nodes: [pi1]
backend: nftables
rules:
  - {action: allow, from: "fd00::/8", port: "7946-7947", protocol: udp}
"""
    )
    assert documents == [
        ClusterMembership("swarm", "swarm", "desktop", NodeSet(selector=(("arch", "arm64"),))),
        GlusterVolume(
            "mcp-storage",
            3,
            (Brick("pi1", "/data/gluster"), Brick("pi2", "/data/gluster"), Brick("pi3", "/data/gluster")),
        ),
        Mount(
            "mcp-data",
            "glusterfs",
            "pi1:/mcp-storage",
            "/mnt/mcp",
            NodeSet(names=("pi1", "pi2")),
            ("defaults", "_netdev"),
            "fstab",
        ),
        FirewallPolicy(
            "lan",
            NodeSet(names=("pi1",)),
            "nftables",
            "deny",
            (Rule("allow", "fd00::/8", 7946, 7947, "udp"),),
        ),
    ]


FIREWALL = "kind: FirewallPolicy\nname: f\nnodes: [pi1]\nrules:\n  - {rule}\n"
MOUNT = "kind: Mount\nname: m\ntype: {type}\nsource: {source}\ntarget: {target}\nnodes: [pi1]\n"


@pytest.mark.parametrize(
    ("text", "message"),
    [
        # the list of bad input
        (
            FIREWALL.format(rule="{action: allow, from: 10.0.0.0/33}"),
            "FirewallPolicy/f.rules[0].from: '10.0.0.0/33'",
        ),
        (FIREWALL.format(rule="{action: allow, from: 10.0.0.1/24}"), "rules[0].from"),  # host bits set
        (FIREWALL.format(rule="{action: allow, port: 0}"), "rules[0].port: port 0 is outside 1-65535"),
        (FIREWALL.format(rule="{action: allow, port: 70000}"), "rules[0].port: port 70000 is outside"),
        (
            FIREWALL.format(rule='{action: allow, port: "2380:2379", protocol: tcp}'),
            "range 2380:2379 is inverted",
        ),
        (
            FIREWALL.format(rule='{action: allow, port: "2379:2380"}'),
            "rules[0].protocol: a port range needs tcp or udp",
        ),
        (
            FIREWALL.format(rule="{action: allow, port: 22, protocol: icmp}"),
            "rules[0].protocol: 'icmp' is not one of",
        ),
        (FIREWALL.format(rule="{action: reject, port: 22}"), "rules[0].action: 'reject' is not one of"),
        (FIREWALL.format(rule="{action: allow}"), "rules[0]: a rule needs `from`, `port`, or both"),
        (FIREWALL.format(rule="{action: allow, port: 22, comment: 'x; reboot'}"), "rules[0].comment"),
        (FIREWALL.format(rule="{action: allow, port: 22, comment: '100%'}"), "rules[0].comment"),
        (FIREWALL.format(rule="{action: allow, port: 22, extra: 1}"), "rules[0].extra: unknown field"),
        (
            MOUNT.format(type="tmpfs", source="tmpfs", target="/etc/../proc"),
            "Mount/m.target: refusing to mount over /proc",
        ),
        (MOUNT.format(type="tmpfs", source="tmpfs", target="/proc/x"), "refusing to mount under /proc"),
        (MOUNT.format(type="tmpfs", source="tmpfs", target="/"), "refusing to mount over /"),
        (MOUNT.format(type="tmpfs", source="tmpfs", target="mnt/x"), "is not an absolute path"),
        (MOUNT.format(type="glusterfs", source="'host:/vol; rm -rf /'", target="/mnt/x"), "Mount/m.source"),
        (MOUNT.format(type="bind", source="--rbind", target="/mnt/x"), "would be read as an option"),
        (MOUNT.format(type="nfs", source="--opt:/x", target="/mnt/x"), "would be read as an option"),
        (MOUNT.format(type="cifs", source="x", target="/mnt/x"), "Mount/m.type: 'cifs' is not one of"),
        ("kind: Mount\nname: --help\ntype: tmpfs\ntarget: /mnt/x\nnodes: [pi1]\n", "documents[0].name"),
        ("kind: Mount\nname: m\ntype: tmpfs\ntarget: /mnt/x\nnodes: [--all]\n", "Mount/m.nodes[0]"),
        (
            "kind: ClusterMembership\nname: c\nengine: nomad\nmanager: a\nworkers: [b]\n",
            "engine: 'nomad' is not one",
        ),
        (
            "kind: ClusterMembership\nname: c\nengine: swarm\nworkers: [b]\n",
            "ClusterMembership/c.manager: is required",
        ),
        ("kind: GlusterVolume\nname: v\nreplica: 3\nbricks: [a:/b, c:/d]\n", "2 bricks do not divide"),
        ("kind: GlusterVolume\nname: v\nbricks: [a:/b, a:/b]\n", "names a brick twice"),
        ("kind: GlusterVolume\nname: v\nbricks: ['a:relative']\n", "bricks[0]"),
        ("kind: Deployment\nname: x\n", "documents[0].kind: 'Deployment' is not one of"),
        ("- just\n- a list\n", "documents[0]: must be a mapping, not list"),
        ("just a string\n", "documents[0]: must be a mapping, not str"),
        ("kind: Mount\nname: m\n---\nkind: Mount\nname: m\n", "Mount/m.type: is required"),
        ("key: [unclosed\n", "not valid YAML"),
        ("", "holds no document"),
    ],
)
def test_bad_documents_name_the_field(text: str, message: str) -> None:
    with pytest.raises(SpecError) as raised:
        parse_spec(text)
    assert message in str(raised.value)


def test_duplicate_documents_are_refused() -> None:
    twice = MOUNT.format(type="tmpfs", source="tmpfs", target="/mnt/x")
    with pytest.raises(SpecError, match="a second Mount named 'm'"):
        parse_spec(twice + "---\n" + twice)


def test_a_ten_megabyte_document_is_refused_before_parsing() -> None:
    huge = "kind: Mount\nname: m\ncomment: '" + "x" * (10 * 1024 * 1024) + "'\n"
    with pytest.raises(SpecError, match="larger than"):
        parse_spec(huge)
    with pytest.raises(SpecError, match="the limit is"):
        parse_spec(huge.encode())


def test_yaml_tags_cannot_construct_objects() -> None:
    with pytest.raises(SpecError, match="not valid YAML"):
        parse_spec("kind: !!python/object/apply:os.system ['true']\n")


EXAMPLE = (Path(__file__).parents[2] / "examples" / "cluster.yaml").read_text()


def test_the_example_file_is_refused_until_its_placeholder_is_filled_in() -> None:
    with pytest.raises(SpecError) as raised:
        parse_spec(EXAMPLE)
    said = str(raised.value)
    assert said.startswith("FirewallPolicy/cluster.rules[0].from: 'YOUR_LAN/24' is a placeholder"), said
    assert "coordctl apply --dry-run" in said
    documents = parse_spec(cluster_example())
    assert [type(doc).__name__ for doc in documents] == [
        "ClusterMembership",
        "GlusterVolume",
        "Mount",
        "FirewallPolicy",
    ]
    assert documents[3].keep_ssh is True
    assert documents[3].rules == (
        Rule("allow", "192.168.1.0/24", comment="your LAN"),
        Rule("allow", "", 8080, 0, "tcp", "mcp-server"),
    )


def test_the_example_plans_on_a_flat_lan_where_the_seeds_vlans_would_cut_the_swarm() -> None:
    """The README finding: on 192.168.1.0/24 the seed's VLAN rules shut the nodes out of
    each other; the example, filled in, keeps Swarm's ports (and the app's) open."""
    from picoord.coordinator.apply.action_planner import NodeView, PlanError, plan

    inventory = [NodeView("ubuntu-desktop", {}, "x86_64", "192.168.1.10")] + [
        NodeView(f"pi{i}", {}, "aarch64", f"192.168.1.{20 + i}") for i in (1, 2, 3)
    ]
    filled = cluster_example()
    steps = plan(parse_spec(filled), inventory)
    assert sorted(step.node for step in steps if step.kind == "firewall") == ["pi1", "pi2", "pi3"]
    seed_vlans = filled.replace(
        "  - {action: allow, from: 192.168.1.0/24, comment: your LAN}",
        "  - {action: allow, from: 192.168.10.0/24}\n  - {action: allow, from: 192.168.20.0/24}",
    )
    with pytest.raises(PlanError) as refused:
        plan(parse_spec(seed_vlans), inventory)
    assert "FirewallPolicy/cluster on pi1 (swarm worker): 7946/tcp from ubuntu-desktop (192.168.1.10)" in str(
        refused.value
    )


@pytest.mark.parametrize(
    ("extra", "field", "value"),
    [
        ("", "keep_ssh", True),
        ("keep_ssh: false\n", "keep_ssh", False),
        ("", "ssh_port", 22),
        ("ssh_port: 2022\n", "ssh_port", 2022),
    ],
)
def test_keep_ssh_and_ssh_port(extra: str, field: str, value: object) -> None:
    [policy] = parse_spec(FIREWALL.format(rule="{action: allow, port: 22}") + extra)
    assert getattr(policy, field) == value


@pytest.mark.parametrize(
    ("text", "message"),
    [
        (
            FIREWALL.format(rule="{action: allow, port: 22}") + "keep_ssh: no-thanks\n",
            "keep_ssh: must be true",
        ),
        (FIREWALL.format(rule="{action: allow, port: 22}") + "ssh_port: 0\n", "ssh_port: port 0 is outside"),
        (
            FIREWALL.format(rule="{action: allow, port: 112, protocol: vrrp}"),
            "rules[0].port: vrrp has no ports",
        ),
        (FIREWALL.format(rule="{action: allow, from: your_lan/24}"), "is a placeholder"),
    ],
)
def test_bad_firewall_fields(text: str, message: str) -> None:
    with pytest.raises(SpecError) as raised:
        parse_spec(text)
    assert message in str(raised.value)


def test_vrrp_rules_need_no_port_or_source() -> None:
    [policy] = parse_spec(FIREWALL.format(rule="{action: allow, protocol: vrrp}"))
    assert policy.rules == (Rule("allow", "", 0, 0, "vrrp"),)


def test_the_lab_demo_spec_reads_and_plans_for_three_pis() -> None:
    from picoord.coordinator.apply.action_planner import NodeView, plan
    from picoord.lab.cli import DEMO_SPEC

    inventory = [NodeView(f"pi{i}", {}, "x86_64", f"10.213.0.{10 + i}") for i in (1, 2, 3)]
    steps = plan(parse_spec(DEMO_SPEC.read_text()), inventory)
    assert {step.kind for step in steps} == {
        "swarm_init",
        "swarm_join",
        "gluster_peer_probe",
        "gluster_volume",
        "mount",
        "firewall",
    }

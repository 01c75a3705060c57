"""The agent's nftables table for published ports (agent/networking/service_ports.py)."""

from __future__ import annotations

import pytest

from picoord.agent.commands import CommandResult
from picoord.agent.networking.service_ports import REMOTE_MARK, ServicePortsApplier, forward_rule, ruleset
from picoord.v1 import workloads_pb2

HEAD = "table ip picoord_ports\ndelete table ip picoord_ports\n"


def ports(
    *endpoints: tuple[str, str, int], node: str = "10.0.0.11", port: int = 8080, protocol: str = "tcp"
) -> workloads_pb2.ServicePorts:
    message = workloads_pb2.ServicePorts(node_address=node, nodes=["10.0.0.11", "10.0.0.12", "10.0.0.13"])
    entry = message.ports.add(service="mcp", port=port, protocol=protocol)
    for replica, address, endpoint in endpoints:
        entry.endpoints.add(replica=replica, address=address, port=endpoint, target=8080)
    return message


def chain(script: str, name: str) -> list[str]:
    lines = script.splitlines()
    start = lines.index(f"\tchain {name} {{")
    return [line.strip() for line in lines[start + 1 : lines.index("\t}", start)]]


@pytest.mark.parametrize(
    ("message", "local", "expected"),
    [
        # a local replica is reached straight at its container
        (
            ports(("mcp.1", "10.0.0.11", 61001)),
            {"mcp.1": "172.17.0.2"},
            ["meta l4proto tcp dnat to 172.17.0.2:8080"],
        ),
        # a local one whose container address is not known yet: at its endpoint port
        (ports(("mcp.1", "10.0.0.11", 61001)), {}, ["meta l4proto tcp dnat to 10.0.0.11:61001"]),
        # a remote one: marked (masqueraded, let through DOCKER-USER), at its node's endpoint port
        (
            ports(("mcp.2", "10.0.0.12", 61002)),
            {},
            [f"meta l4proto tcp ct mark set {REMOTE_MARK:#x} dnat to 10.0.0.12:61002"],
        ),
        # udp
        (
            ports(("dns.1", "10.0.0.12", 61003), port=53, protocol="udp"),
            {},
            [f"meta l4proto udp ct mark set {REMOTE_MARK:#x} dnat to 10.0.0.12:61003"],
        ),
    ],
)
def test_each_endpoint_is_one_dnat(
    message: workloads_pb2.ServicePorts, local: dict, expected: list[str]
) -> None:  # type: ignore[type-arg]
    script = ruleset(message, local)
    port = message.ports[0]
    assert chain(script, f"ep_{port.protocol}_{port.port}_0") == expected
    assert chain(script, f"svc_{port.protocol}_{port.port}") == [
        f"numgen random mod 1 vmap {{ 0 : jump ep_{port.protocol}_{port.port}_0 }}"
    ]


def test_a_published_port_is_answered_on_every_local_address_arriving_and_from_the_node() -> None:
    script = ruleset(ports(("mcp.1", "10.0.0.11", 61001), ("mcp.2", "10.0.0.12", 61002)), {})
    assert script.startswith(HEAD)  # one transaction: the old table goes, the new one comes
    jump = "fib daddr type local ip daddr != 127.0.0.0/8 tcp dport 8080 jump svc_tcp_8080"
    assert chain(script, "prerouting") == ["type nat hook prerouting priority -110; policy accept;", jump]
    assert chain(script, "output") == ["type nat hook output priority -110; policy accept;", jump]
    assert chain(script, "svc_tcp_8080") == [
        "numgen random mod 2 vmap { 0 : jump ep_tcp_8080_0, 1 : jump ep_tcp_8080_1 }"
    ]
    assert chain(script, "postrouting")[1] == f"ct mark {REMOTE_MARK:#x} masquerade"


def test_only_other_nodes_reach_the_endpoint_ports() -> None:
    script = ruleset(ports(("mcp.1", "10.0.0.11", 61001)), {})
    assert chain(script, "guard") == [
        "type filter hook prerouting priority -150; policy accept;",
        "ip daddr 10.0.0.11 meta l4proto { tcp, udp } th dport 61000-63999 ip saddr != @nodes drop",
    ]
    assert "elements = { 10.0.0.11, 10.0.0.12, 10.0.0.13 }" in script


def test_a_port_with_no_healthy_replica_is_not_forwarded() -> None:
    script = ruleset(ports(), {})
    assert "svc_tcp_8080" not in script and "dport 8080" not in script
    assert "chain guard" in script


def test_no_ports_and_no_address_deletes_the_table() -> None:
    assert ruleset(workloads_pb2.ServicePorts(), {}) == HEAD


def test_the_forward_rule_is_checked_then_inserted_first_in_docker_user() -> None:
    assert forward_rule("-C")[3:5] == ["-C", "DOCKER-USER"]
    assert forward_rule("-I")[3:6] == ["-I", "DOCKER-USER", "1"]
    assert forward_rule("-I")[-2:] == ["-j", "ACCEPT"]


class Recorder:
    def __init__(self, ok: bool = True) -> None:
        self.scripts: list[str] = []
        self.forwarding = 0
        self.ok = ok

    def load(self, script: str) -> CommandResult:
        self.scripts.append(script)
        return CommandResult(("nft",), 0 if self.ok else 1, "", "" if self.ok else "Error: boom")

    def allow(self) -> CommandResult | None:
        self.forwarding += 1
        return None


def test_the_applier_loads_a_change_once_and_leaves_an_untouched_kernel_alone() -> None:
    recorder = Recorder()
    applier = ServicePortsApplier(recorder.load, recorder.allow)
    assert applier.apply(None, {}) and recorder.scripts == []  # never told: nothing touched
    message = ports(("mcp.2", "10.0.0.12", 61002))
    assert applier.apply(message, {}) and applier.apply(message, {})
    assert len(recorder.scripts) == 1 and recorder.forwarding == 1  # a remote endpoint: forwarding allowed
    assert applier.apply(None, {})  # the ports went away: the table goes
    assert recorder.scripts[-1] == HEAD


def test_a_failed_load_is_kept_and_tried_again() -> None:
    recorder = Recorder(ok=False)
    applier = ServicePortsApplier(recorder.load, recorder.allow)
    message = ports(("mcp.1", "10.0.0.11", 61001))
    assert not applier.apply(message, {}) and applier.error == "Error: boom"
    assert not applier.apply(message, {})
    assert len(recorder.scripts) == 2 and recorder.forwarding == 0  # local only: no forwarding

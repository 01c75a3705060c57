"""Which nodes announce each LoadBalancer virtual address and with which priority; router
ids; what an operator may ask for. Table tests over plain data."""

from __future__ import annotations

from dataclasses import replace

import pytest

from picoord.common.validation import FieldError
from picoord.coordinator.networking.virtual_ips import (
    FIRST_PRIORITY,
    HOLDER_PRIORITY,
    WARMING_PRIORITY,
    NodeNetwork,
    check_virtual_address,
    holders,
    node_interface,
    plan_announcements,
    router_ids,
    stack_addresses,
    vrrp_nodes,
)
from picoord.coordinator.workloads.spec import PortMapping, ServiceSpec
from picoord.coordinator.workloads.stacks import Applied

VIP = "10.213.0.200"
NODES = (
    NodeNetwork("pi1", True, "10.213.0.11/24"),
    NodeNetwork("pi2", True, "10.213.0.12/24"),
    NodeNetwork("pi3", True, "10.213.0.13/24"),
)


def _priorities(plan: dict, address: str = VIP) -> dict[str, int]:
    return {node: a.priority for node, items in plan.items() for a in items if a.address == address}


@pytest.mark.parametrize(
    ("healthy", "held", "expected"),
    [
        # nobody holds it: ranked by healthy replicas, then name
        ([("mcp", "pi1"), ("mcp", "pi2")], {}, {"pi1": FIRST_PRIORITY, "pi2": FIRST_PRIORITY - 1}),
        (
            [("mcp", "pi2"), ("mcp", "pi2"), ("mcp", "pi1")],
            {},
            {"pi2": FIRST_PRIORITY, "pi1": FIRST_PRIORITY - 1},
        ),
        # the holder is preferred, so the address does not move
        (
            [("mcp", "pi1"), ("mcp", "pi2")],
            {"pi2": [VIP]},
            {"pi2": HOLDER_PRIORITY, "pi1": FIRST_PRIORITY},
        ),
        # a holder without a healthy replica takes no part: the other takes over
        ([("mcp", "pi1")], {"pi2": [VIP]}, {"pi1": FIRST_PRIORITY}),
        # no healthy replica anywhere: nobody announces it
        ([], {"pi1": [VIP]}, {}),
        # another service's replica does not count
        ([("postgres", "pi3"), ("mcp", "pi1")], {}, {"pi1": FIRST_PRIORITY}),
        # two report holding it while VRRP settles: one (by name) is preferred
        (
            [("mcp", "pi1"), ("mcp", "pi2"), ("mcp", "pi3")],
            {"pi3": [VIP], "pi2": [VIP]},
            {"pi2": HOLDER_PRIORITY, "pi1": FIRST_PRIORITY, "pi3": FIRST_PRIORITY - 1},
        ),
    ],
)
def test_who_takes_part_and_with_which_priority(healthy: list, held: dict, expected: dict) -> None:
    plan = plan_announcements({VIP: ["mcp"]}, NODES, healthy, held)
    assert _priorities(plan) == expected


def test_instances_carry_the_subnet_router_id_source_and_peers() -> None:
    plan = plan_announcements({VIP: ["mcp"]}, NODES, [("mcp", "pi1"), ("mcp", "pi3")], {})
    [one] = plan["pi1"]
    assert one.prefix_length == 24
    assert one.source == "10.213.0.11"
    assert one.peers == ("10.213.0.12", "10.213.0.13")  # every other node of the subnet
    assert one.services == ("mcp",)
    assert one.router_id == router_ids([VIP])[VIP]
    [three] = plan["pi3"]
    assert three.peers == ("10.213.0.11", "10.213.0.12") and three.router_id == one.router_id


@pytest.mark.parametrize(
    ("node", "why"),
    [
        (NodeNetwork("pi1", False, "10.213.0.11/24"), "not Ready"),
        (NodeNetwork("pi1", True, "10.9.0.11/24"), "another subnet"),
        (NodeNetwork("pi1", True, ""), "subnet unknown"),
    ],
)
def test_nodes_that_cannot_announce_it_take_no_part(node: NodeNetwork, why: str) -> None:
    plan = plan_announcements({VIP: ["mcp"]}, [node, NODES[1]], [("mcp", "pi1"), ("mcp", "pi2")], {})
    assert set(plan) == {"pi2"}, why
    # a node of the subnet stays a peer while it is away: keepalived keeps its unicast mode
    assert plan["pi2"][0].peers == (("10.213.0.11",) if node.ready is False else ()), why


def test_peers_stay_put_while_nodes_join_and_leave_the_election() -> None:
    """keepalived drops the address for about 3 s when an instance switches between unicast
    and multicast (an empty peer list): a lone holder keeps its peers."""
    alone = plan_announcements({VIP: ["mcp"]}, NODES, [("mcp", "pi1")], {})
    both = plan_announcements({VIP: ["mcp"]}, NODES, [("mcp", "pi1"), ("mcp", "pi2")], {})
    assert alone["pi1"][0].peers == both["pi1"][0].peers == ("10.213.0.12", "10.213.0.13")


def test_priorities_stay_within_vrrp_range_with_many_nodes() -> None:
    nodes = [NodeNetwork(f"n{i:03d}", True, f"10.1.{i // 200}.{i % 200 + 1}/16") for i in range(150)]
    plan = plan_announcements({"10.1.9.9": ["web"]}, nodes, [("web", node.name) for node in nodes], {})
    priorities = _priorities(plan, "10.1.9.9")
    assert len(priorities) == 150
    # healthy ones stay above every warming one, however many
    assert min(priorities.values()) == WARMING_PRIORITY + 1 and max(priorities.values()) == FIRST_PRIORITY
    warming = plan_announcements({"10.1.9.9": ["web"]}, nodes, [], {}, [("web", node.name) for node in nodes])
    assert sorted(_priorities(warming, "10.1.9.9").values())[0] == 1
    assert max(_priorities(warming, "10.1.9.9").values()) == WARMING_PRIORITY


@pytest.mark.parametrize(
    ("healthy", "warming", "held", "expected"),
    [
        # a replica without a health result yet: in the election, below every healthy node
        ([("mcp", "pi1")], [("mcp", "pi2")], {}, {"pi1": FIRST_PRIORITY, "pi2": WARMING_PRIORITY}),
        (
            [("mcp", "pi1")],
            [("mcp", "pi2"), ("mcp", "pi3")],
            {"pi1": [VIP]},
            {"pi1": HOLDER_PRIORITY, "pi2": WARMING_PRIORITY, "pi3": WARMING_PRIORITY - 1},
        ),
        # a warming node that holds it (nobody else could) is not made the preferred holder
        (
            [("mcp", "pi1")],
            [("mcp", "pi2")],
            {"pi2": [VIP]},
            {"pi1": FIRST_PRIORITY, "pi2": WARMING_PRIORITY},
        ),
        # a node with a healthy and a warming replica ranks as healthy
        ([("mcp", "pi2")], [("mcp", "pi2")], {}, {"pi2": FIRST_PRIORITY}),
    ],
)
def test_warming_replicas_join_the_election_below_healthy_ones(
    healthy: list, warming: list, held: dict, expected: dict
) -> None:
    assert _priorities(plan_announcements({VIP: ["mcp"]}, NODES, healthy, held, warming)) == expected


@pytest.mark.parametrize(
    ("addresses", "expected"),
    [
        (["10.0.0.200"], {"10.0.0.200": (int.from_bytes(bytes([10, 0, 0, 200]), "big") % 255) + 1}),
        # a /24's addresses never collide
        (["192.168.1.10", "192.168.1.11"], None),
        # 255 apart: the same wish; the later one takes the next free id
        (["10.0.0.1", "10.0.0.0"], None),
    ],
)
def test_router_ids_are_stable_and_distinct(addresses: list[str], expected: dict | None) -> None:
    ids = router_ids(addresses)
    assert sorted(ids) == sorted(addresses)
    assert len(set(ids.values())) == len(addresses)
    assert all(1 <= value <= 255 for value in ids.values())
    if expected is not None:
        assert ids == expected
    assert router_ids(reversed(addresses)) == ids  # the order given does not matter


def test_router_id_collision_goes_to_the_next_free_id() -> None:
    first, second = "10.0.0.5", str(__import__("ipaddress").IPv4Address("10.0.0.5") + 255)
    ids = router_ids([first, second])
    assert ids[second] == ids[first] % 255 + 1
    assert router_ids([first]) == {first: ids[first]}  # the lower one keeps its id


def test_256_addresses_cannot_all_get_an_id() -> None:
    addresses = [f"10.0.{i // 250}.{i % 250 + 1}" for i in range(256)]
    assert len(router_ids(addresses)) == 255


def test_node_interface_finds_the_prefix_of_the_cluster_address() -> None:
    interfaces = [("lo", ["127.0.0.1/8"]), ("eth0", ["fe80::1/64", "10.213.0.11/24"])]
    assert node_interface("10.213.0.11", interfaces) == "10.213.0.11/24"
    assert node_interface("10.9.9.9", interfaces) == ""
    assert node_interface("", interfaces) == ""
    assert node_interface("10.213.0.11", [("eth0", ["garbage"])]) == ""


def test_holders_lists_who_reports_each_address() -> None:
    assert holders([VIP, "10.213.0.201"], {"pi1": [VIP], "pi2": []}) == {VIP: ["pi1"], "10.213.0.201": []}


@pytest.mark.parametrize(
    ("address", "taken", "error"),
    [
        ("10.213.0.200", {}, None),
        ("10.213.0.200", {"10.213.0.200": "stack mcp"}, None),  # its own, again
        ("10.213.0.200", {"10.213.0.200": "stack other"}, "already the virtual address of stack other"),
        ("10.213.0.12", {}, "node pi2's own address"),
        ("10.9.0.5", {}, r"outside the nodes' subnets \(10.213.0.0/24\)"),
        ("10.213.0.255", {}, "broadcast"),
        ("10.213.0.0", {}, "network or broadcast"),
        ("fd00::5", {}, "IPv4"),
        ("127.0.0.5", {}, "not an address a LAN can route"),
        ("224.0.0.18", {}, "not an address a LAN can route"),
        ("not-an-ip", {}, "is not an IP address"),
        ("10.213.0.300", {}, "is not an IP address"),
    ],
)
def test_what_an_operator_may_ask_for(address: str, taken: dict, error: str | None) -> None:
    if error is None:
        assert check_virtual_address("x-picoord.address", address, "stack mcp", NODES, taken) == address
    else:
        with pytest.raises(FieldError, match=error) as raised:
            check_virtual_address("x-picoord.address", address, "stack mcp", NODES, taken)
        assert raised.value.field == "x-picoord.address"


def test_without_any_node_report_only_the_form_is_checked() -> None:
    assert check_virtual_address("f", "192.168.7.7", "stack mcp", [], {}) == "192.168.7.7"


def _spec(name: str, address: str = "", published: int = 8080) -> ServiceSpec:
    ports = (PortMapping(8080, published),)
    return ServiceSpec(name=name, image="mcp:1", ports=ports, address=address, origin=f"services.{name}")


@pytest.mark.parametrize(
    ("existing", "specs", "keeps", "stack", "expected"),
    [
        # a re-deploy that says nothing keeps the stack's address, on its publishing services
        (
            {"mcp": Applied("s", _spec("mcp", VIP))},
            [_spec("mcp"), _spec("db", published=0)],
            True,
            "s",
            {"mcp": VIP, "db": ""},
        ),
        # `none` (keeps False): given up
        ({"mcp": Applied("s", _spec("mcp", VIP))}, [_spec("mcp")], False, "s", {"mcp": ""}),
        # another stack's address is not kept
        ({"web": Applied("t", _spec("web", VIP))}, [_spec("mcp")], True, "s", {"mcp": ""}),
        # its own address again, and an address a removed-from-file service of the stack had
        ({"mcp": Applied("s", _spec("mcp", VIP))}, [_spec("mcp", VIP)], False, "s", {"mcp": VIP}),
    ],
)
def test_stack_addresses_settle_what_a_deploy_means(
    existing: dict, specs: list, keeps: bool, stack: str, expected: dict
) -> None:
    settled = stack_addresses(specs, existing, stack, keeps, NODES)
    assert {spec.name: spec.address for spec in settled} == expected


def test_another_stacks_address_is_refused_naming_the_field() -> None:
    existing = {"web": Applied("t", _spec("web", VIP))}
    spec = replace(_spec("mcp", VIP), address_field="x-picoord.address")
    with pytest.raises(FieldError, match="already the virtual address of stack t") as raised:
        stack_addresses([spec], existing, "s", False, NODES)
    assert raised.value.field == "x-picoord.address"


def test_two_services_without_a_stack_cannot_share_an_address() -> None:
    with pytest.raises(FieldError, match="already the virtual address of service a"):
        stack_addresses([_spec("a", VIP), _spec("b", VIP)], {}, "", False, NODES)


def test_a_stacks_services_share_its_address() -> None:
    settled = stack_addresses([_spec("a", VIP), _spec("b", VIP)], {}, "s", False, NODES)
    assert [spec.address for spec in settled] == [VIP, VIP]


def test_a_node_address_is_refused_at_apply() -> None:
    with pytest.raises(FieldError, match="node pi1's own address"):
        stack_addresses([_spec("a", "10.213.0.11")], {}, "s", False, NODES)


@pytest.mark.parametrize(
    ("vips", "nodes", "expected"),
    [
        ([], NODES, set()),  # no virtual address: VRRP nowhere
        (["10.213.0.200"], NODES, {"pi1", "pi2", "pi3"}),  # adverts go to every node of the subnet
        (["10.213.0.200"], [*NODES, NodeNetwork("far", True, "10.9.0.5/24")], {"pi1", "pi2", "pi3"}),
        (["10.9.0.200"], [*NODES, NodeNetwork("far", True, "10.9.0.5/24")], {"far"}),
        (["10.213.0.200"], [NodeNetwork("pi9", False, "")], set()),  # no address reported
    ],
)
def test_vrrp_passes_between_the_nodes_of_each_vips_subnet(vips, nodes, expected) -> None:
    assert vrrp_nodes(vips, nodes) == expected

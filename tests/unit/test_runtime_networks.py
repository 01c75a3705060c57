"""The agent's side of overlay networks, as pure parts: the create request of a replica on
networks, the network a Swarm manager creates, and what it creates and removes."""

from __future__ import annotations

import pytest

from picoord.agent.runtime.engine import create_request, overlay_network_request
from picoord.agent.runtime.model import LABEL_MANAGED, ContainerSpec, NetworkJoin
from picoord.agent.runtime.supervisor import NetworkPlan, plan_networks, spec_from_wire
from picoord.v1 import workloads_pb2

BASE = ContainerSpec(service="postgres", revision=1, replica="postgres.1", image="postgres:15-alpine")


def test_a_replica_joins_its_first_network_at_create_with_its_aliases() -> None:
    spec = ContainerSpec(
        **{
            **BASE.__dict__,
            "networks": (NetworkJoin("mcp_a", ("postgres", "db")), NetworkJoin("mcp_b", ("postgres",))),
        }
    )
    _, body = create_request(spec)
    assert body["HostConfig"]["NetworkMode"] == "mcp_a"
    assert body["NetworkingConfig"] == {"EndpointsConfig": {"mcp_a": {"Aliases": ["postgres", "db"]}}}
    assert body["HostConfig"]["PortBindings"] == {}  # nothing published


def test_a_replica_without_networks_stays_on_the_default_bridge() -> None:
    _, body = create_request(BASE)
    assert body["HostConfig"]["NetworkMode"] == "default"
    assert "NetworkingConfig" not in body


def test_the_wire_spec_carries_networks_and_aliases() -> None:
    wire = workloads_pb2.ReplicaSpec(
        service="postgres", revision=1, replica="postgres.1", image="postgres:15-alpine",
        networks=[workloads_pb2.NetworkAttachment(name="mcp_a", aliases=["postgres"])],
    )  # fmt: skip
    assert spec_from_wire(wire).networks == (NetworkJoin("mcp_a", ("postgres",)),)


@pytest.mark.parametrize("encrypted", [False, True])
def test_the_manager_creates_an_attachable_labelled_overlay(encrypted: bool) -> None:
    body = overlay_network_request("mcp_mcp-network", encrypted)
    assert body["Name"] == "mcp_mcp-network"
    assert body["Driver"] == "overlay" and body["Attachable"] is True and body["CheckDuplicate"] is True
    assert body["Labels"] == {LABEL_MANAGED: "true"}
    assert body["Options"] == ({"encrypted": ""} if encrypted else {})


@pytest.mark.parametrize(
    ("wanted", "present", "expected"),
    [
        ({}, {}, NetworkPlan((), (), ())),
        ({"a_x": False, "a_y": True}, {}, NetworkPlan((("a_x", False), ("a_y", True)), (), ())),
        ({"a_x": False}, {"a_x": False, "b_old": False}, NetworkPlan((), ("b_old",), ())),
        ({"a_x": True}, {"a_x": False}, NetworkPlan((), (), ("a_x",))),  # Docker cannot change it
        ({}, {"a_x": True}, NetworkPlan((), ("a_x",), ())),  # every stack removed
    ],
)
def test_the_manager_plans_its_networks(
    wanted: dict[str, bool], present: dict[str, bool], expected: NetworkPlan
) -> None:
    assert plan_networks(wanted, present) == expected

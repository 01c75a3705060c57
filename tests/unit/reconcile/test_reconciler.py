"""The reconciler: failover with a grace period, stale replicas, drains, global services."""

from dataclasses import replace

import pytest

from picoord.coordinator.placement.constraints import NodeFacts, parse_constraint
from picoord.coordinator.placement.scheduler import Request
from picoord.coordinator.reconcile.reconciler import (
    DesiredService,
    NodeStatus,
    Plan,
    Reclaim,
    Replace,
    Start,
    Stop,
    global_nodes,
    reconcile,
    visible_replicas,
)
from picoord.coordinator.rollout.policy import START_FIRST, UpdatePolicy
from picoord.coordinator.rollout.replicas import (
    FAILED,
    HEALTH_STARTING,
    PENDING,
    RUNNING,
    STOPPED,
    UNHEALTHY,
    Replica,
)

NOW = 1000.0
MCP = DesiredService(Request("mcp", 3), revision=2)


def up(name, since=0.0, draining=False, arch="aarch64"):
    return NodeStatus(name, True, since, draining, NodeFacts(name, arch=arch))


def down(name, for_seconds):
    return NodeStatus(name, False, NOW - for_seconds, facts=NodeFacts(name, arch="aarch64"))


def rep(rid, node, revision=2, service="mcp", created=100.0, **changes):
    base = Replica(rid, service, node, revision, RUNNING, "healthy", created, created, created)
    return replace(base, **changes)


NODES = [up("pi1"), up("pi2"), up("pi3")]
THREE = [rep("r1", "pi1"), rep("r2", "pi2"), rep("r3", "pi3")]


def test_converged_means_nothing_to_do():
    plan = reconcile([MCP], THREE, NODES, NOW)
    assert plan == Plan()
    assert plan.empty


@pytest.mark.parametrize(
    ("replicas", "starts", "stops"),
    [
        (THREE[:2], [Start("mcp", 2, None, "3 of 3 replicas")], []),
        (THREE[:1], [Start("mcp", 2, None, "2 of 3 replicas"), Start("mcp", 2, None, "3 of 3 replicas")], []),
        ([], [Start("mcp", 2, None, f"{i} of 3 replicas") for i in (1, 2, 3)], []),
        # the newest goes first when there are too many
        ([*THREE, rep("r4", "pi1", created=200.0)], [], [Stop("mcp", "r4", "pi1", "more than 3 replicas")]),
        # other revisions before the current one, then not serving ones
        ([*THREE, rep("r0", "pi2", revision=1)], [], [Stop("mcp", "r0", "pi2", "more than 3 replicas")]),
        (
            [*THREE, rep("r5", "pi2", health=HEALTH_STARTING, created=50.0)],
            [],
            [Stop("mcp", "r5", "pi2", "more than 3 replicas")],
        ),
        # stopping replicas are going: they do not count and are not stopped twice
        ([*THREE[:2], replace(THREE[2], stopping=True)], [Start("mcp", 2, None, "3 of 3 replicas")], []),
        # a stopped replica is history
        ([*THREE[:2], replace(THREE[2], state=STOPPED)], [Start("mcp", 2, None, "3 of 3 replicas")], []),
    ],
)
def test_count_converges(replicas, starts, stops):
    plan = reconcile([MCP], replicas, NODES, NOW)
    assert list(plan.starts) == starts
    assert list(plan.stops) == stops


def test_scale_to_zero_stops_everything():
    plan = reconcile([DesiredService(Request("mcp", 0), 2)], THREE, NODES, NOW)
    assert [s.replica for s in plan.stops] == ["r1", "r2", "r3"]
    assert {s.reason for s in plan.stops} == {"more than 0 replicas"}
    assert plan.starts == ()


def test_dead_and_unhealthy_replicas_are_stopped_and_replaced():
    replicas = [
        rep("r1", "pi1", state=FAILED, failure="exit code 1"),
        rep("r2", "pi2", health=UNHEALTHY, failure="http GET /health: 500"),
        rep("r3", "pi3"),
    ]
    plan = reconcile([MCP], replicas, NODES, NOW)
    assert plan.stops == (
        Stop("mcp", "r1", "pi1", "exited: exit code 1"),
        Stop("mcp", "r2", "pi2", "unhealthy: http GET /health: 500"),
    )
    assert len(plan.starts) == 2


# --- failover: Nomad's disconnect with lost_after = grace ---------------------------------


@pytest.mark.parametrize("away", [0.5, 3.0, 5.0])
def test_an_outage_within_the_grace_period_replaces_nothing(away):
    nodes = [up("pi1"), up("pi2"), down("pi3", away)]
    plan = reconcile([MCP], THREE, nodes, NOW)
    assert plan.empty
    assert plan.wake_at == NOW - away + 5.0  # look again when the grace period ends


def test_an_unhealthy_replica_on_an_unreachable_node_is_left_alone_within_grace():
    replicas = [*THREE[:2], replace(THREE[2], health=UNHEALTHY)]
    plan = reconcile([MCP], replicas, [up("pi1"), up("pi2"), down("pi3", 2)], NOW)
    assert plan.empty


@pytest.mark.parametrize("away", [5.01, 6.0, 3600.0])
def test_a_node_lost_longer_than_grace_has_its_replicas_replaced(away):
    nodes = [up("pi1"), up("pi2"), down("pi3", away)]
    plan = reconcile([MCP], THREE, nodes, NOW)
    lost = f"node pi3 lost {away:.0f} s ago (grace 5 s)"
    assert plan.replaces == (Replace("mcp", "r3", "pi3", lost),)
    assert plan.starts == (Start("mcp", 2, None, f"replaces r3 ({lost})"),)
    assert plan.stops == ()
    assert plan.wake_at is None


def test_grace_is_configurable():
    nodes = [up("pi1"), up("pi2"), down("pi3", 8)]
    assert reconcile([MCP], THREE, nodes, NOW, grace=10).empty
    assert reconcile([MCP], THREE, nodes, NOW, grace=7).replaces


def test_a_node_not_in_the_inventory_is_lost():
    plan = reconcile([MCP], THREE, NODES[:2], NOW)
    assert plan.replaces == (Replace("mcp", "r3", "pi3", "node pi3 is not in the inventory"),)
    assert len(plan.starts) == 1


def test_a_replaced_replica_is_not_replaced_again():
    replicas = [*THREE[:2], replace(THREE[2], replaced=True), rep("r4", "pi1", state=PENDING)]
    plan = reconcile([MCP], replicas, [up("pi1"), up("pi2"), down("pi3", 60)], NOW)
    assert plan.empty


def test_a_returning_node_has_its_stale_replicas_stopped():
    replicas = [*THREE[:2], replace(THREE[2], replaced=True), rep("r4", "pi1")]
    plan = reconcile([MCP], replicas, [up("pi1"), up("pi2"), up("pi3", since=NOW - 1)], NOW)
    assert plan.stops == (Stop("mcp", "r3", "pi3", "replaced while node pi3 was away"),)
    assert plan.starts == () and plan.reclaims == ()


def test_a_returning_node_keeps_its_replica_when_no_replacement_ran():
    replicas = [*THREE[:2], replace(THREE[2], replaced=True)]  # nothing fitted elsewhere
    plan = reconcile([MCP], replicas, [up("pi1"), up("pi2"), up("pi3", since=NOW - 1)], NOW)
    assert plan.reclaims == (Reclaim("mcp", "r3", "pi3", "node pi3 is back and no replacement runs"),)
    assert plan.stops == () and plan.starts == ()


def test_a_replaced_replica_on_a_still_lost_node_waits():
    replicas = [*THREE[:2], replace(THREE[2], replaced=True), rep("r4", "pi1")]
    assert reconcile([MCP], replicas, [up("pi1"), up("pi2"), down("pi3", 1)], NOW).empty


class Cluster:
    """Applies plans the way the shell does; agents on lost nodes keep running their replicas."""

    def __init__(self, replicas, nodes):
        self.replicas = list(replicas)
        self.nodes = {node.name: node for node in nodes}
        self.ids = 100

    def apply(self, plan, now):
        marks = {r.replica for r in plan.replaces}
        reclaims = {r.replica for r in plan.reclaims}
        stops = {s.replica for s in plan.stops}
        kept = []
        for replica in self.replicas:
            if replica.id in stops:
                continue  # the agent stopped it
            if replica.id in marks:
                replica = replace(replica, replaced=True)
            if replica.id in reclaims:
                replica = replace(replica, replaced=False)
            kept.append(replica)
        for start in plan.starts:
            self.ids += 1
            node = (
                start.node
                or min(
                    (n for n in self.nodes.values() if n.connected and not n.draining),
                    key=lambda n: (sum(r.node == n.name for r in kept), n.name),
                ).name
            )
            kept.append(rep(f"r{self.ids}", node, start.revision, start.service, created=now))
        self.replicas = kept

    def running(self, service="mcp"):
        return sorted(r.node for r in self.replicas if r.service == service and r.active)


@pytest.mark.parametrize(("outage", "replaced"), [(3.0, False), (4.9, False), (7.0, True), (60.0, True)])
def test_failover_converges_to_the_desired_count(outage, replaced):
    cluster = Cluster(THREE, NODES)
    now = NOW
    cluster.nodes["pi3"] = NodeStatus("pi3", False, now)
    while now < NOW + outage:
        cluster.apply(reconcile([MCP], cluster.replicas, cluster.nodes.values(), now), now)
        now += 0.5
    cluster.nodes["pi3"] = NodeStatus("pi3", True, now)
    for _ in range(3):
        cluster.apply(reconcile([MCP], cluster.replicas, cluster.nodes.values(), now), now)
        now += 0.5
    assert len(cluster.running()) == 3
    assert ("pi3" in cluster.running()) is not replaced
    assert reconcile([MCP], cluster.replicas, cluster.nodes.values(), now).empty


# --- unknown services ---------------------------------------------------------------------


def test_replicas_of_an_unknown_service_are_stopped_where_reachable():
    replicas = [*THREE, rep("x1", "pi1", service="gone"), rep("x2", "pi3", service="gone")]
    plan = reconcile([MCP], replicas, [up("pi1"), up("pi2"), down("pi3", 2)], NOW)
    assert plan.stops == (Stop("gone", "x1", "pi1", "service gone no longer exists"),)


def test_with_no_services_everything_stops():
    plan = reconcile([], THREE, NODES, NOW)
    assert {s.replica for s in plan.stops} == {"r1", "r2", "r3"}


# --- drain --------------------------------------------------------------------------------


def test_drain_stop_first_stops_then_refills_elsewhere():
    nodes = [up("pi1"), up("pi2"), up("pi3", draining=True)]
    first = reconcile([MCP], THREE, nodes, NOW)
    assert first.stops == (Stop("mcp", "r3", "pi3", "node pi3 is draining"),)
    assert first.starts == ()
    second = reconcile([MCP], [*THREE[:2], replace(THREE[2], stopping=True)], nodes, NOW)
    assert second.starts == (Start("mcp", 2, None, "3 of 3 replicas"),)
    assert second.stops == ()


def test_drain_start_first_adds_elsewhere_then_stops_once_healthy():
    service = DesiredService(Request("mcp", 3), 2, UpdatePolicy(order=START_FIRST))
    nodes = [up("pi1"), up("pi2"), up("pi3", draining=True)]
    first = reconcile([service], THREE, nodes, NOW)
    assert first.starts == (Start("mcp", 2, None, "moving off a draining node"),)
    assert first.stops == ()
    starting = rep("r4", "pi1", health=HEALTH_STARTING, created=NOW)
    assert reconcile([service], [*THREE, starting], nodes, NOW).empty
    healthy = reconcile([service], [*THREE, replace(starting, health="healthy")], nodes, NOW)
    assert healthy.stops == (Stop("mcp", "r3", "pi3", "node pi3 is draining"),)
    assert healthy.starts == ()


def test_drain_stays_within_max_unavailable():
    replicas = [rep("r1", "pi1"), rep("r2", "pi3"), rep("r3", "pi3")]
    nodes = [up("pi1"), up("pi2"), up("pi3", draining=True)]
    plan = reconcile([MCP], replicas, nodes, NOW)  # stop-first, parallelism 1: one at a time
    assert [s.replica for s in plan.stops] == ["r2"]
    wide = DesiredService(Request("mcp", 3), 2, UpdatePolicy(parallelism=2))
    assert len(reconcile([wide], replicas, nodes, NOW).stops) == 2


def test_an_unavailable_replica_on_a_draining_node_goes_at_once():
    starting = {"health": HEALTH_STARTING}
    replicas = [rep("r1", "pi1"), rep("r2", "pi2", **starting), rep("r3", "pi3", **starting)]
    nodes = [up("pi1"), up("pi2"), up("pi3", draining=True)]
    plan = reconcile([MCP], replicas, nodes, NOW)
    assert plan.stops == (Stop("mcp", "r3", "pi3", "node pi3 is draining"),)


# --- global services ----------------------------------------------------------------------

EXPORTER = DesiredService(
    Request("exporter", global_mode=True, constraints=(parse_constraint("c", "node.arch == arm64"),)), 1
)


def test_global_nodes():
    nodes = [up("pi1"), up("pi2", draining=True), up("desk", arch="x86_64"), down("pi4", 1), up("pi0")]
    assert global_nodes(EXPORTER, nodes) == ("pi0", "pi1")


def test_global_one_replica_per_matching_ready_node():
    nodes = [up("pi1"), up("pi2"), up("pi3", draining=True), up("desk", arch="x86_64"), down("pi5", 2)]
    replicas = [
        rep("e1", "pi1", 1, "exporter"),
        rep("e1b", "pi1", 1, "exporter", created=300.0),
        rep("e3", "pi3", 1, "exporter"),
        rep("e5", "pi5", 1, "exporter"),
    ]
    plan = reconcile([EXPORTER], replicas, nodes, NOW)
    assert plan.starts == (Start("exporter", 1, "pi2", "global service on node pi2"),)
    assert plan.stops == (
        Stop("exporter", "e1b", "pi1", "a second replica on node pi1"),
        Stop("exporter", "e3", "pi3", "node pi3 is draining or no longer matches"),
    )
    assert plan.replaces == ()


def test_global_replicas_of_a_lost_node_are_not_moved_and_return_with_it():
    replicas = [rep("e1", "pi1", 1, "exporter"), rep("e2", "pi2", 1, "exporter")]
    lost = reconcile([EXPORTER], replicas, [up("pi1"), down("pi2", 60)], NOW)
    assert lost.empty
    back = reconcile([EXPORTER], replicas, [up("pi1"), up("pi2", since=NOW)], NOW)
    assert back.empty


# --- a service that is rolling ------------------------------------------------------------


def test_a_rolling_service_is_left_to_the_planner_except_failover():
    rolling = replace(MCP, rolling=True)
    mixed = [rep("r1", "pi1", revision=1), rep("r2", "pi2"), rep("r9", "pi2", created=NOW)]
    assert reconcile([rolling], mixed, NODES, NOW).empty  # surplus and revisions: the planner's
    lost = reconcile([rolling], THREE, [up("pi1"), up("pi2"), down("pi3", 9)], NOW)
    assert [r.replica for r in lost.replaces] == ["r3"]
    assert lost.starts == ()  # the planner sees the gap (visible_replicas) and refills
    stale = [*THREE[:2], replace(THREE[2], replaced=True)]
    back = reconcile([rolling], stale, NODES, NOW)
    assert back.stops == (Stop("mcp", "r3", "pi3", "replaced while node pi3 was away"),)


def test_replicas_of_another_revision_ask_for_a_rollout():
    replicas = [rep("r1", "pi1", revision=1), *THREE[1:]]
    plan = reconcile([MCP], replicas, NODES, NOW)
    assert plan.rollouts_needed == ("mcp",)
    assert plan.empty


def test_visible_replicas_hide_lost_and_replaced():
    replicas = [*THREE[:2], replace(THREE[2], replaced=True), rep("r4", "pi4")]
    nodes = [up("pi1"), down("pi2", 2), up("pi3"), down("pi4", 30)]
    assert [r.id for r in visible_replicas(replicas, nodes, NOW)] == ["r1", "r2"]

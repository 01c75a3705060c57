"""Properties of the reconciler over random clusters: what it may never do, whatever the input."""

from hypothesis import given, settings
from hypothesis import strategies as st

from picoord.common.limits import DISCONNECT_GRACE as GRACE_SECONDS
from picoord.coordinator.placement.scheduler import Request
from picoord.coordinator.reconcile.reconciler import DesiredService, NodeStatus, reconcile
from picoord.coordinator.rollout.policy import START_FIRST, UpdatePolicy, validate_update_policy
from picoord.coordinator.rollout.replicas import FAILED, HEALTHS, PENDING, RUNNING, STARTING, Replica

NOW = 1000.0
NAMES = ("pi1", "pi2", "pi3", "pi4", "pi5")

node_statuses = st.builds(
    NodeStatus,
    name=st.sampled_from(NAMES),
    connected=st.booleans(),
    since=st.sampled_from([0.0, NOW - 20, NOW - GRACE_SECONDS, NOW - 3, NOW]),
    draining=st.booleans(),
)
replicas = st.builds(
    Replica,
    id=st.uuids().map(lambda u: u.hex[:8]),
    service=st.sampled_from(["mcp", "mcp", "db", "gone"]),
    node=st.sampled_from([*NAMES, "removed"]),
    revision=st.sampled_from([1, 2]),
    state=st.sampled_from([PENDING, STARTING, RUNNING, RUNNING, FAILED]),
    health=st.sampled_from(HEALTHS),
    created_at=st.floats(0, NOW),
    stopping=st.booleans(),
    replaced=st.booleans(),
)
policies = st.sampled_from(
    [
        UpdatePolicy(),
        UpdatePolicy(order=START_FIRST),
        UpdatePolicy(parallelism=2),
        UpdatePolicy(max_surge="50%"),
    ]
)


def lost(node, now):
    return node is None or (not node.connected and now - node.since > GRACE_SECONDS)


@settings(max_examples=300, deadline=None)
@given(
    nodes=st.lists(node_statuses, max_size=5, unique_by=lambda n: n.name),
    actual=st.lists(replicas, max_size=12, unique_by=lambda r: r.id),
    count=st.integers(0, 5),
    policy=policies,
    rolling=st.booleans(),
)
def test_what_the_reconciler_never_does(nodes, actual, count, policy, rolling):
    desired = [
        DesiredService(Request("mcp", count), 2, validate_update_policy(policy), rolling),
        DesiredService(Request("db", 1), 1),
    ]
    plan = reconcile(desired, actual, nodes, NOW)
    by_node = {node.name: node for node in nodes}
    by_id = {replica.id: replica for replica in actual}
    # never a stop that cannot be delivered, nor one already asked for
    for stop in plan.stops:
        replica = by_id[stop.replica]
        assert by_node.get(replica.node) is not None and by_node[replica.node].connected
        assert not replica.stopping
    # never a replacement for a replica whose node is within its grace period or connected
    for mark in plan.replaces:
        assert lost(by_node.get(by_id[mark.replica].node), NOW)
        assert not by_id[mark.replica].replaced
    # a rolling service's count is the planner's: no starts for it
    if rolling:
        assert not [start for start in plan.starts if start.service == "mcp"]
    # a replica is stopped once per plan
    assert len({stop.replica for stop in plan.stops}) == len(plan.stops)
    # the plan is a function of its inputs
    assert reconcile(desired, list(reversed(actual)), list(reversed(nodes)), NOW) == plan


@settings(max_examples=300, deadline=None)
@given(
    nodes=st.lists(node_statuses, min_size=1, max_size=5, unique_by=lambda n: n.name),
    actual=st.lists(replicas, max_size=12, unique_by=lambda r: r.id),
    count=st.integers(0, 5),
)
def test_the_count_reaches_the_desired_count(nodes, actual, count):
    """Without drains, and with every replica allowed down at once: after the plan, what
    counts plus what starts is the desired count (beyond it only by the unreachable)."""
    nodes = [NodeStatus(n.name, n.connected, n.since) for n in nodes]
    service = DesiredService(Request("mcp", count), 2, validate_update_policy(UpdatePolicy(parallelism=0)))
    plan = reconcile([service], actual, nodes, NOW)
    by_node = {node.name: node for node in nodes}
    stopped = {stop.replica for stop in plan.stops}
    reclaimed = {reclaim.replica for reclaim in plan.reclaims}
    counted = [
        r
        for r in actual
        if r.service == "mcp"
        and r.state in (PENDING, STARTING, RUNNING)
        and not r.stopping
        and (not r.replaced or r.id in reclaimed)
        and not lost(by_node.get(r.node), NOW)
        and r.id not in stopped
    ]
    after = len(counted) + len([s for s in plan.starts if s.service == "mcp"])
    # a surplus replica on a node within its grace period cannot be reached to be stopped yet
    unreachable = [r for r in counted if not by_node[r.node].connected] if count < after else []
    assert count <= after <= count + len(unreachable)

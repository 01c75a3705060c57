"""Planner and reconciler together, as the reconcile loop runs them: a node lost mid-rollout
and a coordinator restart mid-rollout, with the bounds checked at every tick."""

from dataclasses import replace

import pytest

from picoord.coordinator.placement.scheduler import Request
from picoord.coordinator.reconcile.reconciler import DesiredService, NodeStatus, reconcile, visible_replicas
from picoord.coordinator.rollout.planner import COMPLETE, begin, step
from picoord.coordinator.rollout.policy import START_FIRST, UpdatePolicy, validate_update_policy
from picoord.coordinator.rollout.replicas import HEALTH_STARTING, HEALTHY, PENDING, RUNNING, STARTING, Replica

NOW = 1000.0
NODES = ("pi1", "pi2", "pi3", "pi4")


class Loop:
    """The imperative shell in miniature: store, agents, and the reconcile loop's order:
    reconciler first (failover), then the planner over the replicas it may count."""

    def __init__(self, policy, replicas=3):
        self.now = NOW
        self.policy = validate_update_policy(policy)
        self.rollout = begin("mcp", 2, 1, replicas, self.policy, NOW)
        self.records = [
            Replica(f"old{i}", "mcp", NODES[i - 1], 1, RUNNING, HEALTHY, 0.0, 0.0, 0.0)
            for i in range(1, replicas + 1)
        ]
        self.nodes = {name: NodeStatus(name, True, 0.0) for name in NODES}
        self.frozen: set[str] = set()  # nodes whose agents are away: nothing there moves
        # replicas caught on a node when it went away: out of reach, so out of the bounds;
        # they are written off after the grace period and stopped when the node returns
        self.stranded: set[str] = set()
        self.next_id = 0
        self.max_present = 0
        self.min_available = replicas

    def tick(self):
        rolling = not self.rollout.finished
        service = DesiredService(Request("mcp", self.rollout.replicas), 2, self.policy, rolling=rolling)
        nodes = list(self.nodes.values())
        plan = reconcile([service], self.records, nodes, self.now)
        marked = {r.replica for r in plan.replaces}
        reclaimed = {r.replica for r in plan.reclaims}
        self.records = [
            replace(r, replaced=r.id in marked or (r.replaced and r.id not in reclaimed))
            for r in self.records
        ]
        self._stop({s.replica for s in plan.stops})
        self._start(plan.starts)
        result = step(self.rollout, visible_replicas(self.records, nodes, self.now), self.now)
        self.rollout = result.rollout
        self._stop({s.replica for s in result.stops})
        self._start(result.starts)
        self._measure(nodes)
        self.now += 1.0
        self.records = [self._agent(r) for r in self.records]

    def _start(self, starts):
        for start in starts:
            self.next_id += 1
            node = min(
                (n for n in NODES if self.nodes[n].connected),
                key=lambda n: (sum(r.node == n and r.active for r in self.records), n),
            )
            self.records.append(
                Replica(
                    f"new{self.next_id}", "mcp", node, start.revision, PENDING, "unknown", *(self.now,) * 3
                )
            )

    def _stop(self, ids):
        self.records = [replace(r, stopping=True) if r.id in ids else r for r in self.records]

    def _measure(self, nodes):
        visible = visible_replicas(self.records, nodes, self.now)
        counted = [r for r in visible if r.active and r.id not in self.stranded]
        self.max_present = max(self.max_present, len(counted))
        self.min_available = min(self.min_available, sum(r.available() for r in counted))

    def _agent(self, replica):
        if replica.node in self.frozen:
            return replica
        if replica.stopping:
            return replace(replica, state="stopped")
        if replica.state == PENDING:
            return replace(replica, state=STARTING, since=self.now)
        if replica.state == STARTING:
            return replace(
                replica, state=RUNNING, health=HEALTH_STARTING, since=self.now, health_since=self.now
            )
        if replica.health == HEALTH_STARTING:
            return replace(replica, health=HEALTHY, health_since=self.now)
        return replica

    def lose(self, node):
        self.nodes[node] = NodeStatus(node, False, self.now)
        self.frozen.add(node)
        self.stranded |= {r.id for r in self.records if r.node == node and r.active}

    def restore(self, node):
        self.nodes[node] = NodeStatus(node, True, self.now)
        self.frozen.discard(node)

    def running(self):
        return [r for r in self.records if r.state in (PENDING, STARTING, RUNNING) and not r.stopping]


@pytest.mark.parametrize(
    "policy", [UpdatePolicy(), UpdatePolicy(order=START_FIRST), UpdatePolicy(parallelism=2)]
)
@pytest.mark.parametrize("lost_at", [0, 2, 5, 9])
def test_a_node_lost_mid_rollout(policy, lost_at):
    loop = Loop(policy)
    for _ in range(lost_at):
        loop.tick()
    loop.lose("pi3")
    for _ in range(60):
        loop.tick()
    assert loop.rollout.status == COMPLETE
    assert loop.nodes["pi3"].connected is False
    loop.restore("pi3")
    for _ in range(3):
        loop.tick()
    running = loop.running()
    assert len(running) == 3  # the stale replicas of pi3 were stopped on its return
    assert {r.revision for r in running} == {2}
    surge, unavailable = loop.policy.bounds(3)
    assert loop.max_present <= 3 + surge
    # the lost replica stopped serving on its own; beyond that the bound holds
    assert loop.min_available >= 3 - unavailable - 1


def test_a_short_outage_mid_rollout_replaces_nothing():
    loop = Loop(UpdatePolicy())
    loop.tick()
    loop.lose("pi2")
    for _ in range(4):
        loop.tick()
    loop.restore("pi2")
    for _ in range(60):
        loop.tick()
    assert loop.rollout.status == COMPLETE
    assert not any(r.replaced for r in loop.records)
    assert len(loop.running()) == 3


@pytest.mark.parametrize("restart_at", [1, 3, 4, 7, 12])
def test_a_coordinator_restart_mid_rollout_never_exceeds_the_bounds(restart_at):
    loop = Loop(UpdatePolicy(order=START_FIRST, parallelism=2), replicas=4)
    for _ in range(restart_at):
        loop.tick()
    # the new coordinator reads the stored rollout and records; in-memory state is gone
    stored_rollout, stored_records = loop.rollout, list(loop.records)
    loop.rollout, loop.records = stored_rollout, stored_records
    for _ in range(80):
        loop.tick()
    assert loop.rollout.status == COMPLETE
    assert loop.max_present <= 4 + 2
    assert loop.min_available >= 4

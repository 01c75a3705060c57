"""A tiny stand-in for the shell and the agents, to drive the rollout planner over time.

It does what the real shell promises the planner: records each start as a pending replica
and each stop as stopping before the next call. The agents then move replicas one state
per tick: pending -> starting -> running (health starting) -> the revision's outcome.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field, replace

from picoord.coordinator.rollout.planner import Rollout, Step, step
from picoord.coordinator.rollout.replicas import (
    FAILED,
    HEALTH_STARTING,
    HEALTHY,
    PENDING,
    RUNNING,
    STARTING,
    UNHEALTHY,
    UNKNOWN,
    Replica,
)

HEALTHY_OUTCOME = "healthy"
UNHEALTHY_OUTCOME = "unhealthy"
EXITS = "exits"
RESTARTS = "restarts"
HANGS = "hangs"  # stays pending (an image pull that never ends)


def running(rid, revision, node="pi1", at=0.0, service="mcp", health=HEALTHY):
    return Replica(rid, service, node, revision, RUNNING, health, created_at=at, since=at, health_since=at)


@dataclass
class Simulation:
    rollout: Rollout
    replicas: list[Replica]
    now: float
    outcomes: dict[int, str] = field(default_factory=dict)
    nodes: tuple[str, ...] = ("pi1", "pi2", "pi3", "pi4", "pi5")
    tick: float = 1.0
    steps: list[Step] = field(default_factory=list)
    _ids: itertools.count = field(default_factory=lambda: itertools.count(1))
    max_present: int = 0
    min_available: int = 10**9

    def call(self) -> Step:
        result = step(self.rollout, self.replicas, self.now)
        self.steps.append(result)
        self.rollout = result.rollout
        stopped = {stop.replica for stop in result.stops}
        self.replicas = [replace(r, stopping=True) if r.id in stopped else r for r in self.replicas]
        for start in result.starts:
            node = start.node or self._least_loaded()
            rid = f"{self.rollout.service}-r{start.revision}-{next(self._ids)}"
            self.replicas.append(
                Replica(
                    rid,
                    self.rollout.service,
                    node,
                    start.revision,
                    PENDING,
                    UNKNOWN,
                    self.now,
                    self.now,
                    self.now,
                )
            )
        self._observe()
        return result

    def _least_loaded(self) -> str:
        counts = {node: 0 for node in self.nodes}
        for replica in self.replicas:
            if replica.active and replica.node in counts:
                counts[replica.node] += 1
        return min(self.nodes, key=lambda node: (counts[node], node))

    def _observe(self) -> None:
        mine = [r for r in self.replicas if r.service == self.rollout.service and r.active]
        self.max_present = max(self.max_present, len(mine))
        available = sum(r.available(self.rollout.has_health_check) for r in mine)
        self.min_available = min(self.min_available, available)

    def advance(self) -> None:
        """One tick of the agents."""
        self.now += self.tick
        moved = []
        for replica in self.replicas:
            if replica.stopping:
                continue  # gone: the agent stopped it and the shell dropped it
            moved.append(self._progress(replica))
        self.replicas = moved
        self._observe()

    def _progress(self, replica: Replica) -> Replica:
        outcome = self.outcomes.get(replica.revision, HEALTHY_OUTCOME)
        now = self.now
        if replica.state == PENDING:
            if outcome == HANGS:
                return replica
            return replace(replica, state=STARTING, since=now)
        if replica.state == STARTING:
            if outcome == EXITS:
                return replace(replica, state=FAILED, since=now, failure="exit code 1")
            health = HEALTH_STARTING if self.rollout.has_health_check else UNKNOWN
            return replace(replica, state=RUNNING, since=now, health=health, health_since=now)
        if replica.state == RUNNING and replica.health == HEALTH_STARTING:
            if outcome == UNHEALTHY_OUTCOME:
                return replace(replica, health=UNHEALTHY, health_since=now, failure="http GET /health: 500")
            if outcome == RESTARTS:
                return replace(replica, restarts=replica.restarts + 1, failure="exit code 137")
            return replace(replica, health=HEALTHY, health_since=now)
        return replica

    def run(self, limit: int = 400) -> Rollout:
        for _ in range(limit):
            self.call()
            if self.rollout.finished or self.rollout.status == "paused":
                return self.rollout
            self.advance()
        raise AssertionError(f"no end after {limit} steps: {self.steps[-1]}")

    def revisions(self) -> list[int]:
        return sorted(r.revision for r in self.replicas if r.active and r.service == self.rollout.service)

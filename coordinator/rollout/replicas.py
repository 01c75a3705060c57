"""A replica as the coordinator knows it: what an agent reported, plus what was asked of it.

One definition shared by the rollout planner and the reconciler. `stopping` is the
coordinator's own record that it asked for a stop the agent has not confirmed yet, the
way swarmkit keeps a task's desired state beside its observed state: counting such a
replica as still present is what keeps a restarted coordinator within the bounds.
`replaced` is its record that a replica on a lost node has a replacement elsewhere, so
the replica is stopped, not counted, when its node comes back.
"""

from __future__ import annotations

from dataclasses import dataclass

from picoord.common.vocabulary import ReplicaHealth, ReplicaState

# The states the planner and the reconciler reason on (controller/observed.py classifies
# what an agent reports into these), and the healths; each is the vocabulary's member.
PENDING = ReplicaState.PENDING  # recorded by the coordinator, not yet created by the agent (or pulling)
STARTING = ReplicaState.STARTING
RUNNING = ReplicaState.RUNNING
FAILED = ReplicaState.FAILED
STOPPED = ReplicaState.STOPPED
STATES = (PENDING, STARTING, RUNNING, FAILED, STOPPED)
ACTIVE_STATES = (PENDING, STARTING, RUNNING)

UNKNOWN = ReplicaHealth.UNKNOWN
NO_CHECK = ReplicaHealth.NONE  # read like UNKNOWN: a replica without a health check
HEALTH_STARTING = ReplicaHealth.STARTING
HEALTHY = ReplicaHealth.HEALTHY
UNHEALTHY = ReplicaHealth.UNHEALTHY
HEALTHS = (UNKNOWN, NO_CHECK, HEALTH_STARTING, HEALTHY, UNHEALTHY)


@dataclass(frozen=True)
class Replica:
    id: str
    service: str
    node: str
    revision: int
    state: ReplicaState = PENDING  # one of STATES
    health: ReplicaHealth = UNKNOWN
    created_at: float = 0.0
    since: float = 0.0  # when `state` last changed
    health_since: float = 0.0  # when `health` last changed
    restarts: int = 0  # restarts by the agent's restart policy since the replica was created
    stopping: bool = False  # the coordinator asked for a stop not yet confirmed
    replaced: bool = False  # replaced elsewhere while its node was lost: stopped when it returns
    failure: str = ""  # the agent's words for the last failure: exit code, failed check output
    slot: str = ""  # the place it fills (1..replicas; the node of a global service): keys its start backoff

    @property
    def active(self) -> bool:
        """Present on its node, or about to be: it holds a place within the bounds."""
        return self.state in ACTIVE_STATES

    def available(self, has_health_check: bool = True) -> bool:
        """Serving: running and healthy (running is enough without a health check)."""
        if self.state != RUNNING or self.stopping:
            return False
        return self.health == HEALTHY or (not has_health_check and self.health in (UNKNOWN, NO_CHECK))

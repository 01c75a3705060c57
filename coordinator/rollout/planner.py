"""The rolling update as a step function: (rollout, observed replicas, now) -> decisions.

Like swarmkit's updater, but with no goroutines, timers or store: every call looks at what
is true now and says what to stop, how many to start (the caller places them) and what
to store, so a restarted coordinator resumes from the stored rollout and the replicas
the agents report, and reaches the same decision. The caller records every replica it
starts as `pending` before dispatching it, and every stop as `stopping`, which is what
keeps the counts honest between two calls.

The model is swarmkit's: `parallelism` workers. A worker is busy while its new replica is
not yet healthy, then for `delay` after it became healthy, and while an old replica it
stopped has not gone yet. A free worker, with `stop-first`, stops an old replica if the
availability bound allows, otherwise starts a new one into surge room; with
`start-first` the other way round. A slot vacated by a stop is refilled as soon as the
stop is confirmed (so a first deploy starts every replica at once). Two bounds hold at
every step, counting from what is observed plus what was asked:
    present (pending, starting, running, including stopping) <= replicas + max_surge
    available (running, healthy, not stopping)               >= replicas - max_unavailable
(the only way below the second is a replica failing by itself). With start-first, an old
replica made surplus by a new one is stopped only once every new replica is healthy.
Replicas marked `replaced` (their node is lost, see the reconciler) are not counted: the
planner refills their slots.

A replica of the target revision started by this rollout fails when it exits, reports
unhealthy, is restarted by its restart policy, or is not healthy `ready_deadline`
seconds after it was recorded. This is stricter than Swarm, which only watches during
the monitor window: the rollout is not complete until every new replica has been
healthy for `monitor` seconds, and any failure until then counts (a replica of the
target revision that predates the rollout is only cleaned up). When failures exceed
`max_failure_ratio` of the replicas (ratio 0: the first failure), the failure action
applies: `rollback` makes the previous revision the target and rolls back within the
same bounds, naming each failure (which replica, which node, what failed); `pause`
stops moving until an operator resumes; `continue` replaces the failed replica and
goes on. A failure while rolling back pauses (a rollback is never rolled back).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, replace

from picoord.common.vocabulary import RolloutStatus
from picoord.coordinator.rollout.policy import PAUSE, ROLLBACK, START_FIRST, UpdatePolicy
from picoord.coordinator.rollout.replicas import FAILED, STOPPED, UNHEALTHY, Replica

# The statuses a stored rollout takes (the planner's names for them).
PROGRESSING = RolloutStatus.PROGRESSING
PAUSED = RolloutStatus.PAUSED
COMPLETE = RolloutStatus.COMPLETE
FAILED_ROLLOUT = RolloutStatus.FAILED  # failed with nothing to roll back to
STATUSES = (PROGRESSING, PAUSED, COMPLETE, FAILED_ROLLOUT)

# What a step is doing, beside the stored status.
UPDATING = "updating"
WAITING_FOR_HEALTH = "waiting for health"
MONITORING = "monitoring"
DELAYING = "delaying"
WAITING_FOR_ROOM = "waiting for room"
PHASES = (UPDATING, WAITING_FOR_HEALTH, MONITORING, DELAYING, WAITING_FOR_ROOM, *STATUSES)

READY_DEADLINE = 300.0  # seconds from recorded to healthy: an image pull on a Pi can take minutes


@dataclass(frozen=True)
class Failure:
    replica: str
    node: str
    revision: int
    what: str

    def __str__(self) -> str:
        return f"replica {self.replica} on {self.node} (revision {self.revision}) {self.what}"


@dataclass(frozen=True)
class Rollout:
    """What the store keeps about one service's rollout; every field is plain data."""

    service: str
    revision: int  # the revision this rollout brings
    previous: int | None  # the revision it replaces (the rollback target); None on first deploy
    replicas: int  # desired count (replicated mode)
    policy: UpdatePolicy
    started_at: float = 0.0
    has_health_check: bool = True
    global_nodes: tuple[str, ...] | None = None  # global mode: one replica on each of these nodes
    status: RolloutStatus = PROGRESSING  # one of STATUSES
    rolling_back: bool = False
    phase_started_at: float = 0.0  # when this rollout, or its rollback, began
    failures: tuple[Failure, ...] = ()
    tolerated_failures: int = 0  # failures already counted when the phase began or was resumed
    message: str = ""

    @property
    def target(self) -> int:
        if self.rolling_back and self.previous is not None:
            return self.previous
        return self.revision

    @property
    def desired_count(self) -> int:
        return len(self.global_nodes) if self.global_nodes is not None else self.replicas

    @property
    def state(self) -> RolloutStatus:
        """For people: the stored status, with rolling back and rolled back told apart."""
        if self.rolling_back and self.status == PROGRESSING:
            return RolloutStatus.ROLLING_BACK
        if self.rolling_back and self.status == COMPLETE:
            return RolloutStatus.ROLLED_BACK
        return self.status

    @property
    def finished(self) -> bool:
        return self.status in (COMPLETE, FAILED_ROLLOUT)


@dataclass(frozen=True)
class StopReplica:
    replica: str
    node: str
    reason: str


@dataclass(frozen=True)
class StartReplica:
    revision: int
    node: str | None = None  # global mode names the node; otherwise the caller places it
    reason: str = ""


@dataclass(frozen=True)
class Step:
    rollout: Rollout  # store this
    stops: tuple[StopReplica, ...] = ()
    starts: tuple[StartReplica, ...] = ()
    waiting: str = ""  # why nothing more moves now
    wake_at: float | None = None  # call again by then even if nothing is reported
    events: tuple[str, ...] = ()  # lines for the operator: failures, rollback, completion
    phase: str = ""  # what the rollout is doing: one of PHASES, for a live view


def begin(
    service: str,
    revision: int,
    previous: int | None,
    replicas: int,
    policy: UpdatePolicy,
    now: float,
    has_health_check: bool = True,
    global_nodes: Sequence[str] | None = None,
) -> Rollout:
    nodes = tuple(sorted(global_nodes)) if global_nodes is not None else None
    return Rollout(
        service,
        revision,
        previous,
        replicas,
        policy,
        started_at=now,
        has_health_check=has_health_check,
        global_nodes=nodes,
        phase_started_at=now,
    )


def pause(rollout: Rollout, reason: str = "paused by the operator") -> Rollout:
    if rollout.status != PROGRESSING:
        return rollout
    return replace(rollout, status=PAUSED, message=reason)


def resume(rollout: Rollout) -> Rollout:
    """Go on; the failures seen so far are forgiven (they were the reason to pause)."""
    if rollout.status != PAUSED:
        return rollout
    return replace(rollout, status=PROGRESSING, tolerated_failures=len(rollout.failures), message="")


def _healthy_at(replica: Replica, rollout: Rollout) -> float:
    return replica.health_since if rollout.has_health_check else replica.since


def _failure(replica: Replica, rollout: Rollout, now: float, ready_deadline: float) -> str:
    """What went wrong with a replica this rollout started, or ""."""
    detail = f": {replica.failure}" if replica.failure else ""
    if replica.state == FAILED:
        return f"exited{detail}"
    if replica.state == STOPPED:
        return ""
    if replica.health == UNHEALTHY:
        return f"failed its health check{detail}"
    if replica.restarts > 0:
        return f"was restarted {replica.restarts} time{'s' if replica.restarts > 1 else ''}{detail}"
    if not replica.available(rollout.has_health_check) and now - replica.created_at > ready_deadline:
        return f"was not healthy {ready_deadline:g} s after it was started"
    return ""


def _detect_failures(
    rollout: Rollout, mine: Sequence[Replica], now: float, ready_deadline: float
) -> list[Failure]:
    known = {failure.replica for failure in rollout.failures}
    found = []
    for replica in mine:
        if replica.revision != rollout.target or replica.id in known or replica.stopping:
            continue
        if replica.created_at < rollout.phase_started_at:
            continue  # not started by this phase: a crash there is the reconciler's to handle
        what = _failure(replica, rollout, now, ready_deadline)
        if what:
            found.append(Failure(replica.id, replica.node, replica.revision, what))
    return found


def _cleanup(rollout: Rollout, mine: Sequence[Replica]) -> list[StopReplica]:
    """Remove what is dead or broken: exited replicas, failures, unhealthy target replicas."""
    failed = {failure.replica for failure in rollout.failures}
    stops = []
    for replica in mine:
        if replica.stopping or replica.state == STOPPED:
            continue
        if replica.state == FAILED:
            stops.append(StopReplica(replica.id, replica.node, "exited"))
        elif replica.id in failed:
            stops.append(StopReplica(replica.id, replica.node, "failed during the rollout"))
        elif replica.revision == rollout.target and replica.health == UNHEALTHY:
            stops.append(StopReplica(replica.id, replica.node, "unhealthy"))
    return stops


def _apply_failure_action(rollout: Rollout, new: list[Failure], now: float) -> tuple[Rollout, list[str]]:
    rollout = replace(rollout, failures=rollout.failures + tuple(new))
    events = [f"{rollout.service}: {failure}" for failure in new]
    counted = len(rollout.failures) - rollout.tolerated_failures
    if not new or rollout.status != PROGRESSING:
        return rollout, events
    if counted <= rollout.policy.max_failure_ratio * rollout.desired_count:
        return rollout, events
    why = "; ".join(str(failure) for failure in rollout.failures[rollout.tolerated_failures :])
    if rollout.rolling_back:
        message = f"rollback of {rollout.service} to revision {rollout.target} failed, paused: {why}"
        rollout = replace(rollout, status=PAUSED, message=message)
    elif rollout.policy.failure_action == ROLLBACK and rollout.previous is not None:
        message = (
            f"rolling back {rollout.service} from revision {rollout.revision} "
            f"to revision {rollout.previous}: {why}"
        )
        rollout = replace(
            rollout,
            rolling_back=True,
            phase_started_at=now,
            tolerated_failures=len(rollout.failures),
            message=message,
        )
    elif rollout.policy.failure_action == ROLLBACK:
        message = (
            f"rollout of {rollout.service} to revision {rollout.revision} failed "
            f"and there is no earlier revision to roll back to: {why}"
        )
        rollout = replace(rollout, status=FAILED_ROLLOUT, message=message)
    elif rollout.policy.failure_action == PAUSE:
        message = f"rollout of {rollout.service} to revision {rollout.revision} paused: {why}"
        rollout = replace(rollout, status=PAUSED, message=message)
    else:
        return rollout, [*events, f"{rollout.service}: continuing despite {counted} failure(s)"]
    return rollout, [*events, message]


@dataclass
class _Counts:
    """The running tally of one step, updated as decisions are taken."""

    present: int  # pending/starting/running, stopping included
    live: int  # present and not being stopped
    new_live: int
    available: int


def step(
    rollout: Rollout, replicas: Iterable[Replica], now: float, ready_deadline: float = READY_DEADLINE
) -> Step:
    """The next decisions for `rollout` (module docstring)."""
    # A replaced replica sits on a lost node: the reconciler has written it off.
    mine = sorted(
        (r for r in replicas if r.service == rollout.service and not r.replaced), key=lambda r: r.id
    )
    if rollout.finished:
        return Step(rollout, phase=rollout.status)
    new_failures = _detect_failures(rollout, mine, now, ready_deadline)
    rollout, events = _apply_failure_action(rollout, new_failures, now)
    stops = _cleanup(rollout, mine)
    if rollout.status == FAILED_ROLLOUT:
        return Step(rollout, tuple(stops), events=tuple(events), phase=FAILED_ROLLOUT)
    if rollout.status == PAUSED:
        waiting = rollout.message or "paused"
        return Step(rollout, tuple(stops), waiting=waiting, events=tuple(events), phase=PAUSED)
    return _advance(rollout, mine, now, stops, events, ready_deadline)


def _advance(
    rollout: Rollout,
    mine: list[Replica],
    now: float,
    stops: list[StopReplica],
    events: list[str],
    ready_deadline: float,
) -> Step:
    policy = rollout.policy
    target = rollout.target
    desired = rollout.desired_count
    surge, unavailable = policy.bounds(desired)
    batch = policy.batch_size(desired)
    health_checked = rollout.has_health_check
    stopped_now = {stop.replica for stop in stops}

    present = [r for r in mine if r.active]
    live = [r for r in present if not r.stopping and r.id not in stopped_now]
    new_live = [r for r in live if r.revision == target]
    old_live = [r for r in live if r.revision != target]
    counts = _Counts(
        present=len(present),
        live=len(live),
        new_live=len(new_live),
        available=sum(r.available(health_checked) for r in live),
    )
    max_present = desired + surge
    min_available = desired - unavailable

    def settled(replica: Replica) -> bool:
        return replica.available(health_checked) and now >= _healthy_at(replica, rollout) + policy.monitor

    in_flight = [r for r in new_live if not r.available(health_checked)]
    delaying = [
        r for r in new_live if r.available(health_checked) and _healthy_at(r, rollout) + policy.delay > now
    ]
    old_going = [r for r in present if r.revision != target and (r.stopping or r.id in stopped_now)]
    busy = len(in_flight) + len(delaying) + len([r for r in old_going if r.id not in stopped_now])

    starts: list[StartReplica] = []
    global_nodes = rollout.global_nodes
    occupied = {r.node for r in live}
    has_new = {r.node for r in new_live}

    def start(reason: str, node: str | None) -> None:
        starts.append(StartReplica(target, node, reason))
        counts.present += 1
        counts.live += 1
        counts.new_live += 1
        if node is not None:
            occupied.add(node)
            has_new.add(node)

    def stop(replica: Replica, reason: str) -> None:
        stops.append(StopReplica(replica.id, replica.node, reason))
        counts.live -= 1
        if replica.available(health_checked):
            counts.available -= 1
        if replica in old_live:
            old_live.remove(replica)
        occupied.discard(replica.node)

    def may_stop(replica: Replica) -> bool:
        return not replica.available(health_checked) or counts.available - 1 >= min_available

    # Old replicas that a new one has made surplus: only once every new replica is healthy.
    if not in_flight:
        for replica in _surplus(old_live, new_live, desired, global_nodes, health_checked):
            if may_stop(replica):
                stop(replica, f"replaced by revision {target}")
                busy += 1

    # More new replicas than desired (the count went down mid-rollout): the extra ones go.
    if not old_live and counts.new_live > desired:
        extra = sorted(
            (r for r in new_live if r.id not in {stop.replica for stop in stops}),
            key=lambda r: (r.available(health_checked), -r.created_at, r.id),
        )
        for replica in extra[: counts.new_live - desired]:
            if may_stop(replica):
                stop(replica, f"more than {desired} replicas")
                counts.new_live -= 1

    # Refill vacated slots at once (also the first placement of a new service).
    refill_nodes = [] if global_nodes is None else [n for n in global_nodes if n not in occupied]
    while counts.present < max_present and counts.new_live < desired and counts.live < desired:
        if global_nodes is not None:
            if not refill_nodes:
                break
            start(f"revision {target}", refill_nodes.pop(0))
        else:
            start(f"revision {target}", None)
        busy += 1

    # Free workers take the next replicas.
    for _ in range(max(0, batch - busy)):
        start_node = _start_node(global_nodes, has_new, old_live)
        can_start = counts.present < max_present and counts.new_live < desired and start_node is not False
        candidate = _stop_candidate(old_live, health_checked)
        can_stop = candidate is not None and may_stop(candidate)
        if policy.order == START_FIRST and can_start:
            start(f"revision {target}", start_node or None)
        elif can_stop and candidate is not None:
            stop(candidate, f"updating to revision {target}")
        elif can_start:
            start(f"revision {target}", start_node or None)
        else:
            break

    if (
        not starts
        and not stops
        and not old_live
        and not old_going
        and len(new_live) == desired
        and all(settled(r) for r in new_live)
    ):
        return _complete(rollout, events)
    phase, waiting = UPDATING, ""
    if not starts and not stops:
        phase, waiting = _waiting(
            rollout, new_live, in_flight, delaying, counts, max_present, min_available, now
        )
    wake_at = _wake_at(rollout, new_live, now, ready_deadline)
    return Step(rollout, tuple(stops), tuple(starts), waiting, wake_at, tuple(events), phase)


def _surplus(
    old_live: list[Replica],
    new_live: list[Replica],
    desired: int,
    global_nodes: tuple[str, ...] | None,
    health_checked: bool,
) -> list[Replica]:
    """Old replicas beyond the desired count, unavailable first."""
    ordered = sorted(old_live, key=lambda r: (r.available(health_checked), r.id))
    if global_nodes is not None:
        replaced = {r.node for r in new_live if r.available(health_checked)}
        return [r for r in ordered if r.node in replaced or r.node not in global_nodes]
    extra = len(old_live) + len(new_live) - desired
    return ordered[: max(0, extra)]


def _stop_candidate(old_live: list[Replica], health_checked: bool) -> Replica | None:
    if not old_live:
        return None
    return min(old_live, key=lambda r: (r.available(health_checked), r.id))


def _start_node(
    global_nodes: tuple[str, ...] | None, has_new: set[str], old_live: list[Replica]
) -> str | bool | None:
    """Replicated: None (the caller places). Global: a node whose old replica is still
    there without a new one beside it; False when there is none."""
    if global_nodes is None:
        return None
    for node in sorted({r.node for r in old_live}):
        if node in global_nodes and node not in has_new:
            return node
    return False


def _complete(rollout: Rollout, events: list[str]) -> Step:
    if rollout.rolling_back:
        why = "; ".join(str(failure) for failure in rollout.failures)
        message = f"rolled back {rollout.service} to revision {rollout.target} after: {why}"
    else:
        message = f"rollout of {rollout.service} to revision {rollout.revision} complete"
    done = replace(rollout, status=COMPLETE, message=message)
    return Step(done, events=(*events, message), phase=COMPLETE)


def _waiting(
    rollout: Rollout,
    new_live: list[Replica],
    in_flight: list[Replica],
    delaying: list[Replica],
    counts: _Counts,
    max_present: int,
    min_available: int,
    now: float,
) -> tuple[str, str]:
    """(phase, words) when a step moves nothing."""
    if in_flight:
        target = rollout.target
        return (
            WAITING_FOR_HEALTH,
            f"waiting for {len(in_flight)} replica(s) of revision {target} to become healthy",
        )
    if delaying:
        return DELAYING, f"waiting {rollout.policy.delay:g} s between batches"
    monitored = [r for r in new_live if now < _healthy_at(r, rollout) + rollout.policy.monitor]
    if monitored:
        return MONITORING, f"monitoring {len(monitored)} replica(s) for {rollout.policy.monitor:g} s"
    if counts.present >= max_present:
        return WAITING_FOR_ROOM, (
            f"waiting for stopped replicas to go ({counts.present} present, at most {max_present})"
        )
    return (
        WAITING_FOR_ROOM,
        f"waiting for room ({counts.available} available, at least {min_available} must stay)",
    )


def _wake_at(rollout: Rollout, new_live: list[Replica], now: float, ready_deadline: float) -> float | None:
    times = []
    for replica in new_live:
        if replica.available(rollout.has_health_check):
            healthy_at = _healthy_at(replica, rollout)
            times += [healthy_at + rollout.policy.delay, healthy_at + rollout.policy.monitor]
        elif replica.created_at >= rollout.phase_started_at:
            times.append(replica.created_at + ready_deadline)
    later = [t for t in times if t > now]
    return min(later) if later else None

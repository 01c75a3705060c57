"""One tick of the workload controller as one pure function: facts -> decisions.

The orchestrator half of SwarmKit's manager in one call: what is stored and reported
(`Facts`) goes in, what to write and when to look again (`Decisions`) comes out; the
shell (controller.py) gathers the facts, writes the decisions in one store transaction
and the dispatcher sends each node its assignment. In order:

1. Stopped replicas whose node confirmed them gone (or that left the inventory) are
   forgotten, so the room they held is free in this same pass.
2. The reconciler (failover, stale replicas, drains, counts) over every rolled-out service.
3. Services that are rolling and whose first placement waits for a dependency wait.
4. The rollout planner's step for every service still rolling.
5. Every start is given a slot (1..replicas, or its node for a global service); a slot
   whose last start of the same revision failed waits out its backoff (backoff.py), and a
   stop of a replica that failed to start lengthens it. Then placement (`place`, only
   here) picks a node for each start that names none.

`wake_at` is the earliest moment a decision may change with no new report: the end of a
disconnected node's grace, a silent node turning lost, a rollout's health deadline or
delay, a backoff running out.
"""

from __future__ import annotations

import dataclasses
from collections import defaultdict
from collections.abc import Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass, field

from picoord.common.limits import DISCONNECT_GRACE, START_BACKOFF_RESET_AFTER
from picoord.common.validation import FieldError
from picoord.coordinator.controller import backoff as backoffs
from picoord.coordinator.controller.backoff import Backoff
from picoord.coordinator.controller.records import NewReplica, ServiceRecord
from picoord.coordinator.placement.constraints import first_unmet
from picoord.coordinator.placement.scheduler import Node, Placed, check_spread, place
from picoord.coordinator.reconcile.reconciler import DesiredService, NodeStatus, reconcile, visible_replicas
from picoord.coordinator.rollout import planner
from picoord.coordinator.rollout.planner import Rollout
from picoord.coordinator.rollout.replicas import FAILED, UNHEALTHY, Replica
from picoord.coordinator.workloads.spec import (
    GLOBAL,
    MAX_REPLICAS,
    ServiceSpec,
    check_secrets,
    placement_request,
)


@dataclass(frozen=True)
class Facts:
    """Everything one tick reads, gathered once by the shell."""

    now: float
    services: Mapping[str, ServiceRecord]
    replicas: Mapping[str, Replica]  # by id: the records with the agents' reports merged in
    nodes: Mapping[str, Node]  # the scheduler's view of every node in the inventory
    statuses: tuple[NodeStatus, ...]  # the reconciler's view: sessions, grace, draining
    specs: Mapping[tuple[str, int], ServiceSpec]  # every stored revision, by (service, revision)
    backoffs: Mapping[tuple[str, str], Backoff] = field(default_factory=dict)  # by (service, slot)
    gone: frozenset[str] = frozenset()  # stopping replicas their node confirmed gone
    silent_at: Mapping[str, float] = field(default_factory=dict)  # node -> when it turns not Ready
    unplaced: Mapping[str, str] = field(default_factory=dict)  # as told before, by service
    waiting: Mapping[str, str] = field(default_factory=dict)  # as told before, by service
    grace: float = DISCONNECT_GRACE


@dataclass(frozen=True)
class Start:
    """A replica to record and send: the node is chosen, the store gives the id."""

    service: str
    revision: int
    node: str
    slot: str
    reason: str

    @property
    def new(self) -> NewReplica:
        return NewReplica(self.service, self.revision, self.node, self.slot)


@dataclass(frozen=True)
class Decisions:
    """What one tick writes (in one transaction), tells the operator, and when it looks again."""

    forget: tuple[str, ...] = ()
    replaced: tuple[str, ...] = ()
    reclaimed: tuple[str, ...] = ()
    stops: tuple[tuple[str, str], ...] = ()  # (replica, reason)
    starts: tuple[Start, ...] = ()
    rollouts: tuple[Rollout, ...] = ()  # changed rollouts
    backoffs: tuple[Backoff, ...] = ()  # slots whose backoff changed
    cleared: tuple[tuple[str, str], ...] = ()  # slots whose backoff ends (a replica served)
    notes: tuple[tuple[str, str], ...] = ()  # (service, line) for the operator
    unplaced: Mapping[str, str] = field(default_factory=dict)
    waiting: Mapping[str, str] = field(default_factory=dict)
    wake_at: float | None = None


def desired(service: ServiceRecord) -> DesiredService:
    """What the reconciler holds a rolled-out service to."""
    rollout = service.rollout
    assert rollout is not None
    spec = service.spec
    return DesiredService(
        request=placement_request(spec, rollout.desired_count),
        revision=rollout.target,
        policy=spec.update,
        rolling=not rollout.finished,
        has_health_check=rollout.has_health_check,
    )


def holding(spec: ServiceSpec, node: str) -> Placed:
    """What one replica of `spec` holds on its node, for the scheduler."""
    resources = spec.resources
    return Placed(spec.name, node, resources.memory_request, resources.cpu_request, resources.gpu_count)


def placed(
    replicas: Iterable[Replica], specs: Mapping[tuple[str, int], ServiceSpec], exclude: str = ""
) -> list[Placed]:
    """What every replica holds on its node (the requests of its revision)."""
    found = []
    for replica in sorted(replicas, key=lambda r: r.id):
        spec = specs.get((replica.service, replica.revision))
        if replica.service != exclude and spec is not None:
            found.append(holding(spec, replica.node))
    return found


def dependencies_not_serving(
    service: ServiceRecord, services: Mapping[str, ServiceRecord], replicas: Iterable[Replica]
) -> list[str]:
    """The services it depends on that have no available replica yet."""
    replicas = list(replicas)
    missing = []
    for dependency in service.spec.depends_on:
        other = services.get(dependency)
        checked = other.rollout.has_health_check if other and other.rollout else True
        if not any(r.service == dependency and r.available(checked) for r in replicas):
            missing.append(dependency)
    return missing


class _Tick:
    """The working state of one decide call: replicas as changed so far, and the output."""

    def __init__(self, facts: Facts) -> None:
        self.facts = facts
        self.replicas = dict(facts.replicas)
        self.placed: list[Placed] = []
        self.stops: list[tuple[str, str]] = []
        self.starts: list[Start] = []
        self.rollouts: list[Rollout] = []
        self.backoffs: dict[tuple[str, str], Backoff] = dict(facts.backoffs)
        self.changed: dict[tuple[str, str], Backoff] = {}
        self.cleared: list[tuple[str, str]] = []
        self.notes: list[tuple[str, str]] = []
        self.unplaced = dict(facts.unplaced)
        self.waiting = dict(facts.waiting)
        self.wakes: list[float] = []

    def note(self, service: str, text: str) -> None:
        self.notes.append((service, text))

    def wake(self, at: float | None) -> None:
        if at is not None:
            self.wakes.append(at)

    def stop(self, replica_id: str, reason: str) -> None:
        replica = self.replicas[replica_id]
        if replica.stopping:
            return
        self.stops.append((replica_id, reason))
        self.replicas[replica_id] = dataclasses.replace(replica, stopping=True)
        self.note(replica.service, f"stopping {replica_id} on {replica.node}: {reason}")
        if replica.slot and (replica.state == FAILED or replica.health == UNHEALTHY):
            self._failed(replica, reason)

    def _failed(self, replica: Replica, reason: str) -> None:
        """A replica that could not start or serve: its slot waits longer before the next try."""
        now = self.facts.now
        key = (replica.service, replica.slot)
        after = backoffs.failed(
            self.backoffs.get(key), *key, replica.revision, replica.id, replica.node,
            replica.failure or reason, now,
        )  # fmt: skip
        self.backoffs[key] = self.changed[key] = after
        self.note(
            replica.service,
            f"{replica.service} slot {replica.slot}: next try in {backoffs.delay(after.failures):.0f} s "
            f"({after.failures} failure(s) in a row)",
        )

    def serving(self) -> None:
        """A replica that has served long enough ends its slot's backoff."""
        for replica in self.replicas.values():
            key = (replica.service, replica.slot)
            if key not in self.backoffs or replica.stopping:
                continue
            service = self.facts.services.get(replica.service)
            checked = service.rollout.has_health_check if service and service.rollout else True
            since = max(replica.since, replica.health_since)
            if replica.available(checked) and self.facts.now - since >= START_BACKOFF_RESET_AFTER:
                del self.backoffs[key]
                self.changed.pop(key, None)
                self.cleared.append(key)
            elif replica.available(checked):
                self.wake(since + START_BACKOFF_RESET_AFTER)

    def start(self, service: ServiceRecord, wanted: Sequence[tuple[int, str | None, str]]) -> None:
        """Give each start a slot, hold those in backoff, place the rest, record them."""
        by_revision: dict[int, list[tuple[str | None, str]]] = defaultdict(list)
        for revision, node, reason in wanted:
            by_revision[revision].append((node, reason))
        for revision, starts in by_revision.items():
            spec = self.facts.specs.get((service.name, revision))
            if spec is None:
                self.note(service.name, f"revision {revision} of {service.name} is not stored: not started")
                continue
            named = [(node, reason, node) for node, reason in starts if node is not None]
            free = self._free_slots(service.name, sum(node is None for node, _ in starts))
            unnamed = [(None, reason, slot) for (_, reason), slot in zip(
                [s for s in starts if s[0] is None], free, strict=True
            )]  # fmt: skip
            ready = []
            for node, reason, slot in [*named, *unnamed]:
                held = self.backoffs.get((service.name, slot))
                if held is not None and held.holds(revision, self.facts.now):
                    self.wake(held.retry_at)
                    continue
                ready.append((node, reason, slot))
            chosen = [(node, reason, slot) for node, reason, slot in ready if node is not None]
            to_place = [(reason, slot) for node, reason, slot in ready if node is None]
            if to_place:
                placement = place(
                    list(self.facts.nodes.values()), self.placed, placement_request(spec, len(to_place))
                )
                chosen.extend(
                    (node, reason, slot)
                    for node, (reason, slot) in zip(placement.assignments, to_place, strict=False)
                )
                for warning in placement.warnings:
                    self.note(service.name, warning)
                if placement.unplaced:
                    why = f"{placement.unplaced} replica(s) of {service.name} not placed: {placement.reason}"
                    if self.unplaced.get(service.name) != why:
                        self.note(service.name, why)
                    self.unplaced[service.name] = why
                else:
                    self.unplaced.pop(service.name, None)
            for node, reason, slot in chosen:
                assert node is not None
                self.starts.append(Start(service.name, revision, node, slot, reason))
                self.placed.append(holding(spec, node))

    def _free_slots(self, service: str, count: int) -> list[str]:
        """The lowest `count` slots no live replica of the service (nor a start of this
        tick) fills: a failed replica's replacement takes its slot, and its backoff."""
        taken = {
            r.slot
            for r in self.replicas.values()
            if r.service == service and r.active and not r.stopping and not r.replaced
        }
        taken.update(s.slot for s in self.starts if s.service == service)
        free: list[str] = []
        number = 1
        while len(free) < count:
            if str(number) not in taken:
                free.append(str(number))
            number += 1
        return free

    def silent_wakes(self) -> None:
        """A connected node that goes silent turns lost `grace` after it stops being Ready:
        look again then, if it holds a replica."""
        holders = {r.node for r in self.replicas.values() if not r.stopping}
        for node, at in self.facts.silent_at.items():
            if node in holders and at + self.facts.grace > self.facts.now:
                self.wake(at + self.facts.grace)


def decide(facts: Facts) -> Decisions:
    """The whole tick's decisions (module docstring)."""
    tick = _Tick(facts)
    now = facts.now
    forget = tuple(
        sorted(
            r.id
            for r in facts.replicas.values()
            if r.stopping and (r.id in facts.gone or r.node not in facts.nodes)
        )
    )
    for replica in forget:
        del tick.replicas[replica]
    tick.placed = placed(tick.replicas.values(), facts.specs)
    tick.serving()

    statuses = list(facts.statuses)
    rolled = {name: s for name, s in facts.services.items() if s.rollout is not None}
    plan = reconcile(
        [desired(s) for s in rolled.values()], list(tick.replicas.values()), statuses, now, facts.grace
    )
    tick.wake(plan.wake_at)
    for change in (*plan.replaces, *plan.reclaims):
        tick.replicas[change.replica] = dataclasses.replace(
            tick.replicas[change.replica], replaced=change in plan.replaces
        )
        tick.note(change.service, f"{change.replica} on {change.node}: {change.reason}")
    for stop in plan.stops:
        tick.stop(stop.replica, stop.reason)
    for name, service in rolled.items():
        tick.start(service, [(s.revision, s.node, s.reason) for s in plan.starts if s.service == name])

    for name, service in rolled.items():
        rollout = service.rollout
        assert rollout is not None
        if rollout.finished:
            continue
        waiting_for = dependencies_not_serving(service, facts.services, tick.replicas.values())
        if rollout.previous is None and waiting_for:
            # depends_on orders first placement: nothing of it starts before they serve.
            text = f"waiting for {', '.join(waiting_for)} to have a healthy replica"
            if tick.waiting.get(name) != text:
                tick.waiting[name] = text
                tick.note(name, text)
            continue
        mine = [r for r in tick.replicas.values() if r.service == name]
        step = planner.step(rollout, visible_replicas(mine, statuses, now, facts.grace), now)
        tick.wake(step.wake_at)
        if step.rollout != rollout:
            tick.rollouts.append(step.rollout)
        for event in step.events:
            tick.note(name, event)
        for stop in step.stops:
            tick.stop(stop.replica, stop.reason)
        tick.start(service, [(s.revision, s.node, s.reason) for s in step.starts])
    tick.silent_wakes()

    return Decisions(
        forget=forget,
        replaced=tuple(r.replica for r in plan.replaces),
        reclaimed=tuple(r.replica for r in plan.reclaims),
        stops=tuple(tick.stops),
        starts=tuple(tick.starts),
        rollouts=tuple(tick.rollouts),
        backoffs=tuple(tick.changed.values()),
        cleared=tuple(tick.cleared),
        notes=tuple(tick.notes),
        unplaced=tick.unplaced,
        waiting=tick.waiting,
        wake_at=min((at for at in tick.wakes if at > now), default=None),
    )


def refusal(spec: ServiceSpec, facts: Facts, secrets: Iterable[tuple[str, str]]) -> str | None:
    """Why a rollout of `spec` is refused before anything starts, or None: a missing secret,
    an unknown dependency, a spread the matching nodes cannot hold, replicas that fit
    nowhere (in Kubernetes' words). Its own replicas make way for the new ones; everything
    else keeps its place."""
    usable = [node for node in facts.nodes.values() if node.ready and not node.draining]
    matching = [node for node in usable if first_unmet(spec.placement.constraints, node.facts) is None]
    try:
        check_secrets(spec, set(secrets))
        for dependency in spec.depends_on:
            if dependency not in facts.services:
                raise FieldError(
                    f"{spec.origin or spec.name}.depends_on",
                    f"{spec.name} depends on {dependency!r}, which is not applied: apply its spec too",
                )
        if spec.mode != GLOBAL:
            check_spread(f"{spec.origin}.placement", spec.replicas, spec.placement.spread, len(matching))
    except FieldError as error:
        return str(error)
    others = placed(facts.replicas.values(), facts.specs, exclude=spec.name)
    placement = place(list(facts.nodes.values()), others, placement_request(spec, spec.replicas))
    if spec.mode == GLOBAL and not placement.assignments:
        return f"{spec.origin}: {placement.reason or 'no node matches'}"
    if spec.mode != GLOBAL and placement.unplaced:
        return (
            f"{spec.origin}: {placement.unplaced} of {spec.replicas} replicas cannot be placed: "
            f"{placement.reason}"
        )
    return None


def global_targets(spec: ServiceSpec, facts: Facts) -> tuple[str, ...] | None:
    """The nodes a new rollout of a global service covers (None for a replicated one)."""
    if spec.mode != GLOBAL:
        return None
    ready = [node for node in facts.nodes.values() if node.ready]
    return place(ready, [], placement_request(spec, 0)).assignments


def scale_refusal(service: ServiceRecord, count: int) -> str | None:
    """Why `coordctl scale NAME=count` is refused, or None. Scaling changes the running
    rollout's count only (no new revision, nothing rolls); the reconciler then starts or
    stops replicas, and says where they cannot be placed. The next rollout of the service
    takes the applied file's count again, as `docker stack deploy` and `kubectl apply` do."""
    if service.spec.mode == GLOBAL:
        return f"{service.name} is global: it runs one replica on every matching node, it has no count"
    if not 0 <= count <= MAX_REPLICAS:
        return f"{count} is not a replica count (0-{MAX_REPLICAS})"
    if service.rollout is None:
        return f"{service.name} is not rolled out yet: `coordctl rollout {service.name}` first"
    return None


def scaled(rollout: Rollout, count: int) -> Rollout:
    """The same rollout, holding `count` replicas (scale_refusal said it may)."""
    return dataclasses.replace(rollout, replicas=count)


SERVICE = "service"
STACK = "stack"


@dataclass(frozen=True)
class Removal:
    """What `coordctl rm` takes away: the services, and their replicas (id, node), which
    stop within their stop grace. Named volumes the services mount are kept
    (`volumes_kept`), or with --volumes removed (`volumes_removed`: (node, volume) for each
    named volume a removed replica declared, on the node it ran on; the agent removes it
    once no container uses it). `away`: the nodes of those replicas that cannot be reached
    now, where both are done when they return (the operator is told so, rather than left to
    wonder why a container is still there)."""

    services: tuple[str, ...]
    replicas: tuple[tuple[str, str], ...]
    volumes_kept: tuple[str, ...]
    away: tuple[str, ...] = ()
    volumes_removed: tuple[tuple[str, str], ...] = ()


def removal(
    kind: str,
    name: str,
    services: Mapping[str, ServiceRecord],
    replicas: Iterable[Replica],
    away_nodes: Collection[str] = (),
    specs: Mapping[tuple[str, int], ServiceSpec] | None = None,
    volumes: bool = False,
) -> Removal:
    """The removal of service or stack `name`; ValueError (LookupError when there is no such
    service or stack) for what cannot be removed. Nothing here waits for a node: a replica on
    a node that is away is stopped, and its container (and with `volumes` its named volumes)
    removed, when the node returns. A replica declares the volumes of the revision it runs
    (`specs`), else of its service's applied spec."""
    if kind == SERVICE:
        if name not in services:
            raise LookupError(f"no service {name!r}")
        names = [name]
    elif kind == STACK:
        names = sorted(s.name for s in services.values() if s.stack == name)
        if not names:
            raise LookupError(f"no stack {name!r}")
    else:
        raise ValueError(f"{kind!r}: remove a service or a stack")
    taken = [r for r in replicas if r.service in names]
    gone = tuple(sorted((r.id, r.node) for r in taken))
    declared = sorted({volume for n in names for volume in services[n].spec.named_volumes})
    away = tuple(sorted({node for _, node in gone if node in away_nodes}))
    if not volumes:
        return Removal(tuple(names), gone, tuple(declared), away)
    revisions = specs or {}
    on_nodes = {
        (replica.node, volume)
        for replica in taken
        for volume in revisions.get(
            (replica.service, replica.revision), services[replica.service].spec
        ).named_volumes
    }
    return Removal(tuple(names), gone, (), away, tuple(sorted(on_nodes)))


LEAVE_WAIT = 5.0  # seconds a stopped replica keeps running, out of the rotation, for the nodes' acks


@dataclass(frozen=True)
class Leaving:
    """A replica the controller stops that was in a published port's rotation: out of every
    node's rules from `since`, still running until the nodes say so."""

    since: float
    owed: Mapping[str, int] | None = (
        None  # Ready node -> generation of its first assignment without it; None: not sent yet
    )


def leaving(
    left: Mapping[str, Leaving],
    acked: Mapping[str, int],
    ready: Collection[str],
    now: float,
    wait: float = LEAVE_WAIT,
) -> tuple[frozenset[str], float | None]:
    """Leave before stopping: of the replicas that left the rotation, those that must keep
    running, and when to look again (the earliest end of a wait).

    A replica is stopped once every Ready node has acknowledged (reported applying) an
    assignment without it, so no node forwards a new connection to a container about to
    receive SIGTERM; a node that is not Ready cannot answer and is not waited for, and no
    replica waits longer than `wait` (a node that stopped applying assignments must not
    hold a rollout, a drain or an rm). Nothing sent yet (`owed` None): it waits."""
    held = set()
    for replica, state in left.items():
        deadline = state.since + wait
        if now >= deadline:
            continue
        if state.owed is None or any(
            node in ready and acked.get(node, 0) < generation for node, generation in state.owed.items()
        ):
            held.add(replica)
    wakes = [left[replica].since + wait for replica in held]
    return frozenset(held), min(wakes, default=None)

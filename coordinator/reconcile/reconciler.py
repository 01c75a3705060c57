"""Desired services + the replicas agents report + node sessions + now -> actions.

A pure function, called by the reconcile loop on every change and at `wake_at`. It owns
what the rollout planner does not: failover, stale replicas, drains, unknown services,
global services, and the replica count of a service that is not rolling. While a service
rolls, its count and revisions belong to the planner: the reconciler only writes off the
replicas of lost nodes (the planner, which ignores replaced replicas, then refills).

Failover follows Nomad's `disconnect` block with `lost_after` = the grace period
(default 5 s) and `replace = true`:
- A node whose session is gone no longer than the grace period is *unreachable*: its
  replicas still count, nothing is replaced, nothing new goes there.
- Gone longer, it is *lost*: each of its replicas gets a `Replace` (the store marks it
  replaced, so it is never counted or replaced again) and a replacement is started.
- When the node comes back, each replaced replica on it is stopped, so it never runs
  beside its replacement, and the count converges to the desired count. If no
  replacement was started meanwhile (nothing fitted), the replica is reclaimed instead.
A node that is draining has its replicas moved within the service's update bounds: a
replacement starts elsewhere while `replicas + max_surge` allows, and a replica on the
draining node stops while `replicas - max_unavailable` stay available.

A reconnecting agent never duplicates replicas: the store's records are the truth, matched
to the agent's report by replica id (the container labels carry service, revision and
replica id), and the node is sent its whole assignment again (controller/dispatcher.py).

One pass of the controller (controller/decide.py), on every change and at the earliest
wake_at: `reconcile`; Replace/Reclaim marks and stops; for each rolling service,
`planner.step` over `visible_replicas`; a slot and a node for every start; all of it
written in one transaction, then each node's assignment sent.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

from picoord.common.limits import DISCONNECT_GRACE
from picoord.coordinator.placement.constraints import NodeFacts, first_unmet
from picoord.coordinator.placement.scheduler import Request
from picoord.coordinator.rollout.policy import UpdatePolicy
from picoord.coordinator.rollout.replicas import FAILED, STOPPED, UNHEALTHY, Replica


@dataclass(frozen=True)
class NodeStatus:
    name: str
    connected: bool
    since: float  # when the session started, or when it was lost
    draining: bool = False
    facts: NodeFacts | None = None  # for global services' constraints; None: name only

    @property
    def node_facts(self) -> NodeFacts:
        return self.facts or NodeFacts(self.name)


@dataclass(frozen=True)
class DesiredService:
    request: Request  # service name, count or global, constraints: what the scheduler gets
    revision: int
    policy: UpdatePolicy = field(default_factory=UpdatePolicy)
    rolling: bool = False  # a rollout is in progress: the planner owns count and revisions
    has_health_check: bool = True

    @property
    def name(self) -> str:
        return self.request.service


@dataclass(frozen=True)
class Start:
    service: str
    revision: int
    node: str | None  # global services name the node; otherwise the scheduler places it
    reason: str


@dataclass(frozen=True)
class Stop:
    service: str
    replica: str
    node: str
    reason: str


@dataclass(frozen=True)
class Replace:
    """Mark the replica replaced: its node is lost; a replacement is started (or the rollout refills)."""

    service: str
    replica: str
    node: str
    reason: str


@dataclass(frozen=True)
class Reclaim:
    """Clear `replaced`: the node came back before any replacement ran."""

    service: str
    replica: str
    node: str
    reason: str


@dataclass(frozen=True)
class Plan:
    starts: tuple[Start, ...] = ()
    stops: tuple[Stop, ...] = ()
    replaces: tuple[Replace, ...] = ()
    reclaims: tuple[Reclaim, ...] = ()
    rollouts_needed: tuple[str, ...] = ()  # services with replicas of another revision, not rolling
    wake_at: float | None = None  # when an unreachable node's grace period ends

    @property
    def empty(self) -> bool:
        return not (self.starts or self.stops or self.replaces or self.reclaims)


class _Nodes:
    def __init__(self, nodes: Iterable[NodeStatus], now: float, grace: float) -> None:
        self.by_name = {node.name: node for node in nodes}
        self.now = now
        self.grace = grace

    def lost(self, name: str) -> bool:
        node = self.by_name.get(name)
        return node is None or (not node.connected and self.now - node.since > self.grace)

    def reachable(self, name: str) -> bool:
        node = self.by_name.get(name)
        return node is not None and node.connected

    def draining(self, name: str) -> bool:
        node = self.by_name.get(name)
        return node is not None and node.draining

    def away_for(self, name: str) -> str:
        node = self.by_name.get(name)
        if node is None:
            return f"node {name} is not in the inventory"
        return f"node {name} lost {self.now - node.since:.0f} s ago (grace {self.grace:g} s)"

    def wake_at(self) -> float | None:
        ends = [
            node.since + self.grace
            for node in self.by_name.values()
            if not node.connected and node.since + self.grace >= self.now
        ]
        return min(ends) if ends else None


def visible_replicas(
    replicas: Iterable[Replica], nodes: Iterable[NodeStatus], now: float, grace: float = DISCONNECT_GRACE
) -> list[Replica]:
    """What the rollout planner should count: not replaced, not on a lost node."""
    view = _Nodes(nodes, now, grace)
    return [r for r in replicas if not r.replaced and not view.lost(r.node)]


def global_nodes(service: DesiredService, nodes: Iterable[NodeStatus]) -> tuple[str, ...]:
    """The nodes a global service belongs on: connected, not draining, matching."""
    return tuple(
        sorted(
            node.name
            for node in nodes
            if node.connected
            and not node.draining
            and first_unmet(service.request.constraints, node.node_facts) is None
        )
    )


def reconcile(
    desired: Sequence[DesiredService],
    replicas: Iterable[Replica],
    nodes: Iterable[NodeStatus],
    now: float,
    grace: float = DISCONNECT_GRACE,
) -> Plan:
    node_list = list(nodes)
    view = _Nodes(node_list, now, grace)
    services = {service.name: service for service in desired}
    by_service: dict[str, list[Replica]] = {}
    for replica in sorted(replicas, key=lambda r: r.id):
        if replica.state != STOPPED:
            by_service.setdefault(replica.service, []).append(replica)

    plan = _Builder()
    for name in sorted(by_service):
        if name not in services:
            for replica in by_service[name]:
                if view.reachable(replica.node) and not replica.stopping:
                    plan.stop(replica, f"service {name} no longer exists")
    for name in sorted(services):
        service = services[name]
        mine = by_service.get(name, [])
        counted = _failover(service, mine, view, plan)
        if service.rolling:
            continue  # the planner owns the rest, and cleans up its own failures
        counted = _remove_broken(mine, counted, view, plan)
        if service.request.global_mode:
            _converge_global(service, counted, global_nodes(service, node_list), view, plan)
        else:
            _converge_count(service, counted, mine, view, plan)
        if any(r.revision != service.revision for r in counted):
            plan.rollouts_needed.append(name)
    return plan.build(view.wake_at())


@dataclass
class _Builder:
    starts: list[Start] = field(default_factory=list)
    stops: list[Stop] = field(default_factory=list)
    replaces: list[Replace] = field(default_factory=list)
    reclaims: list[Reclaim] = field(default_factory=list)
    rollouts_needed: list[str] = field(default_factory=list)

    def stop(self, replica: Replica, reason: str) -> None:
        self.stops.append(Stop(replica.service, replica.id, replica.node, reason))

    def build(self, wake_at: float | None) -> Plan:
        return Plan(
            tuple(self.starts),
            tuple(self.stops),
            tuple(self.replaces),
            tuple(self.reclaims),
            tuple(self.rollouts_needed),
            wake_at,
        )


def _failover(service: DesiredService, mine: list[Replica], view: _Nodes, plan: _Builder) -> list[Replica]:
    """Write off replicas of lost nodes, stop the stale ones of returned nodes; return
    the replicas that count (active, not stopping, not lost, not replaced)."""
    counted = [r for r in mine if r.active and not r.stopping and not r.replaced and not view.lost(r.node)]
    for replica in mine:
        if not replica.active or replica.stopping:
            continue
        if replica.replaced:
            if not view.reachable(replica.node):
                continue
            if service.rolling or len(counted) >= service.request.replicas:
                plan.stop(replica, f"replaced while node {replica.node} was away")
            else:
                counted.append(replica)
                reason = f"node {replica.node} is back and no replacement runs"
                plan.reclaims.append(Reclaim(service.name, replica.id, replica.node, reason))
        elif view.lost(replica.node) and not service.request.global_mode:
            plan.replaces.append(Replace(service.name, replica.id, replica.node, view.away_for(replica.node)))
    return counted


def _remove_broken(
    mine: list[Replica], counted: list[Replica], view: _Nodes, plan: _Builder
) -> list[Replica]:
    """Stop exited and unhealthy replicas on reachable nodes (as Swarm does); they stop counting."""
    for replica in mine:
        if replica.state == FAILED and not replica.stopping and view.reachable(replica.node):
            plan.stop(replica, "exited" + (f": {replica.failure}" if replica.failure else ""))
    kept = []
    for replica in counted:
        if replica.health == UNHEALTHY and view.reachable(replica.node):
            plan.stop(replica, "unhealthy" + (f": {replica.failure}" if replica.failure else ""))
        else:
            kept.append(replica)
    return kept


def _converge_count(
    service: DesiredService, counted: list[Replica], mine: list[Replica], view: _Nodes, plan: _Builder
) -> None:
    """Start up to the desired count; move replicas off draining nodes within the bounds;
    stop what is beyond the desired count."""
    desired = service.request.replicas
    surge, unavailable = service.policy.bounds(desired)
    health_checked = service.has_health_check
    lost = [r for r in mine if r.active and not r.stopping and not r.replaced and view.lost(r.node)]
    going = sum(1 for r in mine if r.active and r.stopping)
    staying = [r for r in counted if not view.draining(r.node)]
    available = sum(r.available(health_checked) for r in counted)

    deficit = max(0, desired - len(counted))
    moving = max(0, min(desired - len(staying), desired + surge - len(counted) - going))
    started = max(deficit, moving)
    for index in range(started):
        if index < len(lost):
            reason = f"replaces {lost[index].id} ({view.away_for(lost[index].node)})"
        elif index < deficit:
            reason = f"{len(counted) + index + 1} of {desired} replicas"
        else:
            reason = "moving off a draining node"
        plan.starts.append(Start(service.name, service.revision, None, reason))

    def may_stop(replica: Replica) -> bool:
        nonlocal available
        if not view.reachable(replica.node):
            return False
        if replica.available(health_checked):
            if available - 1 < desired - unavailable:
                return False
            available -= 1
        return True

    ordered = _stop_order(counted, service, health_checked)
    for replica in ordered:
        if view.draining(replica.node) and may_stop(replica):
            plan.stop(replica, f"node {replica.node} is draining")
    surplus = len(staying) + started - desired
    for replica in ordered:
        if surplus <= 0:
            break
        if not view.draining(replica.node) and may_stop(replica):
            plan.stop(replica, f"more than {desired} replicas")
            surplus -= 1


def _stop_order(counted: list[Replica], service: DesiredService, health_checked: bool) -> list[Replica]:
    """Other revisions first, then not serving, then the newest (as Kubernetes scales down)."""
    return sorted(
        counted,
        key=lambda r: (
            r.revision == service.revision,
            r.available(health_checked),
            -r.created_at,
            r.id,
        ),
    )


def _converge_global(
    service: DesiredService, counted: list[Replica], targets: tuple[str, ...], view: _Nodes, plan: _Builder
) -> None:
    """One replica on each target node. A node within its grace period keeps its replica;
    a draining or no longer matching node loses it (a global replica does not move)."""
    seen: set[str] = set()
    ordered = sorted(counted, key=lambda r: (r.revision != service.revision, not r.available(), r.id))
    for replica in ordered:
        if not view.reachable(replica.node):
            seen.add(replica.node)
        elif replica.node not in targets:
            plan.stop(replica, f"node {replica.node} is draining or no longer matches")
        elif replica.node in seen:
            plan.stop(replica, f"a second replica on node {replica.node}")
        else:
            seen.add(replica.node)
    for node in targets:
        if node not in seen:
            plan.starts.append(Start(service.name, service.revision, node, f"global service on node {node}"))

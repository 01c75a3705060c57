"""What operators and /metrics see of the workloads: pure views of the snapshot the
controller publishes after each tick.

Every view reads one `Snapshot` (immutable, replaced whole after a tick), so a view never
rebuilds the tick's facts, never races a tick half-way, and costs no store read.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field

from picoord.common.vocabulary import ReplicaState, RolloutStatus
from picoord.coordinator.controller.backoff import Backoff, describe
from picoord.coordinator.controller.records import ReplicaRecord, ServiceRecord, stored
from picoord.coordinator.rollout.replicas import RUNNING, Replica
from picoord.coordinator.workloads.spec import ServiceSpec
from picoord.coordinator.workloads.stacks import dependencies
from picoord.v1 import services_pb2, workloads_pb2


@dataclass(frozen=True)
class ServiceFigures:
    """What /metrics says of one service, as of the last tick (see metrics_snapshot)."""

    service: str
    desired: int
    running: int
    healthy: int
    revision: int
    rollout_status: RolloutStatus


@dataclass(frozen=True)
class Snapshot:
    """The workloads as the last tick left them."""

    at: float = 0.0
    services: Mapping[str, ServiceRecord] = field(default_factory=dict)
    records: tuple[ReplicaRecord, ...] = ()
    replicas: Mapping[str, Replica] = field(default_factory=dict)  # by id
    reports: Mapping[tuple[str, str, int], workloads_pb2.ReplicaReport] = field(default_factory=dict)
    specs: Mapping[tuple[str, int], ServiceSpec] = field(default_factory=dict)
    backoffs: Mapping[tuple[str, str], Backoff] = field(default_factory=dict)
    unplaced: Mapping[str, str] = field(default_factory=dict)
    ready: frozenset[str] = frozenset()  # nodes that are Ready
    figures: tuple[ServiceFigures, ...] = ()


def service_figures(info: services_pb2.RolloutInfo, service: ServiceRecord, running: int) -> ServiceFigures:
    """The figures `coordctl services` shows: desired from the rollout once there is one."""
    return ServiceFigures(
        service=service.name,
        desired=info.desired if service.rollout else service.spec.replicas,
        running=running,
        healthy=info.available,
        revision=service.rollout.target if service.rollout else 0,
        rollout_status=RolloutStatus.from_wire(info.status),
    )


def running(replicas: Iterable[Replica], service: str) -> int:
    """Replicas of the service running and not being stopped, as `coordctl services` counts them."""
    return sum(r.service == service and r.state == RUNNING and not r.stopping for r in replicas)


def finished(info: services_pb2.RolloutInfo) -> bool:
    return not RolloutStatus.from_wire(info.status).under_way


def rollout_info(
    service: ServiceRecord, replicas: Sequence[Replica], unplaced: Mapping[str, str]
) -> services_pb2.RolloutInfo:
    rollout = service.rollout
    if rollout is None:
        return services_pb2.RolloutInfo(service=service.name, status=RolloutStatus.NOT_ROLLED_OUT.wire)
    mine = [r for r in replicas if r.service == service.name and r.active and not r.stopping]
    health_checked = rollout.has_health_check
    return services_pb2.RolloutInfo(
        service=service.name,
        revision=rollout.target,
        previous=(rollout.revision if rollout.rolling_back else rollout.previous) or 0,
        status=rollout.state.wire,
        rolling_back=rollout.rolling_back,
        message=rollout.message or unplaced.get(service.name, ""),
        failures=[str(failure) for failure in rollout.failures],
        started_at=rollout.started_at,
        desired=rollout.desired_count,
        updated=sum(r.revision == rollout.target for r in mine),
        healthy=sum(r.revision == rollout.target and r.available(health_checked) for r in mine),
        available=sum(r.available(health_checked) for r in mine),
    )


def service_status(info: services_pb2.RolloutInfo, snapshot: Snapshot) -> int:
    """The rollout status, or `failing` when a settled service cannot keep its replicas
    running (a slot of its revision waits out a start backoff): not shown as fine."""
    settled = RolloutStatus.from_wire(info.status) in (RolloutStatus.COMPLETE, RolloutStatus.ROLLED_BACK)
    backing_off = any(
        b.service == info.service and b.revision == info.revision for b in snapshot.backoffs.values()
    )
    return RolloutStatus.FAILING.wire if settled and backing_off else info.status


def by_service(replicas: Iterable[Replica]) -> dict[str, list[Replica]]:
    grouped: dict[str, list[Replica]] = {}
    for replica in replicas:
        grouped.setdefault(replica.service, []).append(replica)
    return grouped


def infos(snapshot: Snapshot) -> dict[str, services_pb2.RolloutInfo]:
    """Every service's rollout progress, as `coordctl rollout status` shows it."""
    grouped = by_service(snapshot.replicas.values())
    return {
        name: rollout_info(service, grouped.get(name, []), snapshot.unplaced)
        for name, service in snapshot.services.items()
    }


def figures(
    snapshot: Snapshot, progress: Mapping[str, services_pb2.RolloutInfo] | None = None
) -> tuple[ServiceFigures, ...]:
    progress = infos(snapshot) if progress is None else progress
    grouped = by_service(snapshot.replicas.values())
    found = []
    for name, service in snapshot.services.items():
        info = services_pb2.RolloutInfo()
        info.CopyFrom(progress[name])
        info.status = service_status(info, snapshot)
        found.append(service_figures(info, service, running(grouped.get(name, []), name)))
    return tuple(found)


def services_view(snapshot: Snapshot) -> list[services_pb2.ServiceInfo]:
    views = []
    grouped = by_service(snapshot.replicas.values())
    for name, service in snapshot.services.items():
        replicas = grouped.get(name, [])
        info = rollout_info(service, replicas, snapshot.unplaced)
        current = service.rollout.target if service.rollout else 0
        spec = snapshot.specs.get((name, current)) if current else None
        views.append(
            services_pb2.ServiceInfo(
                name=name,
                mode=service.spec.mode,
                desired=info.desired if service.rollout else service.spec.replicas,
                running=running(replicas, name),
                healthy=info.available,
                revision=current,
                image=(spec or service.spec).image,
                rollout_status=service_status(info, snapshot),
                staged=spec is None
                or stored(spec) != stored(service.spec)
                or spec.replicas != service.spec.replicas,
                ports=[f"{p.published or '-'}:{p.target}/{p.protocol}" for p in service.spec.ports],
                unplaced=snapshot.unplaced.get(name, ""),
                stack=service.stack,
                dependencies=list(dependencies(service.spec)),
            )
        )
    return views


def replicas_view(snapshot: Snapshot, name: str, now: float) -> list[services_pb2.ReplicaInfo]:
    """The service's replicas, then a row per slot waiting out a start backoff with no
    replica running in it: the last attempt, why it failed and when the next try is."""
    views = []
    live_slots = set()
    for record in snapshot.records:
        if record.service != name:
            continue
        replica = snapshot.replicas[record.id]
        if replica.active and not record.stopping:
            live_slots.add(record.slot)
        report = snapshot.reports.get((record.node, record.id, record.revision))
        spec = snapshot.specs.get((name, record.revision))
        views.append(
            services_pb2.ReplicaInfo(
                replica=record.id,
                service=name,
                revision=record.revision,
                node=record.node,
                state=report.state if report else ReplicaState.PENDING.wire,
                # Ready, not merely holding a session: an agent whose loop hangs keeps its
                # session open while its gRPC core answers the keepalive pings.
                node_unreachable=record.node not in snapshot.ready,
                health=report.health if report else workloads_pb2.REPLICA_HEALTH_UNSPECIFIED,
                since=replica.since,
                restarts=replica.restarts,
                message=(report.message if report else "") or record.stop_reason,
                image=spec.image if spec else "",
                # replaced: written off on a lost node, stopped when the node returns
                desired="stopping" if record.stopping else "replaced" if record.replaced else "running",
            )
        )
    for (service, slot), backoff in sorted(snapshot.backoffs.items()):
        if service != name or slot in live_slots or not backoff.attempts:
            continue
        spec = snapshot.specs.get((name, backoff.revision))
        views.append(
            services_pb2.ReplicaInfo(
                replica=backoff.attempts[-1],
                service=name,
                revision=backoff.revision,
                node=backoff.node,
                state=ReplicaState.BACKOFF.wire,
                since=backoff.failed_at,
                restarts=backoff.failures,  # the failed starts in a row
                message=describe(backoff, now),
                image=spec.image if spec else "",
                desired="running",
            )
        )
    return views

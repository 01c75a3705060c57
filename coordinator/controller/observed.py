"""The pure translations between what the coordinator stores or hears and what the
functional core reads: replica records + agent reports -> rollout.replicas.Replica, and
node records + hardware + metrics -> placement.scheduler.Node."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from picoord.common.vocabulary import ReplicaHealth, ReplicaState
from picoord.coordinator.controller.records import ReplicaRecord
from picoord.coordinator.rollout.replicas import (
    FAILED,
    PENDING,
    RUNNING,
    STARTING,
    UNHEALTHY,
    Replica,
)
from picoord.v1 import workloads_pb2

# What the agent reports (Docker's container states, plus its own pending/pulling/failed),
# as the planner counts it; any other state counts as failed.
PLANNED_STATES = {
    ReplicaState.PENDING: PENDING,
    ReplicaState.PULLING: PENDING,
    ReplicaState.CREATED: STARTING,
    ReplicaState.RESTARTING: STARTING,
    ReplicaState.RUNNING: RUNNING,
}


@dataclass(frozen=True)
class Seen:
    """When the coordinator first saw a replica's current state and health (its own clock:
    a Pi's clock may be off, and the monitor window is measured here)."""

    state: ReplicaState
    health: ReplicaHealth
    state_since: float
    health_since: float


def observe(previous: Seen | None, state: ReplicaState, health: ReplicaHealth, now: float) -> Seen:
    if previous is None:
        return Seen(state, health, now, now)
    return Seen(
        state,
        health,
        previous.state_since if previous.state == state else now,
        previous.health_since if previous.health == health else now,
    )


def replica_view(
    record: ReplicaRecord, report: workloads_pb2.ReplicaReport | None, seen: Seen | None
) -> Replica:
    """One replica as the planner and the reconciler see it."""
    if report is None:
        return Replica(
            id=record.id,
            service=record.service,
            node=record.node,
            revision=record.revision,
            state=PENDING,
            created_at=record.created_at,
            since=record.created_at,
            stopping=record.stopping,
            replaced=record.replaced,
            slot=record.slot,
        )
    state = PLANNED_STATES.get(ReplicaState.from_wire(report.state), FAILED)
    health = ReplicaHealth.from_wire(report.health)
    failure = failure_detail(report, state, health)
    return Replica(
        id=record.id,
        service=record.service,
        node=record.node,
        revision=record.revision,
        state=state,
        health=health,
        created_at=record.created_at,
        since=seen.state_since if seen else record.created_at,
        health_since=seen.health_since if seen else record.created_at,
        restarts=report.restarts,
        stopping=record.stopping,
        replaced=record.replaced,
        failure=failure,
        slot=record.slot,
    )


def failure_detail(report: workloads_pb2.ReplicaReport, state: ReplicaState, health: ReplicaHealth) -> str:
    """The agent's words for what went wrong, with the exit code of the run that ended when
    the replica was restarted by its policy: a container that exits at once shows as a
    restart or as a failed probe of a container that is gone, and the code is what the
    operator needs."""
    words = report.message if state == FAILED or health == UNHEALTHY else ""
    code = f"exit code {report.exit_code}"
    if report.restarts and report.exit_code and code not in words:
        words = f"{words} (last run: {code})" if words else code
    return words


def reports_by_replica(
    reports: Mapping[str, workloads_pb2.ReplicaReports],
) -> dict[tuple[str, str, int], workloads_pb2.ReplicaReport]:
    """(node, replica, revision) -> the node's latest report of it."""
    found = {}
    for node, message in reports.items():
        for report in message.replicas:
            found[(node, report.replica, report.revision)] = report
    return found

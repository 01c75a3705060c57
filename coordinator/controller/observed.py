"""The pure translations between what the coordinator stores or hears and what the
functional core reads: replica records + agent reports -> rollout.replicas.Replica, and
node records + hardware + metrics -> placement.scheduler.Node."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from picoord.common.names import normalise_arch
from picoord.coordinator.controller.records import ReplicaRecord
from picoord.coordinator.placement.constraints import NodeFacts
from picoord.coordinator.placement.scheduler import Load, Node
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
from picoord.coordinator.telemetry import soc_temperature
from picoord.v1 import node_pb2, workloads_pb2

# The agent's words (Docker's container states, plus its own pending/pulling/failed).
AGENT_STATES = {
    "pending": PENDING,
    "pulling": PENDING,
    "created": STARTING,
    "restarting": STARTING,
    "running": RUNNING,
    "exited": FAILED,
    "dead": FAILED,
    "failed": FAILED,
    "removing": FAILED,
    "paused": FAILED,
}
AGENT_HEALTH = {
    workloads_pb2.REPLICA_HEALTH_UNSPECIFIED: UNKNOWN,
    workloads_pb2.REPLICA_HEALTH_NONE: UNKNOWN,
    workloads_pb2.REPLICA_HEALTH_STARTING: HEALTH_STARTING,
    workloads_pb2.REPLICA_HEALTH_HEALTHY: HEALTHY,
    workloads_pb2.REPLICA_HEALTH_UNHEALTHY: UNHEALTHY,
}
WIRE_HEALTH = {
    UNKNOWN: workloads_pb2.REPLICA_HEALTH_UNSPECIFIED,
    HEALTH_STARTING: workloads_pb2.REPLICA_HEALTH_STARTING,
    HEALTHY: workloads_pb2.REPLICA_HEALTH_HEALTHY,
    UNHEALTHY: workloads_pb2.REPLICA_HEALTH_UNHEALTHY,
}


@dataclass(frozen=True)
class Seen:
    """When the coordinator first saw a replica's current state and health (its own clock:
    a Pi's clock may be off, and the monitor window is measured here)."""

    state: str
    health: str
    state_since: float
    health_since: float


def observe(previous: Seen | None, state: str, health: str, now: float) -> Seen:
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
        )
    state = AGENT_STATES.get(report.state, FAILED)
    health = AGENT_HEALTH.get(report.health, UNKNOWN)
    failure = report.message if state == FAILED or health == UNHEALTHY else ""
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
    )


def reports_by_replica(
    reports: Mapping[str, workloads_pb2.ReplicaReports],
) -> dict[tuple[str, str, int], workloads_pb2.ReplicaReport]:
    """(node, replica, revision) -> the node's latest report of it."""
    found = {}
    for node, message in reports.items():
        for report in message.replicas:
            found[(node, report.replica, report.revision)] = report
    return found


def scheduler_node(
    name: str,
    hardware: node_pb2.Hardware,
    labels: Mapping[str, str],
    sample: node_pb2.MetricsSample | None,
    ready: bool,
    draining: bool,
) -> Node:
    load = Load()
    if sample is not None:
        load = Load(
            cpu_percent=sample.cpu_percent,
            memory_available_bytes=sample.memory_available_bytes or None,
            soc_celsius=soc_temperature(sample),
            throttled=sample.throttled if sample.throttled_available else 0,
        )
    return Node(
        facts=NodeFacts(
            name=name,
            arch=normalise_arch(hardware.arch),
            hostname=hardware.hostname or name,
            role=labels.get("role", "worker"),
            labels=dict(labels),
        ),
        memory_bytes=hardware.memory_total_bytes,
        cpu_cores=hardware.cpu_cores,
        gpus=len(hardware.gpus),
        ready=ready,
        draining=draining,
        load=load,
    )

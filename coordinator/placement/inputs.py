"""From what the coordinator holds (a node's Hardware, its latest MetricsSample, labels,
session and drain state) to the scheduler's plain data, in one place.

Pure conversions, so the reconcile loop stays a thin shell and the scheduler never sees
protobuf. The SoC temperature is picked by telemetry's one rule (`soc_temperature`);
throttling bits count only when the agent could read them (`throttled_available`).
"""

from __future__ import annotations

from collections.abc import Mapping

from picoord.coordinator.placement.constraints import NodeFacts
from picoord.coordinator.placement.scheduler import Load, Node
from picoord.coordinator.telemetry import soc_temperature
from picoord.v1 import node_pb2


def load_from_sample(sample: node_pb2.MetricsSample | None) -> Load:
    """The scheduler's view of a node's load; all unknown without a sample yet."""
    if sample is None:
        return Load()
    return Load(
        cpu_percent=sample.cpu_percent,
        memory_available_bytes=sample.memory_available_bytes if sample.memory_total_bytes else None,
        soc_celsius=soc_temperature(sample),
        throttled=sample.throttled if sample.throttled_available else 0,
    )


def node_from(
    name: str,
    hardware: node_pb2.Hardware,
    sample: node_pb2.MetricsSample | None,
    labels: Mapping[str, str],
    ready: bool,
    draining: bool = False,
    role: str = "worker",
) -> Node:
    facts = NodeFacts(name, arch=hardware.arch, hostname=hardware.hostname, role=role, labels=dict(labels))
    return Node(
        facts,
        memory_bytes=hardware.memory_total_bytes,
        cpu_cores=hardware.cpu_cores,
        gpus=len(hardware.gpus),
        ready=ready,
        draining=draining,
        load=load_from_sample(sample),
    )

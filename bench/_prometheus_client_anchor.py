"""The node section of /metrics written the prometheus_client way: the coordinator's
renderer before the hand-made one (coordinator/prometheus.py `render_nodes`), about 6 times
slower. It is no longer served; bench/metrics_scrape.py keeps it as its anchor and
tests/unit/test_prometheus.py as the oracle `render_nodes` must match byte for byte.

The leading underscore keeps it from being taken for a bench. Importable both from a bench
(bench/ on sys.path) and from the tests (as bench._prometheus_client_anchor).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric, UnknownMetricFamily

from picoord.common.node_series import SeriesFamily
from picoord.coordinator.cluster import Cluster
from picoord.coordinator.prometheus import (
    BOOT,
    CPU,
    CPU_MODES,
    DEVICE_ERROR,
    FILESYSTEM,
    GUEST,
    GUEST_MODES,
    LOAD,
    MEMORY,
    NETWORK,
    NETWORK_LINK,
    STATUS,
    THERMAL,
    THROTTLED,
    TIME,
    TIMEX_OFFSET,
    UNAME,
    UP,
    CoordinatorCollector,
    declared_layout,
    link_values,
    uname_values,
)
from picoord.coordinator.status import Status
from picoord.v1 import node_pb2

if TYPE_CHECKING:
    from picoord.coordinator.prometheus import Workloads


def metric_family(family: SeriesFamily, labels: tuple[str, ...] | None = None) -> Metric:
    """A prometheus_client family for one of the table's (its labels after instance)."""
    names = ("instance", *(family.labels if labels is None else labels))
    if family.kind == "counter":
        return CounterMetricFamily(family.name.removesuffix("_total"), family.help, labels=names)
    if family.kind == "gauge":
        return GaugeMetricFamily(family.name, family.help, labels=names)
    return UnknownMetricFamily(family.name, family.help, labels=names)


def declared_series(
    hardware: node_pb2.Hardware, sample: node_pb2.MetricsSample
) -> Iterator[tuple[SeriesFamily, tuple[str, ...], float]]:
    """(family, label values, value in node_exporter's unit) of every declared series the
    sample carries; none when the sample's values do not match the declaration."""
    values = sample.series_values
    if len(values) != len(hardware.series):
        return
    for entry in declared_layout(hardware):
        yield entry.family, entry.labels, values[entry.index] * entry.family.scale


class ClusterCollector(CoordinatorCollector):
    """Every node's latest sample, then the coordinator's own figures (`include_nodes=False`:
    only those, as the coordinator serves them)."""

    def __init__(
        self, cluster: Cluster, include_nodes: bool = True, workloads: Workloads | None = None
    ) -> None:
        super().__init__(cluster, workloads)
        self.include_nodes = include_nodes

    def collect(self) -> Iterator[Metric]:
        if self.include_nodes:
            yield from self._node_metrics()
        yield from self._coordinator_metrics()

    def _node_metrics(self) -> Iterator[Metric]:
        cpu = metric_family(CPU)
        guest = metric_family(GUEST)
        load = [metric_family(family) for family in LOAD]
        memory = [(metric_family(family), family.field) for family in MEMORY]
        # the labels in prometheus_client's order of add_metric, sorted on output
        fs_labels = ("device", "mountpoint", "fstype")
        filesystem = [(metric_family(family, fs_labels), family.field) for family in FILESYSTEM]
        network = [(metric_family(family), family.field) for family in NETWORK]
        thermal = metric_family(THERMAL, ("zone", "type"))
        boot, throttled, up = metric_family(BOOT), metric_family(THROTTLED), metric_family(UP)
        status, uname, clock = metric_family(STATUS), metric_family(UNAME), metric_family(TIME)
        offset = metric_family(TIMEX_OFFSET)
        link = {family.name: metric_family(family) for family in NETWORK_LINK}
        device_error = metric_family(DEVICE_ERROR, fs_labels)
        declared: dict[str, Metric] = {}

        for record in self.cluster.nodes():
            node = record.name
            node_status = self.cluster.status(node)
            up.add_metric([node], 1.0 if node_status is Status.READY else 0.0)
            for value in Status:
                status.add_metric([node, value.value], 1.0 if value is node_status else 0.0)
            measured = self.cluster.clock_offset(node)
            if measured is not None:
                offset.add_metric([node], measured)
            sample = self.cluster.history.latest(node)
            if sample is None:
                continue
            for times in sample.cpus:
                for mode in CPU_MODES:
                    cpu.add_metric([node, str(times.cpu), mode], getattr(times, mode))
                for field, mode in GUEST_MODES:
                    guest.add_metric([node, str(times.cpu), mode], getattr(times, field))
            for family, value in zip(load, (sample.load1, sample.load5, sample.load15), strict=True):
                family.add_metric([node], value)
            for family, field in memory:
                family.add_metric([node], float(getattr(sample, field)))
            for fs in sample.filesystems:
                for family, field in filesystem:
                    family.add_metric([node, fs.device, fs.mountpoint, fs.fstype], float(getattr(fs, field)))
                device_error.add_metric([node, fs.device, fs.mountpoint, fs.fstype], 0.0)
            for counters in sample.network:
                for family, field in network:
                    family.add_metric([node, counters.device], float(getattr(counters, field)))
            for temperature in sample.temperatures:
                thermal.add_metric([node, temperature.zone, temperature.type], temperature.celsius)
            boot.add_metric([node], sample.boot_time)
            if sample.throttled_available:
                throttled.add_metric([node], float(sample.throttled))
            hardware = self.cluster.hardware(record)
            uname.add_metric([node, *uname_values(hardware, node)], 1.0)
            clock.add_metric([node], sample.timestamp)
            for counters in sample.network:
                for name, value in link_values(counters):
                    link[name].add_metric([node, counters.device], value)
            for family, labels, value in declared_series(hardware, sample):
                metric = declared.get(family.name)
                if metric is None:
                    metric = declared[family.name] = metric_family(family)
                metric.add_metric([node, *labels], value)

        yield from (cpu, *load, *(family for family, _ in memory), *(family for family, _ in filesystem))
        yield from (family for family, _ in network)
        yield from (
            thermal,
            boot,
            throttled,
            up,
            status,
            uname,
            clock,
            offset,
            *link.values(),
            guest,
            device_error,
        )
        yield from (declared[name] for name in sorted(declared))

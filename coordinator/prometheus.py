"""Prometheus endpoint: every node's latest sample under node_exporter's metric names with
`instance` set to the node name (scrape with `honor_labels: true`), plus the
coordinator's own figures."""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Iterator

from prometheus_client import CollectorRegistry, start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from picoord.coordinator.cluster import Cluster
from picoord.coordinator.status import Status

CPU_MODES = ("user", "nice", "system", "idle", "iowait", "irq", "softirq", "steal")
MESSAGE_RATE_WINDOW = 10.0


class ClusterCollector(Collector):
    def __init__(self, cluster: Cluster) -> None:
        self.cluster = cluster
        self._message_counts: deque[tuple[float, int]] = deque(maxlen=64)

    def _messages_per_second(self) -> float:
        now = time.monotonic()
        self._message_counts.append((now, self.cluster.counters.messages_received))
        while len(self._message_counts) > 2 and now - self._message_counts[0][0] > MESSAGE_RATE_WINDOW:
            self._message_counts.popleft()
        (then, before), (_, after) = self._message_counts[0], self._message_counts[-1]
        return (after - before) / (now - then) if now > then else 0.0

    def collect(self) -> Iterator[Metric]:
        yield from self._node_metrics()
        yield from self._coordinator_metrics()

    def _node_metrics(self) -> Iterator[Metric]:
        def gauge(name: str, doc: str, labels: tuple[str, ...] = ()) -> GaugeMetricFamily:
            return GaugeMetricFamily(name, doc, labels=("instance", *labels))

        def counter(name: str, doc: str, labels: tuple[str, ...] = ()) -> CounterMetricFamily:
            return CounterMetricFamily(name, doc, labels=("instance", *labels))

        cpu = counter("node_cpu_seconds", "Seconds the CPUs spent in each mode.", ("cpu", "mode"))
        load = {n: gauge(f"node_load{n}", f"{n}m load average.") for n in ("1", "5", "15")}
        memory = {
            field: gauge(f"node_memory_{name}_bytes", f"Memory information field {name}_bytes.")
            for field, name in (
                ("memory_total_bytes", "MemTotal"),
                ("memory_available_bytes", "MemAvailable"),
                ("memory_free_bytes", "MemFree"),
                ("swap_total_bytes", "SwapTotal"),
                ("swap_free_bytes", "SwapFree"),
            )
        }
        fs_labels = ("device", "mountpoint", "fstype")
        filesystem = {
            field: gauge(f"node_filesystem_{field}", f"Filesystem {field.replace('_', ' ')}.", fs_labels)
            for field in ("size_bytes", "free_bytes", "avail_bytes")
        }
        network = {
            field: counter(f"node_network_{name}", f"Network device statistic {name}.", ("device",))
            for field, name in (
                ("receive_bytes", "receive_bytes"),
                ("transmit_bytes", "transmit_bytes"),
                ("receive_packets", "receive_packets"),
                ("transmit_packets", "transmit_packets"),
                ("receive_errors", "receive_errs"),
                ("transmit_errors", "transmit_errs"),
            )
        }
        thermal = gauge("node_thermal_zone_temp", "Zone temperature in Celsius.", ("zone", "type"))
        boot = gauge("node_boot_time_seconds", "Node boot time, in unixtime.")
        throttled = gauge(
            "picoord_node_throttled", "Raspberry Pi firmware throttling bits (vcgencmd get_throttled)."
        )
        up = gauge("picoord_node_up", "1 when the node is Ready.")
        status = gauge(
            "picoord_node_status", "The node's status, one series per possible value.", ("status",)
        )

        for record in self.cluster.nodes():
            node = record.name
            node_status = self.cluster.status(node)
            up.add_metric([node], 1.0 if node_status is Status.READY else 0.0)
            for value in Status:
                status.add_metric([node, value.value], 1.0 if value is node_status else 0.0)
            sample = self.cluster.history.latest(node)
            if sample is None:
                continue
            for times in sample.cpus:
                for mode in CPU_MODES:
                    cpu.add_metric([node, str(times.cpu), mode], getattr(times, mode))
            load["1"].add_metric([node], sample.load1)
            load["5"].add_metric([node], sample.load5)
            load["15"].add_metric([node], sample.load15)
            for field, family in memory.items():
                family.add_metric([node], float(getattr(sample, field)))
            for fs in sample.filesystems:
                for field, family in filesystem.items():
                    family.add_metric([node, fs.device, fs.mountpoint, fs.fstype], float(getattr(fs, field)))
            for counters in sample.network:
                for field, family in network.items():
                    family.add_metric([node, counters.device], float(getattr(counters, field)))
            for temperature in sample.temperatures:
                thermal.add_metric([node, temperature.zone, temperature.type], temperature.celsius)
            boot.add_metric([node], sample.boot_time)
            if sample.throttled_available:
                throttled.add_metric([node], float(sample.throttled))

        yield from (cpu, *load.values(), *memory.values(), *filesystem.values(), *network.values())
        yield from (thermal, boot, throttled, up, status)

    def _coordinator_metrics(self) -> Iterator[Metric]:
        counters = self.cluster.counters
        yield GaugeMetricFamily(
            "picoord_coordinator_sessions", "Open agent sessions.", value=len(self.cluster.sessions)
        )
        yield CounterMetricFamily(
            "picoord_coordinator_messages_received",
            "Agent messages received.",
            value=counters.messages_received,
        )
        yield GaugeMetricFamily(
            "picoord_coordinator_messages_per_second",
            f"Agent messages received per second over the last {MESSAGE_RATE_WINDOW:.0f} s.",
            value=self._messages_per_second(),
        )
        yield CounterMetricFamily(
            "picoord_coordinator_sessions_opened", "Agent sessions opened.", value=counters.sessions_opened
        )
        yield CounterMetricFamily(
            "picoord_coordinator_malformed_messages",
            "Agent messages rejected.",
            value=counters.malformed_messages,
        )
        refused = CounterMetricFamily(
            "picoord_coordinator_refused_messages",
            "Agent messages refused, by message kind and reason.",
            labels=("kind", "reason"),
        )
        for (kind, reason), count in sorted(counters.refused_messages.items()):
            refused.add_metric((kind, reason), count)
        yield refused
        yield CounterMetricFamily(
            "picoord_coordinator_enrollments", "Nodes enrolled.", value=counters.enrollments
        )
        yield CounterMetricFamily(
            "picoord_coordinator_enrollments_refused",
            "Enrollments refused.",
            value=counters.enrollments_refused,
        )


def serve_metrics(cluster: Cluster, host: str, port: int) -> None:
    """Serve /metrics from a background thread (prometheus_client's own server)."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(ClusterCollector(cluster))
    start_http_server(port, addr=host, registry=registry)

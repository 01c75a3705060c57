"""Recent metric samples per node, kept in memory with a bounded size, and the pure
computations `coordctl top` and the Prometheus endpoint make from them."""

from __future__ import annotations

from collections import deque
from collections.abc import Iterable

from picoord.v1 import admin_pb2, node_pb2

DEFAULT_HISTORY = 120


class MetricsHistory:
    """The last `size` samples of every node; oldest dropped first."""

    def __init__(self, size: int = DEFAULT_HISTORY) -> None:
        if size < 2:
            raise ValueError("metrics history must keep at least 2 samples (rates need two)")
        self.size = size
        self._samples: dict[str, deque[node_pb2.MetricsSample]] = {}

    def add(self, node: str, sample: node_pb2.MetricsSample) -> None:
        self._samples.setdefault(node, deque(maxlen=self.size)).append(sample)

    def recent(self, node: str, count: int | None = None) -> list[node_pb2.MetricsSample]:
        samples = list(self._samples.get(node, ()))
        return samples if count is None else samples[-count:]

    def latest(self, node: str) -> node_pb2.MetricsSample | None:
        samples = self._samples.get(node)
        return samples[-1] if samples else None

    def forget(self, node: str) -> None:
        self._samples.pop(node, None)

    def nodes(self) -> Iterable[str]:
        return self._samples.keys()


def network_rates(previous: node_pb2.MetricsSample, current: node_pb2.MetricsSample) -> tuple[float, float]:
    """Receive and transmit bytes/s between two samples, summed over interfaces.

    A counter that went down (interface re-created, agent host rebooted) contributes
    nothing rather than a huge negative or wrapped figure.
    """
    elapsed = current.timestamp - previous.timestamp
    if elapsed <= 0:
        return 0.0, 0.0
    before = {counters.device: counters for counters in previous.network}
    received = transmitted = 0
    for counters in current.network:
        old = before.get(counters.device)
        if old is None:
            continue
        received += max(0, counters.receive_bytes - old.receive_bytes)
        transmitted += max(0, counters.transmit_bytes - old.transmit_bytes)
    return received / elapsed, transmitted / elapsed


SOC_SENSOR_TYPES = ("cpu-thermal", "cpu_thermal", "soc-thermal", "soc_thermal", "x86_pkg_temp", "coretemp")


def soc_temperature(sample: node_pb2.MetricsSample) -> float | None:
    """The SoC/package temperature: a known sensor type first, else the hottest zone."""
    if not sample.temperatures:
        return None
    for sensor_type in SOC_SENSOR_TYPES:
        for temperature in sample.temperatures:
            if temperature.type == sensor_type:
                return temperature.celsius
    return max(temperature.celsius for temperature in sample.temperatures)


def root_filesystem(sample: node_pb2.MetricsSample) -> node_pb2.FilesystemUsage | None:
    for filesystem in sample.filesystems:
        if filesystem.mountpoint == "/":
            return filesystem
    return sample.filesystems[0] if sample.filesystems else None


def top_row(
    name: str, status: int, cpu_cores: int, samples: list[node_pb2.MetricsSample]
) -> admin_pb2.TopRow:
    row = admin_pb2.TopRow(name=name, status=status, cpu_cores=cpu_cores)
    if not samples:
        return row
    latest = samples[-1]
    row.sample_time = latest.timestamp
    row.cpu_percent = latest.cpu_percent
    row.load1 = latest.load1
    row.memory_total_bytes = latest.memory_total_bytes
    row.memory_available_bytes = latest.memory_available_bytes
    root = root_filesystem(latest)
    if root is not None:
        row.disk_size_bytes = root.size_bytes
        row.disk_avail_bytes = root.avail_bytes
    if len(samples) >= 2:
        received, transmitted = network_rates(samples[-2], latest)
        row.network_receive_bytes_per_second = received
        row.network_transmit_bytes_per_second = transmitted
    temperature = soc_temperature(latest)
    if temperature is not None:
        row.temperature_available = True
        row.soc_temperature_celsius = temperature
    row.throttled_available = latest.throttled_available
    row.throttled = latest.throttled
    return row

"""Recent metric samples per node, kept in memory with a bounded size, and the pure
computations `coordctl top` and the Prometheus endpoint make from them."""

from __future__ import annotations

from collections import deque
from collections.abc import Iterable

from picoord.common import limits
from picoord.v1 import admin_pb2, node_pb2

DEFAULT_HISTORY = limits.HISTORY_SAMPLES


class MetricsHistory:
    """The last `size` samples of every node, at most `node_bytes` of them per node and
    `total_bytes` for all nodes together; oldest dropped first.

    The byte bounds are what keeps memory flat whatever nodes send: a count alone let a
    node sending 4 MB samples grow the coordinator by 150 MB in 30 s. Over the per-node
    bound that node's oldest samples go; over the total, the oldest samples of any node
    (each node keeps at least its newest, so `top` and `node show` always have one).

    Samples are kept serialized: a parsed MetricsSample costs about 2.7 KB and dozens of
    objects the garbage collector must walk, its bytes about 0.5 KB and none. With 1000
    Pis that is the difference between long collector pauses on the event loop and none.
    Only the latest sample per node is kept parsed, with its `top` row precomputed, since
    those are what every scrape and every `coordctl top` read.
    """

    def __init__(
        self,
        size: int = DEFAULT_HISTORY,
        node_bytes: int = limits.HISTORY_NODE_BYTES,
        total_bytes: int = limits.HISTORY_TOTAL_BYTES,
    ) -> None:
        if size < 2:
            raise ValueError("metrics history must keep at least 2 samples (rates need two)")
        if not 0 < node_bytes <= total_bytes:
            raise ValueError("metrics history needs 0 < bytes per node <= bytes in total")
        self.size = size
        self.node_bytes = node_bytes
        self.total_bytes = total_bytes
        self._samples: dict[str, deque[tuple[int, bytes]]] = {}  # (arrival number, sample)
        self._node_bytes: dict[str, int] = {}
        self._bytes = 0
        # Every kept sample's (arrival number, node), oldest first, for the total bound.
        # Samples dropped by the per-node bounds leave stale entries here, skipped when
        # met and swept out once they outnumber the live ones.
        self._arrivals: deque[tuple[int, str]] = deque()
        self._count = 0
        self._next = 0
        self._latest: dict[str, node_pb2.MetricsSample] = {}
        self._top: dict[str, admin_pb2.TopRow] = {}

    def add(self, node: str, sample: node_pb2.MetricsSample) -> None:
        data = sample.SerializeToString()
        samples = self._samples.setdefault(node, deque())
        samples.append((self._next, data))
        self._arrivals.append((self._next, node))
        self._next += 1
        self._count += 1
        self._node_bytes[node] = self._node_bytes.get(node, 0) + len(data)
        self._bytes += len(data)
        while len(samples) > 1 and (len(samples) > self.size or self._node_bytes[node] > self.node_bytes):
            self._drop_oldest(node)
        while self._bytes > self.total_bytes and self._arrivals:
            number, oldest_node = self._arrivals.popleft()
            kept = self._samples.get(oldest_node)
            # Stale (already dropped), or that node's newest, which always stays.
            if kept and number >= kept[0][0] and len(kept) > 1:
                self._drop_oldest(oldest_node)
        if len(self._arrivals) > 2 * self._count + 1024:
            self._sweep()
        previous = self._latest.get(node)
        self._latest[node] = sample
        self._top[node] = top_row(node, 0, 0, [sample] if previous is None else [previous, sample])

    def _drop_oldest(self, node: str) -> None:
        _number, data = self._samples[node].popleft()
        self._node_bytes[node] -= len(data)
        self._bytes -= len(data)
        self._count -= 1

    def _sweep(self) -> None:
        self._arrivals = deque(
            sorted((number, node) for node, samples in self._samples.items() for number, _data in samples)
        )

    def bytes_kept(self, node: str | None = None) -> int:
        """Serialized bytes kept for `node`, or for all nodes."""
        return self._bytes if node is None else self._node_bytes.get(node, 0)

    def recent(self, node: str, count: int | None = None) -> list[node_pb2.MetricsSample]:
        samples = self._samples.get(node, ())
        chosen = list(samples)[-count:] if count else list(samples)
        return [node_pb2.MetricsSample.FromString(data) for _number, data in chosen]

    def latest(self, node: str) -> node_pb2.MetricsSample | None:
        return self._latest.get(node)

    def top(
        self, node: str, status: int, cpu_cores: int, into: admin_pb2.TopRow | None = None
    ) -> admin_pb2.TopRow:
        """The node's `top` row, written `into` a message when given (a response's own row)."""
        row = admin_pb2.TopRow() if into is None else into
        cached = self._top.get(node)
        if cached is not None:
            row.CopyFrom(cached)
        row.name, row.status, row.cpu_cores = node, status, cpu_cores
        return row

    def forget(self, node: str) -> None:
        samples = self._samples.pop(node, ())
        self._count -= len(samples)
        self._bytes -= self._node_bytes.pop(node, 0)
        for store in (self._latest, self._top):
            store.pop(node, None)

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

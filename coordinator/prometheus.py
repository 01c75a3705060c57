"""Prometheus endpoint: every node's latest sample under node_exporter's metric names with
`instance` set to the node name (scrape with `honor_labels: true`), plus the
coordinator's own figures.

A scrape never renders. A background thread renders the whole exposition at most every
`interval` seconds while someone scrapes (a thousand Pis are about 300,000 series: each
declares some 200 of node_exporter's, see common/node_series.py), and the
HTTP handler returns the latest complete bytes. The node section is written by a small
hand-made formatter over a snapshot taken on the event loop; the coordinator's own
figures still go through prometheus_client (`ClusterCollector._coordinator_metrics`).
"""

from __future__ import annotations

import asyncio
import gzip
import socket
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from concurrent import futures
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import TYPE_CHECKING, TypeVar

import structlog
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric, UnknownMetricFamily
from prometheus_client.registry import Collector
from prometheus_client.utils import floatToGoString

from picoord.common.node_series import SeriesFamily, family_of
from picoord.common.vocabulary import RolloutStatus
from picoord.coordinator.cluster import Cluster
from picoord.coordinator.status import Status
from picoord.v1 import node_pb2

if TYPE_CHECKING:
    from picoord.coordinator.controller.controller import ServiceFigures

    Workloads = Callable[[], Sequence[ServiceFigures]]

CPU_MODES = ("user", "nice", "system", "idle", "iowait", "irq", "softirq", "steal")
MESSAGE_RATE_WINDOW = 10.0
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
RENDER_INTERVAL = 1.0  # seconds between renders while scrapes come
RENDER_DUTY = 0.2  # at most this share of the time goes to rendering (see render_pause)
IDLE_AFTER = 300.0  # no scrape for this long: stop rendering until the next one
SNAPSHOT_TIMEOUT = 10.0  # a render waits this long for the event loop to hand over a snapshot
SCRAPE_WAIT = 10.0  # a scrape that finds no fresh exposition waits this long for one
SNAPSHOT_SLICE = 100  # nodes per snapshot callback on the loop (about 1 ms)

log = structlog.get_logger("picoord.coordinator.metrics")
T = TypeVar("T")


class ClusterCollector(Collector):
    """The prometheus_client way. The coordinator serves only its own section through it
    (`include_nodes=False`); the node section below is the reference that `render_nodes`
    is tested and benchmarked against (bench/metrics_scrape.py)."""

    def __init__(
        self, cluster: Cluster, include_nodes: bool = True, workloads: Workloads | None = None
    ) -> None:
        self.cluster = cluster
        self.include_nodes = include_nodes
        self.workloads = workloads
        self._message_counts: deque[tuple[float, int]] = deque(maxlen=64)

    def _messages_per_second(self) -> float:
        now = time.monotonic()
        self._message_counts.append((now, self.cluster.counters.messages_received))
        while len(self._message_counts) > 2 and now - self._message_counts[0][0] > MESSAGE_RATE_WINDOW:
            self._message_counts.popleft()
        (then, before), (_, after) = self._message_counts[0], self._message_counts[-1]
        return (after - before) / (now - then) if now > then else 0.0

    def collect(self) -> Iterator[Metric]:
        if self.include_nodes:
            yield from self._node_metrics()
        yield from self._coordinator_metrics()

    def _node_metrics(self) -> Iterator[Metric]:
        def gauge(name: str, doc: str, labels: tuple[str, ...] = ()) -> GaugeMetricFamily:
            return GaugeMetricFamily(name, doc, labels=("instance", *labels))

        def counter(name: str, doc: str, labels: tuple[str, ...] = ()) -> CounterMetricFamily:
            return CounterMetricFamily(name, doc, labels=("instance", *labels))

        cpu = counter("node_cpu_seconds", "Seconds the CPUs spent in each mode.", ("cpu", "mode"))
        guest = counter(GUEST.name.removesuffix("_total"), GUEST.help, ("cpu", "mode"))
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
            for field in FILESYSTEM_FIELDS
        }
        network = {
            field: counter(f"node_network_{name}", f"Network device statistic {name}.", ("device",))
            for field, name in NETWORK_FIELDS
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
        uname = gauge(UNAME.name, UNAME.help, UNAME_LABELS)
        clock = gauge(TIME.name, TIME.help)
        link = {family.name: gauge(family.name, family.help, ("device",)) for family in NETWORK_LINK}
        device_error = gauge(DEVICE_ERROR.name, DEVICE_ERROR.help, fs_labels)
        declared: dict[str, Metric] = {}

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
                for field, mode in GUEST_MODES:
                    guest.add_metric([node, str(times.cpu), mode], getattr(times, field))
            load["1"].add_metric([node], sample.load1)
            load["5"].add_metric([node], sample.load5)
            load["15"].add_metric([node], sample.load15)
            for field, family in memory.items():
                family.add_metric([node], float(getattr(sample, field)))
            for fs in sample.filesystems:
                for field, family in filesystem.items():
                    family.add_metric([node, fs.device, fs.mountpoint, fs.fstype], float(getattr(fs, field)))
                device_error.add_metric([node, fs.device, fs.mountpoint, fs.fstype], 0.0)
            for counters in sample.network:
                for field, family in network.items():
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
                    metric = declared[family.name] = _prometheus_family(family)
                metric.add_metric([node, *labels], value)

        yield from (cpu, *load.values(), *memory.values(), *filesystem.values(), *network.values())
        yield from (thermal, boot, throttled, up, status, uname, clock, *link.values(), guest, device_error)
        yield from (declared[name] for name in sorted(declared))

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
        yield GaugeMetricFamily(
            "picoord_coordinator_store_writable",
            "1 while the state disk takes writes, 0 while it refuses them (full, read-only).",
            value=1.0 if self.cluster.store_writable else 0.0,
        )
        yield CounterMetricFamily(
            "picoord_coordinator_store_write_failures",
            "Writes the state disk refused.",
            value=counters.store_write_failures,
        )
        yield CounterMetricFamily(
            "picoord_coordinator_enrollments_throttled",
            "Enrollments refused unchecked because their source address failed too often.",
            value=counters.enrollments_throttled,
        )
        yield from service_metrics(self.workloads() if self.workloads is not None else ())


def service_metrics(figures: Sequence[ServiceFigures]) -> Iterator[Metric]:
    """Each applied service's replica counts, rollout status (one series per possible value,
    1 for the current one) and revision, as of the controller's last tick."""
    replicas = GaugeMetricFamily(
        "picoord_service_replicas",
        "Replicas of a service: desired, running, healthy.",
        labels=("service", "state"),
    )
    status = GaugeMetricFamily(
        "picoord_rollout_status",
        "The service's rollout status, one series per possible value.",
        labels=("service", "status"),
    )
    revision = GaugeMetricFamily(
        "picoord_rollout_revision",
        "The revision the service runs or rolls out (0: never rolled out).",
        labels=("service",),
    )
    for service in sorted(figures, key=lambda figure: figure.service):
        for state in ("desired", "running", "healthy"):
            replicas.add_metric((service.service, state), getattr(service, state))
        for value in RolloutStatus:
            status.add_metric((service.service, value.value), 1.0 if value == service.rollout_status else 0.0)
        revision.add_metric((service.service,), service.revision)
    yield from (replicas, status, revision)


# --- the node section, written by hand -------------------------------------------------------


@dataclass(frozen=True)
class NodeState:
    """What one render needs of one node. Taken on the event loop, so the render thread
    never iterates the cluster's dicts while sessions change them; samples are never
    changed after they arrive, so the thread may read them."""

    name: str
    status: Status
    sample: node_pb2.MetricsSample | None
    hardware: node_pb2.Hardware | None = None


def snapshot(cluster: Cluster, names: list[str] | None = None) -> list[NodeState]:
    """The listed nodes' states (every node's by default)."""
    if names is None:
        names = [record.name for record in cluster.nodes()]
    states = []
    for name in names:
        record = cluster.node(name)
        hardware = cluster.hardware(record) if record is not None else None
        states.append(NodeState(name, cluster.status(name), cluster.history.latest(name), hardware))
    return states


def escape_label_value(value: str) -> str:
    """Text format 0.0.4: backslash, double quote and line feed are escaped in label values."""
    if "\\" in value or '"' in value or "\n" in value:
        return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")
    return value


def _escape_help(text: str) -> str:
    return text.replace("\\", "\\\\").replace("\n", "\\n")


_SPECIAL_VALUES = {"inf": "+Inf", "-inf": "-Inf", "nan": "NaN"}


def _value(number: float) -> str:
    """prometheus_client's floatToGoString (the coordinator section's number format) with
    its common case first: a render formats some 65,000 of these."""
    text = repr(float(number))
    if text.find(".") > 6 or text in _SPECIAL_VALUES:
        return floatToGoString(number)
    return text


@dataclass(frozen=True)
class Family:
    name: str  # as exposed: counters end in _total
    kind: str
    help: str

    def header(self) -> str:
        return f"# HELP {self.name} {_escape_help(self.help)}\n# TYPE {self.name} {self.kind}\n"


def _gauge(name: str, help_text: str) -> Family:
    return Family(name, "gauge", help_text)


def _counter(name: str, help_text: str) -> Family:
    return Family(f"{name}_total", "counter", help_text)


MEMORY_FIELDS = (
    ("memory_total_bytes", "MemTotal"),
    ("memory_available_bytes", "MemAvailable"),
    ("memory_free_bytes", "MemFree"),
    ("swap_total_bytes", "SwapTotal"),
    ("swap_free_bytes", "SwapFree"),
)
FILESYSTEM_FIELDS = ("size_bytes", "free_bytes", "avail_bytes", "files", "files_free", "readonly")
NETWORK_FIELDS = (
    ("receive_bytes", "receive_bytes"),
    ("transmit_bytes", "transmit_bytes"),
    ("receive_packets", "receive_packets"),
    ("transmit_packets", "transmit_packets"),
    ("receive_errors", "receive_errs"),
    ("transmit_errors", "transmit_errs"),
    ("receive_drop", "receive_drop"),
    ("transmit_drop", "transmit_drop"),
    ("receive_fifo", "receive_fifo"),
    ("transmit_fifo", "transmit_fifo"),
    ("receive_frame", "receive_frame"),
    ("receive_compressed", "receive_compressed"),
    ("transmit_compressed", "transmit_compressed"),
    ("receive_multicast", "receive_multicast"),
    ("transmit_colls", "transmit_colls"),
    ("transmit_carrier", "transmit_carrier"),
)
UNAME_LABELS = ("domainname", "machine", "nodename", "release", "sysname", "version")  # sorted
# The node families in exposition order, with the same names, help and types as
# node_exporter's (and as ClusterCollector._node_metrics).
CPU = _counter("node_cpu_seconds", "Seconds the CPUs spent in each mode.")
LOAD = tuple(_gauge(f"node_load{n}", f"{n}m load average.") for n in ("1", "5", "15"))
MEMORY = tuple(
    _gauge(f"node_memory_{name}_bytes", f"Memory information field {name}_bytes.")
    for _, name in MEMORY_FIELDS
)
FILESYSTEM = tuple(
    _gauge(f"node_filesystem_{field}", f"Filesystem {field.replace('_', ' ')}.")
    for field in FILESYSTEM_FIELDS
)
NETWORK = tuple(
    _counter(f"node_network_{name}", f"Network device statistic {name}.") for _, name in NETWORK_FIELDS
)
THERMAL = _gauge("node_thermal_zone_temp", "Zone temperature in Celsius.")
BOOT = _gauge("node_boot_time_seconds", "Node boot time, in unixtime.")
THROTTLED = _gauge(
    "picoord_node_throttled", "Raspberry Pi firmware throttling bits (vcgencmd get_throttled)."
)
UP = _gauge("picoord_node_up", "1 when the node is Ready.")
STATUS = _gauge("picoord_node_status", "The node's status, one series per possible value.")
UNAME = _gauge("node_uname_info", "Labeled system information as provided by the uname system call.")
TIME = _gauge("node_time_seconds", "System time in seconds since epoch (1970), when the sample was taken.")
NETWORK_LINK = (
    _gauge("node_network_up", "Value is 1 if operstate is 'up', 0 otherwise."),
    _gauge("node_network_carrier", "Network device property: carrier"),
    _gauge("node_network_mtu_bytes", "Network device property: mtu_bytes"),
    _gauge("node_network_speed_bytes", "Network device property: speed_bytes"),
)
GUEST = _counter("node_cpu_guest_seconds", "Seconds the CPUs spent in guests (VMs) for each mode.")
GUEST_MODES = (("guest", "user"), ("guest_nice", "nice"))
# A filesystem the agent could not stat is left out of the sample, so those it reports had no error.
DEVICE_ERROR = _gauge(
    "node_filesystem_device_error", "Whether an error occurred while getting statistics for the given device."
)
NODE_FAMILIES = (
    CPU,
    *LOAD,
    *MEMORY,
    *FILESYSTEM,
    *NETWORK,
    THERMAL,
    BOOT,
    THROTTLED,
    UP,
    STATUS,
    UNAME,
    TIME,
    *NETWORK_LINK,
    GUEST,
    DEVICE_ERROR,
)
FIXED_NAMES = frozenset(family.name for family in NODE_FAMILIES)


def uname_values(hardware: node_pb2.Hardware, node: str) -> tuple[str, ...]:
    """node_uname_info's label values in UNAME_LABELS order. An agent from before the uname
    field still gets a series (from its hostname, kernel and arch), so Node Exporter Full's
    node selector lists it."""
    if hardware.HasField("uname"):
        u = hardware.uname
        return (u.domainname, u.machine, u.nodename or node, u.release, u.sysname, u.version)
    return ("", hardware.arch, hardware.hostname or node, hardware.kernel, "Linux", "")


def link_values(counters: node_pb2.NetworkCounters) -> list[tuple[str, float]]:
    """node_exporter's netclass gauges for one device, in NETWORK_LINK order; speed only when known."""
    if not counters.link_known:
        return []
    values = [
        ("node_network_up", 1.0 if counters.up else 0.0),
        ("node_network_carrier", 1.0 if counters.carrier else 0.0),
        ("node_network_mtu_bytes", float(counters.mtu)),
    ]
    if counters.speed_mbps:
        values.append(("node_network_speed_bytes", counters.speed_mbps * 125000.0))
    return values


@dataclass(frozen=True)
class DeclaredSeries:
    """One series of `Hardware.series` the exposition knows: where its value is, its family
    and its label values (without instance)."""

    index: int
    family: SeriesFamily
    labels: tuple[str, ...]


def declared_layout(hardware: node_pb2.Hardware) -> list[DeclaredSeries]:
    """The declared series this coordinator exports: known families only, not those the
    sample has own fields for, each series once, with the family's label count."""
    layout, seen = [], set()
    for index, key in enumerate(hardware.series):
        family = family_of(key.name)
        labels = tuple(key.label_values)
        if family is None or family.name in FIXED_NAMES or len(labels) != len(family.labels):
            continue
        if (family.name, labels) in seen:
            continue
        seen.add((family.name, labels))
        layout.append(DeclaredSeries(index, family, labels))
    return layout


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


def _prometheus_family(family: SeriesFamily) -> Metric:
    labels = ("instance", *family.labels)
    if family.kind == "counter":
        return CounterMetricFamily(family.name.removesuffix("_total"), family.help, labels=labels)
    if family.kind == "gauge":
        return GaugeMetricFamily(family.name, family.help, labels=labels)
    return UnknownMetricFamily(family.name, family.help, labels=labels)


NodeLines = dict[Family, list[str]]


def render_nodes(nodes: list[NodeState]) -> str:
    """The node section of the exposition: pure, and about 6 times faster than building
    prometheus_client families for it."""
    lines = empty_lines()
    add_node_lines(nodes, lines)
    return join_lines(lines)


def empty_lines() -> NodeLines:
    return {family: [] for family in NODE_FAMILIES}


def join_lines(lines: NodeLines) -> str:
    """The fixed families in their order, then the declared ones by name."""
    declared = sorted((family for family in lines if family.name not in FIXED_NAMES), key=lambda f: f.name)
    return "".join(
        family.header() + "".join(line + "\n" for line in lines[family])
        for family in (*NODE_FAMILIES, *declared)
    )


@dataclass(frozen=True)
class _DeclaredLine:
    index: int
    family: Family
    prefix: str  # name{labels} with the instance, ready for the value
    scale: float


_declared_cache: dict[str, tuple[node_pb2.Hardware, list[_DeclaredLine]]] = {}
DECLARED_CACHE_NODES = 100_000


def _declared_lines(node: str, instance: str, hardware: node_pb2.Hardware) -> list[_DeclaredLine]:
    """The node's declared series as line prefixes, built once per hello (a render formats
    them for every node every second)."""
    cached = _declared_cache.get(node)
    if cached is not None and cached[0] is hardware:
        return cached[1]
    lines = []
    for entry in declared_layout(hardware):
        labels = [instance]
        labels += [
            f'{name}="{escape_label_value(value)}"'
            for name, value in zip(entry.family.labels, entry.labels, strict=True)
        ]
        labels.sort(key=lambda label: label.partition("=")[0])
        family = Family(entry.family.name, entry.family.kind, entry.family.help)
        lines.append(
            _DeclaredLine(entry.index, family, f"{family.name}{{{','.join(labels)}}} ", entry.family.scale)
        )
    if len(_declared_cache) >= DECLARED_CACHE_NODES:
        _declared_cache.clear()
    _declared_cache[node] = (hardware, lines)
    return lines


def add_node_lines(nodes: list[NodeState], lines: NodeLines) -> None:
    """Append the nodes' series to their families' lines. Labels are written in sorted
    order, as prometheus_client does."""
    cpu, up, status = lines[CPU], lines[UP], lines[STATUS]
    by_name = {family.name: series for family, series in lines.items()}  # str keys hash faster
    memory = [(lines[family], field) for family, (field, _) in zip(MEMORY, MEMORY_FIELDS, strict=True)]
    filesystem = [(lines[family], field) for family, field in zip(FILESYSTEM, FILESYSTEM_FIELDS, strict=True)]
    network = [(lines[family], field) for family, (field, _) in zip(NETWORK, NETWORK_FIELDS, strict=True)]
    thermal, boot, throttled = lines[THERMAL], lines[BOOT], lines[THROTTLED]
    for node in nodes:
        instance = f'instance="{escape_label_value(node.name)}"'
        up.append(f"{UP.name}{{{instance}}} {'1.0' if node.status is Status.READY else '0.0'}")
        for value in Status:
            on = "1.0" if value is node.status else "0.0"
            status.append(f'{STATUS.name}{{{instance},status="{value.value}"}} {on}')
        sample = node.sample
        if sample is None:
            continue
        for times in sample.cpus:
            prefix = f'{CPU.name}{{cpu="{times.cpu}",{instance},mode="'
            for mode in CPU_MODES:
                cpu.append(f'{prefix}{mode}"}} {_value(getattr(times, mode))}')
            prefix = f'{GUEST.name}{{cpu="{times.cpu}",{instance},mode="'
            for field, mode in GUEST_MODES:
                lines[GUEST].append(f'{prefix}{mode}"}} {_value(getattr(times, field))}')
        for family, value in zip(LOAD, (sample.load1, sample.load5, sample.load15), strict=True):
            lines[family].append(f"{family.name}{{{instance}}} {_value(value)}")
        for (series, field), family in zip(memory, MEMORY, strict=True):
            series.append(f"{family.name}{{{instance}}} {_value(getattr(sample, field))}")
        for fs in sample.filesystems:
            labels = (
                f'device="{escape_label_value(fs.device)}",fstype="{escape_label_value(fs.fstype)}",'
                f'{instance},mountpoint="{escape_label_value(fs.mountpoint)}"'
            )
            for (series, field), family in zip(filesystem, FILESYSTEM, strict=True):
                series.append(f"{family.name}{{{labels}}} {_value(getattr(fs, field))}")
            lines[DEVICE_ERROR].append(f"{DEVICE_ERROR.name}{{{labels}}} 0.0")
        for counters in sample.network:
            labels = f'device="{escape_label_value(counters.device)}",{instance}'
            for (series, field), family in zip(network, NETWORK, strict=True):
                series.append(f"{family.name}{{{labels}}} {_value(getattr(counters, field))}")
        for temperature in sample.temperatures:
            thermal.append(
                f'{THERMAL.name}{{{instance},type="{escape_label_value(temperature.type)}",'
                f'zone="{escape_label_value(temperature.zone)}"}} {_value(temperature.celsius)}'
            )
        boot.append(f"{BOOT.name}{{{instance}}} {_value(sample.boot_time)}")
        if sample.throttled_available:
            throttled.append(f"{THROTTLED.name}{{{instance}}} {_value(sample.throttled)}")
        hardware = node.hardware if node.hardware is not None else node_pb2.Hardware()
        uname = ",".join(
            f'{name}="{escape_label_value(value)}"'
            for name, value in zip(UNAME_LABELS, uname_values(hardware, node.name), strict=True)
        )
        # instance sorts between domainname and machine
        head, _, tail = uname.partition(",machine=")
        lines[UNAME].append(f"{UNAME.name}{{{head},{instance},machine={tail}}} 1.0")
        lines[TIME].append(f"{TIME.name}{{{instance}}} {_value(sample.timestamp)}")
        for counters in sample.network:
            labels = f'device="{escape_label_value(counters.device)}",{instance}'
            for (name, value), family in zip(link_values(counters), NETWORK_LINK, strict=False):
                lines[family].append(f"{name}{{{labels}}} {_value(value)}")
        values = sample.series_values
        if len(values) == len(hardware.series):
            for entry in _declared_lines(node.name, instance, hardware):
                series = by_name.get(entry.family.name)
                if series is None:
                    series = by_name[entry.family.name] = lines[entry.family] = []
                series.append(f"{entry.prefix}{_value(values[entry.index] * entry.scale)}")


# --- the cached exposition --------------------------------------------------------------------


def render_pause(interval: float, render_seconds: float) -> float:
    """Seconds until the next render: `interval`, stretched so rendering takes at most a
    RENDER_DUTY share of the time (of the GIL, that is) when the cluster is large or the
    machine busy."""
    return max(interval, render_seconds * (1 - RENDER_DUTY) / RENDER_DUTY)


class RenderStopped(Exception):
    """The exposition was stopped while a render waited for the event loop."""


@dataclass(frozen=True)
class Rendered:
    """One render of the node section."""

    body: bytes
    rendered_at: float  # time.monotonic()
    seconds: float  # how long the render took


@dataclass(frozen=True)
class Scrape:
    """What one scrape returns: the cached node section, then the coordinator's own
    figures, rendered fresh (a few series, well under a millisecond), so counters a test or
    an operator just moved are never a render behind."""

    nodes: Rendered
    coordinator: bytes

    @property
    def body(self) -> bytes:
        return self.nodes.body + self.coordinator


class MetricsExposition:
    """The latest complete node section, re-rendered by a background thread.

    With an event `loop`, the node snapshot is taken on that loop (the coordinator's), so
    the render never races the servicers; without one (benchmarks, tests) in the thread.
    A scrape gets the latest bytes at once. Only when there are none yet, or they are
    stale because nobody scraped for `idle_after` seconds and rendering paused, does it
    wait for a fresh render.
    """

    def __init__(
        self,
        cluster: Cluster,
        interval: float = RENDER_INTERVAL,
        loop: asyncio.AbstractEventLoop | None = None,
        idle_after: float = IDLE_AFTER,
        workloads: Workloads | None = None,
    ) -> None:
        if interval <= 0:
            raise ValueError("metrics render interval must be positive")
        self.cluster = cluster
        self.interval = interval
        self.idle_after = max(idle_after, interval)
        self.loop = loop
        self._registry = CollectorRegistry(auto_describe=False)
        self._registry.register(ClusterCollector(cluster, include_nodes=False, workloads=workloads))
        self._registry_lock = threading.Lock()  # the collector keeps a message-rate window
        self._latest: Rendered | None = None
        self._gzipped: tuple[Rendered, bytes] | None = None
        self._changed = threading.Condition()
        self._wanted = threading.Event()
        self._stop = threading.Event()
        self._last_scrape = -float("inf")
        self._pause = interval
        self._thread: threading.Thread | None = None

    # rendering
    def _on_loop(self, read: Callable[[], T]) -> T:
        """`read()` run on the coordinator's loop (here, without one)."""
        if self.loop is None:
            return read()
        done: futures.Future[T] = futures.Future()

        def run() -> None:
            try:
                done.set_result(read())
            except Exception as error:
                done.set_exception(error)

        self.loop.call_soon_threadsafe(run)
        deadline = time.monotonic() + SNAPSHOT_TIMEOUT
        while True:  # in short waits, so stop() never waits for a loop that is stopping itself
            try:
                return done.result(0.1)
            except futures.TimeoutError:
                if self._stop.is_set():
                    raise RenderStopped from None
                if time.monotonic() > deadline:
                    raise TimeoutError(f"the event loop gave no snapshot in {SNAPSHOT_TIMEOUT:g} s") from None

    def render(self) -> Rendered:
        """Render the node section now and publish it whole: a scrape sees the old bytes or
        the new, never a mix. The snapshot is taken in slices of SNAPSHOT_SLICE nodes, each
        a short callback on the loop, and each slice is formatted before the next is taken:
        the loop never waits long for this thread, in one piece or for the GIL."""
        started = time.monotonic()
        names = self._on_loop(lambda: [record.name for record in self.cluster.nodes()])
        lines = empty_lines()
        for first in range(0, len(names), SNAPSHOT_SLICE):
            part = names[first : first + SNAPSHOT_SLICE]
            add_node_lines(self._on_loop(lambda part=part: snapshot(self.cluster, part)), lines)
        body = join_lines(lines).encode()
        finished = time.monotonic()
        rendered = Rendered(body, finished, finished - started)
        with self._changed:
            self._latest = rendered
            self._changed.notify_all()
        return rendered

    def _run(self) -> None:
        while not self._stop.is_set():
            self._wanted.wait(self._pause)
            self._wanted.clear()
            if self._stop.is_set():
                return
            if self.loop is not None and self.loop.is_closed():
                return  # the coordinator is shutting down
            if time.monotonic() - self._last_scrape > self.idle_after:
                continue  # nobody is scraping: save the CPU
            try:
                rendered = self.render()
            except RenderStopped:
                return
            except Exception as error:  # the previous exposition stays served
                log.warning("metrics render failed", error=f"{type(error).__name__}: {error}")
                self._pause = self.interval
            else:
                self._pause = render_pause(self.interval, rendered.seconds)

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="metrics-render", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._wanted.set()
        if self._thread is not None:
            self._thread.join()

    # serving
    def latest(self) -> Rendered | None:
        return self._latest

    def scrape(self, timeout: float = SCRAPE_WAIT) -> Scrape | None:
        """The latest node section (a fresh one when the cached one is missing or stale)
        and the coordinator section; None when no render finished in `timeout`."""
        nodes = self._nodes_section(timeout)
        if nodes is None:
            return None
        with self._registry_lock:
            coordinator = generate_latest(self._registry)
        return Scrape(nodes, coordinator)

    def _nodes_section(self, timeout: float) -> Rendered | None:
        now = time.monotonic()
        self._last_scrape = now
        current = self._latest
        if current is not None and now - current.rendered_at <= self._stale_after():
            return current
        self._wanted.set()
        with self._changed:
            self._changed.wait_for(
                lambda: self._latest is not None and self._latest.rendered_at >= now, timeout
            )
            return self._latest

    def _stale_after(self) -> float:
        """Older than this, the renderer has paused for want of scrapes: it renders every
        `_pause` seconds (at least `interval`), and a render takes well under a second."""
        return 2 * self._pause + 2.0

    def gzipped(self, rendered: Rendered) -> bytes:
        """The node section compressed once per render, by the first scrape asking for gzip
        (zlib lets go of the GIL while it works)."""
        cached = self._gzipped
        if cached is not None and cached[0] is rendered:
            return cached[1]
        data = gzip.compress(rendered.body, compresslevel=1)
        self._gzipped = (rendered, data)
        return data


class _MetricsHandler(BaseHTTPRequestHandler):
    server: _MetricsServer

    def do_GET(self) -> None:
        if self.path.split("?", 1)[0] not in ("/metrics", "/"):
            self.send_error(404, "only /metrics here")
            return
        exposition = self.server.exposition
        scrape = exposition.scrape()
        if scrape is None:
            self.send_error(503, "metrics are not rendered yet")
            return
        compress = "gzip" in self.headers.get("Accept-Encoding", "")
        if compress:  # two gzip members: one stream to any gzip reader (RFC 1952)
            parts = [exposition.gzipped(scrape.nodes), gzip.compress(scrape.coordinator, compresslevel=1)]
        else:
            parts = [scrape.nodes.body, scrape.coordinator]
        self.send_response(200)
        self.send_header("Content-Type", CONTENT_TYPE)
        self.send_header("Content-Length", str(sum(len(part) for part in parts)))
        self.send_header("Age", str(int(time.monotonic() - scrape.nodes.rendered_at)))
        if compress:
            self.send_header("Content-Encoding", "gzip")
        self.end_headers()
        for part in parts:
            self.wfile.write(part)

    def log_message(self, format: str, *args: object) -> None:
        """Scrapes are not logged."""


class _MetricsServer(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, address: tuple[str, int], exposition: MetricsExposition) -> None:
        self.address_family = socket.getaddrinfo(address[0], address[1], type=socket.SOCK_STREAM)[0][0]
        self.exposition = exposition
        super().__init__(address, _MetricsHandler)


@dataclass
class MetricsEndpoint:
    exposition: MetricsExposition
    server: _MetricsServer

    @property
    def port(self) -> int:
        return self.server.server_address[1]

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.exposition.stop()


def serve_metrics(
    cluster: Cluster,
    host: str,
    port: int,
    interval: float = RENDER_INTERVAL,
    loop: asyncio.AbstractEventLoop | None = None,
    workloads: Workloads | None = None,
) -> MetricsEndpoint:
    """Serve /metrics from background threads: one renders, the HTTP server's answer scrapes.
    Called on the coordinator's event loop, the snapshots are taken there."""
    if loop is None:
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            loop = None
    exposition = MetricsExposition(cluster, interval, loop, workloads=workloads)
    server = _MetricsServer((host, port), exposition)
    exposition.start()
    threading.Thread(target=server.serve_forever, name="metrics-http", daemon=True).start()
    return MetricsEndpoint(exposition, server)

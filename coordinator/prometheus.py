"""Prometheus endpoint: every node's latest sample under node_exporter's metric names with
`instance` set to the node name (scrape with `honor_labels: true`), plus the
coordinator's own figures.

A scrape never renders. A background thread renders the whole exposition while someone
scrapes (a thousand Pis are about 300,000 series: each declares some 200 of
node_exporter's, see common/node_series.py), and the HTTP handler returns the latest
complete bytes. It renders once per expected scrape, just before it (`next_render_in`),
and never more often than every `interval` seconds. The node section is written by a small
hand-made formatter over a snapshot taken on the event loop, from the families of
common/node_series.py; the coordinator's own figures still go through prometheus_client
(`CoordinatorCollector`). The prometheus_client rendering of the node section that this
formatter replaced is bench/_prometheus_client_anchor.py, the anchor of bench/metrics_scrape.py.
"""

from __future__ import annotations

import asyncio
import gzip
import math
import socket
import statistics
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from concurrent import futures
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from itertools import pairwise
from typing import TYPE_CHECKING, TypeVar

import structlog
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector
from prometheus_client.utils import floatToGoString

from picoord.common.node_series import (
    FAMILIES,
    SAMPLE_FILESYSTEMS,
    SAMPLE_LINK,
    SAMPLE_MEMORY,
    SAMPLE_NETWORK,
    SeriesFamily,
    family_of,
    from_source,
)
from picoord.common.vocabulary import RolloutStatus
from picoord.coordinator.cluster import Cluster
from picoord.coordinator.rate_limit import duty_pause
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
SCRAPE_LEAD = 1.0  # a render for an expected scrape is due to finish this long before it
SCRAPES_KEPT = 5  # the lower median of the gaps between these last scrapes is the cadence
SCRAPES_AHEAD = 2  # renders for this many expected scrapes past the last one that came
SNAPSHOT_TIMEOUT = 10.0  # a render waits this long for the event loop to hand over a snapshot
SCRAPE_WAIT = 10.0  # a scrape that finds no fresh exposition waits this long for one
SNAPSHOT_SLICE = 100  # nodes per snapshot callback on the loop (about 1 ms)

log = structlog.get_logger("picoord.coordinator.metrics")
T = TypeVar("T")


class CoordinatorCollector(Collector):
    """The coordinator's own figures, the prometheus_client way (a few series, rendered at
    every scrape). The node section is written by hand below."""

    def __init__(self, cluster: Cluster, workloads: Workloads | None = None) -> None:
        self.cluster = cluster
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
        yield from self._coordinator_metrics()

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
    clock_offset: float | None = None  # None: not measured lately


def snapshot(cluster: Cluster, names: list[str] | None = None) -> list[NodeState]:
    """The listed nodes' states (every node's by default)."""
    if names is None:
        names = [record.name for record in cluster.nodes()]
    states = []
    for name in names:
        record = cluster.node(name)
        hardware = cluster.hardware(record) if record is not None else None
        states.append(
            NodeState(
                name, cluster.status(name), cluster.history.latest(name), hardware, cluster.clock_offset(name)
            )
        )
    return states


def escape_label_value(value: str) -> str:
    """Text format 0.0.4: backslash, double quote and line feed are escaped in label values."""
    if "\\" in value or '"' in value or "\n" in value:
        return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")
    return value


_SPECIAL_VALUES = {"inf": "+Inf", "-inf": "-Inf", "nan": "NaN"}


def _value(number: float) -> str:
    """prometheus_client's floatToGoString (the coordinator section's number format) with
    its common case first: a render formats some 65,000 of these."""
    text = repr(float(number))
    if text.find(".") > 6 or text in _SPECIAL_VALUES:
        return floatToGoString(number)
    return text


# The node families the sample's own fields feed, in exposition order, from the one table.
NODE_FAMILIES = tuple(family for family in FAMILIES.values() if not family.declared)
FIXED_NAMES = frozenset(family.name for family in NODE_FAMILIES)
CPU = FAMILIES["node_cpu_seconds_total"]
LOAD = tuple(FAMILIES[f"node_load{n}"] for n in ("1", "5", "15"))
MEMORY = from_source(SAMPLE_MEMORY)
FILESYSTEM = from_source(SAMPLE_FILESYSTEMS)
NETWORK = from_source(SAMPLE_NETWORK)
MEMORY_FIELDS = tuple(family.field for family in MEMORY)  # MetricsSample's
FILESYSTEM_FIELDS = tuple(family.field for family in FILESYSTEM)  # FilesystemUsage's
NETWORK_FIELDS = tuple(family.field for family in NETWORK)  # NetworkCounters'
THERMAL = FAMILIES["node_thermal_zone_temp"]
BOOT = FAMILIES["node_boot_time_seconds"]
THROTTLED = FAMILIES["picoord_node_throttled"]
UP = FAMILIES["picoord_node_up"]
STATUS = FAMILIES["picoord_node_status"]
UNAME = FAMILIES["node_uname_info"]
UNAME_LABELS = UNAME.labels  # sorted
TIME = FAMILIES["node_time_seconds"]
TIMEX_OFFSET = FAMILIES["node_timex_offset_seconds"]
NETWORK_LINK = from_source(SAMPLE_LINK)
GUEST = FAMILIES["node_cpu_guest_seconds_total"]
GUEST_MODES = (("guest", "user"), ("guest_nice", "nice"))
DEVICE_ERROR = FAMILIES["node_filesystem_device_error"]


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
    up, carrier, mtu, speed = NETWORK_LINK
    values = [
        (up.name, 1.0 if counters.up else 0.0),
        (carrier.name, 1.0 if counters.carrier else 0.0),
        (mtu.name, float(counters.mtu)),
    ]
    if counters.speed_mbps:
        values.append((speed.name, counters.speed_mbps * speed.scale))
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


NodeLines = dict[SeriesFamily, list[str]]


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
    family: SeriesFamily
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
        family = entry.family
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
    memory = [(lines[family], family.field) for family in MEMORY]
    filesystem = [(lines[family], family.field) for family in FILESYSTEM]
    network = [(lines[family], family.field) for family in NETWORK]
    thermal, boot, throttled = lines[THERMAL], lines[BOOT], lines[THROTTLED]
    for node in nodes:
        instance = f'instance="{escape_label_value(node.name)}"'
        up.append(f"{UP.name}{{{instance}}} {'1.0' if node.status is Status.READY else '0.0'}")
        for value in Status:
            on = "1.0" if value is node.status else "0.0"
            status.append(f'{STATUS.name}{{{instance},status="{value.value}"}} {on}')
        if node.clock_offset is not None:
            lines[TIMEX_OFFSET].append(f"{TIMEX_OFFSET.name}{{{instance}}} {_value(node.clock_offset)}")
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
    return max(interval, duty_pause(render_seconds, RENDER_DUTY))


def next_render_in(
    now: float,
    scrapes: Sequence[float],
    last: Rendered | None,
    interval: float,
    idle_after: float,
    lead: float = SCRAPE_LEAD,
) -> float | None:
    """Seconds until the next render is due (0: now), or None: none until a scrape asks.

    Prometheus scrapes at a steady cadence (15 s is usual), so one render per scrape, timed
    to finish `lead` seconds plus one render's time before the next one is expected (a
    scrape that waited for a render moves the next by up to that much), serves it bytes as
    fresh as rendering all along would, for far fewer renders (bench/metrics_scrape.py: at
    1,000 nodes scraped every 15 s, 7 renders a minute instead of 45). The cadence is the
    lower median of the gaps between the recent `scrapes` (monotonic times, oldest first):
    one odd gap (a curl between two scrapes) does not move it, and two scrapers taking turns
    are served by the nearer. One scrape alone has no cadence yet; nor has anyone whose last
    scrape is over `idle_after` ago. Renders serve
    the next SCRAPES_AHEAD expected scrapes (a scraper that stops costs no more), and are
    still at least `render_pause` apart: a scraper faster than `lead` gets a render about
    every `interval`, as before cadences were kept."""
    if not scrapes or now - scrapes[-1] > idle_after:
        return None
    gaps = [later - earlier for earlier, later in pairwise(scrapes) if later > earlier]
    if not gaps:
        return None
    cadence = statistics.median_low(gaps)
    took = last.seconds if last is not None else 0.0
    started = last.rendered_at - last.seconds if last is not None else -math.inf
    ahead = max(1, math.ceil((now - scrapes[-1]) / cadence))  # the next expected scrape
    while True:
        if ahead > SCRAPES_AHEAD or ahead * cadence > idle_after:
            return None  # served, or missed: the next scrape that comes asks
        start = scrapes[-1] + ahead * cadence - lead - 2 * took
        if started < start:  # this one has no render yet
            break
        ahead += 1
    return max(0.0, start - now, started + render_pause(interval, took) - now)


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
    A scrape at the expected cadence gets the latest bytes at once. Only when there are
    none yet, or they are stale (the first scrape, an irregular one, or one after nobody
    scraped for `idle_after` seconds) does it wait for a fresh render.
    """

    def __init__(
        self,
        cluster: Cluster,
        interval: float = RENDER_INTERVAL,
        loop: asyncio.AbstractEventLoop | None = None,
        idle_after: float = IDLE_AFTER,
        workloads: Workloads | None = None,
        lead: float = SCRAPE_LEAD,
    ) -> None:
        if interval <= 0:
            raise ValueError("metrics render interval must be positive")
        self.cluster = cluster
        self.interval = interval
        self.idle_after = max(idle_after, interval)
        self.lead = lead
        self.loop = loop
        self._registry = CollectorRegistry(auto_describe=False)
        self._registry.register(CoordinatorCollector(cluster, workloads))
        self._registry_lock = threading.Lock()  # the collector keeps a message-rate window
        self._latest: Rendered | None = None
        self._gzipped: tuple[Rendered, bytes] | None = None
        self._changed = threading.Condition()
        self._wanted = threading.Event()
        self._stop = threading.Event()
        self._scrapes: deque[float] = deque(maxlen=SCRAPES_KEPT)  # monotonic times, by any thread
        self._asked_at = -math.inf  # when a scrape last found stale bytes and asked for a render
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

    def _next_render_in(self) -> float | None:
        return next_render_in(
            time.monotonic(), tuple(self._scrapes), self._latest, self.interval, self.idle_after, self.lead
        )

    def _run(self) -> None:
        while not self._stop.is_set():
            due_in = self._next_render_in()
            # Woken at least every interval: a new scrape may have moved the next render.
            self._wanted.wait(self.interval if due_in is None else min(due_in, self.interval))
            asked = self._wanted.is_set()
            self._wanted.clear()
            latest = self._latest
            if asked and latest is not None and latest.rendered_at >= self._asked_at:
                asked = False  # the render that just finished is the one the scrape waited for
            if self._stop.is_set():
                return
            if self.loop is not None and self.loop.is_closed():
                return  # the coordinator is shutting down
            if not asked and self._next_render_in() != 0.0:
                continue  # no scrape is coming soon: save the CPU
            try:
                rendered = self.render()
            except RenderStopped:
                return
            except Exception as error:  # the previous exposition stays served
                log.warning("metrics render failed", error=f"{type(error).__name__}: {error}")
                self._pause = self.interval
                self._stop.wait(self.interval)  # the same render is still due: not at once
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
        self._scrapes.append(now)
        current = self._latest
        if current is not None and now - current.rendered_at <= self._stale_after():
            return current
        self._asked_at = now
        self._wanted.set()
        with self._changed:
            self._changed.wait_for(
                lambda: self._latest is not None and self._latest.rendered_at >= now, timeout
            )
            return self._latest

    def _stale_after(self) -> float:
        """A scrape takes cached bytes up to this old, as fresh as rendering every `_pause`
        seconds keeps them; older ones (no scrape was expected: a first or irregular one,
        or the renderer had paused) it waits for a fresh render."""
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

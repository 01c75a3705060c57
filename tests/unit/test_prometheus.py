"""/metrics from a cached exposition: the hand-written node section says exactly what the
prometheus_client collector said (escaping included), scrapes are served from the cache
over real HTTP, and a scrape during a render gets the previous complete exposition."""

from __future__ import annotations

import asyncio
import gzip
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from bench._prometheus_client_anchor import ClusterCollector
from picoord.coordinator.cluster import Cluster, LiveSession
from picoord.coordinator.prometheus import (
    CONTENT_TYPE,
    NODE_FAMILIES,
    MetricsEndpoint,
    MetricsExposition,
    Rendered,
    Scrape,
    escape_label_value,
    next_render_in,
    render_nodes,
    render_pause,
    serve_metrics,
    snapshot,
)
from picoord.coordinator.status import StatusTimeouts
from picoord.coordinator.store import CertificateRecord, Store, TokenRecord
from picoord.coordinator.telemetry import MetricsHistory
from picoord.v1 import agent_pb2, node_pb2

HOSTILE_LABELS = ['quo"te', "back\\slash", "new\nline", 'all\\"\n\\n', "ünï 日本", "", '{x="1"} 2']


@pytest.mark.parametrize(
    ("value", "escaped"),
    [
        ("/dev/sda1", "/dev/sda1"),
        ('a"b', 'a\\"b'),
        ("a\\b", "a\\\\b"),
        ("a\nb", "a\\nb"),
        ('\\"\n', '\\\\\\"\\n'),
        ("\\n", "\\\\n"),  # a backslash then n stays two characters, not a newline
        ("tab\there", "tab\there"),  # only three characters are special in 0.0.4
        ("", ""),
    ],
)
def test_escape_label_value(value: str, escaped: str) -> None:
    assert escape_label_value(value) == escaped


def sample(index: int, hostile: str = "") -> node_pb2.MetricsSample:
    return node_pb2.MetricsSample(
        timestamp=1000.0 + index,
        cpus=[
            node_pb2.CpuTimes(cpu=cpu, user=12.5 * cpu, idle=86000.1, steal=0.25, guest_nice=0.5 * cpu)
            for cpu in range(2)
        ],
        load1=0.21,
        load5=1e-7,
        load15=3.0,
        memory_total_bytes=971_000_000,
        memory_available_bytes=2**63,
        memory_free_bytes=123456789,
        filesystems=[
            node_pb2.FilesystemUsage(
                device=f"/dev/{hostile}sda",
                mountpoint=f"/mnt/{hostile}",
                fstype=hostile or "ext4",
                size_bytes=31_000_000_000,
                free_bytes=1,
                files=1_900_000,
                readonly=index % 3 == 0,
            )
        ],
        network=[
            node_pb2.NetworkCounters(
                device=f"eth{hostile}",
                receive_bytes=10**12,
                transmit_errors=3,
                receive_drop=7,
                link_known=index % 2 == 0,
                up=True,
                carrier=index % 4 == 0,
                mtu=1500,
                speed_mbps=1000 * (index % 3),
            )
        ],
        series_values=[len(hostile), 2**40, -1, 250_000, 1, 7] if index != 1 else [3],  # 1: a mismatch
        temperatures=[node_pb2.Temperature(zone=f"zone{hostile}", type=f"cpu-{hostile}", celsius=-4.5)],
        throttled_available=index % 2 == 0,
        throttled=0x50005,
        boot_time=1.7e9 + 0.5,
    )


def hardware(index: int) -> node_pb2.Hardware:
    """A declaration with known families (counter, gauge, untyped, labelled, scaled), one
    unknown family, one with the wrong label count, a duplicate, and hostile label values;
    every other node has no uname and falls back to hostname/kernel/arch."""
    hostile = HOSTILE_LABELS[index % len(HOSTILE_LABELS)]
    series = [
        node_pb2.SeriesKey(name="node_disk_read_bytes_total", label_values=[f"mmcblk{hostile}"]),
        node_pb2.SeriesKey(name="node_memory_Cached_bytes"),
        node_pb2.SeriesKey(name="node_netstat_Tcp_MaxConn"),
        node_pb2.SeriesKey(name="node_cpu_scaling_frequency_hertz", label_values=["0"]),
        node_pb2.SeriesKey(name="node_from_the_future", label_values=["x"]),
        node_pb2.SeriesKey(name="node_memory_Cached_bytes", label_values=["one too many"]),
    ]
    if index % 2:
        return node_pb2.Hardware(hostname=f"host{hostile}", kernel="6.1", arch="aarch64", series=series)
    uname = node_pb2.Uname(
        sysname="Linux",
        nodename=f"pi{hostile}",
        release="6.1.0-rpi7-rpi-v8",
        version=f"#1 {hostile}",
        machine="aarch64",
        domainname="(none)",
    )
    return node_pb2.Hardware(uname=uname, series=series)


def make_cluster(tmp_path: Path, count: int = len(HOSTILE_LABELS) + 2) -> Cluster:
    """`count` enrolled nodes: most connected with a sample, some with a hostile one, one
    connected without a sample, one never seen."""
    store = Store(tmp_path / "state.db")
    store.add_token(TokenRecord("abcdef", "x", 0.0, 1e12, 0, 0, ""))
    for index in range(count):
        name = f"pi{index}"
        store.enroll("abcdef", name, {}, CertificateRecord(f"s{index}", name, 1.0, 1e12, None), time.time())
    cluster = Cluster(store, StatusTimeouts(), MetricsHistory())
    for index in range(count - 1):
        name = f"pi{index}"
        hello = agent_pb2.Hello(agent_version="0.1.0", hardware=hardware(index))
        asyncio.run(cluster.open_session(LiveSession(name, f"s{index}"), hello))
        if index < len(HOSTILE_LABELS):
            cluster.history.add(name, sample(index, HOSTILE_LABELS[index]))
            cluster.observe_clock(name, cluster.clock() - 0.25 * index)  # node_timex_offset_seconds
    cluster.counters.messages_received = 41
    cluster.counters.enrollments = count
    return cluster


def reference(cluster: Cluster, include_nodes: bool = True) -> bytes:
    """What prometheus_client rendered for the same cluster before the cache existed."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(ClusterCollector(cluster, include_nodes=include_nodes))
    return generate_latest(registry)


def families(text: str) -> list[tuple[str, str, str, list[tuple[str, dict[str, str], float]]]]:
    parsed = text_string_to_metric_families(text)
    return [
        (
            family.name,
            family.type,
            family.documentation,
            [(s.name, s.labels, s.value) for s in family.samples],
        )
        for family in parsed
    ]


def test_node_section_is_what_the_prometheus_client_collector_wrote(tmp_path: Path) -> None:
    cluster = make_cluster(tmp_path)
    ours = render_nodes(snapshot(cluster))
    theirs = reference(cluster).decode().split("# HELP picoord_coordinator_")[0]
    assert ours == theirs  # byte for byte, escaping of hostile label values included
    parsed = families(ours)
    assert parsed == families(theirs)
    devices = {s[1]["device"] for f in parsed if f[0] == "node_filesystem_size_bytes" for s in f[3]}
    assert {f"/dev/{text}sda" for text in HOSTILE_LABELS} == devices  # read back as sent
    zones = {(s[1]["zone"], s[1]["type"]) for f in parsed if f[0] == "node_thermal_zone_temp" for s in f[3]}
    assert {(f"zone{text}", f"cpu-{text}") for text in HOSTILE_LABELS} == zones


def test_the_node_families_keep_their_names_help_and_types() -> None:
    assert [(family.name, family.kind) for family in NODE_FAMILIES] == [
        ("node_cpu_seconds_total", "counter"),
        ("node_load1", "gauge"),
        ("node_load5", "gauge"),
        ("node_load15", "gauge"),
        ("node_memory_MemTotal_bytes", "gauge"),
        ("node_memory_MemAvailable_bytes", "gauge"),
        ("node_memory_MemFree_bytes", "gauge"),
        ("node_memory_SwapTotal_bytes", "gauge"),
        ("node_memory_SwapFree_bytes", "gauge"),
        ("node_filesystem_size_bytes", "gauge"),
        ("node_filesystem_free_bytes", "gauge"),
        ("node_filesystem_avail_bytes", "gauge"),
        ("node_filesystem_files", "gauge"),
        ("node_filesystem_files_free", "gauge"),
        ("node_filesystem_readonly", "gauge"),
        ("node_network_receive_bytes_total", "counter"),
        ("node_network_transmit_bytes_total", "counter"),
        ("node_network_receive_packets_total", "counter"),
        ("node_network_transmit_packets_total", "counter"),
        ("node_network_receive_errs_total", "counter"),
        ("node_network_transmit_errs_total", "counter"),
        ("node_network_receive_drop_total", "counter"),
        ("node_network_transmit_drop_total", "counter"),
        ("node_network_receive_fifo_total", "counter"),
        ("node_network_transmit_fifo_total", "counter"),
        ("node_network_receive_frame_total", "counter"),
        ("node_network_receive_compressed_total", "counter"),
        ("node_network_transmit_compressed_total", "counter"),
        ("node_network_receive_multicast_total", "counter"),
        ("node_network_transmit_colls_total", "counter"),
        ("node_network_transmit_carrier_total", "counter"),
        ("node_thermal_zone_temp", "gauge"),
        ("node_boot_time_seconds", "gauge"),
        ("picoord_node_throttled", "gauge"),
        ("picoord_node_up", "gauge"),
        ("picoord_node_status", "gauge"),
        ("node_uname_info", "gauge"),
        ("node_time_seconds", "gauge"),
        ("node_timex_offset_seconds", "gauge"),
        ("node_network_up", "gauge"),
        ("node_network_carrier", "gauge"),
        ("node_network_mtu_bytes", "gauge"),
        ("node_network_speed_bytes", "gauge"),
        ("node_cpu_guest_seconds_total", "counter"),
        ("node_filesystem_device_error", "gauge"),
    ]


def test_an_empty_cluster_still_describes_every_family(tmp_path: Path) -> None:
    cluster = make_cluster(tmp_path, count=0)
    assert (
        render_nodes(snapshot(cluster)) == reference(cluster).decode().split("# HELP picoord_coordinator_")[0]
    )


@pytest.fixture
def endpoint(tmp_path: Path) -> Iterator[MetricsEndpoint]:
    served = serve_metrics(make_cluster(tmp_path), "127.0.0.1", 0, interval=0.2)
    yield served
    served.close()


def get(url: str, **headers: str) -> tuple[int, dict[str, str], bytes]:
    request = urllib.request.Request(url, headers=headers)
    try:
        with urllib.request.urlopen(request, timeout=10) as reply:
            return reply.status, dict(reply.headers), reply.read()
    except urllib.error.HTTPError as error:
        return error.code, dict(error.headers), error.read()


def test_a_scrape_over_http_equals_the_old_exposition(endpoint: MetricsEndpoint) -> None:
    cluster = endpoint.exposition.cluster
    expected = reference(cluster)  # the first call of its message rate: 0, like ours
    status, headers, body = get(f"http://127.0.0.1:{endpoint.port}/metrics")
    assert status == 200
    assert headers["Content-Type"] == CONTENT_TYPE
    assert int(headers["Age"]) >= 0
    assert body == expected
    assert "picoord_coordinator_messages_received_total 41.0" in body.decode()


def test_gzip_when_asked(endpoint: MetricsEndpoint) -> None:
    plain = get(f"http://127.0.0.1:{endpoint.port}/metrics")[2]
    status, headers, body = get(f"http://127.0.0.1:{endpoint.port}/metrics", **{"Accept-Encoding": "gzip"})
    assert status == 200 and headers["Content-Encoding"] == "gzip"
    unpacked = gzip.decompress(body).decode()
    assert families(unpacked) == families(plain.decode())


def test_other_paths_are_not_found(endpoint: MetricsEndpoint) -> None:
    assert get(f"http://127.0.0.1:{endpoint.port}/favicon.ico")[0] == 404


def test_coordinator_counters_are_never_a_render_behind(endpoint: MetricsEndpoint) -> None:
    url = f"http://127.0.0.1:{endpoint.port}/metrics"
    get(url)
    endpoint.exposition.cluster.counters.enrollments_refused = 7
    assert "picoord_coordinator_enrollments_refused_total 7.0" in get(url)[2].decode()


def test_nothing_is_rendered_until_someone_scrapes_at_a_cadence(tmp_path: Path) -> None:
    exposition = MetricsExposition(make_cluster(tmp_path), interval=0.05, lead=0.0)
    exposition.start()
    try:
        time.sleep(0.3)
        assert exposition.latest() is None
        first = exposition.scrape()
        assert first is not None
        time.sleep(0.3)  # one scrape is no cadence: nothing more is rendered
        assert exposition.latest() is first.nodes
        served = set()
        for _ in range(20):  # scraped every 0.1 s, it keeps the cache fresh by itself
            time.sleep(0.1)
            scrape = exposition.scrape()
            assert scrape is not None
            served.add(scrape.nodes.rendered_at)
        assert len(served) >= 2  # never older than the stale limit: no scrape made these
    finally:
        exposition.stop()


def test_a_failing_render_is_tried_again_after_an_interval_not_at_once(tmp_path: Path) -> None:
    exposition = MetricsExposition(make_cluster(tmp_path), interval=0.1, lead=0.0)
    attempts: list[float] = []
    render = exposition.render

    def failing_after_the_first() -> Rendered:
        attempts.append(time.monotonic())
        if len(attempts) == 1:
            return render()
        raise RuntimeError("the snapshot failed")

    exposition.render = failing_after_the_first  # type: ignore[method-assign]
    exposition.start()
    try:
        for _ in range(4):  # scraped at a cadence: a render is due all along
            assert exposition.scrape() is not None
            time.sleep(0.1)
    finally:
        exposition.stop()
    assert 2 <= len(attempts) <= 10, len(attempts)  # about one per interval, not a busy loop


def test_scrapes_waiting_for_the_same_render_get_one_render(tmp_path: Path) -> None:
    """A scrape that asks for a render while one is under way is served by that one: the
    renderer does not start a second for it."""
    exposition = MetricsExposition(make_cluster(tmp_path), interval=0.05, lead=0.0)
    renders: list[float] = []
    render = exposition.render

    def slow() -> Rendered:
        renders.append(time.monotonic())
        time.sleep(0.3)
        return render()

    exposition.render = slow  # type: ignore[method-assign]
    exposition.start()
    try:
        first = threading.Thread(target=exposition.scrape)
        first.start()
        time.sleep(0.1)  # the first scrape's render is under way
        assert exposition.scrape() is not None
        first.join(5)
        time.sleep(0.5)
    finally:
        exposition.stop()
    assert len(renders) == 1, renders


def scraped_at_a_cadence(exposition: MetricsExposition) -> Scrape:
    """A few scrapes 0.05 s apart, so the renderer keeps rendering by itself: the last one."""
    for _ in range(3):
        scrape = exposition.scrape()
        assert scrape is not None
        time.sleep(0.05)
    return scrape


def rendered(finished: float, seconds: float) -> Rendered:
    return Rendered(b"", finished, seconds)


@pytest.mark.parametrize(
    ("now", "scrapes", "last", "due_in"),
    [
        pytest.param(100.0, (), None, None, id="never scraped"),
        pytest.param(100.0, (99.0,), rendered(99.5, 0.5), None, id="one scrape is no cadence yet"),
        pytest.param(100.0, (99.0, 99.0), rendered(99.5, 0.5), None, id="two at once are no cadence either"),
        pytest.param(1000.0, (600.0, 615.0), rendered(615.5, 0.5), None, id="nobody scraped for idle_after"),
        pytest.param(
            401.0, (0.0, 400.0), rendered(400.5, 0.5), None, id="the next scrape is past idle_after"
        ),
        # Prometheus every 15 s, the last scrape's render (started 100.0) just done: the
        # next render is to finish a second (the lead) and a render's time before 115.
        pytest.param(
            100.6, (85.0, 100.0), rendered(100.5, 0.5), 12.4, id="every 15 s: render before the next"
        ),
        pytest.param(113.0, (85.0, 100.0), rendered(100.5, 0.5), 0.0, id="every 15 s: due now"),
        pytest.param(101.0, (85.0, 100.0), None, 13.0, id="never rendered: a render takes no time"),
        pytest.param(
            114.2, (85.0, 100.0), rendered(114.0, 0.5), 13.8, id="this scrape has its render: the next"
        ),
        pytest.param(
            116.0, (85.0, 100.0), rendered(114.0, 0.5), 12.0, id="an expected scrape missed: the one after"
        ),
        pytest.param(131.0, (85.0, 100.0), rendered(128.5, 0.5), None, id="two missed: none until one comes"),
        # Scraped every 0.1 s: a render about every second, as before cadences were kept.
        pytest.param(100.25, (100.0, 100.1, 100.2), rendered(100.05, 0.01), None, id="fast: just rendered"),
        pytest.param(100.25, (100.0, 100.1, 100.2), rendered(99.31, 0.01), 0.05, id="fast: every interval"),
        pytest.param(
            100.21, (100.0, 100.1, 100.2), rendered(98.8, 0.5), 0.09, id="a slow render stretches it"
        ),
        # Two scrapers, 7 and 8 s apart in turn: the nearer one is served.
        pytest.param(
            107.1, (85.0, 92.0, 100.0, 107.0), rendered(100.6, 0.5), 4.9, id="two scrapers: the shorter gap"
        ),
        # A curl 2.3 s after a scrape, then Prometheus every 15 s again: 15 s is the cadence.
        pytest.param(
            97.4, (50.0, 52.3, 67.3, 82.3, 97.3), rendered(97.3, 0.3), 13.3, id="an odd gap does not move it"
        ),
    ],
)
def test_next_render_in(
    now: float, scrapes: tuple[float, ...], last: Rendered | None, due_in: float | None
) -> None:
    got = next_render_in(now, scrapes, last, interval=1.0, idle_after=300.0, lead=1.0)
    assert got == (None if due_in is None else pytest.approx(due_in))


def test_a_scrape_during_a_render_gets_the_previous_complete_exposition(tmp_path: Path) -> None:
    """The snapshot is taken on the coordinator's event loop. While that loop is busy, the
    render waits for it, and scrapes keep getting the last complete exposition."""
    cluster = make_cluster(tmp_path)
    loop = asyncio.new_event_loop()
    loop_thread = threading.Thread(target=loop.run_forever, daemon=True)
    loop_thread.start()
    exposition = MetricsExposition(cluster, interval=0.05, loop=loop, lead=0.0)
    busy, release = threading.Event(), threading.Event()
    try:
        exposition.start()
        before = scraped_at_a_cadence(exposition)
        loop.call_soon_threadsafe(lambda: (busy.set(), release.wait(10)))
        assert busy.wait(5)
        cluster.history.add("pi0", sample(0, "changed"))
        time.sleep(0.3)  # several render periods: the render thread is stuck waiting for the loop
        during = exposition.scrape()
        assert during is not None and during.nodes is exposition.latest()
        assert b"changed" not in during.body
        assert families(during.body.decode()) == families(before.body.decode())
        release.set()
        deadline = time.monotonic() + 5
        while b"changed" not in exposition.latest().body and time.monotonic() < deadline:  # type: ignore[union-attr]
            time.sleep(0.02)
        assert b'device="/dev/changedsda"' in exposition.latest().body  # type: ignore[union-attr]
    finally:
        release.set()
        exposition.stop()
        loop.call_soon_threadsafe(loop.stop)
        loop_thread.join(5)
        loop.close()


@pytest.mark.parametrize(
    ("interval", "render_seconds", "pause"),
    [
        (1.0, 0.01, 1.0),  # a small cluster renders every interval
        (1.0, 0.25, 1.0),  # exactly the duty share
        (1.0, 0.5, 2.0),  # a slow render stretches the pause: rendering stays at 20 % of the time
        (2.0, 1.0, 4.0),
        (0.2, 0.0, 0.2),
    ],
)
def test_render_pause(interval: float, render_seconds: float, pause: float) -> None:
    assert render_pause(interval, render_seconds) == pytest.approx(pause)


def test_stop_does_not_wait_for_a_busy_loop(tmp_path: Path) -> None:
    """The coordinator stops its loop and the exposition together: a render waiting for a
    snapshot must not hold the shutdown for the snapshot timeout."""
    loop = asyncio.new_event_loop()
    loop_thread = threading.Thread(target=loop.run_forever, daemon=True)
    loop_thread.start()
    release = threading.Event()
    exposition = MetricsExposition(make_cluster(tmp_path), interval=0.05, loop=loop, lead=0.0)
    try:
        exposition.start()
        scraped_at_a_cadence(exposition)
        loop.call_soon_threadsafe(release.wait, 10)
        time.sleep(0.2)  # the next render is now waiting for the loop
        started = time.monotonic()
        exposition.stop()
        assert time.monotonic() - started < 1.0
    finally:
        release.set()
        loop.call_soon_threadsafe(loop.stop)
        loop_thread.join(5)
        loop.close()

"""Recent metrics and the figures `coordctl top` derives from them."""

import pytest

from picoord.coordinator.telemetry import (
    MetricsHistory,
    network_rates,
    root_filesystem,
    soc_temperature,
    top_row,
)
from picoord.v1 import admin_pb2, node_pb2


def sample(t: float, rx: dict[str, int] | None = None, tx: dict[str, int] | None = None, **fields: object):
    devices = sorted(set(rx or {}) | set(tx or {}))
    network = [
        node_pb2.NetworkCounters(
            device=d, receive_bytes=(rx or {}).get(d, 0), transmit_bytes=(tx or {}).get(d, 0)
        )
        for d in devices
    ]
    return node_pb2.MetricsSample(timestamp=t, network=network, **fields)


def test_history_is_bounded_and_keeps_the_newest() -> None:
    history = MetricsHistory(size=3)
    for t in range(1, 6):
        history.add("pi1", sample(float(t)))
    assert [s.timestamp for s in history.recent("pi1")] == [3.0, 4.0, 5.0]
    assert [s.timestamp for s in history.recent("pi1", 2)] == [4.0, 5.0]
    assert history.latest("pi1").timestamp == 5.0
    assert history.recent("pi2") == [] and history.latest("pi2") is None
    history.forget("pi1")
    assert history.recent("pi1") == []


def test_history_needs_two_samples_for_rates() -> None:
    with pytest.raises(ValueError):
        MetricsHistory(size=1)


@pytest.mark.parametrize(
    ("before", "after", "elapsed", "expected"),
    [
        ({"eth0": 0}, {"eth0": 1000}, 1.0, 1000.0),
        ({"eth0": 0, "wlan0": 0}, {"eth0": 1000, "wlan0": 3000}, 2.0, 2000.0),  # summed over devices
        ({"eth0": 5000}, {"eth0": 100}, 1.0, 0.0),  # counter reset: no negative rate
        ({}, {"eth0": 1000}, 1.0, 0.0),  # a new interface has no rate yet
        ({"eth0": 0}, {"eth0": 1000}, 0.0, 0.0),  # same timestamp: no division by zero
        ({"eth0": 0}, {"eth0": 1000}, -1.0, 0.0),  # agent clock stepped back
    ],
)
def test_network_rates(before: dict, after: dict, elapsed: float, expected: float) -> None:
    rx, tx = network_rates(sample(100.0, before, before), sample(100.0 + elapsed, after, after))
    assert rx == pytest.approx(expected)
    assert tx == pytest.approx(expected)


def temperatures(*zones: tuple[str, float]) -> list[node_pb2.Temperature]:
    return [
        node_pb2.Temperature(zone=f"thermal_zone{i}", type=t, celsius=c) for i, (t, c) in enumerate(zones)
    ]


@pytest.mark.parametrize(
    ("zones", "expected"),
    [
        ((), None),
        ((("cpu-thermal", 61.5),), 61.5),
        ((("acpitz", 90.0), ("x86_pkg_temp", 55.0)), 55.0),  # the package sensor beats a hotter other zone
        ((("acpitz", 40.0), ("pch", 70.0)), 70.0),  # no known sensor: the hottest
    ],
)
def test_soc_temperature(zones: tuple, expected: float | None) -> None:
    assert soc_temperature(node_pb2.MetricsSample(temperatures=temperatures(*zones))) == expected


def test_root_filesystem_prefers_slash() -> None:
    boot = node_pb2.FilesystemUsage(mountpoint="/boot/firmware", size_bytes=1)
    root = node_pb2.FilesystemUsage(mountpoint="/", size_bytes=2)
    assert root_filesystem(node_pb2.MetricsSample(filesystems=[boot, root])) == root
    assert root_filesystem(node_pb2.MetricsSample(filesystems=[boot])) == boot
    assert root_filesystem(node_pb2.MetricsSample()) is None


def test_top_row_without_samples_reports_only_identity() -> None:
    row = top_row("pi1", admin_pb2.NODE_STATUS_DOWN, 4, [])
    assert (row.name, row.status, row.cpu_cores, row.sample_time) == ("pi1", admin_pb2.NODE_STATUS_DOWN, 4, 0)
    assert not row.temperature_available and not row.throttled_available


def test_top_row_from_two_samples() -> None:
    first = sample(10.0, {"eth0": 0}, {"eth0": 0})
    second = sample(
        12.0,
        {"eth0": 4000},
        {"eth0": 1000},
        cpu_percent=37.5,
        load1=1.25,
        memory_total_bytes=1024,
        memory_available_bytes=256,
        filesystems=[node_pb2.FilesystemUsage(mountpoint="/", size_bytes=100, avail_bytes=40)],
        temperatures=temperatures(("cpu-thermal", 71.0)),
        throttled_available=True,
        throttled=0x50005,
    )
    row = top_row("pi1", admin_pb2.NODE_STATUS_READY, 4, [first, second])
    assert row.sample_time == 12.0 and row.cpu_percent == 37.5 and row.load1 == 1.25
    assert (row.memory_total_bytes, row.memory_available_bytes) == (1024, 256)
    assert (row.disk_size_bytes, row.disk_avail_bytes) == (100, 40)
    assert row.network_receive_bytes_per_second == pytest.approx(2000.0)
    assert row.network_transmit_bytes_per_second == pytest.approx(500.0)
    assert row.temperature_available and row.soc_temperature_celsius == 71.0
    assert row.throttled_available and row.throttled == 0x50005


def test_history_keeps_the_top_row_of_the_last_two_samples() -> None:
    history = MetricsHistory(size=5)
    assert history.top("pi1", admin_pb2.NODE_STATUS_DOWN, 4).sample_time == 0  # no sample yet
    history.add("pi1", sample(10.0, {"eth0": 0}, {"eth0": 0}, cpu_percent=5.0))
    history.add("pi1", sample(12.0, {"eth0": 4000}, {"eth0": 0}, cpu_percent=25.0))
    row = history.top("pi1", admin_pb2.NODE_STATUS_READY, 4)
    assert (row.name, row.status, row.cpu_cores, row.cpu_percent) == (
        "pi1",
        admin_pb2.NODE_STATUS_READY,
        4,
        25.0,
    )
    assert row.network_receive_bytes_per_second == pytest.approx(2000.0)
    row.cpu_percent = 99.0  # a caller changing its copy does not change the history
    assert history.top("pi1", admin_pb2.NODE_STATUS_READY, 4).cpu_percent == 25.0
    assert [s.cpu_percent for s in history.recent("pi1")] == [5.0, 25.0]


def weighing(t: float, size: int) -> node_pb2.MetricsSample:
    """A sample whose serialized form is exactly `size` bytes (size >= 20)."""
    for filler in range(size, -1, -1):
        for extra in range(4):
            filesystem = node_pb2.FilesystemUsage(device="x" * filler, fstype="y" * extra)
            candidate = node_pb2.MetricsSample(timestamp=t, filesystems=[filesystem])
            if candidate.ByteSize() == size:
                return candidate
            if candidate.ByteSize() < size - 8:
                break
    raise AssertionError(f"no sample of {size} bytes")


# (size, node_bytes, total_bytes, adds as (node, time, bytes), kept times per node)
HISTORY_BOUNDS = [
    pytest.param(
        5, 1000, 10_000, [("pi1", t, 100) for t in range(1, 8)], {"pi1": [3, 4, 5, 6, 7]}, id="count"
    ),
    pytest.param(
        100, 350, 10_000, [("pi1", t, 100) for t in range(1, 8)], {"pi1": [5, 6, 7]}, id="node-bytes"
    ),
    pytest.param(
        100,
        350,
        10_000,
        [("pi1", 1, 100), ("pi1", 2, 100), ("pi1", 3, 300)],
        {"pi1": [3]},
        id="one-big-sample-pushes-out-the-rest",
    ),
    pytest.param(100, 400, 400, [("pi1", 1, 600)], {"pi1": [1]}, id="a-nodes-newest-always-stays"),
    pytest.param(
        100,
        400,
        400,
        [
            ("pi1", 1, 100),
            ("pi2", 2, 100),
            ("pi1", 3, 100),
            ("pi2", 4, 100),
            ("pi3", 5, 100),
            ("pi3", 6, 100),
        ],
        {"pi1": [3], "pi2": [4], "pi3": [5, 6]},
        id="total-bytes-drops-the-oldest-of-any-node",
    ),
    pytest.param(
        100,
        300,
        300,
        [("pi1", 1, 100), ("pi2", 2, 100), ("pi3", 3, 100), ("pi1", 4, 100), ("pi1", 5, 100)],
        {"pi1": [5], "pi2": [2], "pi3": [3]},
        id="total-keeps-each-nodes-newest",
    ),
    pytest.param(
        3,
        250,
        350,
        [
            ("pi1", 1, 100),
            ("pi1", 2, 100),
            ("pi1", 3, 100),
            ("pi2", 4, 100),
            ("pi2", 5, 100),
            ("pi2", 6, 100),
        ],
        {"pi1": [3], "pi2": [5, 6]},
        id="all-bounds-at-once",
    ),
]


@pytest.mark.parametrize(("size", "node_bytes", "total_bytes", "adds", "kept"), HISTORY_BOUNDS)
def test_history_bounds(
    size: int, node_bytes: int, total_bytes: int, adds: list, kept: dict[str, list[int]]
) -> None:
    history = MetricsHistory(size=size, node_bytes=node_bytes, total_bytes=total_bytes)
    for node, t, weight in adds:
        history.add(node, weighing(float(t), weight))
        assert history.latest(node).timestamp == t
    assert {node: [int(s.timestamp) for s in history.recent(node)] for node in kept} == kept
    for node in kept:
        assert history.bytes_kept(node) == sum(s.ByteSize() for s in history.recent(node))
    assert history.bytes_kept() == sum(history.bytes_kept(node) for node in kept)


@pytest.mark.parametrize(("node_bytes", "total_bytes"), [(0, 10), (20, 10), (-1, -1)])
def test_history_refuses_nonsense_byte_bounds(node_bytes: int, total_bytes: int) -> None:
    with pytest.raises(ValueError):
        MetricsHistory(node_bytes=node_bytes, total_bytes=total_bytes)


def test_history_stays_within_its_bytes_under_a_flood_of_big_samples() -> None:
    """64 KiB samples from 50 nodes, 40 each: memory stays at the bound, not 128 MB."""
    history = MetricsHistory(size=120, node_bytes=512 * 1024, total_bytes=4 * 1024 * 1024)
    fat = weighing(1.0, 64 * 1024)
    for round_number in range(40):
        for index in range(50):
            fat.timestamp = float(round_number + 1)
            history.add(f"pi{index}", fat)
            assert history.bytes_kept() <= 4 * 1024 * 1024
            assert history.bytes_kept(f"pi{index}") <= 512 * 1024
    assert len(history._arrivals) <= 2 * 4 * 1024 * 1024 // (64 * 1024) + 1024  # swept, not piling up
    assert all(history.recent(f"pi{index}")[-1].timestamp == 40.0 for index in range(50))


def test_forget_gives_the_bytes_back() -> None:
    history = MetricsHistory(size=10, node_bytes=1000, total_bytes=1000)
    history.add("pi1", weighing(1.0, 400))
    history.add("pi2", weighing(2.0, 400))
    history.forget("pi1")
    assert history.bytes_kept() == 400
    history.add("pi3", weighing(3.0, 500))
    assert [s.timestamp for s in history.recent("pi2")] == [2.0]  # room again: nothing dropped
    history.add("pi1", weighing(4.0, 100))  # the name comes back: old tickets do not hit it
    assert [s.timestamp for s in history.recent("pi1")] == [4.0]

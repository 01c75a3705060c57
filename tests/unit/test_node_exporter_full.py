"""Node Exporter Full on picoord's series: its node selector finds every node, and at least
90 of its 122 panels find every metric they query, for a cluster of Raspberry Pis whose
agents read real Pi kernel files (tests/data/pi4_kernel_files.json) with the agent's own
readers. The panels' metric names come from tests/data/node_exporter_full_panels.json; what
each family is (type, labels) comes from the one table, common/node_series.py, checked here
against node_exporter's own output (tests/data/node_exporter_1.5_families.json)."""

from __future__ import annotations

import asyncio
import json
import os
import time
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from picoord.agent.metrics import SeriesLayout, read_series, series_sources
from picoord.common.node_series import FAMILIES, SeriesFamily, family_of
from picoord.coordinator.cluster import Cluster, LiveSession
from picoord.coordinator.prometheus import render_nodes, snapshot
from picoord.coordinator.status import StatusTimeouts
from picoord.coordinator.store import CertificateRecord, Store, TokenRecord
from picoord.coordinator.telemetry import MetricsHistory
from picoord.v1 import agent_pb2, node_pb2

DATA = Path(__file__).resolve().parent.parent / "data"
PANELS = json.loads((DATA / "node_exporter_full_panels.json").read_text())
NODE_EXPORTER = json.loads((DATA / "node_exporter_1.5_families.json").read_text())["families"]
PANELS_WANTED = 90
NODES = 3


def pi_tree(root: Path) -> Path:
    """The Pi's /proc and /sys files under root."""
    kernel = json.loads((DATA / "pi4_kernel_files.json").read_text())
    for name, text in kernel["files"].items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    for name, target in kernel["symlinks"].items():
        os.symlink(target, root / name)
    return root


def pi_layout(root: Path) -> SeriesLayout:
    sources = series_sources(proc=root / "proc", sys_root=root / "sys")
    return SeriesLayout(sources, list(read_series(sources)))


def pi_hardware(name: str, layout: SeriesLayout) -> node_pb2.Hardware:
    uname = node_pb2.Uname(
        sysname="Linux",
        nodename=name,
        release="6.1.0-rpi7-rpi-v8",
        version="#1 SMP PREEMPT Debian 1:6.1.63-1+rpt1 (2023-11-24)",
        machine="aarch64",
        domainname="(none)",
    )
    hardware = node_pb2.Hardware(hostname=name, arch="aarch64", uname=uname)
    layout.declare(hardware.series)
    return hardware


def pi_sample(layout: SeriesLayout) -> node_pb2.MetricsSample:
    """Like bench/fanin.py's Pi sample, with what the agent now adds."""
    return node_pb2.MetricsSample(
        timestamp=time.time(),
        cpu_percent=7.5,
        cpus=[
            node_pb2.CpuTimes(cpu=cpu, user=1200.5, nice=0.3, system=300.2, idle=86000.1, iowait=12.0)
            for cpu in range(4)
        ],
        load1=0.21,
        load5=0.18,
        load15=0.12,
        memory_total_bytes=3_975_200_768,
        memory_available_bytes=3_581_689_856,
        memory_free_bytes=3_060_764_672,
        swap_total_bytes=104_853_504,
        swap_free_bytes=104_853_504,
        filesystems=[
            node_pb2.FilesystemUsage(
                device="/dev/mmcblk0p2",
                mountpoint="/",
                fstype="ext4",
                size_bytes=31_000_000_000,
                free_bytes=24_000_000_000,
                avail_bytes=22_500_000_000,
                files=1_900_000,
                files_free=1_750_000,
            ),
            node_pb2.FilesystemUsage(
                device="/dev/mmcblk0p1",
                mountpoint="/boot/firmware",
                fstype="vfat",
                size_bytes=535_805_952,
                free_bytes=470_000_000,
                avail_bytes=470_000_000,
            ),
        ],
        network=[
            node_pb2.NetworkCounters(
                device="eth0",
                receive_bytes=10**9,
                transmit_bytes=4 * 10**8,
                receive_packets=10**6,
                transmit_packets=6 * 10**5,
                receive_drop=12,
                receive_multicast=3000,
                link_known=True,
                up=True,
                carrier=True,
                mtu=1500,
                speed_mbps=1000,
            ),
            node_pb2.NetworkCounters(
                device="wlan0", receive_bytes=1000, transmit_bytes=2000, link_known=True, mtu=1500
            ),
        ],
        temperatures=[node_pb2.Temperature(zone="thermal_zone0", type="cpu-thermal", celsius=48.3)],
        throttled_available=True,
        throttled=0,
        boot_time=time.time() - 86400,
        series_values=layout.values(),
    )


def pi_cluster(tmp_path: Path) -> Cluster:
    """NODES Raspberry Pis in session, each with a sample from the Pi kernel files."""
    layout = pi_layout(pi_tree(tmp_path / "pi"))
    store = Store(tmp_path / "state.db")
    store.add_token(TokenRecord("abcdef", "x", 0.0, 1e12, 0, 0, ""))
    for index in range(NODES):
        name = f"pi{index}"
        store.enroll("abcdef", name, {}, CertificateRecord(f"s{index}", name, 1.0, 1e12, None), time.time())
    cluster = Cluster(store, StatusTimeouts(), MetricsHistory())
    for index in range(NODES):
        name = f"pi{index}"
        hello = agent_pb2.Hello(agent_version="0.1.0", hardware=pi_hardware(name, layout))
        asyncio.run(cluster.open_session(LiveSession(name, f"s{index}"), hello))
        cluster.history.add(name, pi_sample(layout))
    return cluster


@pytest.fixture
def exposition(tmp_path: Path) -> str:
    return render_nodes(snapshot(pi_cluster(tmp_path)))


def present_metrics(text: str) -> set[str]:
    """Every sample name with at least one series (a counter family's samples end in _total)."""
    return {sample.name for family in text_string_to_metric_families(text) for sample in family.samples}


def test_the_node_selector_lists_every_node(exposition: str) -> None:
    nodenames = {
        sample.labels["nodename"]
        for family in text_string_to_metric_families(exposition)
        if family.name == "node_uname_info"
        for sample in family.samples
    }
    assert nodenames == {f"pi{index}" for index in range(NODES)}


def test_node_exporter_full_panels_have_their_series(exposition: str) -> None:
    present = present_metrics(exposition)
    complete = [panel for panel in PANELS["panels"] if set(panel["metrics"]) <= present]
    missing = {panel["title"]: sorted(set(panel["metrics"]) - present) for panel in PANELS["panels"]}
    print(f"{len(complete)} of {len(PANELS['panels'])} panels have all their series; missing:")
    for title, names in missing.items():
        if names:
            print(f"  {title}: {' '.join(names)}")
    assert len(PANELS["panels"]) == 122
    assert len(complete) >= PANELS_WANTED, {title: names for title, names in missing.items() if names}


def test_every_panel_metric_picoord_exports_has_node_exporters_unit_and_labels(exposition: str) -> None:
    """A few values checked against the Pi files: kB, sectors, ms, kHz and millidegrees
    come out in node_exporter's units, with its labels."""
    values = {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(exposition)
        for sample in family.samples
        if sample.labels.get("instance") == "pi0"
    }
    pi0 = ("instance", "pi0")
    assert values[("node_memory_Cached_bytes", (pi0,))] == 553920 * 1024
    assert values[("node_disk_read_bytes_total", (("device", "mmcblk0"), pi0))] == 2345678 * 512
    assert values[("node_disk_io_time_seconds_total", (("device", "mmcblk0"), pi0))] == pytest.approx(456.789)
    assert values[("node_disk_io_now", (("device", "mmcblk0p2"), pi0))] == 0
    assert values[("node_cpu_scaling_frequency_hertz", (("cpu", "3"), pi0))] == 1.5e9
    assert values[
        ("node_hwmon_temp_celsius", (("chip", "thermal_thermal_zone0"), pi0, ("sensor", "temp1")))
    ] == (pytest.approx(48.686))
    assert values[
        ("node_hwmon_chip_names", (("chip", "thermal_thermal_zone0"), ("chip_name", "cpu_thermal"), pi0))
    ]
    assert values[("node_netstat_Tcp_MaxConn", (pi0,))] == -1
    assert values[("node_sockstat_TCP_mem_bytes", (pi0,))] == 2 * os.sysconf("SC_PAGE_SIZE")
    assert values[("node_context_switches_total", (pi0,))] == 98765432
    assert values[("node_schedstat_running_seconds_total", (("cpu", "0"), pi0))] == pytest.approx(
        1234.567890123
    )
    assert values[("node_softnet_processed_total", (("cpu", "2"), pi0))] == 0x12D687
    assert (
        values[
            (
                "node_filesystem_files_free",
                (("device", "/dev/mmcblk0p2"), ("fstype", "ext4"), pi0, ("mountpoint", "/")),
            )
        ]
        == 1_750_000
    )
    assert values[("node_network_speed_bytes", (("device", "eth0"), pi0))] == 125_000_000
    assert (
        "node_disk_reads_completed_total",
        (("device", "ram0"), pi0),
    ) not in values  # node_exporter's exclusions


def table_family(name: str) -> SeriesFamily | None:
    """The table's family of an exposed name, sample-fed or declared."""
    return FAMILIES.get(name) or family_of(name)


def test_the_table_types_and_labels_families_as_node_exporter_does() -> None:
    assert len(NODE_EXPORTER) >= 200
    for name, expected in NODE_EXPORTER.items():
        family = table_family(name)
        assert family is not None, name
        assert (family.kind, sorted(family.labels)) == (expected["type"], expected["labels"]), name


def test_every_family_exported_is_the_tables(exposition: str) -> None:
    """Each family on /metrics has the type and labels (with instance) the table gives it."""
    exported = list(text_string_to_metric_families(exposition))
    assert len(exported) > 150
    for exposed in exported:
        name = exposed.name + ("_total" if exposed.type == "counter" else "")
        family = table_family(name)
        assert family is not None, name
        assert exposed.type == {"untyped": "unknown"}.get(family.kind, family.kind), name
        for sample in exposed.samples:
            assert set(sample.labels) == {"instance", *family.labels}, name

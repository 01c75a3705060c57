"""The declared-series contract: which names the coordinator knows (type, labels, unit),
what the agent's readers make of kernel text, and what the coordinator refuses in a hello."""

from __future__ import annotations

import pytest

from picoord.agent.metrics import (
    diskstats_series,
    meminfo_series,
    netstat_series,
    parse_net_dev,
    sockstat_series,
    softnet_series,
    stat_series,
    vmstat_series,
)
from picoord.common.node_series import family_of
from picoord.coordinator.inbound import MalformedMessage, check_hello
from picoord.v1 import agent_pb2, node_pb2


@pytest.mark.parametrize(
    ("name", "kind", "labels", "scale"),
    [
        ("node_memory_Cached_bytes", "gauge", (), 1024),
        ("node_memory_Active_anon_bytes", "gauge", (), 1024),
        ("node_memory_HugePages_Total", "gauge", (), 1),
        ("node_vmstat_pgfault", "untyped", (), 1),
        ("node_netstat_Tcp_MaxConn", "untyped", (), 1),
        ("node_sockstat_TCP_inuse", "gauge", (), 1),
        ("node_disk_read_bytes_total", "counter", ("device",), 512),
        ("node_disk_io_time_seconds_total", "counter", ("device",), 0.001),
        ("node_cpu_scaling_frequency_hertz", "gauge", ("cpu",), 1000),
        ("node_hwmon_temp_celsius", "gauge", ("chip", "sensor"), 0.001),
        ("node_context_switches_total", "counter", (), 1),
        ("process_cpu_seconds_total", "counter", (), 0.001),
    ],
)
def test_known_families(name: str, kind: str, labels: tuple[str, ...], scale: float) -> None:
    family = family_of(name)
    assert family is not None
    assert (family.name, family.kind, family.labels, family.scale) == (name, kind, labels, scale)


@pytest.mark.parametrize(
    "name",
    ["node_from_the_future", "node_memory_", "node_vmstat_", "node_netstat_Tcp MaxConn", "go_goroutines"],
)
def test_unknown_families(name: str) -> None:
    assert family_of(name) is None


def test_meminfo_series_in_kb_under_node_exporters_names() -> None:
    text = (
        "MemTotal:  100 kB\nActive(anon):   12 kB\nHugePages_Total:   4\nHugepagesize:  2048 kB\nBad line\n"
    )
    assert meminfo_series(text) == {
        ("node_memory_Active_anon_bytes", ()): 12,
        ("node_memory_HugePages_Total", ()): 4,
        ("node_memory_Hugepagesize_bytes", ()): 2048,
    }


def test_stat_vmstat_and_sockstat() -> None:
    assert stat_series("cpu 1 2 3\nintr 99 1 2\nctxt 7\nprocesses 5\nprocs_running 2\nprocs_blocked 0\n") == {
        ("node_intr_total", ()): 99,
        ("node_context_switches_total", ()): 7,
        ("node_forks_total", ()): 5,
        ("node_procs_running", ()): 2,
        ("node_procs_blocked", ()): 0,
    }
    assert vmstat_series(
        "nr_free_pages 1\npgfault 10\npgmajfault 2\npgpgin 3\npswpout 4\noom_kill 0\npgfree 9\n"
    ) == {
        ("node_vmstat_pgfault", ()): 10,
        ("node_vmstat_pgmajfault", ()): 2,
        ("node_vmstat_pgpgin", ()): 3,
        ("node_vmstat_pswpout", ()): 4,
        ("node_vmstat_oom_kill", ()): 0,
    }
    assert sockstat_series("sockets: used 5\nTCP: inuse 1 mem 3\nFRAG: inuse 0 memory 0\n", 4096) == {
        ("node_sockstat_sockets_used", ()): 5,
        ("node_sockstat_TCP_inuse", ()): 1,
        ("node_sockstat_TCP_mem", ()): 3,
        ("node_sockstat_TCP_mem_bytes", ()): 3 * 4096,
        ("node_sockstat_FRAG_inuse", ()): 0,
        ("node_sockstat_FRAG_memory", ()): 0,
    }


def test_netstat_keeps_node_exporters_default_fields() -> None:
    text = "Tcp: RtoMin MaxConn InSegs\nTcp: 200 -1 77\nUdp: InDatagrams IgnoredMulti\nUdp: 5 6\n"
    assert netstat_series(text) == {
        ("node_netstat_Tcp_MaxConn", ()): -1,
        ("node_netstat_Tcp_InSegs", ()): 77,
        ("node_netstat_Udp_InDatagrams", ()): 5,
    }


def test_diskstats_skips_node_exporters_excluded_devices() -> None:
    text = (
        "   1 0 ram0 1 0 0 0 0 0 0 0 0 0 0\n   7 0 loop3 1 0 0 0 0 0 0 0 0 0 0\n"
        "   8 1 sda1 1 0 0 0 0 0 0 0 0 0 0\n 179 0 mmcblk0 5 1 80 30 6 2 90 40 1 70 100\n"
    )
    readings = diskstats_series(text)
    assert {labels for _, labels in readings} == {("mmcblk0",)}
    assert readings[("node_disk_read_bytes_total", ("mmcblk0",))] == 80  # sectors: the coordinator scales
    assert readings[("node_disk_io_time_weighted_seconds_total", ("mmcblk0",))] == 100
    assert ("node_disk_discards_completed_total", ("mmcblk0",)) not in readings  # an old kernel's 11 fields


def test_softnet_and_net_dev() -> None:
    assert (
        softnet_series("0000000a 00000001 00000002 0 0 0 0 0 0 00000003 00000004\n")[
            ("node_softnet_received_rps_total", ("0",))
        ]
        == 3
    )
    dev = "Inter-|\n face |\n  eth0: " + " ".join(map(str, range(1, 17))) + "\n    lo: " + "0 " * 16 + "\n"
    assert parse_net_dev(dev)["eth0"] == list(range(1, 17))


def _hello(*series: node_pb2.SeriesKey) -> agent_pb2.AgentMessage:
    hello = agent_pb2.Hello(node_name="pi1", hardware=node_pb2.Hardware(series=series))
    return agent_pb2.AgentMessage(hello=hello)


@pytest.mark.parametrize(
    ("key", "error"),
    [
        (
            node_pb2.SeriesKey(name='x{a="1"} 2\nevil'),
            r"hello\.hardware\.series\[1\]\.name .* is not a metric name",
        ),
        (node_pb2.SeriesKey(name=""), "is not a metric name"),
        (
            node_pb2.SeriesKey(name="node_disk_io_now"),
            r"series\[1\] node_disk_io_now has 0 label values, it takes 1 \(device\)",
        ),
        (
            node_pb2.SeriesKey(name="node_memory_Cached_bytes", label_values=["x"]),
            "has 1 label values, it takes 0 (none)",
        ),
    ],
)
def test_a_hello_with_a_bad_declaration_is_refused(key: node_pb2.SeriesKey, error: str) -> None:
    good = node_pb2.SeriesKey(name="node_disk_io_now", label_values=["mmcblk0"])
    with pytest.raises(
        MalformedMessage, match=error if error.startswith(("hello", "series")) else None
    ) as raised:
        check_hello(_hello(good, key), "pi1")
    assert raised.value.code == "malformed_message"
    if not error.startswith(("hello", "series")):
        assert error in str(raised.value)


def test_a_hello_declaring_unknown_but_well_formed_series_is_accepted() -> None:
    check_hello(_hello(node_pb2.SeriesKey(name="node_from_the_future", label_values=["a", "b"])), "pi1")


def test_a_large_machine_declares_what_the_coordinator_accepts() -> None:
    from picoord.agent.metrics import within_limits
    from picoord.common import limits

    many = [("node_schedstat_timeslices_total", (str(cpu),)) for cpu in range(limits.SERIES + 500)]
    odd = [("node_disk_io_now", ("x" * (limits.TEXT + 1),)), ("node_procs_running", ())]
    kept = within_limits(odd + many)
    assert kept[0] == ("node_procs_running", ()) and len(kept) == limits.SERIES
    hello = _hello(*(node_pb2.SeriesKey(name=name, label_values=labels) for name, labels in kept))
    check_hello(hello, "pi1")  # accepted, sizes and all

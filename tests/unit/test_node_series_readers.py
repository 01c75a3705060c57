"""The agent's readers of the families node_exporter serves beyond picoord's first set
(pressure, ARP, UDP queues, TCP states, processes, interrupts, the sampler's collectors),
each on fixture text in the kernel's format, and the one-table rule: every series an agent
reader makes is a family of common/node_series.py, with that family's number of labels."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from picoord.agent.metrics import (
    COLLECTORS,
    Readings,
    SeriesLayout,
    SeriesSource,
    arp_series,
    collector_series,
    declared_bytes,
    interrupts_series,
    pressure_series,
    processes_series,
    read_lines,
    read_series,
    series_sources,
    tcp_states_series,
    udp_queues_series,
    within_limits,
)
from picoord.common import limits
from picoord.common.node_series import FAMILIES, family_of
from picoord.coordinator.inbound import check_hello
from picoord.v1 import agent_pb2, node_pb2

TCP_HEADER = (
    "  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode\n"
)
TCP = (
    TCP_HEADER
    + "   0: 0100007F:A0EB 00000000:0000 0A 00000000:00000003 00:00000000 00000000     0        0 70254 1\n"
    + "   1: 0100D50A:1388 0200D50A:D3B2 01 00000010:00000000 01:00000014 00000000     0        0 76660 1\n"
    + "   2: 0100D50A:1388 0200D50A:D3B4 06 00000000:00000000 03:00000f3e 00000000     0        0 0 3\n"
)
TCP6 = (
    TCP_HEADER + "   0: 00000000000000000000000000000000:0016 00000000000000000000000000000000:0000 0A"
    " 00000000:00000000 00:00000000 00000000     0        0 1 1\n"
)
UDP = (
    "   sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode ref\n"
    "  116: 3500007F:0035 00000000:0000 07 00000000:00000200 00:00000000 00000000   101        0 12 2\n"
    "  200: 00000000:0044 00000000:0000 07 00000100:00000000 00:00000000 00000000     0        0 13 2\n"
)
INTERRUPTS = (
    "           CPU0       CPU1       \n"
    " 24:          1          0  IO-APIC   5-edge      ACPI:Ged\n"
    " 28:          0          7 PCI-MSIX-0000:00:01.0   0-edge      virtio0-config\n"
    "NMI:          0          2   Non-maskable interrupts\n"
    "ERR:          0\n"
)


def _interrupt(cpu: str, devices: str, info: str, irq: str) -> tuple[str, tuple[str, ...]]:
    return ("node_interrupts_total", (cpu, devices, info, irq))


@pytest.mark.parametrize(
    ("readings", "expected"),
    [
        (
            pressure_series(
                "some avg10=2.42 avg60=1.29 avg300=0.95 total=10575531\n"
                "full avg10=0.03 avg60=0.05 avg300=0.25 total=5694646\n",
                "io",
            ),
            {
                ("node_pressure_io_waiting_seconds_total", ()): 10575531,
                ("node_pressure_io_stalled_seconds_total", ()): 5694646,
            },
        ),
        (  # node_exporter exports cpu's "some" only
            pressure_series(
                "some avg10=0 avg60=0 avg300=0 total=7\nfull avg10=0 avg60=0 avg300=0 total=0\n", "cpu"
            ),
            {("node_pressure_cpu_waiting_seconds_total", ()): 7},
        ),
        (
            pressure_series("full avg10=0.00 avg60=0.00 avg300=0.00 total=12\n", "irq"),
            {("node_pressure_irq_stalled_seconds_total", ()): 12},
        ),
        (
            arp_series(
                "IP address       HW type     Flags       HW address            Mask     Device\n"
                "10.0.0.2         0x1         0x2         12:8f:1e:b4:88:81     *        eth0\n"
                "10.0.0.3         0x1         0x0         00:00:00:00:00:00     *        eth0\n"
                "192.168.1.1      0x1         0x2         52:8f:1f:5b:da:f3     *        wlan0\n"
            ),
            {("node_arp_entries", ("eth0",)): 2, ("node_arp_entries", ("wlan0",)): 1},
        ),
        (arp_series("IP address HW type Flags HW address Mask Device\n"), {}),
        (
            udp_queues_series(UDP.splitlines(), "v4"),
            {("node_udp_queues", ("v4", "rx")): 0x200, ("node_udp_queues", ("v4", "tx")): 0x100},
        ),
        (
            udp_queues_series(UDP.splitlines()[:1], "v6"),
            {("node_udp_queues", ("v6", "rx")): 0, ("node_udp_queues", ("v6", "tx")): 0},
        ),
        (
            interrupts_series(INTERRUPTS),
            {
                _interrupt("0", "5-edge ACPI:Ged", "IO-APIC", "24"): 1,
                _interrupt("1", "5-edge ACPI:Ged", "IO-APIC", "24"): 0,
                _interrupt("0", "0-edge virtio0-config", "PCI-MSIX-0000:00:01.0", "28"): 0,
                _interrupt("1", "0-edge virtio0-config", "PCI-MSIX-0000:00:01.0", "28"): 7,
                _interrupt("0", "", "Non-maskable interrupts", "NMI"): 0,
                _interrupt("1", "", "Non-maskable interrupts", "NMI"): 2,
            },
        ),
        (interrupts_series(""), {}),
    ],
)
def test_readers(readings: Readings, expected: Readings) -> None:
    assert readings == expected


def test_tcp_states_count_v4_and_v6_and_declare_every_state() -> None:
    readings = tcp_states_series((TCP + TCP6).splitlines())
    states = {labels[0]: value for (name, labels), value in readings.items()}
    assert {name for name, _ in readings} == {"node_tcp_connection_states"}
    assert states.pop("listen") == 2
    assert states.pop("established") == 1
    assert states.pop("time_wait") == 1
    assert states.pop("rx_queued_bytes") == 3
    assert states.pop("tx_queued_bytes") == 0x10
    assert set(states) == {
        "syn_sent",
        "syn_recv",
        "fin_wait1",
        "fin_wait2",
        "close",
        "close_wait",
        "last_ack",
        "closing",
    }
    assert set(states.values()) == {0}


def test_processes_count_states_pids_and_threads() -> None:
    text = (
        "1 (systemd) S 0 1 1 0 -1 4194560 1 2 3 4 5 6 7 8 20 0 1 0 9 1 1 1\n"
        "6523 (cat) R 6517 6517 6220 0 -1 4194304 101 0 0 0 0 0 0 0 20 0 1 0 64326 3133440 385\n"
        "77 (a (weird) name) S 2 0 0 0 -1 69238880 0 0 0 0 0 0 0 0 20 0 12 0 5 0 0\n"
        "78 (kworker/0:1-events) I 2 0 0 0 -1 69238880 0 0 0 0 0 0 0 0 20 0 1 0 5 0 0\n"
        "79 (gone\n"  # a process that went away mid-read
    )
    readings = processes_series(text.splitlines())
    assert readings[("node_processes_pids", ())] == 4
    assert readings[("node_processes_threads", ())] == 15
    states = {
        labels[0]: value for (name, labels), value in readings.items() if name == "node_processes_state"
    }
    assert states == {"D": 0, "I": 1, "R": 1, "S": 2, "T": 0, "Z": 0}


def test_collectors_report_success_and_duration() -> None:
    readings = collector_series({"cpu": (True, 250), "network": (False, 1200)})
    assert readings[("node_scrape_collector_success", ("cpu",))] == 1
    assert readings[("node_scrape_collector_duration_seconds", ("cpu",))] == 250
    assert readings[("node_scrape_collector_success", ("network",))] == 0
    assert readings[("node_scrape_collector_success", ("load",))] == 0  # not run
    assert readings[("node_textfile_scrape_error", ())] == 0
    assert len(readings) == 2 * len(COLLECTORS) + 1


def _tree(root: Path) -> Path:
    files = {
        "proc/pressure/io": "some avg10=0 avg60=0 avg300=0 total=5\nfull avg10=0 avg60=0 avg300=0 total=4\n",
        "proc/net/arp": "IP address HW type Flags HW address Mask Device\n10.0.0.2 0x1 0x2 aa:bb *  eth0\n",
        "proc/net/udp": UDP,
        "proc/net/tcp": TCP,
        "proc/net/tcp6": TCP6,
        "proc/interrupts": INTERRUPTS,
        "proc/sys/kernel/pid_max": "32768\n",
        "proc/sys/kernel/threads-max": "192735\n",
        "proc/42/stat": "42 (sh) S 1 42 42 0 -1 0 0 0 0 0 0 0 0 0 20 0 3 0 5 0 0\n",
        "sys/class/net/eth0/statistics/rx_nohandler": "9\n",
        "sys/class/net/lo/statistics/rx_nohandler": "0\n",
    }
    for name, text in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(text)
    return root


def test_the_sources_read_a_tree_into_table_families(tmp_path: Path) -> None:
    root = _tree(tmp_path)
    readings = read_series(series_sources(proc=root / "proc", sys_root=root / "sys"))
    assert readings[("node_pressure_io_stalled_seconds_total", ())] == 4
    assert readings[("node_arp_entries", ("eth0",))] == 1
    assert readings[("node_tcp_connection_states", ("listen",))] == 2  # tcp and tcp6
    assert readings[("node_processes_pids", ())] == 1
    assert readings[("node_processes_threads", ())] == 3
    assert readings[("node_processes_max_processes", ())] == 32768
    assert readings[("node_processes_max_threads", ())] == 192735
    assert readings[("node_network_receive_nohandler_total", ("eth0",))] == 9
    assert ("node_network_receive_nohandler_total", ("lo",)) not in readings  # as node_exporter
    assert readings[_interrupt("1", "", "Non-maskable interrupts", "NMI")] == 2
    assert list(readings)[-1][0] == "node_interrupts_total"  # last, see within_limits
    for name, labels in readings:
        family = family_of(name)
        assert family is not None and family.declared, name
        assert len(labels) == len(family.labels), name


def test_every_reading_on_this_machine_is_a_table_family() -> None:
    readings = {**read_series(series_sources()), **collector_series({})}
    assert readings
    for name, labels in readings:
        family = family_of(name)
        assert family is not None, name
        assert len(labels) == len(family.labels), name
        if name in FAMILIES:
            assert FAMILIES[name].declared


def test_tcp6_missing_still_reads_tcp(tmp_path: Path) -> None:
    root = _tree(tmp_path)
    os.unlink(root / "proc/net/tcp6")
    readings = read_series(series_sources(proc=root / "proc", sys_root=root / "sys"))
    assert readings[("node_tcp_connection_states", ("listen",))] == 1


def test_a_many_cpu_machines_interrupts_are_cut_to_fit_the_hello(tmp_path: Path) -> None:
    """64 CPUs and 100 irqs with long labels are 6,400 series, some 500 KiB: the layout keeps
    every other series and as many interrupts as the hello's budget holds, and the
    coordinator accepts that hello (its byte budget and every field's limit)."""
    root = _tree(tmp_path)
    cpus = 64
    rows = [" ".join(f"CPU{cpu}" for cpu in range(cpus))]
    rows += [
        f"{irq}: {' '.join(['123456'] * cpus)} PCI-MSIX-0000:00:{irq:02x}.0 {irq}-edge nvme0q{irq}-long-name"
        for irq in range(100)
    ]
    (root / "proc/interrupts").write_text("\n".join(rows) + "\n")
    readings = {
        **collector_series({}),
        **read_series(series_sources(proc=root / "proc", sys_root=root / "sys")),
    }
    kept = within_limits(list(readings))
    others = [key for key in readings if key[0] != "node_interrupts_total"]
    assert kept[: len(others)] == others  # interrupts come last and only they are cut
    assert 0 < len(kept) - len(others) < cpus * 100
    hardware = node_pb2.Hardware(series=[node_pb2.SeriesKey(name=n, label_values=v) for n, v in kept])
    assert hardware.ByteSize() <= limits.SERIES_BYTES
    hello = agent_pb2.Hello(node_name="pi1", hardware=hardware)
    check_hello(agent_pb2.AgentMessage(hello=hello), "pi1")  # accepted


@pytest.mark.parametrize(
    ("times", "reads"),
    [
        ((0.0,), 1),
        ((0.0, 5.0, 14.9), 1),  # reused: the gauges repeat
        ((0.0, 15.0), 2),
        ((0.0, 5.0, 15.0, 29.0, 30.0), 3),
    ],
)
def test_a_slow_source_is_read_at_most_every_so_often(times: tuple[float, ...], reads: int) -> None:
    calls: list[Path] = []

    def read(path: Path) -> str:
        calls.append(path)
        return str(len(calls))

    slow = SeriesSource(Path("/slow"), lambda text: {("node_processes_pids", ()): int(text)}, read, 15.0)
    fast = SeriesSource(Path("/fast"), lambda text: {("node_procs_running", ()): 7}, lambda _path: "")
    layout = SeriesLayout([slow, fast], [("node_processes_pids", ()), ("node_procs_running", ())])
    values = [layout.values(now=now)[:2] for now in times]
    assert len(calls) == reads
    assert values[-1] == [reads, 7]


@pytest.mark.parametrize(
    "text",
    ["", "one\n", "one\ntwo", "a\n\nb\n", "x" * 5000 + "\n" + "y" * 9000 + "\nz\n"],
)
def test_read_lines_gives_the_files_lines_across_chunks(tmp_path: Path, text: str) -> None:
    path = tmp_path / "table"
    path.write_text(text)
    assert list(read_lines(path)) == text.splitlines()


@pytest.mark.parametrize(
    ("name", "labels"),
    [
        ("node_load1", ()),
        ("n", ("",)),
        ("", ()),
        ("x" * 200, ("y" * 300, "z", "ü" * 70)),
        ("node_interrupts_total", ("0", "0-edge virtio0-config", "PCI-MSIX-0000:00:01.0", "28")),
        ("a" * 127, ("b" * 128,)),
    ],
)
def test_declared_bytes_is_what_the_hello_grows_by(name: str, labels: tuple[str, ...]) -> None:
    key = node_pb2.SeriesKey(name=name, label_values=labels)
    assert declared_bytes(name, labels) == node_pb2.Hardware(series=[key]).ByteSize()

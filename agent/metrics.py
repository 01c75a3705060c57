"""The metric samples an agent streams (`node_pb2.MetricsSample`).

`MetricsSampler.sample()` may run every second on a 1 GB Raspberry Pi, so what cannot
change is read once (boot time), what rarely changes is re-read only when it does (the
mount table, watched with poll(2)) or once a minute (the list of thermal zones), and a
probe that fails or hangs (vcgencmd, a dead NFS mount) is skipped rather than allowed to
stall the stream. The coordinator uses temperatures and throttling to keep work off hot
Pis (`common.pi_throttled_flags` turns the firmware's bits into words for `coordctl top`).
"""

from __future__ import annotations

import functools
import os
import re
import resource
import select
import shutil
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import psutil
import structlog

from picoord.agent.commands import run_command
from picoord.agent.hardware import bounded_statvfs, list_filesystems
from picoord.common import limits
from picoord.common.node_series import (
    FAMILIES,
    MEMINFO_PREFIX,
    NETSTAT_PREFIX,
    PROCESS_STATES,
    SOCKSTAT_PREFIX,
    TCP_STATES,
    VMSTAT_PREFIX,
    by_field,
    from_source,
)
from picoord.v1 import node_pb2

if TYPE_CHECKING:
    from google.protobuf.internal.containers import RepeatedCompositeFieldContainer

log = structlog.get_logger(__name__)

MOUNTS_PATH = Path("/proc/self/mounts")
MEMINFO_PATH = Path("/proc/meminfo")
VCGENCMD_TIMEOUT_SECONDS = 2.0
VCGENCMD_BACKOFF_SECONDS = 60.0  # after vcgencmd hangs, do not pay its timeout on every sample
THERMAL_REFRESH_SECONDS = 60.0  # zones appear only when a driver loads
CPU_TIME_FIELDS = ("user", "nice", "system", "idle", "iowait", "irq", "softirq", "steal")
# guest/guest_nice are already counted in user/nice by the kernel, so they are left out of totals.
CPU_IDLE_FIELDS = ("idle", "iowait")
CPU_GUEST_FIELDS = ("guest", "guest_nice")

_THROTTLED_OUTPUT = re.compile(r"^\s*throttled=0x([0-9a-fA-F]{1,8})\s*$")


# --- Pure helpers ------------------------------------------------------------------------


def parse_throttled(text: str) -> int | None:
    """The bit field from `vcgencmd get_throttled` output ("throttled=0x50005"), None if malformed."""
    match = _THROTTLED_OUTPUT.match(text)
    return int(match[1], 16) if match else None


def cpu_busy_and_total(times: object) -> tuple[float, float]:
    """(busy seconds, total seconds) from one psutil cpu_times entry."""
    total = sum(getattr(times, name, 0.0) for name in CPU_TIME_FIELDS)
    idle = sum(getattr(times, name, 0.0) for name in CPU_IDLE_FIELDS)
    return total - idle, total


def cpu_busy_percent(previous: tuple[float, float], current: tuple[float, float]) -> float:
    """Share of CPU time spent busy between two (busy, total) readings, in 0..100.

    No elapsed time, or counters that went backwards, give 0 rather than a nonsense value.
    """
    busy = current[0] - previous[0]
    total = current[1] - previous[1]
    if total <= 0:
        return 0.0
    return min(max(busy / total * 100.0, 0.0), 100.0)


def parse_meminfo(text: str) -> dict[str, int]:
    """/proc/meminfo as bytes per key ("MemTotal:  3884 kB" -> 3977216)."""
    values: dict[str, int] = {}
    for line in text.splitlines():
        key, separator, rest = line.partition(":")
        parts = rest.split()
        if not separator or not parts:
            continue
        try:
            number = int(parts[0])
        except ValueError:
            continue
        values[key.strip()] = number * 1024 if len(parts) > 1 and parts[1] == "kB" else number
    return values


@dataclass(frozen=True)
class ThermalZone:
    zone: str  # thermal_zone0
    type: str  # cpu-thermal
    temp_path: Path


def _zone_number(path: Path) -> tuple[int, str]:
    suffix = path.name.removeprefix("thermal_zone")
    return (int(suffix) if suffix.isdigit() else 1 << 30, path.name)


def discover_thermal_zones(sys_root: Path = Path("/sys")) -> list[ThermalZone]:
    """The thermal zones under sys_root, numerically ordered, with their (static) type."""
    base = sys_root / "class" / "thermal"
    try:
        paths = sorted(base.glob("thermal_zone*"), key=_zone_number)
    except OSError:
        return []
    zones = []
    for path in paths:
        try:
            zone_type = (path / "type").read_text().strip()
        except OSError:
            zone_type = ""
        zones.append(ThermalZone(zone=path.name, type=zone_type, temp_path=path / "temp"))
    return zones


def read_temperatures(zones: list[ThermalZone]) -> list[node_pb2.Temperature]:
    """Current readings; a zone whose sensor cannot be read right now (ENODATA, EAGAIN) is left out."""
    readings = []
    for zone in zones:
        try:
            millidegrees = int(zone.temp_path.read_text().strip())
        except (OSError, ValueError):
            continue
        readings.append(node_pb2.Temperature(zone=zone.zone, type=zone.type, celsius=millidegrees / 1000.0))
    return readings


def read_thermal_zones(sys_root: Path = Path("/sys")) -> list[node_pb2.Temperature]:
    """Temperatures from sys_root/class/thermal/thermal_zone*/temp (millidegrees Celsius)."""
    return read_temperatures(discover_thermal_zones(sys_root))


# --- node_exporter's other series: declared once, sent as integers ------------------------------
#
# Each reader below turns one kernel file into (family, label values, integer) in the kernel's
# unit; common/node_series.py says how the coordinator scales and types them. The set of
# series is taken once (`series_layout`) and each sample sends only the numbers, in that order.

SeriesKey = tuple[str, tuple[str, ...]]
Readings = dict[SeriesKey, int]

# node_exporter 1.5's defaults, so the same series show up under the same names.
DISK_EXCLUDE = re.compile(r"^(ram|loop|fd|(h|s|v|xv)d[a-z]|nvme\d+n\d+p)\d+$")
NETSTAT_FIELDS = re.compile(
    r"^(.*_(InErrors|InErrs)|Ip_Forwarding|IpExt_(InOctets|OutOctets)|Icmp_(InMsgs|OutMsgs)"
    r"|TcpExt_(Listen.*|Syncookies.*|TCPSynRetrans|TCPTimeouts|TCPOFOQueue|TCPRcvQDrop)"
    r"|Tcp_(ActiveOpens|InSegs|OutSegs|OutRsts|PassiveOpens|RetransSegs|CurrEstab|MaxConn)"
    r"|Udp_(InDatagrams|OutDatagrams|NoPorts|RcvbufErrors|SndbufErrors))$"
)
FIXED_MEMINFO = frozenset({"MemTotal", "MemAvailable", "MemFree", "SwapTotal", "SwapFree"})  # own fields
# Where each reader finds its families' names: common/node_series.py's table.
DISKSTATS_FAMILIES = tuple(family.name for family in from_source("diskstats"))  # by column
SOFTNET_COLUMNS = tuple((int(family.field), family.name) for family in from_source("net/softnet_stat"))
SCHEDSTAT_COLUMNS = tuple((int(family.field), family.name) for family in from_source("schedstat"))
STAT_FIELDS = by_field("stat")
CPUFREQ_FILES = by_field("cpufreq")
HWMON_FILES = by_field("hwmon")
PRESSURE = ("cpu", "io", "memory", "irq")  # /proc/pressure/<resource>
ARP_ENTRIES = by_field("net/arp")["entries"]
UDP_QUEUES = by_field("net/udp")["queues"]
TCP_CONNECTIONS = by_field("net/tcp")["states"]
PROCESSES = by_field("processes")  # state, pids, threads
INTERRUPTS = by_field("interrupts")["total"]
COLLECTOR = by_field("agent")  # success, duration, textfile_error
# /proc/net/tcp walks the kernel's whole connection hash (13 ms on a 24 GiB host, whatever
# the number of sockets) and the process scan reads a file per process (7 ms for 150): read
# at most this often, their gauges repeated in between.
SLOW_SOURCE_SECONDS = 15.0
STAT_LINE_BYTES = 4096  # /proc/[pid]/stat: 52 numbers and a name of at most 64 bytes
TABLE_CHUNK_BYTES = 4096  # read size for the socket tables
COLLECTORS = ("cpu", "load", "memory", "filesystems", "network", "temperatures", "throttled")
_HWMON_INVALID = re.compile(r"[^a-z0-9:_]")


def read_file(path: Path | str, chunk_bytes: int = 65536) -> str:
    """A small kernel file's text: os.read without Python's buffered text layers, which cost
    more than the read itself on a Pi (a sample reads some 30 of these)."""
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        chunks = []
        while chunk := os.read(fd, chunk_bytes):
            chunks.append(chunk)
        return b"".join(chunks).decode(errors="replace")
    finally:
        os.close(fd)


_MEMINFO_LINE = re.compile(r"^([^:\s]+):\s+(\d+)( kB)?$", re.MULTILINE)
_memory_names: dict[tuple[str, str], SeriesKey] = {}


def meminfo_series(text: str) -> Readings:
    """/proc/meminfo under node_exporter's names ("Active(anon):  12 kB" ->
    node_memory_Active_anon_bytes = 12, in kB), without the five keys the sample has fields for."""
    readings: Readings = {}
    for key, value, unit in _MEMINFO_LINE.findall(text):
        name = _memory_names.get((key, unit))
        if name is None:
            suffix = "_bytes" if unit else ""
            name = _memory_names[(key, unit)] = (
                f"{MEMINFO_PREFIX}{key.replace('(', '_').replace(')', '')}{suffix}",
                (),
            )
        if key not in FIXED_MEMINFO:
            readings[name] = int(value)
    return readings


def stat_series(text: str) -> Readings:
    """Context switches, interrupts, forks and process counts from /proc/stat."""
    readings: Readings = {}
    for line in text.splitlines():
        key, _, rest = line.partition(" ")
        family = STAT_FIELDS.get(key)
        if family is not None:
            readings[(family, ())] = int(rest.split(maxsplit=1)[0])
    return readings


_VMSTAT_LINE = re.compile(
    r"^((?:oom_kill|pgpg|pswp|pg\w*fault)\w*) (\d+)$", re.MULTILINE
)  # node_exporter 1.5: ^(oom_kill|pgpg|pswp|pg.*fault).*


def vmstat_series(text: str) -> Readings:
    return {(f"{VMSTAT_PREFIX}{key}", ()): int(value) for key, value in _VMSTAT_LINE.findall(text)}


_netstat_columns: dict[str, list[tuple[int, SeriesKey]]] = {}


def netstat_series(*texts: str) -> Readings:
    """/proc/net/netstat and /proc/net/snmp: a line of names then a line of values per
    protocol. The wanted columns of a header line are worked out once."""
    readings: Readings = {}
    for text in texts:
        lines = text.splitlines()
        for header, values in zip(lines[::2], lines[1::2], strict=False):
            columns = _netstat_columns.get(header)
            if columns is None:
                protocol, _, names = header.partition(":")
                columns = _netstat_columns[header] = [
                    (index, (f"{NETSTAT_PREFIX}{protocol}_{name}", ()))
                    for index, name in enumerate(names.split())
                    if NETSTAT_FIELDS.match(f"{protocol}_{name}")
                ]
            if columns:
                numbers = values.partition(":")[2].split()
                for index, key in columns:
                    if index < len(numbers):
                        readings[key] = int(numbers[index])
    return readings


def sockstat_series(text: str, page_size: int) -> Readings:
    """/proc/net/sockstat: "TCP: inuse 5 orphan 0 tw 2 alloc 7 mem 1" -> node_sockstat_TCP_inuse..."""
    readings: Readings = {}
    for line in text.splitlines():
        protocol, _, rest = line.partition(":")
        parts = rest.split()
        for name, value in zip(parts[::2], parts[1::2], strict=False):
            if protocol == "sockets":
                readings[(f"{SOCKSTAT_PREFIX}sockets_{name}", ())] = int(value)
                continue
            readings[(f"{SOCKSTAT_PREFIX}{protocol}_{name}", ())] = int(value)
            if name == "mem":
                readings[(f"{SOCKSTAT_PREFIX}{protocol}_mem_bytes", ())] = int(value) * page_size
    return readings


def diskstats_series(text: str) -> Readings:
    readings: Readings = {}
    for line in text.splitlines():
        parts = line.split()
        if len(parts) < 14 or DISK_EXCLUDE.match(parts[2]):
            continue
        device = (parts[2],)
        for family, value in zip(DISKSTATS_FAMILIES, parts[3:], strict=False):
            readings[(family, device)] = int(value)
    return readings


def schedstat_series(text: str) -> Readings:
    readings: Readings = {}
    for line in text.splitlines():
        parts = line.split()
        if len(parts) < 10 or not parts[0].startswith("cpu") or not parts[0][3:].isdigit():
            continue
        cpu = (parts[0][3:],)
        for column, family in SCHEDSTAT_COLUMNS:
            readings[(family, cpu)] = int(parts[column])
    return readings


def pressure_series(text: str, resource: str) -> Readings:
    """/proc/pressure/<resource>: "some avg10=0.00 avg60=0.00 avg300=0.00 total=87565989"
    -> the total (microseconds) of each line node_exporter exports for that resource."""
    families = by_field(f"pressure/{resource}")
    readings: Readings = {}
    for line in text.splitlines():
        kind, _, rest = line.partition(" ")
        family = families.get(kind)
        if family is not None:
            readings[(family, ())] = int(rest.rpartition("total=")[2])
    return readings


def arp_series(text: str) -> Readings:
    """/proc/net/arp: the entries of each device (the last column), under a header line."""
    counts: dict[str, int] = {}
    for line in text.splitlines()[1:]:
        parts = line.split()
        if len(parts) >= 6:
            counts[parts[5]] = counts.get(parts[5], 0) + 1
    return {(ARP_ENTRIES, (device,)): count for device, count in counts.items()}


def _socket_rows(lines: Iterable[str]) -> Iterator[tuple[str, int, int]]:
    """(st, tx_queue, rx_queue) of each socket row of /proc/net/tcp, tcp6, udp or udp6 (one
    or more tables, each under its header)."""
    for line in lines:
        parts = line.split(maxsplit=5)
        if len(parts) > 4 and parts[0] != "sl":
            queued_tx, _, queued_rx = parts[4].partition(":")
            yield parts[3], int(queued_tx, 16), int(queued_rx, 16)


def udp_queues_series(lines: Iterable[str], ip: str) -> Readings:
    """/proc/net/udp (ip "v4") or udp6 ("v6"): the bytes queued to send and to receive,
    summed over sockets (the tx_queue:rx_queue column, hex)."""
    tx = rx = 0
    for _, queued_tx, queued_rx in _socket_rows(lines):
        tx, rx = tx + queued_tx, rx + queued_rx
    return {(UDP_QUEUES, (ip, "rx")): rx, (UDP_QUEUES, (ip, "tx")): tx}


def tcp_states_series(lines: Iterable[str]) -> Readings:
    """/proc/net/tcp and tcp6 (one's lines after the other's): sockets per state, every state
    declared (0 when none, so the layout is fixed), and the bytes queued to send and receive."""
    readings: Readings = {(TCP_CONNECTIONS, (state,)): 0 for state in TCP_STATES.values()}
    tx = rx = 0
    for st, queued_tx, queued_rx in _socket_rows(lines):
        state = TCP_STATES.get(st.upper())
        if state is not None:
            readings[(TCP_CONNECTIONS, (state,))] += 1
        tx, rx = tx + queued_tx, rx + queued_rx
    readings[(TCP_CONNECTIONS, ("rx_queued_bytes",))] = rx
    readings[(TCP_CONNECTIONS, ("tx_queued_bytes",))] = tx
    return readings


def processes_series(lines: Iterable[str]) -> Readings:
    """Every process's /proc/[pid]/stat line: processes per state (those of PROCESS_STATES,
    each declared), processes and threads (num_threads, the 18th field after the name)."""
    states = dict.fromkeys(PROCESS_STATES, 0)
    pids = threads = 0
    for line in lines:
        fields = line.rpartition(")")[2].split()  # the name in parentheses may hold spaces
        if len(fields) < 18:
            continue
        pids += 1
        threads += int(fields[17])
        if fields[0] in states:
            states[fields[0]] += 1
    readings: Readings = {(PROCESSES["state"], (state,)): count for state, count in states.items()}
    readings[(PROCESSES["pids"], ())] = pids
    readings[(PROCESSES["threads"], ())] = threads
    return readings


def interrupts_series(text: str) -> Readings:
    """/proc/interrupts as node_exporter labels it: per CPU, the irq as type; for a numbered
    irq its chip as info and the rest as devices, for a named one its description as info."""
    lines = text.splitlines()
    if not lines:
        return {}
    cpus = len(lines[0].split())
    readings: Readings = {}
    for line in lines[1:]:
        parts = line.split()
        if len(parts) < cpus + 2:
            continue  # ERR and MIS: one total, no CPUs
        irq = parts[0].removesuffix(":")
        if irq.isdigit():
            info, devices = parts[cpus + 1], " ".join(parts[cpus + 2 :])
        else:
            info, devices = " ".join(parts[cpus + 1 :]), ""
        for cpu, value in enumerate(parts[1 : cpus + 1]):
            readings[(INTERRUPTS, (str(cpu), devices, info, irq))] = int(value)
    return readings


def read_process_stats(proc: Path) -> Iterator[str]:
    """Every process's /proc/[pid]/stat line, one at a time (a process gone meanwhile is
    skipped): what node_exporter's processes collector reads too. A line is under 1.2 KiB."""
    with os.scandir(proc) as entries:  # not listdir: no list of every name at once
        for entry in entries:
            if entry.name.isdigit():
                try:
                    yield read_file(f"{entry.path}/stat", STAT_LINE_BYTES)
                except OSError:
                    continue


def collector_series(outcomes: dict[str, tuple[bool, int]]) -> Readings:
    """The sampler's sections as node_exporter reports its collectors: success and duration
    (microseconds) per section; picoord reads no text files, so no textfile error."""
    readings: Readings = {}
    for name in COLLECTORS:
        ok, micros = outcomes.get(name, (False, 0))
        readings[(COLLECTOR["success"], (name,))] = int(ok)
        readings[(COLLECTOR["duration"], (name,))] = micros
    readings[(COLLECTOR["textfile_error"], ())] = 0
    return readings


def softnet_series(text: str) -> Readings:
    """/proc/net/softnet_stat: one line of hex columns per CPU, labelled by line as in node_exporter 1.5."""
    readings: Readings = {}
    for index, line in enumerate(text.splitlines()):
        columns = line.split()
        for column, family in SOFTNET_COLUMNS:
            if column < len(columns):
                readings[(family, (str(index),))] = int(columns[column], 16)
    return readings


def hwmon_chip_name(path: Path) -> str:
    """node_exporter's name for a hwmon directory: "<bus>_<device>" from its device link,
    else its name file, else hwmonN, lower-cased with anything but [a-z0-9:_] made "_"."""

    def clean(text: str) -> str:
        return _HWMON_INVALID.sub("_", text.strip().lower()).strip("_")

    try:
        device = (path / "device").resolve(strict=True)
        name, bus = clean(device.name), clean(device.parent.name)
        if name:
            return f"{bus}_{name}" if bus else name
    except OSError:
        pass
    try:
        name = clean((path / "name").read_text())
        if name:
            return name
    except OSError:
        pass
    return clean(path.resolve().name)


@dataclass(frozen=True)
class SeriesSource:
    """One file (or, with `read`, a set of them) read per sample and the function that
    turns its text into readings."""

    path: Path
    parse: Callable[[Any], Readings]  # takes what `read` returns: the text, or its lines
    read: Callable[[Path], Any] = read_file
    every: float = 0.0  # seconds between reads; 0: every sample


def _single(family: str, labels: tuple[str, ...] = (), field: int = 0) -> Callable[[str], Readings]:
    def parse(text: str) -> Readings:
        return {(family, labels): int(text.split()[field])}

    return parse


def _numbers(*families: tuple[int, str]) -> Callable[[str], Readings]:
    def parse(text: str) -> Readings:
        parts = text.split()
        return {(family, ()): int(parts[index]) for index, family in families}

    return parse


def read_lines(path: Path | str) -> Iterator[str]:
    """A kernel table's lines, read TABLE_CHUNK_BYTES at a time: a busy host's socket tables
    run to megabytes, and a copy of one whole would stay as the agent's high-water mark."""
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        rest = b""
        while chunk := os.read(fd, TABLE_CHUNK_BYTES):
            *lines, rest = (rest + chunk).split(b"\n")
            for line in lines:
                yield line.decode(errors="replace")
        if rest:
            yield rest.decode(errors="replace")
    finally:
        os.close(fd)


def _lines_with(also: Path) -> Callable[[Path], Iterator[str]]:
    """A table's lines followed by those of `also` when it exists (tcp then tcp6)."""

    def read(path: Path) -> Iterator[str]:
        yield from read_lines(path)
        if also.exists():
            yield from read_lines(also)

    return read


def _proc_numbers(proc: Path) -> list[SeriesSource]:
    """The files under /proc/sys holding numbers, one source per file with its families'
    columns, from the table."""
    columns: dict[str, list[tuple[int, str]]] = {}
    for family in FAMILIES.values():
        if family.source.startswith("sys/"):
            columns.setdefault(family.source, []).append((int(family.field), family.name))
    return [SeriesSource(proc / file, _numbers(*numbers)) for file, numbers in columns.items()]


def series_sources(proc: Path = Path("/proc"), sys_root: Path = Path("/sys")) -> list[SeriesSource]:
    """The files to read, those that exist here (conntrack only once its module is loaded).
    /proc/interrupts comes last: on a machine with very many CPUs its series are the ones
    `within_limits` leaves out."""
    page_size = os.sysconf("SC_PAGE_SIZE")
    sources = [
        SeriesSource(proc / "meminfo", meminfo_series),
        SeriesSource(proc / "stat", stat_series),
        SeriesSource(proc / "vmstat", vmstat_series),
        SeriesSource(proc / "diskstats", diskstats_series),
        SeriesSource(proc / "net/netstat", netstat_series),
        SeriesSource(proc / "net/snmp", netstat_series),
        SeriesSource(proc / "net/sockstat", lambda text: sockstat_series(text, page_size)),
        *_proc_numbers(proc),
        SeriesSource(proc / "schedstat", schedstat_series),
        SeriesSource(proc / "net/softnet_stat", softnet_series),
        *(
            SeriesSource(proc / "pressure" / resource, functools.partial(pressure_series, resource=resource))
            for resource in PRESSURE
        ),
        SeriesSource(proc / "net/arp", arp_series),
        SeriesSource(proc / "net/udp", functools.partial(udp_queues_series, ip="v4"), read_lines),
        SeriesSource(proc / "net/udp6", functools.partial(udp_queues_series, ip="v6"), read_lines),
        SeriesSource(
            proc / "net/tcp", tcp_states_series, _lines_with(proc / "net/tcp6"), SLOW_SOURCE_SECONDS
        ),
        SeriesSource(proc, processes_series, read_process_stats, SLOW_SOURCE_SECONDS),
    ]
    cpus = sorted(sys_root.glob("devices/system/cpu/cpu[0-9]*/cpufreq"), key=lambda p: int(p.parent.name[3:]))
    for cpufreq in cpus:
        cpu = (cpufreq.parent.name[3:],)
        for file, family in CPUFREQ_FILES.items():
            sources.append(SeriesSource(cpufreq / file, _single(family, cpu)))
    for hwmon in sorted(sys_root.glob("class/hwmon/hwmon*")):
        chip = hwmon_chip_name(hwmon)
        try:
            chip_name = _HWMON_INVALID.sub("_", (hwmon / "name").read_text().strip().lower()).strip("_")
        except OSError:
            chip_name = ""
        if chip_name:
            key = (chip, chip_name)
            sources.append(
                SeriesSource(hwmon / "name", lambda _text, key=key: {(HWMON_FILES["name"], key): 1})
            )
        for temp in sorted(hwmon.glob("temp*_input")):
            sensor = temp.name.removesuffix("_input")
            for suffix, family in HWMON_FILES.items():
                if suffix != "name":
                    sources.append(
                        SeriesSource(hwmon / f"{sensor}_{suffix}", _single(family, (chip, sensor)))
                    )
    for device in sorted(path.name for path in sys_root.glob("class/net/*")):
        if device != "lo":
            for file, family in by_field("class/net").items():
                sources.append(
                    SeriesSource(sys_root / "class/net" / device / file, _single(family, (device,)))
                )
    sources.append(SeriesSource(proc / "interrupts", interrupts_series))
    return [source for source in sources if source.path.exists()]


def read_source(source: SeriesSource) -> Readings:
    """One source's readings now; a file that cannot be read or parsed gives none."""
    try:
        return source.parse(source.read(source.path))
    except (OSError, ValueError, IndexError):
        return {}


Recent = dict[Path, tuple[float, Readings]]  # a slow source's last readings and when (monotonic)


def read_series(sources: list[SeriesSource], recent: Recent | None = None, now: float = 0.0) -> Readings:
    """Every source's readings. With `recent`, a source with `every` seconds is read again
    only once its readings there are that old, and they are reused until then."""
    readings = process_series()  # first: the files' last series are the ones within_limits may cut
    for source in sources:
        if recent is None or not source.every:
            readings.update(read_source(source))
            continue
        last = recent.get(source.path)
        if last is None or now - last[0] >= source.every:
            last = recent[source.path] = (now, read_source(source))
        readings.update(last[1])
    return readings


def process_series() -> Readings:
    """The agent's own process figures, as node_exporter exports its own (process_*)."""
    times = os.times()
    limit = resource.getrlimit(resource.RLIMIT_AS)[0]
    try:
        open_fds = len(os.listdir("/proc/self/fd"))
        vms = int(read_file("/proc/self/statm").split()[0]) * resource.getpagesize()
    except (OSError, ValueError, IndexError):
        return {}
    cpu, virtual, virtual_max, max_fds, fds = (family.name for family in from_source("process"))
    return {
        (cpu, ()): round((times.user + times.system) * 1000),
        (virtual, ()): vms,
        (virtual_max, ()): limit,  # -1: unlimited
        (max_fds, ()): resource.getrlimit(resource.RLIMIT_NOFILE)[0],
        (fds, ()): open_fds,
    }


@dataclass(frozen=True)
class SeriesLayout:
    """The series this process declares (`Hardware.series`) and sends in every sample."""

    sources: list[SeriesSource]
    keys: list[SeriesKey] = field(default_factory=list)
    recent: Recent = field(default_factory=dict)

    def values(
        self, outcomes: dict[str, tuple[bool, int]] | None = None, now: float | None = None
    ) -> list[int]:
        """The numbers now; `outcomes` are the sampler's sections (see collector_series)."""
        readings = read_series(self.sources, self.recent, time.monotonic() if now is None else now)
        readings.update(collector_series(outcomes or {}))
        return [readings.get(key, 0) for key in self.keys]  # a file gone since: 0

    def declare(self, series: RepeatedCompositeFieldContainer[node_pb2.SeriesKey]) -> None:
        """Add the series to a hello's `Hardware.series`, in place: a list of messages to copy
        from would cost the agent some 300 messages more at its peak."""
        for name, labels in self.keys:
            series.add(name=name, label_values=labels)


@functools.cache
def series_layout() -> SeriesLayout:
    """Taken once per process, so the hello of every session declares what the sampler sends."""
    sources = series_sources()
    return SeriesLayout(sources, within_limits([*collector_series({}), *read_series(sources)]))


def _varint_bytes(number: int) -> int:
    return max(1, (number.bit_length() + 6) // 7)


def _field_bytes(text: str) -> int:
    """A protobuf string field of a small field number: tag, length varint, UTF-8 bytes."""
    size = len(text.encode())
    return 1 + _varint_bytes(size) + size


def declared_bytes(name: str, labels: tuple[str, ...]) -> int:
    """What one declared series adds to a hello (an entry of Hardware.series, field 18),
    counted without building the message: a layout counts some 300 of them. (An empty
    name is not sent at all; an empty label value is.)"""
    key = (_field_bytes(name) if name else 0) + sum(_field_bytes(value) for value in labels)
    return 2 + _varint_bytes(key) + key


def within_limits(keys: list[SeriesKey]) -> list[SeriesKey]:
    """The series the coordinator accepts: a hello over its limits would be refused and the
    node locked out, so a very large machine declares its first limits.SERIES series only,
    and only as many as fit in limits.SERIES_BYTES of the hello (/proc/interrupts alone has
    a series per CPU and irq, with long labels)."""
    fitting = [
        (name, labels)
        for name, labels in keys
        if len(name) <= limits.TEXT
        and len(labels) <= limits.SERIES_LABELS
        and all(len(value) <= limits.TEXT for value in labels)
    ]
    kept: list[SeriesKey] = []
    size = 0
    for name, labels in fitting[: limits.SERIES]:
        size += declared_bytes(name, labels)
        if size > limits.SERIES_BYTES:
            break
        kept.append((name, labels))
    if len(kept) < len(keys):
        log.warning("metrics_series_limited", declared=len(kept), found=len(keys))
    return kept


NET_DEV_FIELDS = (
    "receive_bytes",
    "receive_packets",
    "receive_errors",
    "receive_drop",
    "receive_fifo",
    "receive_frame",
    "receive_compressed",
    "receive_multicast",
    "transmit_bytes",
    "transmit_packets",
    "transmit_errors",
    "transmit_drop",
    "transmit_fifo",
    "transmit_colls",
    "transmit_carrier",
    "transmit_compressed",
)


def parse_net_dev(text: str) -> dict[str, list[int]]:
    """/proc/net/dev: the 16 counters of each device, in NET_DEV_FIELDS order."""
    devices = {}
    for line in text.splitlines()[2:]:
        name, separator, rest = line.partition(":")
        values = rest.split()
        if separator and len(values) >= len(NET_DEV_FIELDS):
            devices[name.strip()] = [int(value) for value in values[: len(NET_DEV_FIELDS)]]
    return devices


def _read_int(path: Path) -> int | None:
    try:
        return int(read_file(path))
    except (OSError, ValueError):
        return None  # carrier and speed cannot be read while the link is down


LINK_PROPERTIES_REFRESH_SECONDS = 60.0  # mtu and speed change only when someone reconfigures the link


class _Links:
    """node_exporter's netclass figures per device: operstate and carrier every sample,
    mtu and speed at most once a minute (two fewer sysfs reads per device per sample)."""

    def __init__(self, sys_root: Path) -> None:
        self._base = sys_root / "class" / "net"
        self._properties: dict[str, tuple[float, int, int]] = {}  # device -> (read at, mtu, speed)

    def read(self, device: str, counters: node_pb2.NetworkCounters, now: float) -> None:
        base = self._base / device
        try:
            counters.up = read_file(base / "operstate").strip() == "up"
        except OSError:
            self._properties.pop(device, None)
            return
        counters.link_known = True
        counters.carrier = _read_int(base / "carrier") == 1
        known = self._properties.get(device)
        if known is None or now - known[0] >= LINK_PROPERTIES_REFRESH_SECONDS:
            known = (now, max(_read_int(base / "mtu") or 0, 0), max(_read_int(base / "speed") or 0, 0))
            self._properties[device] = known
        counters.mtu, counters.speed_mbps = known[1], known[2]

    def forget_except(self, devices: set[str]) -> None:
        for gone in self._properties.keys() - devices:  # veths come and go with containers
            del self._properties[gone]


# --- The sampler -------------------------------------------------------------------------


class _MountTable:
    """Mounted filesystems, re-listed only when the kernel reports a mount-table change.

    /proc/self/mounts signals POLLPRI|POLLERR on an open file once per change since that
    file's last poll, so one held-open descriptor and poll(0) replace re-parsing the
    table every second. Without it (no procfs), the table is re-listed every time.
    """

    def __init__(self, mounts_path: Path = MOUNTS_PATH) -> None:
        self._partitions: list | None = None
        self._poller: select.poll | None = None
        self._file = None
        try:
            self._file = open(mounts_path, "rb")  # noqa: SIM115 - held open on purpose, see above
            poller = select.poll()
            poller.register(self._file.fileno(), select.POLLPRI | select.POLLERR)
            self._poller = poller
        except OSError:
            self.close()

    def partitions(self) -> list:
        if self._partitions is None or self._changed():
            self._partitions = list_filesystems()
        return self._partitions

    def _changed(self) -> bool:
        if self._poller is None:
            return True
        return any(events & (select.POLLPRI | select.POLLERR) for _fd, events in self._poller.poll(0))

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None
        self._poller = None


class MetricsSampler:
    """Produces one `MetricsSample` per call; keeps the state needed between calls.

    cpu_percent is the busy share of all CPUs since the previous `sample()`; the first
    sample has no previous reading and reports the average since boot.
    """

    def __init__(
        self,
        sys_root: Path = Path("/sys"),
        *,
        vcgencmd: str | None = None,
        meminfo_path: Path = MEMINFO_PATH,
        mounts_path: Path = MOUNTS_PATH,
    ) -> None:
        """`vcgencmd` is the program's path; None looks it up on PATH once, here."""
        self._sys_root = sys_root
        self._meminfo_path = meminfo_path
        self._vcgencmd = vcgencmd if vcgencmd is not None else shutil.which("vcgencmd")
        self._vcgencmd_retry_at = 0.0
        self._boot_time = psutil.boot_time()
        self._mounts = _MountTable(mounts_path)
        self._zones: list[ThermalZone] = []
        self._zones_read_at: float | None = None
        self._previous_cpu = (0.0, 0.0)
        self._failed_sections: set[str] = set()
        self._series = series_layout()
        self._outcomes: dict[str, tuple[bool, int]] = {}
        self._proc = Path("/proc")
        self._links = _Links(sys_root)

    def close(self) -> None:
        """Release the descriptor held on the mount table."""
        self._mounts.close()

    def __enter__(self) -> MetricsSampler:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.close()

    def sample(self) -> node_pb2.MetricsSample:
        """One sample now. A failing section is left empty so the stream keeps flowing."""
        sample = node_pb2.MetricsSample(timestamp=time.time(), boot_time=self._boot_time)
        outcomes: dict[str, tuple[bool, int]] = {}
        for name, section in zip(
            COLLECTORS,
            (
                self._sample_cpu,
                self._sample_load,
                self._sample_memory,
                self._sample_filesystems,
                self._sample_network,
                self._sample_temperatures,
                self._sample_throttled,
            ),
            strict=True,
        ):
            started = time.monotonic_ns()
            ok = self._run_section(name, section, sample)
            outcomes[name] = (ok, (time.monotonic_ns() - started) // 1000)
        self._outcomes = outcomes
        self._run_section("series", self._sample_series, sample)
        return sample

    def _run_section(
        self, name: str, section: Callable[[node_pb2.MetricsSample], None], sample: node_pb2.MetricsSample
    ) -> bool:
        """Run one section; False when it failed."""
        try:
            section(sample)
        except Exception as error:  # one broken probe must not stop the stream
            if name not in self._failed_sections:  # once, not every second
                self._failed_sections.add(name)
                log.warning("metrics_section_failed", section=name, error=repr(error))
            return False
        self._failed_sections.discard(name)
        return True

    def _sample_cpu(self, sample: node_pb2.MetricsSample) -> None:
        # The aggregate line stays monotonic across CPU hotplug, unlike a sum of per-CPU lines.
        current = cpu_busy_and_total(psutil.cpu_times())
        sample.cpu_percent = cpu_busy_percent(self._previous_cpu, current)
        self._previous_cpu = current
        for index, times in enumerate(psutil.cpu_times(percpu=True)):
            sample.cpus.add(
                cpu=index,
                **{name: getattr(times, name, 0.0) for name in (*CPU_TIME_FIELDS, *CPU_GUEST_FIELDS)},
            )

    def _sample_load(self, sample: node_pb2.MetricsSample) -> None:
        sample.load1, sample.load5, sample.load15 = os.getloadavg()

    def _sample_memory(self, sample: node_pb2.MetricsSample) -> None:
        # One read of /proc/meminfo instead of psutil's three files (meminfo twice, vmstat).
        try:
            info = parse_meminfo(read_file(self._meminfo_path))
        except OSError:
            info = {}
        keys = ("MemTotal", "MemAvailable", "MemFree", "SwapTotal", "SwapFree")
        if all(key in info for key in keys):
            total, available, free, swap_total, swap_free = (info[key] for key in keys)
        else:  # kernels before 3.14 lack MemAvailable; psutil estimates it
            memory, swap = psutil.virtual_memory(), psutil.swap_memory()
            total, available, free = memory.total, memory.available, memory.free
            swap_total, swap_free = swap.total, swap.free
        sample.memory_total_bytes = total
        sample.memory_available_bytes = min(available, total)
        sample.memory_free_bytes = free
        sample.swap_total_bytes = swap_total
        sample.swap_free_bytes = swap_free

    def _sample_filesystems(self, sample: node_pb2.MetricsSample) -> None:
        for part in self._mounts.partitions():
            stat = bounded_statvfs(part.mountpoint, part.fstype)
            if stat is None:
                continue
            sample.filesystems.add(
                device=part.device,
                mountpoint=part.mountpoint,
                fstype=part.fstype,
                size_bytes=stat.f_blocks * stat.f_frsize,
                free_bytes=stat.f_bfree * stat.f_frsize,
                avail_bytes=stat.f_bavail * stat.f_frsize,  # what a non-root user can still write
                files=stat.f_files,
                files_free=stat.f_ffree,
                readonly=bool(stat.f_flag & os.ST_RDONLY),  # an SD card the kernel remounted read-only
            )

    def _sample_network(self, sample: node_pb2.MetricsSample) -> None:
        devices = parse_net_dev(read_file(self._proc / "net" / "dev"))
        now = time.monotonic()
        for device in sorted(devices):
            if device == "lo":
                continue
            counters = sample.network.add(
                device=device, **dict(zip(NET_DEV_FIELDS, devices[device], strict=True))
            )
            self._links.read(device, counters, now)
        self._links.forget_except(set(devices))

    def _sample_series(self, sample: node_pb2.MetricsSample) -> None:
        sample.series_values.extend(self._series.values(self._outcomes))

    def _sample_temperatures(self, sample: node_pb2.MetricsSample) -> None:
        now = time.monotonic()
        if self._zones_read_at is None or now - self._zones_read_at >= THERMAL_REFRESH_SECONDS:
            self._zones = discover_thermal_zones(self._sys_root)
            self._zones_read_at = now
        sample.temperatures.extend(read_temperatures(self._zones))

    def _sample_throttled(self, sample: node_pb2.MetricsSample) -> None:
        if self._vcgencmd is None or time.monotonic() < self._vcgencmd_retry_at:
            return
        result = run_command([self._vcgencmd, "get_throttled"], timeout=VCGENCMD_TIMEOUT_SECONDS)
        if result.timed_out:
            self._vcgencmd_retry_at = time.monotonic() + VCGENCMD_BACKOFF_SECONDS
            log.warning("vcgencmd_timed_out", backoff_seconds=VCGENCMD_BACKOFF_SECONDS)
            return
        value = parse_throttled(result.stdout) if result.ok else None
        if value is not None:
            sample.throttled_available = True
            sample.throttled = value

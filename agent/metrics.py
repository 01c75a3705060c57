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
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import psutil
import structlog

from picoord.agent.commands import run_command
from picoord.agent.hardware import bounded_statvfs, list_filesystems
from picoord.common import limits
from picoord.v1 import node_pb2

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
DISKSTATS_FAMILIES = (
    "node_disk_reads_completed_total",
    "node_disk_reads_merged_total",
    "node_disk_read_bytes_total",
    "node_disk_read_time_seconds_total",
    "node_disk_writes_completed_total",
    "node_disk_writes_merged_total",
    "node_disk_written_bytes_total",
    "node_disk_write_time_seconds_total",
    "node_disk_io_now",
    "node_disk_io_time_seconds_total",
    "node_disk_io_time_weighted_seconds_total",
    "node_disk_discards_completed_total",
    "node_disk_discards_merged_total",
    "node_disk_discarded_sectors_total",
    "node_disk_discard_time_seconds_total",
    "node_disk_flush_requests_total",
    "node_disk_flush_requests_time_seconds_total",
)
SOFTNET_COLUMNS = (
    (0, "node_softnet_processed_total"),
    (1, "node_softnet_dropped_total"),
    (2, "node_softnet_times_squeezed_total"),
    (9, "node_softnet_received_rps_total"),
    (10, "node_softnet_flow_limit_count_total"),
)
STAT_FIELDS = {
    "ctxt": "node_context_switches_total",
    "intr": "node_intr_total",
    "processes": "node_forks_total",
    "procs_running": "node_procs_running",
    "procs_blocked": "node_procs_blocked",
}
_HWMON_INVALID = re.compile(r"[^a-z0-9:_]")


def read_file(path: Path | str) -> str:
    """A small kernel file's text: os.read without Python's buffered text layers, which cost
    more than the read itself on a Pi (a sample reads some 30 of these)."""
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        chunks = []
        while chunk := os.read(fd, 65536):
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
                f"node_memory_{key.replace('(', '_').replace(')', '')}{suffix}",
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
    return {(f"node_vmstat_{key}", ()): int(value) for key, value in _VMSTAT_LINE.findall(text)}


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
                    (index, (f"node_netstat_{protocol}_{name}", ()))
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
                readings[(f"node_sockstat_sockets_{name}", ())] = int(value)
                continue
            readings[(f"node_sockstat_{protocol}_{name}", ())] = int(value)
            if name == "mem":
                readings[(f"node_sockstat_{protocol}_mem_bytes", ())] = int(value) * page_size
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
        running, waiting, timeslices = parts[7:10]
        readings[("node_schedstat_running_seconds_total", cpu)] = int(running)
        readings[("node_schedstat_waiting_seconds_total", cpu)] = int(waiting)
        readings[("node_schedstat_timeslices_total", cpu)] = int(timeslices)
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
    """One file read per sample and the function that turns its text into readings."""

    path: Path
    parse: Callable[[str], Readings]


def _single(family: str, labels: tuple[str, ...] = (), field: int = 0) -> Callable[[str], Readings]:
    def parse(text: str) -> Readings:
        return {(family, labels): int(text.split()[field])}

    return parse


def _numbers(*families: tuple[int, str]) -> Callable[[str], Readings]:
    def parse(text: str) -> Readings:
        parts = text.split()
        return {(family, ()): int(parts[index]) for index, family in families}

    return parse


def series_sources(proc: Path = Path("/proc"), sys_root: Path = Path("/sys")) -> list[SeriesSource]:
    """The files to read, those that exist here (conntrack only once its module is loaded)."""
    page_size = os.sysconf("SC_PAGE_SIZE")
    sources = [
        SeriesSource(proc / "meminfo", meminfo_series),
        SeriesSource(proc / "stat", stat_series),
        SeriesSource(proc / "vmstat", vmstat_series),
        SeriesSource(proc / "diskstats", diskstats_series),
        SeriesSource(proc / "net/netstat", netstat_series),
        SeriesSource(proc / "net/snmp", netstat_series),
        SeriesSource(proc / "net/sockstat", lambda text: sockstat_series(text, page_size)),
        SeriesSource(
            proc / "sys/fs/file-nr", _numbers((0, "node_filefd_allocated"), (2, "node_filefd_maximum"))
        ),
        SeriesSource(proc / "sys/kernel/random/entropy_avail", _single("node_entropy_available_bits")),
        SeriesSource(proc / "sys/kernel/random/poolsize", _single("node_entropy_pool_size_bits")),
        SeriesSource(proc / "sys/net/netfilter/nf_conntrack_count", _single("node_nf_conntrack_entries")),
        SeriesSource(proc / "sys/net/netfilter/nf_conntrack_max", _single("node_nf_conntrack_entries_limit")),
        SeriesSource(proc / "schedstat", schedstat_series),
        SeriesSource(proc / "net/softnet_stat", softnet_series),
    ]
    cpus = sorted(sys_root.glob("devices/system/cpu/cpu[0-9]*/cpufreq"), key=lambda p: int(p.parent.name[3:]))
    for cpufreq in cpus:
        cpu = (cpufreq.parent.name[3:],)
        for file, family in (
            ("scaling_cur_freq", "node_cpu_scaling_frequency_hertz"),
            ("scaling_max_freq", "node_cpu_scaling_frequency_max_hertz"),
            ("scaling_min_freq", "node_cpu_scaling_frequency_min_hertz"),
        ):
            sources.append(SeriesSource(cpufreq / file, _single(family, cpu)))
    for hwmon in sorted(sys_root.glob("class/hwmon/hwmon*")):
        chip = hwmon_chip_name(hwmon)
        try:
            chip_name = _HWMON_INVALID.sub("_", (hwmon / "name").read_text().strip().lower()).strip("_")
        except OSError:
            chip_name = ""
        if chip_name:
            sources.append(
                SeriesSource(
                    hwmon / "name", lambda _text, key=(chip, chip_name): {("node_hwmon_chip_names", key): 1}
                )
            )
        for temp in sorted(hwmon.glob("temp*_input")):
            sensor = temp.name.removesuffix("_input")
            sources.append(SeriesSource(temp, _single("node_hwmon_temp_celsius", (chip, sensor))))
            for file, family in (
                ("crit", "node_hwmon_temp_crit_celsius"),
                ("max", "node_hwmon_temp_max_celsius"),
            ):
                if (hwmon / f"{sensor}_{file}").exists():
                    sources.append(SeriesSource(hwmon / f"{sensor}_{file}", _single(family, (chip, sensor))))
    return [source for source in sources if source.path.exists()]


def read_series(sources: list[SeriesSource]) -> Readings:
    """Every source's readings now; a file that cannot be read or parsed gives none."""
    readings: Readings = {}
    for source in sources:
        try:
            readings.update(source.parse(read_file(source.path)))
        except (OSError, ValueError, IndexError):
            continue
    readings.update(process_series())
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
    return {
        ("process_cpu_seconds_total", ()): round((times.user + times.system) * 1000),
        ("process_virtual_memory_bytes", ()): vms,
        ("process_virtual_memory_max_bytes", ()): limit,  # -1: unlimited
        ("process_max_fds", ()): resource.getrlimit(resource.RLIMIT_NOFILE)[0],
        ("process_open_fds", ()): open_fds,
    }


@dataclass(frozen=True)
class SeriesLayout:
    """The series this process declares (`Hardware.series`) and sends in every sample."""

    sources: list[SeriesSource]
    keys: list[SeriesKey] = field(default_factory=list)

    def values(self) -> list[int]:
        readings = read_series(self.sources)
        return [readings.get(key, 0) for key in self.keys]  # a file gone since: 0

    def declared(self) -> list[node_pb2.SeriesKey]:
        return [node_pb2.SeriesKey(name=name, label_values=labels) for name, labels in self.keys]


@functools.cache
def series_layout() -> SeriesLayout:
    """Taken once per process, so the hello of every session declares what the sampler sends."""
    sources = series_sources()
    return SeriesLayout(sources, within_limits(list(read_series(sources))))


def within_limits(keys: list[SeriesKey]) -> list[SeriesKey]:
    """The series the coordinator accepts: a hello over its limits would be refused and the
    node locked out, so a very large machine declares its first limits.SERIES series only."""
    fitting = [
        (name, labels)
        for name, labels in keys
        if len(name) <= limits.TEXT
        and len(labels) <= limits.SERIES_LABELS
        and all(len(value) <= limits.TEXT for value in labels)
    ]
    if len(fitting) < len(keys) or len(fitting) > limits.SERIES:
        log.warning("metrics_series_limited", declared=min(len(fitting), limits.SERIES), found=len(keys))
    return fitting[: limits.SERIES]


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
        for name, section in (
            ("cpu", self._sample_cpu),
            ("load", self._sample_load),
            ("memory", self._sample_memory),
            ("filesystems", self._sample_filesystems),
            ("network", self._sample_network),
            ("temperatures", self._sample_temperatures),
            ("throttled", self._sample_throttled),
            ("series", self._sample_series),
        ):
            self._run_section(name, section, sample)
        return sample

    def _run_section(
        self, name: str, section: Callable[[node_pb2.MetricsSample], None], sample: node_pb2.MetricsSample
    ) -> None:
        try:
            section(sample)
        except Exception as error:  # one broken probe must not stop the stream
            if name not in self._failed_sections:  # once, not every second
                self._failed_sections.add(name)
                log.warning("metrics_section_failed", section=name, error=repr(error))
        else:
            self._failed_sections.discard(name)

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
        sample.series_values.extend(self._series.values())

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

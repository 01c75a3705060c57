"""The metric samples an agent streams (`node_pb2.MetricsSample`).

`MetricsSampler.sample()` may run every second on a 1 GB Raspberry Pi, so what cannot
change is read once (boot time), what rarely changes is re-read only when it does (the
mount table, watched with poll(2)) or once a minute (the list of thermal zones), and a
probe that fails or hangs (vcgencmd, a dead NFS mount) is skipped rather than allowed to
stall the stream. The coordinator uses temperatures and throttling to keep work off hot
Pis (`common.throttling` turns the firmware's bits into words for `coordctl top`).
"""

from __future__ import annotations

import os
import re
import select
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import psutil
import structlog

from picoord.agent.commands import run_command
from picoord.agent.hardware import bounded_statvfs, list_filesystems
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
            sample.cpus.add(cpu=index, **{name: getattr(times, name, 0.0) for name in CPU_TIME_FIELDS})

    def _sample_load(self, sample: node_pb2.MetricsSample) -> None:
        sample.load1, sample.load5, sample.load15 = os.getloadavg()

    def _sample_memory(self, sample: node_pb2.MetricsSample) -> None:
        # One read of /proc/meminfo instead of psutil's three files (meminfo twice, vmstat).
        try:
            info = parse_meminfo(self._meminfo_path.read_text())
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
            )

    def _sample_network(self, sample: node_pb2.MetricsSample) -> None:
        counters = psutil.net_io_counters(pernic=True)
        for device in sorted(counters):
            if device == "lo":
                continue
            nic = counters[device]
            sample.network.add(
                device=device,
                receive_bytes=nic.bytes_recv,
                transmit_bytes=nic.bytes_sent,
                receive_packets=nic.packets_recv,
                transmit_packets=nic.packets_sent,
                receive_errors=nic.errin,
                transmit_errors=nic.errout,
            )

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

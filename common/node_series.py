"""The node_exporter series an agent declares once per session and then sends as bare numbers.

Most of what node_exporter exports about a node is a fixed set of series for as long as
the kernel runs: the keys of /proc/meminfo, a few /proc/vmstat and /proc/net/netstat
counters, one set per disk and per CPU. Naming them in every sample would cost more bytes
than the numbers, so the agent names them once (`Hardware.series`: a family name and its
label values) and each `MetricsSample.series_values` carries the integers in that order,
in the kernel's own unit (kB, sectors, milliseconds, kHz, millidegrees). This table is the
contract both ends read: the family's type, help, labels and the factor that turns the
kernel's unit into node_exporter's.

A family name outside the table is still well formed (a newer agent may know more) and is
ignored by the exposition; a malformed one is refused at the door.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

METRIC_NAME = re.compile(r"^[a-zA-Z_][a-zA-Z0-9_]*$")
KIB = 1024
SECTOR = 512  # node_exporter's fixed sector size for /proc/diskstats
MILLI = 0.001


@dataclass(frozen=True)
class SeriesFamily:
    name: str  # as exposed (counters end in _total)
    kind: str  # counter, gauge, untyped
    help: str
    labels: tuple[str, ...] = ()
    scale: float = 1.0  # kernel unit -> node_exporter unit


def _family(
    name: str, kind: str, help_text: str, labels: tuple[str, ...] = (), scale: float = 1.0
) -> SeriesFamily:
    return SeriesFamily(name, kind, help_text, labels, scale)


_DISK = ("device",)
_CPU = ("cpu",)
FAMILIES: dict[str, SeriesFamily] = {
    family.name: family
    for family in (
        # /proc/stat
        _family("node_context_switches_total", "counter", "Total number of context switches."),
        _family("node_intr_total", "counter", "Total number of interrupts serviced."),
        _family("node_forks_total", "counter", "Total number of forks."),
        _family("node_procs_running", "gauge", "Number of processes in runnable state."),
        _family("node_procs_blocked", "gauge", "Number of processes blocked waiting for I/O to complete."),
        # /proc/sys
        _family("node_filefd_allocated", "gauge", "File descriptor statistics: allocated."),
        _family("node_filefd_maximum", "gauge", "File descriptor statistics: maximum."),
        _family("node_entropy_available_bits", "gauge", "Bits of available entropy."),
        _family("node_entropy_pool_size_bits", "gauge", "Bits of entropy pool."),
        _family(
            "node_nf_conntrack_entries",
            "gauge",
            "Number of currently allocated flow entries for connection tracking.",
        ),
        _family("node_nf_conntrack_entries_limit", "gauge", "Maximum size of connection tracking table."),
        # /proc/diskstats (times in ms, sizes in 512-byte sectors)
        _family(
            "node_disk_reads_completed_total",
            "counter",
            "The total number of reads completed successfully.",
            _DISK,
        ),
        _family("node_disk_reads_merged_total", "counter", "The total number of reads merged.", _DISK),
        _family(
            "node_disk_read_bytes_total",
            "counter",
            "The total number of bytes read successfully.",
            _DISK,
            SECTOR,
        ),
        _family(
            "node_disk_read_time_seconds_total",
            "counter",
            "The total number of seconds spent by all reads.",
            _DISK,
            MILLI,
        ),
        _family(
            "node_disk_writes_completed_total",
            "counter",
            "The total number of writes completed successfully.",
            _DISK,
        ),
        _family("node_disk_writes_merged_total", "counter", "The number of writes merged.", _DISK),
        _family(
            "node_disk_written_bytes_total",
            "counter",
            "The total number of bytes written successfully.",
            _DISK,
            SECTOR,
        ),
        _family(
            "node_disk_write_time_seconds_total",
            "counter",
            "This is the total number of seconds spent by all writes.",
            _DISK,
            MILLI,
        ),
        _family("node_disk_io_now", "gauge", "The number of I/Os currently in progress.", _DISK),
        _family(
            "node_disk_io_time_seconds_total", "counter", "Total seconds spent doing I/Os.", _DISK, MILLI
        ),
        _family(
            "node_disk_io_time_weighted_seconds_total",
            "counter",
            "The weighted # of seconds spent doing I/Os.",
            _DISK,
            MILLI,
        ),
        _family(
            "node_disk_discards_completed_total",
            "counter",
            "The total number of discards completed successfully.",
            _DISK,
        ),
        _family("node_disk_discards_merged_total", "counter", "The total number of discards merged.", _DISK),
        _family(
            "node_disk_discarded_sectors_total",
            "counter",
            "The total number of sectors discarded successfully.",
            _DISK,
        ),
        _family(
            "node_disk_discard_time_seconds_total",
            "counter",
            "This is the total number of seconds spent by all discards.",
            _DISK,
            MILLI,
        ),
        _family(
            "node_disk_flush_requests_total",
            "counter",
            "The total number of flush requests completed successfully",
            _DISK,
        ),
        _family(
            "node_disk_flush_requests_time_seconds_total",
            "counter",
            "This is the total number of seconds spent by all flush requests.",
            _DISK,
            MILLI,
        ),
        # /sys/devices/system/cpu (kHz), /proc/schedstat (ns), /proc/net/softnet_stat
        _family(
            "node_cpu_scaling_frequency_hertz",
            "gauge",
            "Current scaled CPU thread frequency in hertz.",
            _CPU,
            1000.0,
        ),
        _family(
            "node_cpu_scaling_frequency_max_hertz",
            "gauge",
            "Maximum scaled CPU thread frequency in hertz.",
            _CPU,
            1000.0,
        ),
        _family(
            "node_cpu_scaling_frequency_min_hertz",
            "gauge",
            "Minimum scaled CPU thread frequency in hertz.",
            _CPU,
            1000.0,
        ),
        _family(
            "node_schedstat_running_seconds_total",
            "counter",
            "Number of seconds CPU spent running a process.",
            _CPU,
            1e-9,
        ),
        _family(
            "node_schedstat_waiting_seconds_total",
            "counter",
            "Number of seconds spent by processing waiting for this CPU.",
            _CPU,
            1e-9,
        ),
        _family("node_schedstat_timeslices_total", "counter", "Number of timeslices executed by CPU.", _CPU),
        _family("node_softnet_processed_total", "counter", "Number of processed packets", _CPU),
        _family("node_softnet_dropped_total", "counter", "Number of dropped packets", _CPU),
        _family(
            "node_softnet_times_squeezed_total",
            "counter",
            "Number of times processing packets ran out of quota",
            _CPU,
        ),
        _family(
            "node_softnet_received_rps_total", "counter", "Number of times cpu woken up received_rps", _CPU
        ),
        _family(
            "node_softnet_flow_limit_count_total",
            "counter",
            "Number of times flow limit has been reached",
            _CPU,
        ),
        # /sys/class/hwmon (millidegrees)
        _family(
            "node_hwmon_chip_names",
            "gauge",
            "Annotation metric for human-readable chip names",
            ("chip", "chip_name"),
        ),
        _family(
            "node_hwmon_temp_celsius",
            "gauge",
            "Hardware monitor for temperature (input)",
            ("chip", "sensor"),
            MILLI,
        ),
        _family(
            "node_hwmon_temp_crit_celsius",
            "gauge",
            "Hardware monitor for temperature (crit)",
            ("chip", "sensor"),
            MILLI,
        ),
        _family(
            "node_hwmon_temp_max_celsius",
            "gauge",
            "Hardware monitor for temperature (max)",
            ("chip", "sensor"),
            MILLI,
        ),
        # the agent's own process, as node_exporter exports its own (cpu in ms)
        _family(
            "process_cpu_seconds_total",
            "counter",
            "Total user and system CPU time spent in seconds.",
            (),
            MILLI,
        ),
        _family("process_virtual_memory_bytes", "gauge", "Virtual memory size in bytes."),
        _family(
            "process_virtual_memory_max_bytes",
            "gauge",
            "Maximum amount of virtual memory available in bytes.",
        ),
        _family("process_max_fds", "gauge", "Maximum number of open file descriptors."),
        _family("process_open_fds", "gauge", "Number of open file descriptors."),
    )
}

# Families named after the file's own keys: (prefix, suffix, kind, help format, scale).
_KEYED = (
    ("node_memory_", "_bytes", "gauge", "Memory information field {}_bytes.", KIB),  # /proc/meminfo, kB
    ("node_memory_", "", "gauge", "Memory information field {}.", 1.0),  # HugePages_Total and the like
    ("node_vmstat_", "", "untyped", "/proc/vmstat information field {}.", 1.0),
    ("node_netstat_", "", "untyped", "Statistic {}.", 1.0),
    ("node_sockstat_", "", "gauge", "Number of {} sockets.", 1.0),
)
_KEY = re.compile(r"^[A-Za-z][A-Za-z0-9_]*$")


def family_of(name: str) -> SeriesFamily | None:
    """The family a declared series belongs to, None for a name this side does not know."""
    known = FAMILIES.get(name)
    if known is not None:
        return known
    for prefix, suffix, kind, help_format, scale in _KEYED:
        if not (name.startswith(prefix) and name.endswith(suffix)):
            continue
        key = name[len(prefix) : len(name) - len(suffix)]
        if _KEY.match(key) and not (suffix == "" and prefix == "node_memory_" and key.endswith("_bytes")):
            return SeriesFamily(
                name,
                kind,
                help_format.format(key.replace("_", " ") if prefix == "node_sockstat_" else key),
                (),
                scale,
            )
    return None

"""THE table of node_exporter series picoord serves: every family's name, type, help, labels,
unit factor, and where the agent reads it. The agent's readers, the coordinator's exposition
and the dashboard checks all take names from here, so a family is named once.

Two kinds of family:

- fed by the sample's own fields (`source` "sample..."): CPU times, load, the five memory
  figures, filesystems, network counters and the like, which every sample carries as typed
  fields and the coordinator writes in this table's order;
- declared (every other `source`): most of what node_exporter exports about a node is a
  fixed set of series for as long as the kernel runs (the keys of /proc/meminfo, one set per
  disk and per CPU, ...). Naming them in every sample would cost more bytes than the
  numbers, so the agent names them once (`Hardware.series`: a family name and its label
  values) and each `MetricsSample.series_values` carries the integers in that order, in the
  kernel's own unit (kB, sectors, milliseconds, kHz, millidegrees, microseconds); `scale`
  turns that unit into node_exporter's.

`source` names the kernel file under /proc (or a group the agent reads its own way) and
`field` where in it: a key, a column, a file name. A declared family name outside the table
is still well formed (a newer agent may know more) and is ignored by the exposition; a
malformed one is refused at the door.
"""

from __future__ import annotations

import re
from typing import NamedTuple

METRIC_NAME = re.compile(r"^[a-zA-Z_][a-zA-Z0-9_]*$")
KIB = 1024
SECTOR = 512  # node_exporter's fixed sector size for /proc/diskstats
MILLI = 0.001
MICRO = 1e-6
NANO = 1e-9
SAMPLE = "sample"  # the families written from MetricsSample's own fields
SAMPLE_MEMORY = "sample.memory"  # MetricsSample's memory fields
SAMPLE_FILESYSTEMS = "sample.filesystems"  # FilesystemUsage fields
SAMPLE_NETWORK = "sample.network"  # NetworkCounters fields
SAMPLE_LINK = "sample.link"  # NetworkCounters' link fields (node_exporter's netclass)


class SeriesFamily(NamedTuple):
    """A tuple rather than a dataclass: the agent imports this table too, and a dataclass's
    generated methods cost it more memory."""

    name: str  # as exposed (counters end in _total)
    kind: str  # counter, gauge, untyped
    help: str
    labels: tuple[str, ...] = ()  # node_exporter's, without instance
    scale: float = 1.0  # kernel unit -> node_exporter unit
    source: str = ""  # where the value comes from (see the module docstring)
    field: str = ""  # where in the source

    @property
    def declared(self) -> bool:
        """Sent as a declared series, not as a field of the sample."""
        return not self.source.startswith(SAMPLE)

    def header(self) -> str:
        """The exposition's HELP and TYPE lines (text format 0.0.4)."""
        text = self.help.replace("\\", "\\\\").replace("\n", "\\n")
        return f"# HELP {self.name} {text}\n# TYPE {self.name} {self.kind}\n"


def _sample(
    name: str, kind: str, help_text: str, labels: tuple[str, ...] = (), field: str = ""
) -> SeriesFamily:
    return SeriesFamily(name, kind, help_text, labels, 1.0, SAMPLE, field)


_DISK = ("device",)
_CPU = ("cpu",)
_FILESYSTEM = ("device", "fstype", "mountpoint")
_NETWORK_FIELDS = (  # sample field, node_exporter's name (in exposition order)
    ("receive_bytes", "receive_bytes"),
    ("transmit_bytes", "transmit_bytes"),
    ("receive_packets", "receive_packets"),
    ("transmit_packets", "transmit_packets"),
    ("receive_errors", "receive_errs"),
    ("transmit_errors", "transmit_errs"),
    ("receive_drop", "receive_drop"),
    ("transmit_drop", "transmit_drop"),
    ("receive_fifo", "receive_fifo"),
    ("transmit_fifo", "transmit_fifo"),
    ("receive_frame", "receive_frame"),
    ("receive_compressed", "receive_compressed"),
    ("transmit_compressed", "transmit_compressed"),
    ("receive_multicast", "receive_multicast"),
    ("transmit_colls", "transmit_colls"),
    ("transmit_carrier", "transmit_carrier"),
)
_MEMORY_FIELDS = (  # sample field, /proc/meminfo key
    ("memory_total_bytes", "MemTotal"),
    ("memory_available_bytes", "MemAvailable"),
    ("memory_free_bytes", "MemFree"),
    ("swap_total_bytes", "SwapTotal"),
    ("swap_free_bytes", "SwapFree"),
)
_TCP_STATES = (  # /proc/net/tcp's st column, node_exporter's state label
    ("01", "established"),
    ("02", "syn_sent"),
    ("03", "syn_recv"),
    ("04", "fin_wait1"),
    ("05", "fin_wait2"),
    ("06", "time_wait"),
    ("07", "close"),
    ("08", "close_wait"),
    ("09", "last_ack"),
    ("0A", "listen"),
    ("0B", "closing"),
)
TCP_STATES = dict(_TCP_STATES)
PROCESS_STATES = ("D", "I", "R", "S", "T", "Z")  # declared always, so the layout is fixed
FAMILIES: dict[str, SeriesFamily] = {
    family.name: family
    for family in (
        # --- fed by the sample's own fields, in exposition order ---
        _sample("node_cpu_seconds_total", "counter", "Seconds the CPUs spent in each mode.", ("cpu", "mode")),
        *(_sample(f"node_load{n}", "gauge", f"{n}m load average.") for n in ("1", "5", "15")),
        *(
            SeriesFamily(
                f"node_memory_{key}_bytes",
                "gauge",
                f"Memory information field {key}_bytes.",
                source=SAMPLE_MEMORY,
                field=field,
            )
            for field, key in _MEMORY_FIELDS
        ),
        *(
            SeriesFamily(
                f"node_filesystem_{field}",
                "gauge",
                f"Filesystem {field.replace('_', ' ')}.",
                _FILESYSTEM,
                source=SAMPLE_FILESYSTEMS,
                field=field,
            )
            for field in ("size_bytes", "free_bytes", "avail_bytes", "files", "files_free", "readonly")
        ),
        *(
            SeriesFamily(
                f"node_network_{name}_total",
                "counter",
                f"Network device statistic {name}.",
                ("device",),
                source=SAMPLE_NETWORK,
                field=field,
            )
            for field, name in _NETWORK_FIELDS
        ),
        _sample("node_thermal_zone_temp", "gauge", "Zone temperature in Celsius.", ("type", "zone")),
        _sample("node_boot_time_seconds", "gauge", "Node boot time, in unixtime."),
        _sample(
            "picoord_node_throttled",
            "gauge",
            "Raspberry Pi firmware throttling bits (vcgencmd get_throttled).",
        ),
        _sample("picoord_node_up", "gauge", "1 when the node is Ready."),
        _sample(
            "picoord_node_status", "gauge", "The node's status, one series per possible value.", ("status",)
        ),
        _sample(
            "node_uname_info",
            "gauge",
            "Labeled system information as provided by the uname system call.",
            ("domainname", "machine", "nodename", "release", "sysname", "version"),  # sorted
        ),
        _sample(
            "node_time_seconds",
            "gauge",
            "System time in seconds since epoch (1970), when the sample was taken.",
        ),
        _sample(  # measured by the coordinator (coordinator/clock_offsets.py), not read on the node
            "node_timex_offset_seconds",
            "gauge",
            "Time offset in between local system and reference clock (the coordinator's).",
        ),
        SeriesFamily(
            "node_network_up",
            "gauge",
            "Value is 1 if operstate is 'up', 0 otherwise.",
            ("device",),
            1.0,
            SAMPLE_LINK,
        ),
        SeriesFamily(
            "node_network_carrier", "gauge", "Network device property: carrier", ("device",), 1.0, SAMPLE_LINK
        ),
        SeriesFamily(
            "node_network_mtu_bytes",
            "gauge",
            "Network device property: mtu_bytes",
            ("device",),
            1.0,
            SAMPLE_LINK,
        ),
        SeriesFamily(
            "node_network_speed_bytes",
            "gauge",
            "Network device property: speed_bytes",
            ("device",),
            125000.0,  # Mbit/s
            SAMPLE_LINK,
        ),
        _sample(
            "node_cpu_guest_seconds_total",
            "counter",
            "Seconds the CPUs spent in guests (VMs) for each mode.",
            ("cpu", "mode"),
        ),
        # A filesystem the agent could not stat is left out of the sample, so those it reports had no error.
        _sample(
            "node_filesystem_device_error",
            "gauge",
            "Whether an error occurred while getting statistics for the given device.",
            _FILESYSTEM,
        ),
        # --- declared ---
        # /proc/stat
        SeriesFamily(
            "node_context_switches_total",
            "counter",
            "Total number of context switches.",
            (),
            1.0,
            "stat",
            "ctxt",
        ),
        SeriesFamily(
            "node_intr_total", "counter", "Total number of interrupts serviced.", (), 1.0, "stat", "intr"
        ),
        SeriesFamily("node_forks_total", "counter", "Total number of forks.", (), 1.0, "stat", "processes"),
        SeriesFamily(
            "node_procs_running",
            "gauge",
            "Number of processes in runnable state.",
            (),
            1.0,
            "stat",
            "procs_running",
        ),
        SeriesFamily(
            "node_procs_blocked",
            "gauge",
            "Number of processes blocked waiting for I/O to complete.",
            (),
            1.0,
            "stat",
            "procs_blocked",
        ),
        # /proc/sys: one number per file, field is its column
        SeriesFamily(
            "node_filefd_allocated",
            "gauge",
            "File descriptor statistics: allocated.",
            (),
            1.0,
            "sys/fs/file-nr",
            "0",
        ),
        SeriesFamily(
            "node_filefd_maximum",
            "gauge",
            "File descriptor statistics: maximum.",
            (),
            1.0,
            "sys/fs/file-nr",
            "2",
        ),
        SeriesFamily(
            "node_entropy_available_bits",
            "gauge",
            "Bits of available entropy.",
            (),
            1.0,
            "sys/kernel/random/entropy_avail",
            "0",
        ),
        SeriesFamily(
            "node_entropy_pool_size_bits",
            "gauge",
            "Bits of entropy pool.",
            (),
            1.0,
            "sys/kernel/random/poolsize",
            "0",
        ),
        SeriesFamily(
            "node_nf_conntrack_entries",
            "gauge",
            "Number of currently allocated flow entries for connection tracking.",
            (),
            1.0,
            "sys/net/netfilter/nf_conntrack_count",
            "0",
        ),
        SeriesFamily(
            "node_nf_conntrack_entries_limit",
            "gauge",
            "Maximum size of connection tracking table.",
            (),
            1.0,
            "sys/net/netfilter/nf_conntrack_max",
            "0",
        ),
        SeriesFamily(
            "node_processes_max_processes",
            "gauge",
            "Number of max PIDs limit",
            (),
            1.0,
            "sys/kernel/pid_max",
            "0",
        ),
        SeriesFamily(
            "node_processes_max_threads",
            "gauge",
            "Limit of threads in the system",
            (),
            1.0,
            "sys/kernel/threads-max",
            "0",
        ),
        # /proc/diskstats (times in ms, sizes in 512-byte sectors), field: column after the name
        *(
            SeriesFamily(name, kind, help_text, _DISK, scale, "diskstats", str(column))
            for column, (name, kind, help_text, scale) in enumerate(
                (
                    (
                        "node_disk_reads_completed_total",
                        "counter",
                        "The total number of reads completed successfully.",
                        1.0,
                    ),
                    ("node_disk_reads_merged_total", "counter", "The total number of reads merged.", 1.0),
                    (
                        "node_disk_read_bytes_total",
                        "counter",
                        "The total number of bytes read successfully.",
                        SECTOR,
                    ),
                    (
                        "node_disk_read_time_seconds_total",
                        "counter",
                        "The total number of seconds spent by all reads.",
                        MILLI,
                    ),
                    (
                        "node_disk_writes_completed_total",
                        "counter",
                        "The total number of writes completed successfully.",
                        1.0,
                    ),
                    ("node_disk_writes_merged_total", "counter", "The number of writes merged.", 1.0),
                    (
                        "node_disk_written_bytes_total",
                        "counter",
                        "The total number of bytes written successfully.",
                        SECTOR,
                    ),
                    (
                        "node_disk_write_time_seconds_total",
                        "counter",
                        "This is the total number of seconds spent by all writes.",
                        MILLI,
                    ),
                    ("node_disk_io_now", "gauge", "The number of I/Os currently in progress.", 1.0),
                    ("node_disk_io_time_seconds_total", "counter", "Total seconds spent doing I/Os.", MILLI),
                    (
                        "node_disk_io_time_weighted_seconds_total",
                        "counter",
                        "The weighted # of seconds spent doing I/Os.",
                        MILLI,
                    ),
                    (
                        "node_disk_discards_completed_total",
                        "counter",
                        "The total number of discards completed successfully.",
                        1.0,
                    ),
                    (
                        "node_disk_discards_merged_total",
                        "counter",
                        "The total number of discards merged.",
                        1.0,
                    ),
                    (
                        "node_disk_discarded_sectors_total",
                        "counter",
                        "The total number of sectors discarded successfully.",
                        1.0,
                    ),
                    (
                        "node_disk_discard_time_seconds_total",
                        "counter",
                        "This is the total number of seconds spent by all discards.",
                        MILLI,
                    ),
                    (
                        "node_disk_flush_requests_total",
                        "counter",
                        "The total number of flush requests completed successfully",
                        1.0,
                    ),
                    (
                        "node_disk_flush_requests_time_seconds_total",
                        "counter",
                        "This is the total number of seconds spent by all flush requests.",
                        MILLI,
                    ),
                )
            )
        ),
        # /sys/devices/system/cpu/cpuN/cpufreq (kHz), field: the file
        SeriesFamily(
            "node_cpu_scaling_frequency_hertz",
            "gauge",
            "Current scaled CPU thread frequency in hertz.",
            _CPU,
            1000.0,
            "cpufreq",
            "scaling_cur_freq",
        ),
        SeriesFamily(
            "node_cpu_scaling_frequency_max_hertz",
            "gauge",
            "Maximum scaled CPU thread frequency in hertz.",
            _CPU,
            1000.0,
            "cpufreq",
            "scaling_max_freq",
        ),
        SeriesFamily(
            "node_cpu_scaling_frequency_min_hertz",
            "gauge",
            "Minimum scaled CPU thread frequency in hertz.",
            _CPU,
            1000.0,
            "cpufreq",
            "scaling_min_freq",
        ),
        # /proc/schedstat (ns), field: the column of a cpuN line
        SeriesFamily(
            "node_schedstat_running_seconds_total",
            "counter",
            "Number of seconds CPU spent running a process.",
            _CPU,
            NANO,
            "schedstat",
            "7",
        ),
        SeriesFamily(
            "node_schedstat_waiting_seconds_total",
            "counter",
            "Number of seconds spent by processing waiting for this CPU.",
            _CPU,
            NANO,
            "schedstat",
            "8",
        ),
        SeriesFamily(
            "node_schedstat_timeslices_total",
            "counter",
            "Number of timeslices executed by CPU.",
            _CPU,
            1.0,
            "schedstat",
            "9",
        ),
        # /proc/net/softnet_stat, field: the hex column
        SeriesFamily(
            "node_softnet_processed_total",
            "counter",
            "Number of processed packets",
            _CPU,
            1.0,
            "net/softnet_stat",
            "0",
        ),
        SeriesFamily(
            "node_softnet_dropped_total",
            "counter",
            "Number of dropped packets",
            _CPU,
            1.0,
            "net/softnet_stat",
            "1",
        ),
        SeriesFamily(
            "node_softnet_times_squeezed_total",
            "counter",
            "Number of times processing packets ran out of quota",
            _CPU,
            1.0,
            "net/softnet_stat",
            "2",
        ),
        SeriesFamily(
            "node_softnet_received_rps_total",
            "counter",
            "Number of times cpu woken up received_rps",
            _CPU,
            1.0,
            "net/softnet_stat",
            "9",
        ),
        SeriesFamily(
            "node_softnet_flow_limit_count_total",
            "counter",
            "Number of times flow limit has been reached",
            _CPU,
            1.0,
            "net/softnet_stat",
            "10",
        ),
        # /sys/class/hwmon (millidegrees), field: the file's suffix
        SeriesFamily(
            "node_hwmon_chip_names",
            "gauge",
            "Annotation metric for human-readable chip names",
            ("chip", "chip_name"),
            1.0,
            "hwmon",
            "name",
        ),
        SeriesFamily(
            "node_hwmon_temp_celsius",
            "gauge",
            "Hardware monitor for temperature (input)",
            ("chip", "sensor"),
            MILLI,
            "hwmon",
            "input",
        ),
        SeriesFamily(
            "node_hwmon_temp_crit_celsius",
            "gauge",
            "Hardware monitor for temperature (crit)",
            ("chip", "sensor"),
            MILLI,
            "hwmon",
            "crit",
        ),
        SeriesFamily(
            "node_hwmon_temp_max_celsius",
            "gauge",
            "Hardware monitor for temperature (max)",
            ("chip", "sensor"),
            MILLI,
            "hwmon",
            "max",
        ),
        # /proc/pressure/* (microseconds), field: the line (some, full)
        SeriesFamily(
            "node_pressure_cpu_waiting_seconds_total",
            "counter",
            "Total time in seconds that processes have waited for CPU time",
            (),
            MICRO,
            "pressure/cpu",
            "some",
        ),
        SeriesFamily(
            "node_pressure_io_waiting_seconds_total",
            "counter",
            "Total time in seconds that processes have waited due to IO congestion",
            (),
            MICRO,
            "pressure/io",
            "some",
        ),
        SeriesFamily(
            "node_pressure_io_stalled_seconds_total",
            "counter",
            "Total time in seconds no process could make progress due to IO congestion",
            (),
            MICRO,
            "pressure/io",
            "full",
        ),
        SeriesFamily(
            "node_pressure_memory_waiting_seconds_total",
            "counter",
            "Total time in seconds that processes have waited for memory",
            (),
            MICRO,
            "pressure/memory",
            "some",
        ),
        SeriesFamily(
            "node_pressure_memory_stalled_seconds_total",
            "counter",
            "Total time in seconds no process could make progress due to memory congestion",
            (),
            MICRO,
            "pressure/memory",
            "full",
        ),
        SeriesFamily(
            "node_pressure_irq_stalled_seconds_total",
            "counter",
            "Total time in seconds no process could make progress due to IRQ congestion",
            (),
            MICRO,
            "pressure/irq",
            "full",
        ),
        # /sys/class/net/<device>, field: the file
        SeriesFamily(
            "node_network_receive_nohandler_total",
            "counter",
            "Network device statistic receive_nohandler.",
            ("device",),
            1.0,
            "class/net",
            "statistics/rx_nohandler",
        ),
        # /proc/net/*: sockets and neighbours
        SeriesFamily(
            "node_arp_entries", "gauge", "ARP entries by device", ("device",), 1.0, "net/arp", "entries"
        ),
        SeriesFamily(
            "node_udp_queues",
            "gauge",
            "Number of allocated memory in the kernel for UDP datagrams in bytes.",
            ("ip", "queue"),
            1.0,
            "net/udp",
            "queues",
        ),
        SeriesFamily(
            "node_tcp_connection_states",
            "gauge",
            "Number of connection states.",
            ("state",),
            1.0,
            "net/tcp",
            "states",
        ),
        # /proc/[pid]/stat of every process, /proc/interrupts
        SeriesFamily(
            "node_processes_state",
            "gauge",
            "Number of processes in each state.",
            ("state",),
            1.0,
            "processes",
            "state",
        ),
        SeriesFamily("node_processes_pids", "gauge", "Number of PIDs", (), 1.0, "processes", "pids"),
        SeriesFamily(
            "node_processes_threads", "gauge", "Allocated threads in system", (), 1.0, "processes", "threads"
        ),
        SeriesFamily(
            "node_interrupts_total",
            "counter",
            "Interrupt details.",
            ("cpu", "devices", "info", "type"),
            1.0,
            "interrupts",
            "total",
        ),
        # the agent's own sampling, as node_exporter reports its collectors (duration in microseconds)
        SeriesFamily(
            "node_scrape_collector_duration_seconds",
            "gauge",
            "node_exporter: Duration of a collector scrape.",
            ("collector",),
            MICRO,
            "agent",
            "duration",
        ),
        SeriesFamily(
            "node_scrape_collector_success",
            "gauge",
            "node_exporter: Whether a collector succeeded.",
            ("collector",),
            1.0,
            "agent",
            "success",
        ),
        SeriesFamily(
            "node_textfile_scrape_error",
            "gauge",
            "1 if there was an error opening or reading a file, 0 otherwise",
            (),
            1.0,
            "agent",
            "textfile_error",
        ),
        # the agent's own process, as node_exporter exports its own (cpu in ms)
        SeriesFamily(
            "process_cpu_seconds_total",
            "counter",
            "Total user and system CPU time spent in seconds.",
            (),
            MILLI,
            "process",
        ),
        SeriesFamily(
            "process_virtual_memory_bytes", "gauge", "Virtual memory size in bytes.", (), 1.0, "process"
        ),
        SeriesFamily(
            "process_virtual_memory_max_bytes",
            "gauge",
            "Maximum amount of virtual memory available in bytes.",
            (),
            1.0,
            "process",
        ),
        SeriesFamily(
            "process_max_fds", "gauge", "Maximum number of open file descriptors.", (), 1.0, "process"
        ),
        SeriesFamily("process_open_fds", "gauge", "Number of open file descriptors.", (), 1.0, "process"),
    )
}


def from_source(source: str) -> tuple[SeriesFamily, ...]:
    """The families read from one source, in table order (a file's columns, the sample's fields)."""
    return tuple(family for family in FAMILIES.values() if family.source == source)


def by_field(source: str) -> dict[str, str]:
    """field -> family name for one source: how a reader finds the name of what it read."""
    return {family.field: family.name for family in from_source(source)}


# Families named after the file's own keys: (prefix, suffix, kind, help format, scale).
MEMINFO_PREFIX = "node_memory_"  # /proc/meminfo's keys
VMSTAT_PREFIX = "node_vmstat_"
NETSTAT_PREFIX = "node_netstat_"  # /proc/net/netstat and snmp: protocol_field
SOCKSTAT_PREFIX = "node_sockstat_"
_KEYED = (
    (MEMINFO_PREFIX, "_bytes", "gauge", "Memory information field {}_bytes.", KIB),  # kB
    (MEMINFO_PREFIX, "", "gauge", "Memory information field {}.", 1.0),  # HugePages_Total and the like
    (VMSTAT_PREFIX, "", "untyped", "/proc/vmstat information field {}.", 1.0),
    (NETSTAT_PREFIX, "", "untyped", "Statistic {}.", 1.0),
    (SOCKSTAT_PREFIX, "", "gauge", "Number of {} sockets.", 1.0),
)
_KEY = re.compile(r"^[A-Za-z][A-Za-z0-9_]*$")


def family_of(name: str) -> SeriesFamily | None:
    """The family a declared series belongs to, None for a name this side does not know (or
    writes from the sample's own fields)."""
    known = FAMILIES.get(name)
    if known is not None and known.declared:
        return known
    for prefix, suffix, kind, help_format, scale in _KEYED:
        if not (name.startswith(prefix) and name.endswith(suffix)):
            continue
        key = name[len(prefix) : len(name) - len(suffix)]
        if _KEY.match(key) and not (suffix == "" and prefix == MEMINFO_PREFIX and key.endswith("_bytes")):
            return SeriesFamily(
                name,
                kind,
                help_format.format(key.replace("_", " ") if prefix == SOCKSTAT_PREFIX else key),
                (),
                scale,
            )
    return None

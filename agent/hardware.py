"""The hardware report an agent sends once per session (`node_pb2.Hardware`).

The coordinator places workloads from this report (arch, cores, memory, Pi or not,
Docker present), so every probe tolerates absence: a missing file, a missing program,
a permission error or a hung network mount leaves its field empty, and
`collect_hardware` never raises. The parsing steps are pure functions over text or a
root directory, so tests can feed them a real Pi's files without a Pi.
"""

from __future__ import annotations

import ipaddress
import os
import platform
import re
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar

import psutil
import structlog

from picoord.agent.commands import program_available, run_command
from picoord.agent.docker_api import CALL_ERRORS, DockerAPI, DockerAPIError
from picoord.common.defaults import DOCKER_SOCKET
from picoord.v1 import node_pb2

log = structlog.get_logger(__name__)

DOCKER_TIMEOUT_SECONDS = 2.0
NVIDIA_SMI_TIMEOUT_SECONDS = 5.0  # the first call can take a second or two while the driver wakes up
NVIDIA_SMI_ARGV = (
    "nvidia-smi",
    "--query-gpu=name,memory.total,driver_version",
    "--format=csv,noheader,nounits",
)
STATVFS_TIMEOUT_SECONDS = 0.5

# Filesystems whose statvfs() can block indefinitely when the server is gone: a hard NFS
# or a GlusterFS mount (both used by this cluster) must not freeze the agent's report.
NETWORK_FSTYPES = frozenset(
    {"nfs", "nfs4", "cifs", "smb3", "smbfs", "glusterfs", "ceph", "9p", "afs", "davfs", "sshfs"}
)
# node_exporter's default exclusions, so the coordinator re-exports what Prometheus users expect:
# read-only images (snaps on the Ubuntu desktop are dozens of always-full squashfs loops) and
# mounts that belong to containers or to the kernel.
IGNORED_FSTYPES = frozenset({"squashfs", "erofs", "iso9660"})
IGNORED_MOUNTPOINTS = re.compile(
    r"^/(dev|proc|run/credentials/.+|sys|var/lib/docker/.+|var/lib/containers/storage/.+)($|/)"
)
# Firmware placeholders that say nothing about the machine; fall back to the vendor instead.
DMI_PLACEHOLDERS = frozenset(
    {"", "to be filled by o.e.m.", "default string", "system product name", "not specified", "none"}
)
# ARM Ltd (implementer 0x41) core part numbers seen on Raspberry Pis and similar boards.
ARM_CPU_PARTS = {
    "0xb76": "ARM1176",
    "0xc07": "Cortex-A7",
    "0xc08": "Cortex-A8",
    "0xc09": "Cortex-A9",
    "0xc0f": "Cortex-A15",
    "0xd03": "Cortex-A53",
    "0xd04": "Cortex-A35",
    "0xd05": "Cortex-A55",
    "0xd07": "Cortex-A57",
    "0xd08": "Cortex-A72",
    "0xd09": "Cortex-A73",
    "0xd0a": "Cortex-A75",
    "0xd0b": "Cortex-A76",
}

_T = TypeVar("_T")


def _probe(name: str, function: Callable[[], _T], default: _T) -> _T:
    """Run one probe; a failure is logged and replaced by `default` so the report still goes out."""
    try:
        return function()
    except Exception as error:  # a probe must never take the session down
        log.warning("hardware_probe_failed", probe=name, error=repr(error))
        return default


def _read_text(path: Path) -> str | None:
    try:
        return path.read_text(errors="replace")
    except (OSError, ValueError):
        return None


# --- CPU ---------------------------------------------------------------------------------


def parse_cpuinfo(cpuinfo_text: str) -> dict[str, str]:
    """First value of each key in /proc/cpuinfo (per-processor blocks repeat the same keys)."""
    fields: dict[str, str] = {}
    for line in cpuinfo_text.splitlines():
        key, separator, value = line.partition(":")
        if not separator:
            continue
        fields.setdefault(key.strip(), value.strip())
    return fields


def parse_cpu_model(cpuinfo_text: str) -> str:
    """The CPU's name: x86 and 32-bit ARM kernels print "model name"; 64-bit ARM kernels
    do not, so decode the core from "CPU part" (the board is `machine_model` already),
    then fall back to the SoC "Hardware" or the board "Model"."""
    fields = parse_cpuinfo(cpuinfo_text)
    if fields.get("model name"):
        return fields["model name"]
    part = fields.get("CPU part", "").lower()
    if part and fields.get("CPU implementer", "").lower() == "0x41" and part in ARM_CPU_PARTS:
        return f"ARM {ARM_CPU_PARTS[part]}"
    for key in ("Hardware", "Model"):
        if fields.get(key):
            return fields[key]
    return f"CPU part {part}" if part else ""


# --- OS and machine ----------------------------------------------------------------------

_OS_RELEASE_LINE = re.compile(r"^(?P<name>[A-Za-z0-9_]+)=(?P<quote>[\"']?)(?P<value>.*)(?P=quote)$")
_OS_RELEASE_UNESCAPE = re.compile(r"\\([\\$\"'`])")


def parse_os_release(text: str) -> dict[str, str]:
    """os-release(5) is shell-like KEY=value with optional quotes and backslash escapes."""
    fields: dict[str, str] = {}
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        match = _OS_RELEASE_LINE.match(line)
        if match:
            fields[match["name"]] = _OS_RELEASE_UNESCAPE.sub(r"\1", match["value"])
    return fields


def read_os_name(root: Path = Path("/")) -> str:
    """PRETTY_NAME from /etc/os-release, else /usr/lib/os-release (the spec's fallback)."""
    for relative in ("etc/os-release", "usr/lib/os-release"):
        text = _read_text(root / relative)
        if text is None:
            continue
        fields = parse_os_release(text)
        name = fields.get("PRETTY_NAME") or " ".join(
            part for part in (fields.get("NAME", ""), fields.get("VERSION", "")) if part
        )
        if name:
            return name
    return ""


def read_machine_model(proc_root: Path = Path("/proc"), sys_root: Path = Path("/sys")) -> tuple[str, bool]:
    """(model, is a Raspberry Pi): the device-tree model on ARM boards, DMI on PCs."""
    try:
        raw = (proc_root / "device-tree" / "model").read_bytes()
    except OSError:
        raw = b""
    model = raw.rstrip(b"\x00").decode(errors="replace").strip()
    if model:
        return model, model.startswith("Raspberry Pi")
    for name in ("product_name", "sys_vendor"):
        value = (_read_text(sys_root / "class" / "dmi" / "id" / name) or "").strip()
        if value.lower() not in DMI_PLACEHOLDERS:
            return value, False
    return "", False


# --- GPUs --------------------------------------------------------------------------------


def parse_nvidia_smi(csv_text: str) -> list[node_pb2.Gpu]:
    """Rows of `name, memory.total (MiB), driver_version`; malformed rows are skipped."""
    gpus: list[node_pb2.Gpu] = []
    for line in csv_text.splitlines():
        parts = line.rsplit(",", 2)  # a GPU name could contain a comma, the other two cannot
        if len(parts) != 3:
            continue
        name, memory, driver = (part.strip() for part in parts)
        if not name:
            continue
        try:
            memory_bytes = int(float(memory) * 1024 * 1024)
        except ValueError:  # "[N/A]" on some boards
            memory_bytes = 0
        gpus.append(
            node_pb2.Gpu(vendor="NVIDIA", name=name, memory_bytes=max(memory_bytes, 0), driver_version=driver)
        )
    return gpus


def detect_gpus(timeout: float = NVIDIA_SMI_TIMEOUT_SECONDS) -> list[node_pb2.Gpu]:
    """NVIDIA GPUs via nvidia-smi; none when the program is absent, fails or hangs."""
    if not program_available("nvidia-smi"):
        return []
    result = run_command(list(NVIDIA_SMI_ARGV), timeout=timeout)
    if not result.ok:
        log.info("nvidia_smi_failed", exit_code=result.exit_code, timed_out=result.timed_out)
        return []
    return parse_nvidia_smi(result.stdout)


# --- Docker ------------------------------------------------------------------------------


def docker_info(
    socket_path: str | os.PathLike[str] = DOCKER_SOCKET, timeout: float = DOCKER_TIMEOUT_SECONDS
) -> node_pb2.DockerInfo:
    """GET /version on the engine's socket; present only when it answers 2xx with a JSON object."""
    try:
        payload = DockerAPI(os.fspath(socket_path), timeout, negotiate=False).version()
    except DockerAPIError as error:
        log.info("docker_version_status", status=error.status)
        return node_pb2.DockerInfo(present=False)
    except CALL_ERRORS as error:
        log.debug("docker_unreachable", socket=os.fspath(socket_path), error=repr(error))
        return node_pb2.DockerInfo(present=False)
    return node_pb2.DockerInfo(
        present=True, version=str(payload.get("Version", "")), api_version=str(payload.get("ApiVersion", ""))
    )


# --- Filesystems -------------------------------------------------------------------------


def is_reported_filesystem(mountpoint: str, fstype: str) -> bool:
    """Whether a mount belongs in the report (node_exporter's default exclusions)."""
    return fstype not in IGNORED_FSTYPES and not IGNORED_MOUNTPOINTS.match(mountpoint)


def list_filesystems() -> list[psutil._common.sdiskpart]:
    """Mounted block-device and network filesystems, in mount-table order."""
    return [
        part
        for part in psutil.disk_partitions(all=False)
        if is_reported_filesystem(part.mountpoint, part.fstype)
    ]


def may_hang(fstype: str) -> bool:
    """Network and FUSE filesystems can block statvfs() until their server comes back."""
    return fstype in NETWORK_FSTYPES or fstype.startswith("fuse")


@dataclass
class _StatvfsCall:
    started: float
    result: os.statvfs_result | None = None
    done: threading.Event = field(default_factory=threading.Event)


_statvfs_calls: dict[str, _StatvfsCall] = {}
_statvfs_lock = threading.Lock()


def bounded_statvfs(
    mountpoint: str,
    fstype: str,
    timeout: float = STATVFS_TIMEOUT_SECONDS,
    statvfs: Callable[[str], os.statvfs_result] = os.statvfs,
) -> os.statvfs_result | None:
    """statvfs() that cannot freeze the caller on a dead network mount.

    Local filesystems are asked directly. For network/FUSE ones the call runs in a daemon
    thread and is abandoned after `timeout`; while it stays stuck, later calls for the same
    mountpoint return None at once instead of piling up threads (node_exporter does the same).
    None also means the mount vanished or is not readable.
    """
    if not may_hang(fstype):
        try:
            return statvfs(mountpoint)
        except OSError:
            return None
    with _statvfs_lock:
        call = _statvfs_calls.get(mountpoint)
        if call is not None and not call.done.is_set() and time.monotonic() - call.started >= timeout:
            return None  # still stuck from an earlier attempt
        if call is None or call.done.is_set():
            call = _StatvfsCall(started=time.monotonic())
            _statvfs_calls[mountpoint] = call
            threading.Thread(
                target=_run_statvfs, args=(call, statvfs, mountpoint), name="statvfs", daemon=True
            ).start()
    remaining = timeout - (time.monotonic() - call.started)
    if not call.done.wait(max(remaining, 0.0)):
        log.warning("statvfs_stuck", mountpoint=mountpoint, fstype=fstype)
        return None
    with _statvfs_lock:
        if _statvfs_calls.get(mountpoint) is call:
            del _statvfs_calls[mountpoint]
    return call.result


def _run_statvfs(call: _StatvfsCall, statvfs: Callable[[str], os.statvfs_result], mountpoint: str) -> None:
    try:
        call.result = statvfs(mountpoint)
    except OSError:
        call.result = None
    finally:
        call.done.set()


def collect_disks() -> list[node_pb2.Disk]:
    """Mounted filesystems with their size, one entry per device (bind mounts such as
    /run/netns repeat their source); one that cannot be measured is left out."""
    disks: list[node_pb2.Disk] = []
    seen: set[str] = set()
    for part in list_filesystems():
        if part.device in seen:
            continue
        seen.add(part.device)
        stat = bounded_statvfs(part.mountpoint, part.fstype)
        if stat is None:
            continue
        disks.append(
            node_pb2.Disk(
                device=part.device,
                mountpoint=part.mountpoint,
                fstype=part.fstype,
                total_bytes=stat.f_blocks * stat.f_frsize,
            )
        )
    return disks


# --- Network -----------------------------------------------------------------------------


def format_address(family: int, address: str, netmask: str | None) -> str | None:
    """ "addr/prefixlen" for an IPv4 or IPv6 address (scope suffix dropped); None for others."""
    if family not in (socket.AF_INET, socket.AF_INET6) or not address:
        return None
    try:
        ip = ipaddress.ip_address(address.split("%", 1)[0])
        prefix = _prefix_length(netmask, ip.max_prefixlen) if netmask else ip.max_prefixlen
    except ValueError:
        return None
    return f"{ip}/{prefix}"


def _prefix_length(netmask: str, max_prefixlen: int) -> int:
    """Prefix length of a dotted or colon netmask (ipaddress accepts only IPv4 netmasks)."""
    mask = int(ipaddress.ip_address(netmask.split("%", 1)[0]))
    prefix = bin(mask).count("1")
    full = (1 << max_prefixlen) - 1
    if mask != full ^ ((1 << (max_prefixlen - prefix)) - 1):
        raise ValueError(f"non-contiguous netmask {netmask}")
    return prefix


IFF_UP = 0x1  # linux/if.h: what psutil's isup reads


def _sysfs_link(name: str, sys_net: Path = Path("/sys/class/net")) -> tuple[bool, int]:
    """(up, mtu) of an interface from sysfs: what psutil's ethtool ioctl gives where that
    ioctl is missing (an arm64 agent under qemu-user: ENOSYS)."""
    try:
        flags = int((sys_net / name / "flags").read_text().strip(), 16)
        mtu = int((sys_net / name / "mtu").read_text().strip())
    except (OSError, ValueError):
        return False, 0
    return bool(flags & IFF_UP), max(mtu, 0)


def collect_interfaces() -> list[node_pb2.NetworkInterface]:
    """Every interface the kernel lists, with MAC, addresses and link state, sorted by name.
    Without the ethtool ioctl the addresses are still reported (they place virtual
    addresses), with link state and MTU from sysfs and no speed."""
    addresses = psutil.net_if_addrs()
    try:
        stats = psutil.net_if_stats()
    except OSError:
        stats = None
    interfaces: list[node_pb2.NetworkInterface] = []
    for name in sorted(set(addresses) | set(stats or {})):
        interface = node_pb2.NetworkInterface(name=name)
        for entry in addresses.get(name, []):
            if entry.family == psutil.AF_LINK:
                interface.mac = entry.address or ""
                continue
            formatted = format_address(entry.family, entry.address, entry.netmask)
            if formatted is not None:
                interface.addresses.append(formatted)
        stat = stats.get(name) if stats is not None else None
        if stats is None:
            interface.up, interface.mtu = _sysfs_link(name)
        elif stat is not None:
            interface.up = bool(stat.isup)
            interface.speed_mbps = max(int(stat.speed), 0)
            interface.mtu = max(int(stat.mtu), 0)
        interfaces.append(interface)
    return interfaces


# --- The report --------------------------------------------------------------------------


def collect_hardware(
    *,
    docker_socket: str | os.PathLike[str] = DOCKER_SOCKET,
    proc_root: Path = Path("/proc"),
    sys_root: Path = Path("/sys"),
    root: Path = Path("/"),
) -> node_pb2.Hardware:
    """Everything the coordinator needs to place work on this node; never raises."""
    hardware = node_pb2.Hardware()
    hardware.hostname = _probe("hostname", socket.gethostname, "")
    hardware.arch = _probe("arch", platform.machine, "")
    hardware.kernel = _probe("kernel", platform.release, "")
    hardware.cpu_model = _probe(
        "cpu_model", lambda: parse_cpu_model(_read_text(proc_root / "cpuinfo") or ""), ""
    )
    hardware.cpu_cores = _probe("cpu_cores", lambda: psutil.cpu_count(logical=True) or 0, 0)
    # 0 when psutil cannot tell (no topology in sysfs): unknown, not "no cores".
    hardware.cpu_physical_cores = _probe(
        "cpu_physical_cores", lambda: psutil.cpu_count(logical=False) or 0, 0
    )
    hardware.memory_total_bytes = _probe("memory", lambda: psutil.virtual_memory().total, 0)
    hardware.swap_total_bytes = _probe("swap", lambda: psutil.swap_memory().total, 0)
    hardware.os_name = _probe("os_name", lambda: read_os_name(root), "")
    model, raspberry_pi = _probe(
        "machine_model", lambda: read_machine_model(proc_root, sys_root), ("", False)
    )
    hardware.machine_model = model
    hardware.raspberry_pi = raspberry_pi
    hardware.disks.extend(_probe("disks", collect_disks, []))
    hardware.interfaces.extend(_probe("interfaces", collect_interfaces, []))
    hardware.gpus.extend(_probe("gpus", detect_gpus, []))
    hardware.docker.CopyFrom(
        _probe("docker", lambda: docker_info(docker_socket), node_pb2.DockerInfo(present=False))
    )
    hardware.boot_time = _probe("boot_time", psutil.boot_time, 0.0)
    hardware.uname.CopyFrom(_probe("uname", read_uname, node_pb2.Uname()))
    from picoord.agent.metrics import series_layout  # metrics imports this module

    _probe("series", lambda: series_layout().declare(hardware.series), None)
    return hardware


def read_uname() -> node_pb2.Uname:
    """uname(2) as node_exporter's node_uname_info labels it; the NIS domain name from procfs."""
    info = os.uname()
    domainname = _read_text(Path("/proc/sys/kernel/domainname")) or "(none)"
    return node_pb2.Uname(
        sysname=info.sysname,
        nodename=info.nodename,
        release=info.release,
        version=info.version,
        machine=info.machine,
        domainname=domainname.strip(),
    )

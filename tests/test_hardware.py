"""The hardware report: parsers fed with real files from Pis and PCs, the Docker probe
against a real HTTP server on a unix socket, and collect_hardware() on this machine."""

from __future__ import annotations

import http.server
import json
import os
import platform
import socket
import socketserver
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest

from picoord.agent.hardware import (
    bounded_statvfs,
    collect_hardware,
    docker_info,
    format_address,
    is_reported_filesystem,
    parse_cpu_model,
    parse_nvidia_smi,
    parse_os_release,
    read_machine_model,
    read_os_name,
)

# /proc/cpuinfo of a Raspberry Pi 4 on 64-bit Raspberry Pi OS bookworm (no "model name").
PI4_AARCH64_CPUINFO = """\
processor	: 0
BogoMIPS	: 108.00
Features	: fp asimd evtstrm crc32 cpuid
CPU implementer	: 0x41
CPU architecture: 8
CPU variant	: 0x0
CPU part	: 0xd08
CPU revision	: 3

processor	: 1
BogoMIPS	: 108.00
Features	: fp asimd evtstrm crc32 cpuid
CPU implementer	: 0x41
CPU architecture: 8
CPU variant	: 0x0
CPU part	: 0xd08
CPU revision	: 3

Hardware	: BCM2835
Revision	: d03114
Serial		: 10000000a1b2c3d4
Model		: Raspberry Pi 4 Model B Rev 1.4
"""

# The same board on 32-bit Raspberry Pi OS: the kernel prints "model name".
PI4_ARMV7_CPUINFO = """\
processor	: 0
model name	: ARMv7 Processor rev 3 (v7l)
BogoMIPS	: 108.00
Features	: half thumb fastmult vfp edsp neon vfpv3 tls vfpv4 idiva idivt vfpd32 lpae evtstrm crc32
CPU implementer	: 0x41
CPU architecture: 7
CPU variant	: 0x0
CPU part	: 0xd08
CPU revision	: 3

Hardware	: BCM2711
Revision	: c03114
Serial		: 100000002a5b3c4d
Model		: Raspberry Pi 4 Model B Rev 1.4
"""

X86_CPUINFO = """\
processor	: 0
vendor_id	: AuthenticAMD
cpu family	: 25
model		: 33
model name	: AMD Ryzen 7 5800X 8-Core Processor
stepping	: 0
cpu MHz		: 3800.000

processor	: 1
vendor_id	: AuthenticAMD
model name	: AMD Ryzen 7 5800X 8-Core Processor
"""

DEBIAN_OS_RELEASE = """\
PRETTY_NAME="Debian GNU/Linux 12 (bookworm)"
NAME="Debian GNU/Linux"
VERSION_ID="12"
VERSION="12 (bookworm)"
VERSION_CODENAME=bookworm
ID=debian
HOME_URL="https://www.debian.org/"
"""

RASPIOS_OS_RELEASE = """\
PRETTY_NAME="Raspbian GNU/Linux 11 (bullseye)"
NAME="Raspbian GNU/Linux"
VERSION_ID="11"
VERSION="11 (bullseye)"
ID=raspbian
ID_LIKE=debian
"""


@pytest.mark.parametrize(
    ("cpuinfo", "expected"),
    [
        (PI4_AARCH64_CPUINFO, "ARM Cortex-A72"),
        (PI4_ARMV7_CPUINFO, "ARMv7 Processor rev 3 (v7l)"),
        (X86_CPUINFO, "AMD Ryzen 7 5800X 8-Core Processor"),
        ("processor : 0\nHardware : BCM2711\n", "BCM2711"),
        ("processor : 0\nCPU implementer : 0x41\nCPU part : 0xd08\n", "ARM Cortex-A72"),
        ("processor : 0\nCPU implementer : 0x41\nCPU part : 0xd03\n", "ARM Cortex-A53"),
        ("processor : 0\nCPU implementer : 0x51\nCPU part : 0x801\n", "CPU part 0x801"),
        ("model name :\nHardware : BCM2835\n", "BCM2835"),  # empty values do not count
        ("", ""),
        ("no separators here\n\n", ""),
    ],
)
def test_parse_cpu_model(cpuinfo: str, expected: str) -> None:
    assert parse_cpu_model(cpuinfo) == expected


def test_parse_os_release_reads_quoted_and_bare_values() -> None:
    fields = parse_os_release(DEBIAN_OS_RELEASE)
    assert fields["PRETTY_NAME"] == "Debian GNU/Linux 12 (bookworm)"
    assert fields["VERSION_CODENAME"] == "bookworm"
    assert fields["HOME_URL"] == "https://www.debian.org/"


def test_parse_os_release_handles_escapes_comments_and_junk() -> None:
    text = (
        "# a comment\n"
        "\n"
        "NAME='Single Quoted'\n"
        'PRETTY_NAME="Say \\"hi\\" for \\$5"\n'
        "not a key value line\n"
        "lower-case-dash=ignored\n"
        "  ID=indented  \n"
    )
    fields = parse_os_release(text)
    assert fields == {"NAME": "Single Quoted", "PRETTY_NAME": 'Say "hi" for $5', "ID": "indented"}


def _write(path: Path, content: str | bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    if isinstance(content, bytes):
        path.write_bytes(content)
    else:
        path.write_text(content)
    return path


def test_read_os_name_prefers_etc_then_usr_lib(tmp_path: Path) -> None:
    _write(tmp_path / "usr/lib/os-release", RASPIOS_OS_RELEASE)
    assert read_os_name(tmp_path) == "Raspbian GNU/Linux 11 (bullseye)"
    _write(tmp_path / "etc/os-release", DEBIAN_OS_RELEASE)
    assert read_os_name(tmp_path) == "Debian GNU/Linux 12 (bookworm)"


def test_read_os_name_without_pretty_name_or_files(tmp_path: Path) -> None:
    assert read_os_name(tmp_path) == ""
    _write(tmp_path / "etc/os-release", 'NAME="Alpine Linux"\nVERSION="3.19"\n')
    assert read_os_name(tmp_path) == "Alpine Linux 3.19"


@pytest.mark.parametrize(
    ("files", "expected"),
    [
        (
            {"proc/device-tree/model": b"Raspberry Pi 4 Model B Rev 1.4\x00"},
            ("Raspberry Pi 4 Model B Rev 1.4", True),
        ),
        (
            {"proc/device-tree/model": b"Raspberry Pi 3 Model B Plus Rev 1.3\x00\x00"},
            ("Raspberry Pi 3 Model B Plus Rev 1.3", True),
        ),
        ({"proc/device-tree/model": b"Pine64 RockPro64 v2.1\x00"}, ("Pine64 RockPro64 v2.1", False)),
        (
            {
                "proc/device-tree/model": b"Raspberry Pi 5 Model B Rev 1.0\x00",
                "sys/class/dmi/id/product_name": "X",
            },
            ("Raspberry Pi 5 Model B Rev 1.0", True),
        ),
        (
            {"sys/class/dmi/id/product_name": "MS-7C56\n", "sys/class/dmi/id/sys_vendor": "Micro-Star\n"},
            ("MS-7C56", False),
        ),
        (
            {
                "sys/class/dmi/id/product_name": "To Be Filled By O.E.M.\n",
                "sys/class/dmi/id/sys_vendor": "ASRock\n",
            },
            ("ASRock", False),
        ),
        ({"sys/class/dmi/id/sys_vendor": "QEMU\n"}, ("QEMU", False)),
        ({"proc/device-tree/model": b"\x00"}, ("", False)),
        ({}, ("", False)),
    ],
)
def test_read_machine_model(
    tmp_path: Path, files: dict[str, str | bytes], expected: tuple[str, bool]
) -> None:
    for relative, content in files.items():
        _write(tmp_path / relative, content)
    assert read_machine_model(tmp_path / "proc", tmp_path / "sys") == expected


def test_parse_nvidia_smi_rows() -> None:
    text = "NVIDIA GeForce RTX 3060, 12288, 535.104.05\nTesla T4, 15360, 535.104.05\n"
    gpus = parse_nvidia_smi(text)
    assert [(g.vendor, g.name, g.memory_bytes, g.driver_version) for g in gpus] == [
        ("NVIDIA", "NVIDIA GeForce RTX 3060", 12288 * 1024 * 1024, "535.104.05"),
        ("NVIDIA", "Tesla T4", 15360 * 1024 * 1024, "535.104.05"),
    ]


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("", []),
        ("\n\n", []),
        ("garbage without commas\n", []),
        (", 1024, 535.54\n", []),  # no name
        ("Jetson, [N/A], 35.4.1\n", [("Jetson", 0, "35.4.1")]),
        ("Odd, Name, 8192, 550.1\n", [("Odd, Name", 8192 * 1024 * 1024, "550.1")]),
        ("NVIDIA A2, 15356, 550.54\nNVIDIA-SMI has failed\n", [("NVIDIA A2", 15356 * 1024 * 1024, "550.54")]),
    ],
)
def test_parse_nvidia_smi_malformed(text: str, expected: list[tuple[str, int, str]]) -> None:
    assert [(g.name, g.memory_bytes, g.driver_version) for g in parse_nvidia_smi(text)] == expected


@pytest.mark.parametrize(
    ("family", "address", "netmask", "expected"),
    [
        (socket.AF_INET, "192.168.1.23", "255.255.255.0", "192.168.1.23/24"),
        (socket.AF_INET, "10.0.0.5", None, "10.0.0.5/32"),
        (
            socket.AF_INET6,
            "fe80::dea6:32ff:fe01:2345%eth0",
            "ffff:ffff:ffff:ffff::",
            "fe80::dea6:32ff:fe01:2345/64",
        ),
        (socket.AF_INET6, "::1", "ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff", "::1/128"),
        (socket.AF_INET6, "2001:db8::5", "ffff:ffff:ffff:ff00::", "2001:db8::5/56"),
        (socket.AF_INET, "10.1.2.3", "255.0.255.0", None),  # non-contiguous mask
        (socket.AF_INET, "not-an-ip", "255.0.0.0", None),
        (socket.AF_PACKET, "dc:a6:32:01:23:45", None, None),
    ],
)
def test_format_address(family: int, address: str, netmask: str | None, expected: str | None) -> None:
    assert format_address(family, address, netmask) == expected


@pytest.mark.parametrize(
    ("mountpoint", "fstype", "expected"),
    [
        ("/", "ext4", True),
        ("/boot/firmware", "vfat", True),
        ("/mnt/gluster", "fuse.glusterfs", True),
        ("/snap/core22/1122", "squashfs", False),
        ("/var/lib/docker/overlay2/abc/merged", "ext4", False),
        ("/var/lib/docker", "ext4", True),
        ("/sys/firmware", "ext4", False),
        ("/devices", "ext4", True),
    ],
)
def test_is_reported_filesystem(mountpoint: str, fstype: str, expected: bool) -> None:
    assert is_reported_filesystem(mountpoint, fstype) is expected


def test_bounded_statvfs_local_filesystem_is_asked_directly(tmp_path: Path) -> None:
    result = bounded_statvfs(str(tmp_path), "ext4")
    assert result is not None and result.f_blocks > 0
    assert bounded_statvfs(str(tmp_path / "missing"), "ext4") is None


def test_bounded_statvfs_gives_up_on_a_hung_network_mount_without_piling_up_threads() -> None:
    release = threading.Event()
    calls: list[str] = []

    def hanging_statvfs(path: str) -> os.statvfs_result:
        calls.append(path)
        release.wait(10)
        return os.statvfs("/")

    mountpoint = "/mnt/test-hung-nfs"
    started = time.monotonic()
    assert bounded_statvfs(mountpoint, "nfs4", timeout=0.1, statvfs=hanging_statvfs) is None
    assert 0.09 <= time.monotonic() - started < 2
    started = time.monotonic()
    assert bounded_statvfs(mountpoint, "nfs4", timeout=0.1, statvfs=hanging_statvfs) is None
    assert time.monotonic() - started < 0.05  # known stuck: no second wait
    assert calls == [mountpoint]  # and no second thread
    release.set()
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:  # the stuck call finishes; the next one asks afresh
        result = bounded_statvfs(mountpoint, "nfs4", timeout=0.1, statvfs=hanging_statvfs)
        if result is not None:
            break
        time.sleep(0.01)
    assert result is not None and result.f_blocks > 0
    assert calls == [mountpoint, mountpoint]


# --- Docker over a real unix socket -----------------------------------------------------


class _UnixHTTPServer(socketserver.ThreadingMixIn, socketserver.UnixStreamServer):
    daemon_threads = True


def _serve(handler: type[http.server.BaseHTTPRequestHandler]) -> Iterator[Path]:
    # AF_UNIX paths are limited to 108 bytes; pytest's tmp_path can be longer than that.
    directory = Path(tempfile.mkdtemp(prefix="picoord-docker-"))
    path = directory / "docker.sock"
    server = _UnixHTTPServer(str(path), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield path
    finally:
        server.shutdown()
        server.server_close()
        path.unlink(missing_ok=True)
        directory.rmdir()


class _EngineHandler(http.server.BaseHTTPRequestHandler):
    requests: list[tuple[str, str]] = []  # shared on purpose: the test reads it
    status = 200
    body = json.dumps({"Version": "20.10.24", "ApiVersion": "1.41", "Os": "linux"}).encode()

    def do_GET(self) -> None:
        type(self).requests.append((self.command, self.path))
        self.send_response(self.status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(self.body)))
        self.end_headers()
        self.wfile.write(self.body)

    def log_message(self, format: str, *args: object) -> None:  # client_address is "" on AF_UNIX
        pass


@pytest.fixture
def docker_engine() -> Iterator[Path]:
    _EngineHandler.requests = []
    yield from _serve(_EngineHandler)


def test_docker_info_asks_the_engine_for_its_version(docker_engine: Path) -> None:
    info = docker_info(docker_engine)
    assert info.present is True
    assert info.version == "20.10.24"
    assert info.api_version == "1.41"
    assert _EngineHandler.requests == [("GET", "/version")]


def test_docker_info_missing_socket(tmp_path: Path) -> None:
    info = docker_info(tmp_path / "nothing-here.sock")
    assert info.present is False
    assert info.version == ""


def test_docker_info_error_status_and_bad_body_are_not_an_engine() -> None:
    class Failing(_EngineHandler):
        status = 500

    class NotJson(_EngineHandler):
        body = b"<html>hello</html>"

    class JsonList(_EngineHandler):
        body = b"[1, 2]"

    for handler in (Failing, NotJson, JsonList):
        for path in _serve(handler):
            assert docker_info(path).present is False, handler.__name__


def test_docker_info_gives_up_on_a_silent_socket() -> None:
    directory = Path(tempfile.mkdtemp(prefix="picoord-silent-"))
    path = directory / "docker.sock"
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        listener.bind(str(path))
        listener.listen(1)  # accepts the connection in the backlog, never answers
        started = time.monotonic()
        assert docker_info(path, timeout=0.2).present is False
        assert time.monotonic() - started < 2
    finally:
        listener.close()
        path.unlink(missing_ok=True)
        directory.rmdir()


# --- collect_hardware ---------------------------------------------------------------------


def test_collect_hardware_on_this_machine(tmp_path: Path) -> None:
    hardware = collect_hardware(docker_socket=tmp_path / "no-docker.sock")
    assert hardware.hostname == socket.gethostname()
    assert hardware.arch == platform.machine()
    assert hardware.kernel == platform.release()
    assert hardware.cpu_cores == os.cpu_count()
    assert 0 <= hardware.cpu_physical_cores <= hardware.cpu_cores
    assert hardware.cpu_model  # every Linux /proc/cpuinfo names something
    assert hardware.memory_total_bytes == psutil.virtual_memory().total
    assert hardware.swap_total_bytes == psutil.swap_memory().total
    assert hardware.boot_time == pytest.approx(psutil.boot_time(), abs=1)
    if Path("/etc/os-release").exists():
        assert hardware.os_name == parse_os_release(Path("/etc/os-release").read_text())["PRETTY_NAME"]
    assert hardware.docker.present is False

    names = [interface.name for interface in hardware.interfaces]
    assert names == sorted(names)
    assert "lo" in names
    loopback = hardware.interfaces[names.index("lo")]
    assert loopback.up and "127.0.0.1/8" in loopback.addresses
    assert any(interface.addresses for interface in hardware.interfaces if interface.name != "lo")
    for interface in hardware.interfaces:  # every IPv4 and IPv6 address psutil sees is reported
        expected = [
            entry.address
            for entry in psutil.net_if_addrs().get(interface.name, [])
            if entry.family in (socket.AF_INET, socket.AF_INET6)
        ]
        assert len(interface.addresses) == len(expected), interface.name
        assert all("/" in address for address in interface.addresses)

    mountpoints = [disk.mountpoint for disk in hardware.disks]
    assert "/" in mountpoints
    root = hardware.disks[mountpoints.index("/")]
    assert root.total_bytes == psutil.disk_usage("/").total


def test_collect_hardware_reports_docker_when_the_engine_answers(docker_engine: Path) -> None:
    hardware = collect_hardware(docker_socket=docker_engine)
    assert hardware.docker.present is True
    assert hardware.docker.version == "20.10.24"


def test_collect_hardware_reads_a_pi_from_its_files(tmp_path: Path) -> None:
    _write(tmp_path / "proc/cpuinfo", PI4_AARCH64_CPUINFO)
    _write(tmp_path / "proc/device-tree/model", b"Raspberry Pi 4 Model B Rev 1.4\x00")
    _write(tmp_path / "etc/os-release", 'PRETTY_NAME="Debian GNU/Linux 12 (bookworm)"\n')
    hardware = collect_hardware(
        docker_socket=tmp_path / "docker.sock",
        proc_root=tmp_path / "proc",
        sys_root=tmp_path / "sys",
        root=tmp_path,
    )
    assert hardware.raspberry_pi is True
    assert hardware.machine_model == "Raspberry Pi 4 Model B Rev 1.4"
    assert hardware.cpu_model == "ARM Cortex-A72"
    assert hardware.os_name == "Debian GNU/Linux 12 (bookworm)"


def test_collect_hardware_tolerates_an_empty_or_broken_root(tmp_path: Path) -> None:
    not_a_directory = _write(tmp_path / "file", "x")
    hardware = collect_hardware(
        docker_socket=not_a_directory,
        proc_root=not_a_directory,
        sys_root=not_a_directory,
        root=not_a_directory,
    )
    assert hardware.cpu_model == ""
    assert hardware.os_name == ""
    assert hardware.machine_model == "" and hardware.raspberry_pi is False
    assert hardware.docker.present is False
    assert hardware.arch == platform.machine()  # the probes that do not use the roots still run


BIND_AND_LIST = """
import subprocess, sys
subprocess.run(["mount", "--bind", sys.argv[1], sys.argv[2]], check=True, timeout=10)
from picoord.agent.hardware import collect_disks
print("\\n".join(disk.device for disk in collect_disks()))
"""


def test_collect_disks_lists_each_device_once(tmp_path: Path) -> None:
    """A bind mount repeats its source device; the hardware report names each device once."""
    target = tmp_path / "bound"
    target.mkdir()
    # a private mount namespace, so the bind mount never touches the host's mount table
    unshare = ["unshare", "--mount", "--propagation", "private", "--"]
    done = subprocess.run(
        [*unshare, sys.executable, "-c", BIND_AND_LIST, str(tmp_path), str(target)],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert done.returncode == 0, done.stderr
    devices = done.stdout.split()
    assert devices and len(devices) == len(set(devices))


def test_interfaces_keep_their_addresses_without_the_ethtool_ioctl(monkeypatch: pytest.MonkeyPatch) -> None:
    """qemu-user has no SIOCETHTOOL (psutil.net_if_stats raises ENOSYS): the addresses, which
    place a stack's virtual address, are still reported, link state and MTU from sysfs."""
    from picoord.agent import hardware

    with_stats = {item.name: item for item in hardware.collect_interfaces()}

    def no_ethtool() -> None:
        raise OSError(38, "Function not implemented (originated from ioctl(SIOCETHTOOL))")

    monkeypatch.setattr(hardware.psutil, "net_if_stats", no_ethtool)
    without = {item.name: item for item in hardware.collect_interfaces()}
    assert without.keys() == with_stats.keys() and "lo" in without
    for name, item in without.items():
        assert list(item.addresses) == list(with_stats[name].addresses), name
        assert (item.up, item.mtu) == (with_stats[name].up, with_stats[name].mtu), name
        assert item.speed_mbps == 0

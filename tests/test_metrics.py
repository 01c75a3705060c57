"""Metric samples: the parsers and the thermal tree fed with real Pi files, a stand-in
vcgencmd program, and two real samples taken on this machine."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import psutil
import pytest

from picoord.agent.hardware import list_filesystems
from picoord.agent.metrics import (
    MetricsSampler,
    cpu_busy_and_total,
    cpu_busy_percent,
    discover_thermal_zones,
    parse_meminfo,
    parse_throttled,
    read_thermal_zones,
)
from picoord.common.pi_throttled_flags import describe_throttled


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("throttled=0x50005\n", 0x50005),
        ("throttled=0x0\n", 0),
        ("throttled=0x80000", 0x80000),
        ("  throttled=0xE0008  \n", 0xE0008),
        ("", None),
        ("throttled=50005\n", None),  # vcgencmd always prints 0x
        ("throttled=0x\n", None),
        ("throttled=0xZZ\n", None),
        ("throttled=0x100000000\n", None),  # wider than the uint32 field
        ('error=2 error_msg="Invalid arguments"\n', None),
        ("VCHI initialization failed\n", None),
        ("temp=48.6'C\n", None),
    ],
)
def test_parse_throttled(text: str, expected: int | None) -> None:
    assert parse_throttled(text) == expected


@pytest.mark.parametrize(
    ("bits", "expected"),
    [
        (0, []),
        (
            0x50005,
            ["under-voltage", "currently throttled", "under-voltage has occurred", "throttling has occurred"],
        ),
        (0x80000, ["soft temperature limit has occurred"]),
        (0x2, ["arm frequency capped"]),
        (0x8, ["soft temperature limit active"]),
        (0x20000, ["arm frequency capping has occurred"]),
        (0x20, ["unknown flag bit 5"]),
    ],
)
def test_describe_throttled(bits: int, expected: list[str]) -> None:
    assert describe_throttled(bits) == expected


def test_describe_throttled_names_all_eight_documented_flags() -> None:
    words = describe_throttled(0xF000F)
    assert len(words) == len(set(words)) == 8
    assert not any(word.startswith("unknown") for word in words)


def _times(**values: float) -> SimpleNamespace:
    fields = dict.fromkeys(("user", "nice", "system", "idle", "iowait", "irq", "softirq", "steal"), 0.0)
    fields.update(values)
    return SimpleNamespace(**fields, guest=999.0, guest_nice=999.0)


def test_cpu_busy_and_total_counts_iowait_as_idle_and_ignores_guest() -> None:
    busy, total = cpu_busy_and_total(_times(user=10, system=5, idle=80, iowait=5, irq=1, softirq=1, steal=2))
    assert (busy, total) == (19, 104)


@pytest.mark.parametrize(
    ("previous", "current", "expected"),
    [
        ((0.0, 0.0), (25.0, 100.0), 25.0),  # the first sample: since boot
        ((25.0, 100.0), (75.0, 200.0), 50.0),
        ((10.0, 100.0), (10.0, 150.0), 0.0),
        ((10.0, 100.0), (60.0, 150.0), 100.0),
        ((10.0, 100.0), (10.0, 100.0), 0.0),  # no time passed
        ((50.0, 200.0), (10.0, 100.0), 0.0),  # counters went backwards
        ((10.0, 100.0), (80.0, 150.0), 100.0),  # rounding jitter above 100 is clamped
    ],
)
def test_cpu_busy_percent(
    previous: tuple[float, float], current: tuple[float, float], expected: float
) -> None:
    assert cpu_busy_percent(previous, current) == pytest.approx(expected)


PI_MEMINFO = """\
MemTotal:         945364 kB
MemFree:          301244 kB
MemAvailable:     676408 kB
Buffers:           34104 kB
Cached:           396128 kB
SwapCached:            0 kB
SwapTotal:        102396 kB
SwapFree:         102396 kB
HugePages_Total:       0
"""


def test_parse_meminfo_converts_kib_to_bytes() -> None:
    info = parse_meminfo(PI_MEMINFO + "garbage line\nBroken:   x kB\n")
    assert info["MemTotal"] == 945364 * 1024
    assert info["MemAvailable"] == 676408 * 1024
    assert info["SwapFree"] == 102396 * 1024
    assert info["HugePages_Total"] == 0
    assert "Broken" not in info


def _zone(sys_root: Path, number: int, zone_type: str | None, temp: str | None) -> Path:
    path = sys_root / "class" / "thermal" / f"thermal_zone{number}"
    path.mkdir(parents=True)
    if zone_type is not None:
        (path / "type").write_text(zone_type + "\n")
    if temp is not None:
        (path / "temp").write_text(temp + "\n")
    return path


def test_read_thermal_zones_from_a_sysfs_tree(tmp_path: Path) -> None:
    _zone(tmp_path, 0, "cpu-thermal", "48686")
    _zone(tmp_path, 10, "iwlwifi_1", None)  # sensor absent while the interface is down
    _zone(tmp_path, 2, "x86_pkg_temp", "-5000")
    _zone(tmp_path, 3, None, "51000")
    _zone(tmp_path, 4, "acpitz", "not a number")
    readings = read_thermal_zones(tmp_path)
    assert [(t.zone, t.type, t.celsius) for t in readings] == [
        ("thermal_zone0", "cpu-thermal", pytest.approx(48.686)),
        ("thermal_zone2", "x86_pkg_temp", pytest.approx(-5.0)),
        ("thermal_zone3", "", pytest.approx(51.0)),
    ]
    assert [zone.zone for zone in discover_thermal_zones(tmp_path)] == [
        "thermal_zone0",
        "thermal_zone2",
        "thermal_zone3",
        "thermal_zone4",
        "thermal_zone10",
    ]


def test_read_thermal_zones_without_thermal_class(tmp_path: Path) -> None:
    assert read_thermal_zones(tmp_path) == []
    assert read_thermal_zones(tmp_path / "missing") == []


def test_sampler_rereads_temperatures_but_not_the_zone_list(tmp_path: Path) -> None:
    zone = _zone(tmp_path, 0, "cpu-thermal", "48686")
    with MetricsSampler(sys_root=tmp_path, vcgencmd="/nonexistent/vcgencmd") as sampler:
        first = sampler.sample()
        (zone / "temp").write_text("61234\n")
        _zone(tmp_path, 1, "gpu-thermal", "40000")  # a zone appearing later waits for the refresh
        second = sampler.sample()
    assert [(t.zone, t.type, t.celsius) for t in first.temperatures] == [
        ("thermal_zone0", "cpu-thermal", pytest.approx(48.686))
    ]
    assert [(t.zone, t.celsius) for t in second.temperatures] == [("thermal_zone0", pytest.approx(61.234))]


def _program(path: Path, body: str) -> str:
    path.write_text(f"#!{sys.executable}\n{body}\n")
    path.chmod(0o755)
    return str(path)


def test_sampler_reads_throttling_from_vcgencmd(tmp_path: Path) -> None:
    argv_log = tmp_path / "argv"
    vcgencmd = _program(
        tmp_path / "vcgencmd",
        f"import sys; open({str(argv_log)!r}, 'w').write(' '.join(sys.argv[1:])); print('throttled=0x50005')",
    )
    with MetricsSampler(sys_root=tmp_path, vcgencmd=vcgencmd) as sampler:
        sample = sampler.sample()
    assert sample.throttled_available is True
    assert sample.throttled == 0x50005
    assert argv_log.read_text() == "get_throttled"


def test_sampler_reports_throttling_unavailable_when_vcgencmd_fails(tmp_path: Path) -> None:
    failing = _program(
        tmp_path / "vcgencmd", "import sys; print('VCHI initialization failed'); sys.exit(255)"
    )
    for program in (failing, str(tmp_path / "missing-vcgencmd")):
        with MetricsSampler(sys_root=tmp_path, vcgencmd=program) as sampler:
            sample = sampler.sample()
        assert sample.throttled_available is False
        assert sample.throttled == 0


@pytest.mark.skipif(shutil.which("vcgencmd") is not None, reason="this machine has a real vcgencmd")
def test_sampler_without_vcgencmd_on_path(tmp_path: Path) -> None:
    with MetricsSampler(sys_root=tmp_path) as sampler:
        assert sampler.sample().throttled_available is False


def test_two_samples_on_this_machine() -> None:
    with MetricsSampler() as sampler:
        first = sampler.sample()
        deadline = time.monotonic() + 0.3
        while time.monotonic() < deadline:  # some work, so the interval has busy time in it
            sum(range(10_000))
        second = sampler.sample()

    assert second.timestamp > first.timestamp
    assert first.boot_time == second.boot_time == pytest.approx(psutil.boot_time(), abs=1)
    for sample in (first, second):
        assert 0.0 <= sample.cpu_percent <= 100.0
        assert [cpu.cpu for cpu in sample.cpus] == list(range(psutil.cpu_count()))
        assert all(cpu.idle > 0 for cpu in sample.cpus)
        assert sample.memory_total_bytes == psutil.virtual_memory().total
        assert 0 < sample.memory_available_bytes <= sample.memory_total_bytes
        assert 0 < sample.memory_free_bytes <= sample.memory_total_bytes
        assert sample.swap_total_bytes == psutil.swap_memory().total
        assert sample.swap_free_bytes <= sample.swap_total_bytes
        assert (sample.load1, sample.load5, sample.load15) != (0.0, 0.0, 0.0) or os.getloadavg() == (0, 0, 0)
        assert "lo" not in [nic.device for nic in sample.network]
        filesystems = {fs.mountpoint: fs for fs in sample.filesystems}
        assert "/" in filesystems
        root = filesystems["/"]
        assert 0 < root.avail_bytes <= root.free_bytes <= root.size_bytes
        assert root.size_bytes == psutil.disk_usage("/").total
    # the busy loop above took a whole CPU for most of the interval
    assert second.cpu_percent > 100.0 / psutil.cpu_count() / 4
    cpu_times = {cpu.cpu: cpu for cpu in first.cpus}
    assert all(cpu.user >= cpu_times[cpu.cpu].user for cpu in second.cpus)

    before = {nic.device: nic for nic in first.network}
    after = {nic.device: nic for nic in second.network}
    common = before.keys() & after.keys()  # other processes may add or remove interfaces meanwhile
    assert common
    for device in common:
        nic = after[device]
        assert nic.receive_bytes >= before[device].receive_bytes
        assert nic.transmit_bytes >= before[device].transmit_bytes
        assert nic.receive_packets >= before[device].receive_packets
        assert nic.transmit_packets >= before[device].transmit_packets
    assert any(nic.receive_bytes > 0 for nic in after.values())


def test_sampler_filesystems_match_the_mount_table() -> None:
    with MetricsSampler() as sampler:
        sampled = [(fs.device, fs.mountpoint, fs.fstype) for fs in sampler.sample().filesystems]
    expected = [(part.device, part.mountpoint, part.fstype) for part in list_filesystems()]
    assert sampled == expected


MOUNT_WATCH_SCRIPT = """
import os, subprocess, sys, tempfile
from picoord.agent.metrics import MetricsSampler
target = tempfile.mkdtemp()
try:
    with MetricsSampler() as sampler:
        def mounted():
            return target in [fs.mountpoint for fs in sampler.sample().filesystems]
        seen = [mounted()]
        subprocess.run(["mount", "--bind", "/", target], check=True)
        seen.append(mounted())
        seen.append(mounted())
        subprocess.run(["umount", target], check=True)
        seen.append(mounted())
    print(seen)
finally:
    os.rmdir(target)
"""


@pytest.mark.lab
def test_sampler_notices_mounts_and_unmounts() -> None:
    # In a private mount namespace, so nothing outside this test sees the bind mount. Like the
    # lab tests, this fails rather than skips without root, so such a run cannot look green.
    if os.geteuid() != 0 or shutil.which("unshare") is None:
        pytest.fail("needs root and unshare(1) for a private mount namespace", pytrace=False)
    done = subprocess.run(
        ["unshare", "--mount", "--propagation", "private", sys.executable, "-c", MOUNT_WATCH_SCRIPT],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[False, True, True, False]"


def test_declared_series_on_this_machine() -> None:
    """The hello declares what every sample carries, from this machine's kernel files."""
    from picoord.agent.hardware import collect_hardware
    from picoord.common.node_series import family_of

    hardware = collect_hardware(docker_socket="/nonexistent/docker.sock")
    with MetricsSampler() as sampler:
        first, second = sampler.sample(), sampler.sample()
    declared = [(key.name, tuple(key.label_values)) for key in hardware.series]
    assert len(declared) == len(set(declared)) == len(first.series_values) == len(second.series_values)
    names = {name for name, _ in declared}
    assert {"node_memory_Cached_bytes", "node_context_switches_total", "node_vmstat_pgfault"} <= names
    assert "node_memory_MemTotal_bytes" not in names  # the sample's own field
    assert all(family_of(name) is not None for name in names)  # every one known to the coordinator
    values = dict(zip(declared, second.series_values, strict=True))
    before = dict(zip(declared, first.series_values, strict=True))
    assert values[("node_context_switches_total", ())] >= before[("node_context_switches_total", ())] > 0
    assert values[("process_open_fds", ())] > 0
    assert hardware.uname.sysname == "Linux" and hardware.uname.release == os.uname().release


def test_filesystem_inodes_and_network_link_on_this_machine() -> None:
    with MetricsSampler() as sampler:
        sample = sampler.sample()
    root = {fs.mountpoint: fs for fs in sample.filesystems}["/"]
    stat = os.statvfs("/")
    assert root.files == stat.f_files and root.readonly == bool(stat.f_flag & os.ST_RDONLY)
    assert 0 < root.files_free <= root.files or root.files == 0
    linked = [nic for nic in sample.network if nic.link_known]
    assert linked and all(nic.mtu > 0 for nic in linked)
    assert any(nic.up for nic in linked)

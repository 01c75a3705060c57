"""systemd/picoord-agent.service and systemd/picoord-coordinator.service: valid, and as intended.

There is no systemd as PID 1 here, so units are checked offline: `systemd-analyze verify
--root=ROOT` against a root holding a copy of this machine's system units (for
network-online.target, multi-user.target, ...) and stand-in executables at the ExecStart
paths, as a Debian package would install them. verify exits 0 on an unknown directive
(it only warns "Unknown key ..., ignoring"), so any output at all counts as a failure,
and a deliberately broken copy proves that the check catches it.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from picoord.agent.state import ENROLLMENT_FILE
from picoord.common import defaults
from picoord.common.joining import FIRST_BOOT_DIRS, FIRST_BOOT_FILE_NAME
from tests.systemd_verify import make_unit_root, verify

REPO_ROOT = Path(__file__).resolve().parent.parent
UNITS_DIR = REPO_ROOT / "systemd"
AGENT_UNIT = "picoord-agent.service"
COORDINATOR_UNIT = "picoord-coordinator.service"
FIRST_BOOT_UNITS = ("picoord-agent-first-boot.path", "picoord-agent-first-boot.service")
EXECUTABLES = ("/usr/bin/picoord-agent", "/usr/bin/picoord-coordinator", "/bin/systemctl")
# Each daemon's watch on what only the operator can fix (the exit-78 faults).
CONFIG_PATHS = {AGENT_UNIT: "picoord-agent-config.path", COORDINATOR_UNIT: "picoord-coordinator-config.path"}
# systemd-analyze security: 0 (locked down) .. 10 (unsafe). Measured: coordinator 1.4, agent
# 8.1 (root with mounts, netfilter and dockerd as its job), Debian's node exporter 9.2.
MAX_COORDINATOR_EXPOSURE = 2.0
MAX_AGENT_EXPOSURE = 8.5
NODE_EXPORTER_UNIT = Path("/usr/lib/systemd/system/prometheus-node-exporter.service")
# System-call groups the agent's helpers need (mount helpers, iptables' modprobe, kubeadm,
# swapoff for kubelet): its filter may deny others, never these.
AGENT_NEEDED_SYSCALL_GROUPS = {"@mount", "@module", "@privileged", "@swap", "@system-service", "@raw-io"}

# Options that give a service its own mount namespace (its mounts would then never reach
# the host or dockerd), restrict devices (/dev/fuse for glusterfs), kernel tunables,
# modules or capabilities, or are inherited by every helper the agent runs.
AGENT_FORBIDDEN = {
    "BindPaths",
    "BindReadOnlyPaths",
    "CapabilityBoundingSet",
    "DeviceAllow",
    "DevicePolicy",
    "DynamicUser",
    "ExecPaths",
    "Group",
    "InaccessiblePaths",
    "MountFlags",
    "NoExecPaths",
    "NoNewPrivileges",
    "PrivateDevices",
    "PrivateMounts",
    "PrivateNetwork",
    "PrivateTmp",
    "PrivateUsers",
    "ProcSubset",
    "ProtectClock",
    "ProtectControlGroups",
    "ProtectHome",
    "ProtectHostname",
    "ProtectKernelLogs",
    "ProtectKernelModules",
    "ProtectKernelTunables",
    "ProtectProc",
    "ProtectSystem",
    "ReadOnlyPaths",
    "ReadWritePaths",
    "RestrictNamespaces",
    "RootDirectory",
    "RootImage",
    "TemporaryFileSystem",
    "User",
}

Unit = dict[str, dict[str, list[str]]]


def parse_unit(text: str) -> Unit:
    """Sections -> key -> every value given (systemd allows repeating a key)."""
    unit: Unit = {}
    section: dict[str, list[str]] | None = None
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("[") and line.endswith("]"):
            section = unit.setdefault(line[1:-1], {})
            continue
        assert section is not None, f"directive outside a section: {line!r}"
        key, separator, value = line.partition("=")
        assert separator, f"not a directive: {line!r}"
        section.setdefault(key.strip(), []).append(value.strip())
    return unit


def words(unit: Unit, section: str, key: str) -> list[str]:
    """All whitespace-separated values of a list-like directive (After=, Wants=, ...)."""
    return [word for value in unit.get(section, {}).get(key, []) for word in value.split()]


def load(name: str) -> Unit:
    """The unit file from systemd/, parsed."""
    return parse_unit((UNITS_DIR / name).read_text())


@pytest.fixture(scope="module")
def unit_root(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """A root for `systemd-analyze verify --root`: the system units, stand-in picoord binaries."""
    root = tmp_path_factory.mktemp("unit-root")
    try:
        make_unit_root(root, EXECUTABLES)
        # picoord's own units as the packages install them, for the ones that name each other.
        for unit in UNITS_DIR.iterdir():
            shutil.copy(unit, root / "usr" / "lib" / "systemd" / "system" / unit.name)
        yield root
    finally:
        shutil.rmtree(root, ignore_errors=True)


@pytest.mark.parametrize("name", [AGENT_UNIT, COORDINATOR_UNIT, *FIRST_BOOT_UNITS])
def test_unit_verifies_without_any_warning(unit_root: Path, name: str) -> None:
    """`systemd-analyze verify` accepts the unit as shipped, silently."""
    code, output = verify(unit_root, name, (UNITS_DIR / name).read_text())
    assert code == 0 and not output, f"systemd-analyze verify {name} ({code}):\n" + "\n".join(output)


@pytest.mark.parametrize("name", [AGENT_UNIT, COORDINATOR_UNIT])
@pytest.mark.parametrize(
    ("breakage", "expected"),
    [
        (("Restart=", "Restrat="), "Unknown key 'Restrat'"),  # a typo'd directive
        (("Restart=", "Restart=sometimes\n#"), "restart specifier"),  # an invalid value
        (("ExecStart=/usr/bin/picoord-", "ExecStart=/usr/bin/picoord-typo-"), "is not executable"),
        (("[Service]", "[Servcie]"), "Unknown section 'Servcie'"),
    ],
    ids=["typo-directive", "bad-value", "missing-executable", "typo-section"],
)
def test_verify_catches_a_broken_copy(
    unit_root: Path, name: str, breakage: tuple[str, str], expected: str
) -> None:
    """The verify check above is not vacuous: each kind of mistake is reported."""
    original = (UNITS_DIR / name).read_text()
    old, new = breakage
    assert f"\n{old}" in original
    broken = original.replace(f"\n{old}", f"\n{new}", 1)

    code, output = verify(unit_root, name, broken)

    assert code != 0 or output, f"verify accepted a broken {name}"
    assert any(expected in line for line in output), output


@pytest.mark.parametrize(
    ("service", "watched"),
    [
        (AGENT_UNIT, [defaults.AGENT_CONFIG]),
        (
            COORDINATOR_UNIT,
            [
                defaults.COORDINATOR_CONFIG,
                defaults.COORDINATOR_STATE_DIR / "ca.key",
                defaults.COORDINATOR_STATE_DIR / "ca.crt",
            ],
        ),
    ],
)
def test_a_file_put_right_starts_the_failed_daemon_again(
    unit_root: Path, service: str, watched: list[Path]
) -> None:
    """A daemon that stopped with 78 (not restarted by systemd) has a path unit watching the
    files behind those faults; it comes and goes with its daemon (no [Install] of its own)."""
    name = CONFIG_PATHS[service]
    code, output = verify(unit_root, name, (UNITS_DIR / name).read_text())
    assert code == 0 and not output, f"systemd-analyze verify {name} ({code}):\n" + "\n".join(output)
    unit = load(name)

    assert unit["Path"]["Unit"] == [service]
    assert [Path(p) for p in unit["Path"]["PathChanged"]] == watched
    assert unit["Unit"]["PartOf"] == [service], "an operator's `systemctl stop` stops the watch too"
    assert name in words(load(service), "Unit", "Wants")
    assert "Install" not in unit


def test_agent_unit_runs_picoord_agent_forever_as_root() -> None:
    """`picoord-agent run`, restarted forever, as root with nothing that would confine its mounts."""
    unit = load(AGENT_UNIT)
    service = unit["Service"]

    assert service["ExecStart"] == ["/usr/bin/picoord-agent run --wait-for-join"]
    assert service["Type"] == ["notify"], "the agent sends READY=1 (common/sd_notify.py)"
    assert service["WatchdogSec"] and service["WatchdogSec"] != ["0"]
    assert service["Restart"] == ["on-failure"], "watchdog timeouts are failures too"
    assert service["RestartPreventExitStatus"] == ["78"], "a bad config is not fixed by restarting"
    assert service["RestartSec"] and service["RestartSec"] != ["0"]
    assert unit["Unit"]["StartLimitIntervalSec"] == ["0"], "the agent must never give up restarting"
    assert service["EnvironmentFile"] == ["-/etc/default/picoord-agent"]
    # Helpers that must outlive a restart (the glusterfs FUSE client behind a mount) survive it.
    assert service["KillMode"] == ["process"]
    forbidden = sorted(AGENT_FORBIDDEN & service.keys())
    assert not forbidden, f"the agent runs as root without namespacing or restrictions: {forbidden}"


def test_agent_confinement_leaves_its_helpers_what_they_need() -> None:
    """Seccomp-only hardening: a deny list sparing mounts, modules and privileged calls; the
    socket families of gRPC, dockerd (unix), netfilter (netlink) and keepalived's gratuitous
    ARP (packet)."""
    service = load(AGENT_UNIT)["Service"]

    (syscall_filter,) = service["SystemCallFilter"]
    assert syscall_filter.startswith("~"), "an allow list would break the helpers the agent runs"
    assert not AGENT_NEEDED_SYSCALL_GROUPS & set(syscall_filter[1:].split())
    assert set(words(load(AGENT_UNIT), "Service", "RestrictAddressFamilies")) == {
        "AF_UNIX",
        "AF_INET",
        "AF_INET6",
        "AF_NETLINK",
        "AF_PACKET",
    }
    assert service["SystemCallArchitectures"] == ["native"]
    assert service["RestrictSUIDSGID"] == ["yes"]


def test_coordinator_unit_runs_picoord_coordinator_hardened() -> None:
    """`picoord-coordinator`, restarted on failure, locked down, with room for 1000+ sessions."""
    unit = load(COORDINATOR_UNIT)
    service = unit["Service"]

    assert service["ExecStart"] == ["/usr/bin/picoord-coordinator"]
    assert service["Type"] == ["notify"], "the coordinator sends READY=1 once it serves"
    assert service["WatchdogSec"] and service["WatchdogSec"] != ["0"]
    assert service["Restart"] == ["on-failure"]
    assert service["RestartPreventExitStatus"] == ["78"], "a bad config or CA is not fixed by restarting"
    assert int(service["LimitNOFILE"][0]) >= 4096, "1000+ agent sessions need file descriptors"
    assert service["NoNewPrivileges"] == ["yes"]
    assert service["CapabilityBoundingSet"] == [""], "no capabilities at all"
    assert service["ProtectSystem"] == ["strict"]
    assert service["ProtectHome"] == ["yes"]
    assert service["PrivateTmp"] == ["yes"]
    assert service["PrivateDevices"] == ["yes"]
    assert service["SystemCallFilter"][0] == "@system-service"
    assert sorted(words(unit, "Service", "RestrictAddressFamilies")) == ["AF_INET", "AF_INET6", "AF_UNIX"]


def test_units_match_the_default_paths_and_do_not_clash() -> None:
    """State and runtime directories are picoord's defaults, and both daemons can share a desktop."""
    agent, coordinator = load(AGENT_UNIT)["Service"], load(COORDINATOR_UNIT)["Service"]

    assert Path("/var/lib", *coordinator["StateDirectory"]) == defaults.COORDINATOR_STATE_DIR
    assert Path("/var/lib", *agent["StateDirectory"]) == defaults.AGENT_STATE_DIR
    assert Path("/run", *coordinator["RuntimeDirectory"]) == defaults.ADMIN_SOCKET.parent
    assert coordinator["RuntimeDirectoryMode"] == ["0700"], "the admin socket is root-only"
    # A unit removes its RuntimeDirectory when it stops: only the coordinator may claim
    # /run/picoord, or stopping the desktop's agent would delete the admin socket.
    assert "RuntimeDirectory" not in agent
    # Both run as root and agree on the mode, so neither re-owns or re-modes the other's state.
    assert "User" not in coordinator and "DynamicUser" not in coordinator
    assert agent["StateDirectoryMode"] == coordinator["StateDirectoryMode"] == ["0700"]


def test_first_boot_units_watch_the_agents_own_first_boot_files() -> None:
    """The path unit watches exactly where the agent looks (common/joining.py), and what it
    starts only enables the agent of a node not enrolled yet."""
    watched = load("picoord-agent-first-boot.path")["Path"]
    expected = [str(directory / FIRST_BOOT_FILE_NAME) for directory in FIRST_BOOT_DIRS]
    assert watched["PathExists"] == expected
    assert watched["Unit"] == ["picoord-agent-first-boot.service"]
    service = load("picoord-agent-first-boot.service")
    enrolled = defaults.AGENT_STATE_DIR / ENROLLMENT_FILE
    assert service["Unit"]["ConditionPathExists"] == [f"!{enrolled}"]
    assert service["Service"]["ExecStart"] == [f"/bin/systemctl enable --now {AGENT_UNIT}"]


@pytest.mark.parametrize("name", [AGENT_UNIT, COORDINATOR_UNIT])
def test_units_wait_for_the_network_and_start_at_boot(name: str) -> None:
    """Both start at boot, once the network is up."""
    unit = load(name)

    assert "network-online.target" in words(unit, "Unit", "After")
    assert "network-online.target" in words(unit, "Unit", "Wants")
    assert words(unit, "Install", "WantedBy") == ["multi-user.target"]


def exposure(unit_root: Path, unit_file: Path) -> float:
    """`systemd-analyze security --offline`'s overall exposure for a unit file (0 best, 10 worst)."""
    path = unit_root / "etc" / "systemd" / "system" / unit_file.name
    shutil.copy(unit_file, path)
    try:
        done = subprocess.run(
            ["systemd-analyze", "security", "--offline=yes", f"--root={unit_root}", "--no-pager", str(path)],
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )
    finally:
        path.unlink()
    match = re.search(r"Overall exposure level for \S+: (\d+\.\d+)", done.stdout)
    assert match, f"no exposure level in:\n{done.stdout}{done.stderr}"
    return float(match.group(1))


def test_exposure_beside_debians_node_exporter(unit_root: Path, record_property: Callable) -> None:
    """`systemd-analyze security`, in one run: the coordinator is locked down (OK), the agent,
    root by design, still less exposed than Debian's own prometheus-node-exporter.service."""
    if not NODE_EXPORTER_UNIT.is_file():
        pytest.fail(
            "prometheus-node-exporter is missing: apt-get install prometheus-node-exporter", pytrace=False
        )
    figures = {
        COORDINATOR_UNIT: exposure(unit_root, UNITS_DIR / COORDINATOR_UNIT),
        AGENT_UNIT: exposure(unit_root, UNITS_DIR / AGENT_UNIT),
        NODE_EXPORTER_UNIT.name: exposure(unit_root, NODE_EXPORTER_UNIT),
    }
    record_property("systemd_analyze_security", figures)
    print(f"systemd-analyze security: {figures}")
    assert figures[COORDINATOR_UNIT] <= MAX_COORDINATOR_EXPOSURE, figures
    assert figures[AGENT_UNIT] <= MAX_AGENT_EXPOSURE, figures
    assert figures[AGENT_UNIT] < figures[NODE_EXPORTER_UNIT.name], figures

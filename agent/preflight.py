"""`picoord-agent check`: what this node lacks to run workloads and actions, with the fix.

A pure table (`evaluate`) over facts the thin probes below gather. Required (the exit status
is 1 without them): dockerd answering on the agent's socket and the cgroup memory controller
(without it dockerd cannot enforce a replica's memory limit, and a 1 GB Pi is overcommitted).
For actions only (reported, exit status unchanged): the GlusterFS client (glusterfs
mounts), ufw or nft (firewall policies), and time sync (certificates and the clock offsets
the coordinator reports depend on it).
"""

from __future__ import annotations

import os
import shutil
import subprocess
from dataclasses import asdict, dataclass
from pathlib import Path

SYSTEM_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
PROBE_TIMEOUT = 5.0
TIME_SERVICES = ("systemd-timesyncd", "chrony", "chronyd", "ntpsec", "ntp", "openntpd")
PI_CMDLINE = ("/boot/firmware/cmdline.txt", "/boot/cmdline.txt")


@dataclass(frozen=True)
class NodeFacts:
    docker_socket: str
    docker_answer: str | None  # None: dockerd answered /_ping; else why not
    cgroup_memory: bool | None  # None: neither cgroup.controllers nor /proc/cgroups readable
    cmdline_txt: str | None  # the Pi's cmdline.txt, where the cgroup fix goes, if there is one
    mount_glusterfs: bool
    ufw: bool
    nft: bool
    ntp_synchronized: bool | None  # timedatectl's NTPSynchronized; None: no timedatectl answer
    time_service: str | None  # an active time-sync service, if any


@dataclass(frozen=True)
class Check:
    name: str
    ok: bool
    required: bool
    detail: str
    fix: str  # empty when ok


def evaluate(facts: NodeFacts) -> list[Check]:
    """Pure: the checks, in the order a node is set up."""
    checks = []
    if facts.docker_answer is None:
        checks.append(Check("dockerd", True, True, f"answers on {facts.docker_socket}", ""))
    else:
        checks.append(
            Check(
                "dockerd",
                False,
                True,
                f"not reachable on {facts.docker_socket}: {facts.docker_answer}",
                "apt install docker.io && systemctl enable --now docker "
                "(or set docker_socket in /etc/picoord/agent.toml)",
            )
        )
    cmdline = facts.cmdline_txt or "/boot/firmware/cmdline.txt"
    if facts.cgroup_memory:
        checks.append(Check("cgroup memory", True, True, "memory controller enabled", ""))
    else:
        seen = "cannot read /sys/fs/cgroup or /proc/cgroups" if facts.cgroup_memory is None else "disabled"
        checks.append(
            Check(
                "cgroup memory",
                False,
                True,
                f"memory controller {seen}: replicas' memory limits cannot be enforced",
                f"append cgroup_enable=memory cgroup_memory=1 to the one line of {cmdline}, then reboot",
            )
        )
    checks.append(
        Check("gluster client", True, False, "mount.glusterfs found", "")
        if facts.mount_glusterfs
        else Check(
            "gluster client",
            False,
            False,
            "mount.glusterfs not found: glusterfs mounts fail here",
            "apt install glusterfs-client",
        )
    )
    tools = [name for name, present in (("ufw", facts.ufw), ("nft", facts.nft)) if present]
    checks.append(
        Check("firewall", True, False, f"{' and '.join(tools)} found", "")
        if tools
        else Check(
            "firewall",
            False,
            False,
            "neither ufw nor nft found: firewall policies fail here",
            "apt install ufw (or nftables)",
        )
    )
    if facts.ntp_synchronized:
        checks.append(Check("time sync", True, False, "clock synchronized (timedatectl)", ""))
    elif facts.time_service:
        checks.append(
            Check(
                "time sync",
                True,
                False,
                f"{facts.time_service} is running; not synchronized yet",
                "",
            )
        )
    else:
        checks.append(
            Check(
                "time sync",
                False,
                False,
                "no time sync running: a Pi has no real-time clock, and certificates need the date",
                "apt install systemd-timesyncd (or chrony); timedatectl set-ntp true",
            )
        )
    return checks


def exit_status(checks: list[Check]) -> int:
    return 1 if any(check.required and not check.ok for check in checks) else 0


def render(checks: list[Check]) -> str:
    """One line per check, then the fix under each that failed."""
    lines = []
    for check in checks:
        mark = "ok" if check.ok else ("MISSING" if check.required else "missing")
        lines.append(f"{mark:<8} {check.name:<15} {check.detail}")
        if check.fix:
            lines.append(f"{'':<8} {'':<15} fix: {check.fix}")
    failed = [check.name for check in checks if check.required and not check.ok]
    lines.append(f"not ready for workloads: {', '.join(failed)}" if failed else "ready for workloads")
    return "\n".join(lines)


def as_dicts(checks: list[Check]) -> list[dict[str, object]]:
    return [asdict(check) for check in checks]


# The probes: thin, each bounded.


def cgroup_memory_enabled(controllers: str | None, proc_cgroups: str | None) -> bool | None:
    """Pure: cgroup v2's cgroup.controllers lists `memory`; v1's /proc/cgroups has it enabled."""
    if controllers is not None:
        return "memory" in controllers.split()
    if proc_cgroups is not None:
        for line in proc_cgroups.splitlines():
            fields = line.split()
            if len(fields) >= 4 and fields[0] == "memory":
                return fields[3] == "1"
        return False
    return None


def _read(path: str) -> str | None:
    try:
        return Path(path).read_text()
    except OSError:
        return None


def _which(name: str) -> bool:
    return shutil.which(name, path=SYSTEM_PATH) is not None


def _run(argv: list[str]) -> str | None:
    """stdout of argv, or None if it cannot run or fails."""
    try:
        done = subprocess.run(
            argv,
            capture_output=True,
            text=True,
            timeout=PROBE_TIMEOUT,
            check=False,
            env={"PATH": SYSTEM_PATH, "LANG": "C"},
        )
    except (OSError, subprocess.TimeoutExpired):
        return None
    return done.stdout if done.returncode == 0 else None


def _docker_answer(socket_path: str) -> str | None:
    from picoord.agent.docker_api import DockerAPI, explain

    if not os.path.exists(socket_path):
        return "no such socket (dockerd not installed or not running)"
    try:
        return (
            None
            if DockerAPI(socket_path, timeout=PROBE_TIMEOUT, negotiate=False).ping()
            else "no OK to /_ping"
        )
    except Exception as error:
        return explain(error)


def gather(docker_socket: str) -> NodeFacts:
    synchronized = _run(["timedatectl", "show", "--property=NTPSynchronized", "--value"])
    active = next(
        (
            name
            for name in TIME_SERVICES
            if (_run(["systemctl", "is-active", name]) or "").strip() == "active"
        ),
        None,
    )
    return NodeFacts(
        docker_socket=docker_socket,
        docker_answer=_docker_answer(docker_socket),
        cgroup_memory=cgroup_memory_enabled(
            _read("/sys/fs/cgroup/cgroup.controllers"), _read("/proc/cgroups")
        ),
        cmdline_txt=next((path for path in PI_CMDLINE if os.path.isfile(path)), None),
        mount_glusterfs=_which("mount.glusterfs"),
        ufw=_which("ufw"),
        nft=_which("nft"),
        ntp_synchronized=None if synchronized is None else synchronized.strip() == "yes",
        time_service=active,
    )

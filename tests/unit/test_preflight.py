"""`picoord-agent check` (agent/preflight.py): the check table over a node's facts."""

from __future__ import annotations

import dataclasses

import pytest

from picoord.agent.preflight import NodeFacts, cgroup_memory_enabled, evaluate, exit_status, render

READY = NodeFacts(
    docker_socket="/var/run/docker.sock",
    docker_answer=None,
    cgroup_memory=True,
    cmdline_txt="/boot/firmware/cmdline.txt",
    mount_glusterfs=True,
    ufw=True,
    nft=False,
    ntp_synchronized=True,
    time_service="systemd-timesyncd",
)


def by_name(facts: NodeFacts) -> dict[str, tuple[bool, bool, str, str]]:
    return {check.name: (check.ok, check.required, check.detail, check.fix) for check in evaluate(facts)}


def test_a_ready_node_passes_everything() -> None:
    checks = evaluate(READY)
    assert [check.name for check in checks] == [
        "dockerd",
        "cgroup memory",
        "gluster client",
        "firewall",
        "time sync",
    ]
    assert all(check.ok and not check.fix for check in checks)
    assert exit_status(checks) == 0
    assert render(checks).endswith("ready for workloads")


@pytest.mark.parametrize(
    ("change", "name", "required", "detail", "fix"),
    [
        (
            {"docker_answer": "no such socket (dockerd not installed or not running)"},
            "dockerd",
            True,
            "not reachable on /var/run/docker.sock: no such socket",
            "apt install docker.io",
        ),
        (
            {"cgroup_memory": False},
            "cgroup memory",
            True,
            "memory controller disabled",
            "cgroup_enable=memory",
        ),
        (
            {"cgroup_memory": None, "cmdline_txt": "/boot/cmdline.txt"},
            "cgroup memory",
            True,
            "cannot read",
            "of /boot/cmdline.txt, then reboot",
        ),
        (
            {"mount_glusterfs": False},
            "gluster client",
            False,
            "mount.glusterfs not found",
            "glusterfs-client",
        ),
        ({"ufw": False, "nft": False}, "firewall", False, "neither ufw nor nft", "apt install ufw"),
        (
            {"ntp_synchronized": None, "time_service": None},
            "time sync",
            False,
            "no time sync running",
            "timedatectl set-ntp true",
        ),
    ],
)
def test_each_missing_part_is_named_with_its_fix(
    change: dict[str, object], name: str, required: bool, detail: str, fix: str
) -> None:
    checks = evaluate(dataclasses.replace(READY, **change))
    failed = [check for check in checks if not check.ok]
    assert [check.name for check in failed] == [name]
    assert failed[0].required == required
    assert detail in failed[0].detail and fix in failed[0].fix
    assert exit_status(checks) == (1 if required else 0)
    text = render(checks)
    assert f"fix: {failed[0].fix}" in text
    assert (f"not ready for workloads: {name}" in text) == required


@pytest.mark.parametrize(
    ("change", "detail"),
    [
        ({"ufw": False, "nft": True}, "nft found"),
        ({"ufw": True, "nft": True}, "ufw and nft found"),
        ({"ntp_synchronized": False, "time_service": "chrony"}, "chrony is running; not synchronized yet"),
        ({"ntp_synchronized": None, "time_service": "systemd-timesyncd"}, "systemd-timesyncd is running"),
    ],
)
def test_alternatives_count(change: dict[str, object], detail: str) -> None:
    checks = evaluate(dataclasses.replace(READY, **change))
    assert all(check.ok for check in checks)
    assert any(detail in check.detail for check in checks)


def test_both_required_missing_are_both_named() -> None:
    checks = evaluate(dataclasses.replace(READY, docker_answer="refused", cgroup_memory=False))
    assert exit_status(checks) == 1
    assert render(checks).endswith("not ready for workloads: dockerd, cgroup memory")


V1 = """#subsys_name\thierarchy\tnum_cgroups\tenabled
cpuset\t3\t1\t1
memory\t0\t1\t{}
"""


@pytest.mark.parametrize(
    ("controllers", "proc", "expected"),
    [
        ("cpuset cpu io memory pids\n", None, True),
        ("cpuset cpu io pids\n", V1.format(1), False),  # v2 decides when it is there
        (None, V1.format(1), True),
        (None, V1.format(0), False),  # Raspberry Pi OS's default: cgroup_disable=memory
        (None, "#subsys_name\thierarchy\tnum_cgroups\tenabled\ncpu\t2\t1\t1\n", False),
        (None, None, None),
    ],
)
def test_cgroup_memory_enabled(controllers: str | None, proc: str | None, expected: bool | None) -> None:
    assert cgroup_memory_enabled(controllers, proc) is expected

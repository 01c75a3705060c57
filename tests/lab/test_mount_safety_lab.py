"""Mount safety against the real mount(8), inside a lab Pi's sandbox (its own mount
namespace, /mnt, /srv and /var/lib/docker): system paths are refused as targets and bind
sources, also through symlinks, and a path the node's config allows is mounted."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest

from picoord.common.validation import within
from picoord.lab.sandbox import PiRack, PiSandbox
from picoord.v1 import actions_pb2
from tests.actions.runner import argvs, run_executor

MOUNT = "picoord.agent.actions.mount:mount"
UNMOUNT = "picoord.agent.actions.mount:unmount"
TMPFS, BIND = actions_pb2.MOUNT_TYPE_TMPFS, actions_pb2.MOUNT_TYPE_BIND
STATE_DIR = "/srv/picoord-agent"  # the agent's state dir in these runs (private /srv)
ALLOWED = "/var/lib/docker/picoord-allowed"  # under a system tree, private to the Pi


@pytest.fixture(scope="module")
def pi(module_sandbox_factory: Callable[..., PiRack]) -> PiSandbox:
    return module_sandbox_factory(1).sandbox("pi1")


def run(sb: PiSandbox, kind: str, request: Any, allowed: tuple[str, ...] = ()) -> dict[str, Any]:
    result = run_executor(
        sb, kind, request, dry_run=False, timeout=60, state_dir=STATE_DIR, allow_mount_paths=allowed
    )
    assert not result["error"], result["error"]
    return result


WATCHED = ("/etc", "/mnt", "/srv", "/var/lib/picoord", "/var/lib/docker")


def seen(sb: PiSandbox) -> tuple[list[str], str]:
    """The Pi's mounts on the paths these tests touch (the rest of its table follows the
    host's, where other tests mount things) and /etc's listing: what a refused request
    must leave alone."""
    table = sb.run(["cat", "/proc/self/mountinfo"], check=True).stdout.splitlines()
    mounts = [line for line in table if any(within(line.split(" ")[4], tree) for tree in WATCHED)]
    listing = sb.run(["ls", "-la", "--time-style=full-iso", "/etc"], check=True).stdout
    return mounts, listing


@pytest.mark.parametrize(
    ("setup", "request_", "field", "fragment"),
    [
        (
            [["ln", "-sfn", "/etc", "/mnt/x"]],
            actions_pb2.Mount(type=TMPFS, target="/mnt/x"),
            "target",
            "'/mnt/x' resolves to /etc",
        ),
        (
            [["ln", "-sfn", "/etc", "/mnt/way"]],
            actions_pb2.Mount(type=TMPFS, target="/mnt/way/ufw"),
            "target",
            "goes through the symlink /mnt/way to /etc",
        ),
        (
            [["mkdir", "-p", "/mnt/dst"]],
            actions_pb2.Mount(type=BIND, source="/var/lib/picoord/agent", target="/mnt/dst"),
            "source",
            "bind-mount from under /var/lib/picoord",
        ),
        (
            [["mkdir", "-p", "/mnt/dst", f"{STATE_DIR}/keys"]],
            actions_pb2.Mount(type=BIND, source=f"{STATE_DIR}/keys", target="/mnt/dst"),
            "source",
            f"under {STATE_DIR}",
        ),
        (
            [["mkdir", "-p", "/mnt/dst"], ["ln", "-sfn", "/etc", "/mnt/etc-link"]],
            actions_pb2.Mount(type=BIND, source="/mnt/etc-link", target="/mnt/dst"),
            "source",
            "resolves to /etc",
        ),
        ([], actions_pb2.Mount(type=TMPFS, target=ALLOWED), "target", "allow_mount_paths"),
    ],
    ids=[
        "target-symlink-to-etc",
        "symlink-on-the-way",
        "bind-from-picoord",
        "bind-from-own-state",
        "bind-from-symlink-to-etc",
        "system-path-not-allowed",
    ],
)
def test_system_paths_are_refused_and_left_alone(
    pi: PiSandbox, setup: list[list[str]], request_: actions_pb2.Mount, field: str, fragment: str
) -> None:
    for argv in setup:
        pi.run(argv, check=True)
    try:
        before = seen(pi)
        result = run(pi, MOUNT, request_)
        assert result["outcome"] == "REJECTED", result
        assert result["message"].startswith(f"{field}: ") and fragment in result["message"], result["message"]
        assert result["commands"] == []
        assert seen(pi) == before, "a refused mount changed the Pi's mounts or /etc"
    finally:
        pi.run(["rm", "-f", "/mnt/x", "/mnt/way", "/mnt/etc-link"])


def test_a_path_the_node_allows_is_mounted(pi: PiSandbox) -> None:
    request_ = actions_pb2.Mount(type=TMPFS, target=ALLOWED, options=["size=1m"])
    assert run(pi, MOUNT, request_)["outcome"] == "REJECTED"
    mounted = run(pi, MOUNT, request_, allowed=(ALLOWED,))
    try:
        assert mounted["outcome"] == "SUCCEEDED", mounted
        assert argvs(mounted)[-1] == ["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", ALLOWED]
        found = pi.run(["findmnt", "-n", "-o", "FSTYPE", ALLOWED], check=True).stdout.strip()
        assert found == "tmpfs"
    finally:
        done = run(pi, UNMOUNT, actions_pb2.Unmount(target=ALLOWED), allowed=(ALLOWED,))
        assert done["outcome"] == "SUCCEEDED", done
    assert pi.run(["findmnt", "-n", ALLOWED]).stdout.strip() == ""


def test_a_bind_mount_runs_through_pinned_directories(pi: PiSandbox) -> None:
    pi.run(["mkdir", "-p", "/srv/bind-src", "/mnt/bind-dst"], check=True)
    pi.run(["sh", "-c", "echo hello > /srv/bind-src/file"], check=True)
    request_ = actions_pb2.Mount(type=BIND, source="/srv/bind-src", target="/mnt/bind-dst", options=["ro"])
    mounted = run(pi, MOUNT, request_)
    try:
        assert mounted["outcome"] == "SUCCEEDED", mounted
        assert argvs(mounted) == [
            ["mount", "--bind", "/srv/bind-src", "/mnt/bind-dst"],
            ["mount", "-o", "remount,bind,ro", "/mnt/bind-dst"],
        ]
        assert pi.run(["cat", "/mnt/bind-dst/file"], check=True).stdout == "hello\n"
        assert "ro" in pi.run(["findmnt", "-n", "-o", "OPTIONS", "/mnt/bind-dst"], check=True).stdout.split(
            ","
        )
    finally:
        assert run(pi, UNMOUNT, actions_pb2.Unmount(target="/mnt/bind-dst"))["outcome"] == "SUCCEEDED"

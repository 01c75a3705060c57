"""The one mountinfo reader: the kernel's octal escapes, both ways, and mount points read
from a mountinfo text (the mount executor, the k3s uninstaller and the lab use it)."""

from __future__ import annotations

import pytest

from picoord.common.mountinfo import at_or_below, escape, mount_points, parse_mountinfo, unescape


@pytest.mark.parametrize(
    ("written", "path"),
    [
        ("/mnt/plain", "/mnt/plain"),
        ("/mnt/my\\040disk", "/mnt/my disk"),
        ("/mnt/a\\011tab", "/mnt/a\ttab"),
        ("/mnt/a\\012newline", "/mnt/a\nnewline"),
        ("/mnt/back\\134slash", "/mnt/back\\slash"),
        ("/mnt/\\040\\011\\012\\134", "/mnt/ \t\n\\"),
        ("/mnt/\\134040", "/mnt/\\040"),  # an escaped backslash before digits stays a backslash
    ],
)
def test_octal_escapes(written: str, path: str) -> None:
    assert unescape(written) == path
    assert escape(path) == written


@pytest.mark.parametrize(
    ("text", "points"),
    [
        ("", []),
        ("22 1 8:1 / / rw - ext4 /dev/sda1 rw\n", ["/"]),
        (
            "22 1 8:1 / / rw - ext4 /dev/sda1 rw\n"
            "90 22 0:50 / /mnt/my\\040disk rw shared:7 master:1 - tmpfs tmpfs rw\n"
            "91 22 0:51 / /mnt/a\\011b rw - tmpfs tmpfs rw\n"
            "92 22 0:52 / /srv/x\\134y rw - tmpfs tmpfs rw\n",
            ["/", "/mnt/my disk", "/mnt/a\tb", "/srv/x\\y"],
        ),
        ("not a mountinfo line\n22 1 8:1 / / rw - ext4 /dev/sda1 rw\n", ["/"]),
    ],
)
def test_mount_points(text: str, points: list[str]) -> None:
    assert mount_points(text) == points
    assert [entry.mount_point for entry in parse_mountinfo(text)] == points


@pytest.mark.parametrize(
    ("point", "path", "expected"),
    [
        ("/var/lib/rancher/k3s", "/var/lib/rancher/k3s", True),
        ("/var/lib/rancher/k3s/agent/x", "/var/lib/rancher/k3s", True),
        ("/var/lib/rancher/k3s/agent/x", "/var/lib/rancher/k3s/", True),
        ("/var/lib/rancherx", "/var/lib/rancher", False),
        ("/var/lib", "/var/lib/rancher", False),
        ("/anything", "/", True),
    ],
)
def test_at_or_below(point: str, path: str, expected: bool) -> None:
    assert at_or_below(point, path) is expected

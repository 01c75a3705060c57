"""The one reader of /proc/PID/mountinfo (proc(5)), and the octal escapes it shares with fstab.

The kernel writes a space, tab, newline and backslash in a path as `\\040`, `\\011`,
`\\012` and `\\134` (fstab(5) takes the same), so a path with any of them is one field.
The mount executor, the k3s uninstaller and the lab's sandboxes all read mount points
through here: a reader that knew only `\\040` once missed a mount under a path holding a
tab.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

_OCTAL = re.compile(r"\\([0-7]{3})")
ESCAPED = " \t\n\\"  # what the kernel and fstab write as octal


@dataclass(frozen=True)
class MountEntry:
    """One line of /proc/self/mountinfo (see proc(5))."""

    mount_id: int
    parent_id: int
    device: str  # major:minor
    root: str  # the path inside the file system that is mounted (a bind mount's source)
    mount_point: str
    options: tuple[str, ...]  # per-mount flags: rw, nosuid, relatime, ...
    fstype: str
    source: str
    super_options: tuple[str, ...]


def unescape(text: str) -> str:
    """mountinfo and fstab write space, tab, newline and backslash as \\040, \\011, \\012, \\134."""
    return _OCTAL.sub(lambda match: chr(int(match.group(1), 8)), text)


def escape(text: str) -> str:
    """The inverse of `unescape`, for a path written into fstab."""
    return "".join(f"\\{ord(char):03o}" if char in ESCAPED else char for char in text)


def parse_mountinfo(text: str) -> list[MountEntry]:
    """Every well-formed line, in mount order; a line without the `-` separator is skipped."""
    entries = []
    for line in text.splitlines():
        fields = line.split(" ")
        if len(fields) < 10 or "-" not in fields[6:]:
            continue
        separator = fields.index("-", 6)
        fstype, source, super_options = [*fields[separator + 1 : separator + 4], "", "", ""][:3]
        entries.append(
            MountEntry(
                mount_id=int(fields[0]),
                parent_id=int(fields[1]),
                device=fields[2],
                root=unescape(fields[3]),
                mount_point=unescape(fields[4]),
                options=tuple(fields[5].split(",")),
                fstype=unescape(fstype),
                source=unescape(source),
                super_options=tuple(super_options.split(",")) if super_options else (),
            )
        )
    return entries


def mount_points(text: str) -> list[str]:
    """The mount points of a mountinfo text, unescaped, in mount order."""
    return [entry.mount_point for entry in parse_mountinfo(text)]


def at_or_below(point: str, path: str) -> bool:
    """Whether mount point `point` is `path` or lies below it."""
    return point == path or point.startswith(path.rstrip("/") + "/")

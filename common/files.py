"""Atomic file writes with the final mode from the first byte (keys are never world-readable),
and the owner and mode checks on the files and directories that hold keys."""

from __future__ import annotations

import contextlib
import os
import stat
from pathlib import Path

# Bits that make a directory holding keys unsafe for a daemon: anyone who can write it can
# replace a key or certificate (or rename the directory's entries away).
WRITABLE_BY_OTHERS = 0o022


def write_atomically(path: Path, data: bytes, mode: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, mode)
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.chmod(tmp, mode)  # O_CREAT's mode is filtered by the umask and ignored for an old file
        os.replace(tmp, path)
    except BaseException:  # a full disk: leave the old file, and no partial one beside it
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def sync_directory(path: Path) -> None:
    """Make a rename in `path` durable (a power cut right after must not undo it)."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class UnsafeStateDir(Exception):
    """A state directory (or one above it) that others could change; the message names the
    path and the command that fixes it."""


def mode_refusal(
    path: Path, mode: int, owner: int, me: int, directory: bool, forbidden: int = 0o077
) -> str | None:
    """Why a file or directory holding a private key is refused: someone else owns it, or
    group or others have one of the `forbidden` permission bits. The message names the
    path and the fix."""
    if owner != me:
        return f"{path} belongs to uid {owner}, not to uid {me}: fix with `chown {me} {path}`"
    if stat.S_IMODE(mode) & forbidden:
        wanted = "700" if directory else "600"
        what = "directory" if directory else "file"
        if forbidden & 0o044:
            exposure = "is open to group or others"
        else:
            exposure = "is writable by group or others (anyone could replace the keys in it)"
        return (
            f"{path} {exposure} (mode {stat.S_IMODE(mode):04o}) and holds a private key: "
            f"fix the {what} with `chmod {wanted} {path}`"
        )
    return None


def check_state_dir(path: Path, me: int | None = None) -> None:
    """Refuse to use `path` for keys when it, or a directory above it, could be changed by
    another user: the state dir must belong to this user and not be writable by group or
    others; each directory above must belong to root or this user and not be writable by
    others unless sticky (/tmp). A missing state dir is fine (it is made 0700)."""
    me = os.geteuid() if me is None else me
    path = Path(os.path.abspath(path))
    try:
        info = path.lstat()
    except FileNotFoundError:
        info = None
    if info is not None:
        if stat.S_ISLNK(info.st_mode) or not stat.S_ISDIR(info.st_mode):
            raise UnsafeStateDir(f"{path} is not a directory: move it away (a new one is made, 0700)")
        refusal = mode_refusal(path, info.st_mode, info.st_uid, me, True, WRITABLE_BY_OTHERS)
        if refusal:
            raise UnsafeStateDir(refusal)
    for parent in path.parents:
        try:
            info = parent.stat()
        except FileNotFoundError:
            continue
        if info.st_uid not in (0, me):
            raise UnsafeStateDir(
                f"{parent}, above the state directory {path}, belongs to uid {info.st_uid}: "
                f"that user could replace the keys; fix with `chown root {parent}`"
            )
        if stat.S_IMODE(info.st_mode) & WRITABLE_BY_OTHERS and not info.st_mode & stat.S_ISVTX:
            raise UnsafeStateDir(
                f"{parent}, above the state directory {path}, is writable by group or others "
                f"(mode {stat.S_IMODE(info.st_mode):04o}): anyone could replace the keys; "
                f"fix with `chmod go-w {parent}`"
            )

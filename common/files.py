"""Atomic file writes with the final mode from the first byte (keys are never world-readable)."""

from __future__ import annotations

import contextlib
import os
from pathlib import Path


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

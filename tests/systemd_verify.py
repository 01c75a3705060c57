"""`systemd-analyze verify` without systemd running: units are checked inside a root that
holds a copy of the system's units (and any stand-in executables a unit names)."""

from __future__ import annotations

import shutil
import subprocess
from collections.abc import Iterable
from pathlib import Path

import pytest

SYSTEM_UNITS = Path("/usr/lib/systemd/system")


def make_unit_root(root: Path, executables: Iterable[str] = ()) -> Path:
    """Fill `root` for `verify --root`: the system units, stand-ins at the given paths."""
    if not shutil.which("systemd-analyze"):
        pytest.fail("systemd-analyze is missing: apt-get install systemd", pytrace=False)
    shutil.copytree(SYSTEM_UNITS, root / SYSTEM_UNITS.relative_to("/"), symlinks=True)
    for executable in executables:
        stand_in = root / executable.lstrip("/")
        stand_in.parent.mkdir(parents=True, exist_ok=True)
        stand_in.write_text("#!/bin/sh\nexit 0\n")
        stand_in.chmod(0o755)
    (root / "etc" / "systemd" / "system").mkdir(parents=True)
    return root


def verify(root: Path, name: str, text: str) -> tuple[int, list[str]]:
    """Install `text` as /etc/systemd/system/NAME in `root` and verify it: (exit code, output lines)."""
    path = root / "etc" / "systemd" / "system" / name
    path.write_text(text)
    try:
        done = subprocess.run(
            ["systemd-analyze", "verify", f"--root={root}", "--man=no", "--recursive-errors=no", str(path)],
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )
    finally:
        path.unlink()
    return done.returncode, [line for line in (done.stdout + done.stderr).splitlines() if line.strip()]

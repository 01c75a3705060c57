"""Reading /etc/picoord/*.toml the same way in both daemons: a mistake is one line naming
the file, the line or setting, and the fix, and the daemon exits with EXIT_CONFIG so that
systemd does not restart it in a loop over a file only the operator can fix."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path


class ConfigFileError(ValueError):
    """A config file (or flag) a restart cannot fix; the message names it and the fix."""


def fix_hint(path: Path, service: str) -> str:
    """What to do about a bad setting in `path`: the packaged file lists every setting with
    its default, commented out."""
    return (
        f"fix it in {path} (every setting is described there, as packaged; "
        f"`{service} --help` lists the flags); under systemd, saving the fixed file starts "
        f"{service} again (else: systemctl restart {service})"
    )


def setting_line(text: str, key: str) -> int | None:
    """The line (from 1) where `key = ...` is set, for messages; None if it cannot be found."""
    pattern = re.compile(rf"^\s*[\"']?{re.escape(key)}[\"']?\s*=")
    for number, line in enumerate(text.splitlines(), 1):
        if pattern.match(line):
            return number
    return None


def where(path: Path, text: str, key: str) -> str:
    """`PATH line N` for the setting `key`, or just PATH when its line is not found."""
    line = setting_line(text, key)
    return f"{path} line {line}" if line else str(path)


def read_settings(path: Path, required: bool, service: str) -> tuple[dict[str, object], str]:
    """The top-level settings of a TOML file and its text (for line numbers): {} when the
    file is missing and not required. Syntax errors name the line (tomllib does)."""
    if not path.exists():
        if required:
            raise ConfigFileError(f"config file {path} does not exist")
        return {}, ""
    try:
        text = path.read_text()
    except (OSError, UnicodeDecodeError) as error:
        raise ConfigFileError(f"cannot read {path}: {error}") from None
    try:
        return tomllib.loads(text), text
    except tomllib.TOMLDecodeError as error:
        hint = fix_hint(path, service)
        raise ConfigFileError(f"{path}: cannot read it as TOML ({error}): {hint}") from None

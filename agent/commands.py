"""Running external programs the only way the agent allows: an argv list, no shell, a timeout.

Every probe (nvidia-smi, vcgencmd) and every action executor goes through
`run_command`, so the rules live in one place: no string is ever split or
interpreted by a shell, a hung program is killed, and output is bounded.
"""

from __future__ import annotations

import shutil
import subprocess
from collections.abc import Sequence
from dataclasses import dataclass

OUTPUT_TAIL_BYTES = 8192


@dataclass(frozen=True)
class CommandResult:
    argv: tuple[str, ...]
    exit_code: int  # -1 when the program could not be started or timed out
    stdout: str
    stderr: str
    timed_out: bool = False

    @property
    def ok(self) -> bool:
        return self.exit_code == 0 and not self.timed_out


def _tail(data: bytes | str | None) -> str:
    if not data:
        return ""
    if isinstance(data, bytes):
        data = data.decode(errors="replace")
    return data[-OUTPUT_TAIL_BYTES:]


def run_command(
    argv: Sequence[str], timeout: float, env: dict[str, str] | None = None, input_text: str | None = None
) -> CommandResult:
    """`input_text`: what the program reads on stdin (e.g. an `nft -f -` script); else none."""
    if isinstance(argv, str) or not argv or not all(isinstance(part, str) for part in argv):
        raise TypeError("run_command takes a non-empty list of strings, never a shell string")
    command = tuple(argv)
    try:
        stdin = {"input": input_text.encode()} if input_text is not None else {"stdin": subprocess.DEVNULL}
        done = subprocess.run(command, capture_output=True, timeout=timeout, check=False, env=env, **stdin)
    except FileNotFoundError as error:
        return CommandResult(command, -1, "", str(error))
    except subprocess.TimeoutExpired as error:
        return CommandResult(command, -1, _tail(error.stdout), _tail(error.stderr), timed_out=True)
    return CommandResult(command, done.returncode, _tail(done.stdout), _tail(done.stderr))


def program_available(name: str) -> bool:
    return shutil.which(name) is not None

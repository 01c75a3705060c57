"""First boot: join from a file on the boot partition, once, then delete it.

A freshly flashed Pi gets `picoord-join.toml` (from `coordctl token create --first-boot`)
on its boot partition, as Raspberry Pi Imager's and cloud-init's first-run files are
placed. The agent, not yet enrolled, finds it at start (and while it waits for a join),
joins with it and deletes it: the token is a secret on a partition any computer can read.

What happens to the file after an attempt is decided here (docs/join.md):
- joined, or the node is enrolled already: deleted;
- the file is malformed, or the coordinator refused it (bad or used-up token, CA hash
  mismatch, name taken): deleted; the error stays in the journal, the token never does.
  Only a new file can fix these, and the secret should not stay on the card;
- the coordinator out of reach, busy or throttling, or the clock not yet set (a Pi has no
  real-time clock until NTP answers): kept and tried again with backoff, since a rack often
  boots before the desktop does, or before the network is up.

The join runs in a child process (`picoord-agent first-boot`): the long-running agent
never loads `cryptography` (about 10 MiB on a 1 GB Pi).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import sys
from dataclasses import dataclass
from pathlib import Path

import structlog

from picoord.agent.errors import JoinError
from picoord.common.joining import InvalidJoinFile

log = structlog.get_logger("picoord.agent.first_boot")

EXIT_JOINED = 0
EXIT_REFUSED = 1
EXIT_INVALID = 2
EXIT_RETRY = 75  # sysexits.h EX_TEMPFAIL: try again later
ATTEMPT_TIMEOUT = 120.0  # pin (10 s) + enroll (30 s), with room for a slow Pi
RETRY_FIRST = 5.0
RETRY_MAX = 300.0


@dataclass(frozen=True)
class Disposition:
    """What an attempt's outcome means for the file and the exit status."""

    delete: bool
    exit_status: int
    level: str  # the log level it is reported at
    message: str


def disposition(path: Path, outcome: BaseException | str | None) -> Disposition:
    """Pure: the outcome of reading and joining with `path` -> what to do. `outcome` is None
    (joined), "enrolled" (already enrolled: the file was not used), or the error."""
    if outcome is None:
        return Disposition(True, EXIT_JOINED, "info", f"joined with {path}; deleted it")
    if outcome == "enrolled":
        return Disposition(
            True,
            EXIT_JOINED,
            "warning",
            f"this node is enrolled already: {path} deleted unused (to join again: "
            "coordctl node remove NODE, then picoord-agent join --force)",
        )
    if isinstance(outcome, InvalidJoinFile):
        return Disposition(
            True, EXIT_INVALID, "error", f"{path} is not a usable first-boot file: {outcome}; deleted it"
        )
    if isinstance(outcome, JoinError) and outcome.transient:
        return Disposition(
            False, EXIT_RETRY, "warning", f"first-boot join not done yet, {outcome}; {path} kept, retrying"
        )
    if isinstance(outcome, OSError):  # the card unreadable or the state disk full, for now
        return Disposition(
            False, EXIT_RETRY, "warning", f"first-boot join with {path} not done: {outcome}; kept, retrying"
        )
    return Disposition(
        True,
        EXIT_REFUSED,
        "error",
        f"first-boot join with {path} failed: {outcome}; deleted it (make a new one with "
        "coordctl token create --first-boot)",
    )


def next_retry_delay(previous: float | None) -> float:
    """Backoff between attempts with a kept file: 5 s, doubling, at most 5 minutes."""
    return RETRY_FIRST if previous is None else min(RETRY_MAX, previous * 2)


def finish(path: Path, decided: Disposition) -> int:
    """Report the outcome and delete the file if decided; a file that cannot be deleted
    is reported (it holds a token) without changing the outcome."""
    getattr(log, decided.level)("first-boot join", detail=decided.message)
    if decided.delete:
        try:
            path.unlink(missing_ok=True)
        except OSError as error:
            log.error(
                "cannot delete the first-boot file: delete it by hand, it holds a token",
                file=str(path),
                error=str(error),
            )
    return decided.exit_status


# The running agent's side: the child process and its answer.


def _child_argv(path: Path, state_dir: Path, config: Path | None, log_level: str | None) -> list[str]:
    """`picoord-agent first-boot` under this interpreter, finding picoord where this process
    found it (the package's private tree, or a virtualenv)."""
    roots = [entry for entry in sys.path if entry and (Path(entry) / "picoord").is_dir()]
    bootstrap = (
        f"import sys; sys.path[:0] = {roots!r}; sys.argv[0] = 'picoord-agent'; "
        "from picoord.agent.entry import main; main()"
    )
    argv = [sys.executable, "-c", bootstrap]
    if config is not None:
        argv += ["--config", str(config)]
    if log_level:
        argv += ["--log-level", log_level]
    return [*argv, "first-boot", "--file", str(path), "--state-dir", str(state_dir)]


async def attempt_in_child(path: Path, state_dir: Path, config: Path | None, log_level: str | None) -> int:
    """Run one first-boot attempt in a child process; its exit status (EXIT_RETRY when it
    could not finish in time). Its log lines go where ours go (the journal)."""
    process = await asyncio.create_subprocess_exec(
        *_child_argv(path, state_dir, config, log_level),
        stdin=asyncio.subprocess.DEVNULL,
        env=dict(os.environ),
    )
    try:
        return await asyncio.wait_for(process.wait(), ATTEMPT_TIMEOUT)
    except TimeoutError:
        log.warning("first-boot join took too long; retrying", file=str(path), seconds=ATTEMPT_TIMEOUT)
        with contextlib.suppress(ProcessLookupError):
            process.kill()
        await process.wait()
        return EXIT_RETRY
    except asyncio.CancelledError:
        with contextlib.suppress(ProcessLookupError):
            process.kill()
        raise

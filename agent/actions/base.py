"""What every executor shares: its context, its outcome, and the one way it runs commands.

An executor is a function `(request message, ActionContext) -> Outcome`. Its decisions
(what to run, given what is in place) are pure functions it keeps beside it and tests
with tables; this module holds the imperative shell they all use.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from picoord.agent.commands import CommandResult, run_command
from picoord.common import defaults
from picoord.common.limits import COMMAND_OUTPUT_TAIL
from picoord.v1 import actions_pb2, agent_pb2

Runner = Callable[[Sequence[str], float], CommandResult]
REDACTED = "<redacted>"
WITHHELD = "<output withheld: it contains a secret>"


class ActionFailed(Exception):
    """A command failed; the outcome is FAILED with what ran so far."""


def read_file(path: Path, errors: str = "strict") -> str | None:
    """A state file's text, None when it does not exist; unreadable is a failure, not absence.

    `errors="replace"` for files only parsed leniently (kubeconfigs, PEM text)."""
    try:
        return path.read_text(errors=errors)
    except FileNotFoundError:
        return None
    except OSError as error:
        raise ActionFailed(f"cannot read {path}: {error}") from None


@dataclass
class ActionContext:
    """Per-request facts and the means to act: executors touch the system only through `run`."""

    dry_run: bool
    deadline: float  # time.monotonic() by which the whole action must end
    coordinator_host: str = ""  # where this agent's session goes (the firewall keeps it open)
    coordinator_port: int = 0
    docker_socket: str = defaults.DOCKER_SOCKET
    state_dir: Path = defaults.AGENT_STATE_DIR  # the agent's own files (a pending firewall revert)
    allow_mount_paths: tuple[str, ...] = ()  # system paths this node's config lets mounts use
    run: Runner = run_command
    secrets: tuple[str, ...] = ()  # values to redact from recorded argv and output
    commands: list[actions_pb2.CommandRecord] = field(default_factory=list)

    def remaining(self, cap: float) -> float:
        """A command's timeout: at most `cap`, and never past the action's deadline."""
        left = self.deadline - time.monotonic()
        if left <= 0:
            raise ActionFailed("the action's time ran out")
        return min(cap, left)

    def redact(self, text: str) -> str:
        """The text with every known secret replaced, fit for records and logs."""
        for secret in self.secrets:
            if secret:
                text = text.replace(secret, REDACTED)
        return text

    def read(self, argv: Sequence[str], timeout: float = 30.0) -> CommandResult:
        """Run a command that only reads state (also in a dry run); not recorded."""
        return self.run(argv, self.remaining(timeout))

    def change(
        self,
        argv: Sequence[str],
        timeout: float = 60.0,
        check: bool = True,
        secret_output: bool = False,
        run_argv: Sequence[str] | None = None,
    ) -> CommandResult | None:
        """Run a command that changes state, and record it. In a dry run, record it only.

        `secret_output`: the command prints a secret not known beforehand (a token it
        generates), so its output is withheld from the record. `run_argv`: what actually
        runs when it differs from the recorded `argv` only in how it names the same
        directories (the mount executor's pinned /proc/PID/fd/N paths)."""
        record = actions_pb2.CommandRecord(argv=[self.redact(word) for word in argv], ran=not self.dry_run)
        self.commands.append(record)
        if self.dry_run:
            return None
        started = time.monotonic()
        result = self.run(run_argv or argv, self.remaining(timeout))
        record.exit_code = result.exit_code
        record.seconds = round(time.monotonic() - started, 3)
        output = WITHHELD if secret_output else (result.stdout + result.stderr)[-COMMAND_OUTPUT_TAIL:]
        record.output_tail = self.redact(output)
        if check and not result.ok:
            reason = "timed out" if result.timed_out else f"exited {result.exit_code}"
            raise ActionFailed(f"{argv[0]} {reason}: {record.output_tail.strip()[-500:]}")
        return result


@dataclass
class Outcome:
    outcome: int  # agent_pb2.ActionOutcome
    message: str
    in_place: str = ""
    facts: list[actions_pb2.Fact] = field(default_factory=list)

    @classmethod
    def done(cls, context: ActionContext, message: str, in_place: str = "") -> Outcome:
        """SUCCEEDED, PLANNED (dry run) or UNCHANGED, from whether anything was (to be) run."""
        if not context.commands:
            return cls(agent_pb2.ACTION_OUTCOME_UNCHANGED, message or "already in place", in_place)
        if context.dry_run:
            return cls(agent_pb2.ACTION_OUTCOME_PLANNED, message, in_place)
        return cls(agent_pb2.ACTION_OUTCOME_SUCCEEDED, message, in_place)

"""The firewall revert that outlives the agent, in the spirit of `iptables-apply`.

Before a firewall change the guard writes a *pending revert* into the agent's state dir
(atomically): the snapshot to restore, the backend, the deadline (wall-clock time) and an
id. Then it arms something outside the agent process that restores the snapshot at the
deadline unless the file is gone by then:

- a transient systemd timer (`systemd-run --on-active=N --unit=picoord-fw-revert-<id>`)
  where systemd is PID 1 of this very namespace set (a lab Pi in a network namespace must
  not have the host's systemd restore the host's firewall);
- otherwise a detached watchdog: `python3 -m picoord.agent.actions.firewall.watchdog
  --detach <file> <id>` starts the watchdog in its own session and returns at once (a
  double fork), so neither SIGKILL of the agent nor the end of its process group stops it.

Either way the process that fires is this module's `main`: it sleeps until the deadline,
then, holding the lock, restores the snapshot if the file still carries its id. The
agent confirms by taking the same lock and removing the file (`claim`), then stops the
timer or the watchdog; a claim that finds the file gone means the watchdog was first and
restored. On agent start, `rearm_on_start` finds a file left behind (the agent died inside
the window) and re-arms it for the rest of its window, or restores at once when its
deadline passed: an unconfirmed policy never stays.

Every restore runs through an ActionContext (argv lists with timeouts) and its commands
are written to `firewall-revert.last.json` beside the pending file, and logged.
"""

from __future__ import annotations

import contextlib
import fcntl
import importlib
import json
import math
import os
import secrets
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from picoord.agent.actions.base import ActionContext, ActionFailed
from picoord.agent.state import FIREWALL_REVERT_FILE
from picoord.common.files import write_atomically

MODULE = "picoord.agent.actions.firewall.watchdog"
PENDING_NAME = FIREWALL_REVERT_FILE
LOCK_NAME = "firewall-revert.lock"
RECORD_NAME = "firewall-revert.last.json"
LOG_NAME = "firewall-revert.log"
LOG_LIMIT = 256 * 1024
UNIT_PREFIX = "picoord-fw-revert-"
BACKEND_MODULES = {
    "ufw": "picoord.agent.actions.firewall.ufw",
    "nftables": "picoord.agent.actions.firewall.nftables",
}
GRACE = 3.0  # the watchdog fires this long after the agent's own last chance to decide
POLL = 0.5  # how often a waiting watchdog looks whether it was cancelled
LAUNCH_TIMEOUT = 15.0
STOP_TIMEOUT = 15.0
RESTORE_SECONDS = 60.0
FORMAT = 1


@dataclass(frozen=True)
class PendingRevert:
    """What the pending-revert file says."""

    id: str
    backend: str  # "ufw" | "nftables"
    deadline: float  # time.time() at which the snapshot goes back unless confirmed
    snapshot: Mapping[str, Any] = field(default_factory=dict)  # the backend's own snapshot
    what: str = ""  # for people: which change this reverts

    def to_json(self) -> bytes:
        return json.dumps({"format": FORMAT, **asdict(self)}, sort_keys=True).encode()

    @classmethod
    def from_json(cls, data: bytes) -> PendingRevert:
        """Parse the file; ValueError naming what is wrong (a file we cannot trust is not
        restored from)."""
        try:
            raw = json.loads(data)
        except ValueError as error:
            raise ValueError(f"not JSON: {error}") from None
        if not isinstance(raw, dict) or raw.get("format") != FORMAT:
            raise ValueError(f"format is not {FORMAT}")
        checks = (
            ("id", str, lambda v: v.isalnum() and 0 < len(v) <= 32),
            ("backend", str, lambda v: v in BACKEND_MODULES),
            ("deadline", (int, float), lambda v: math.isfinite(v) and v > 0),
            ("snapshot", dict, lambda v: True),
            ("what", str, lambda v: True),
        )
        for name, kind, ok in checks:
            value = raw.get(name)
            if isinstance(value, bool) or not isinstance(value, kind) or not ok(value):
                raise ValueError(f"{name} is missing or invalid ({value!r:.60})")
        return cls(raw["id"], raw["backend"], float(raw["deadline"]), raw["snapshot"], raw["what"])


@dataclass(frozen=True)
class Armed:
    """How a pending revert was armed, so that the agent can stop it once confirmed."""

    method: str  # "systemd" | "watchdog"
    path: Path
    id: str
    pid: int = 0  # the detached watchdog's


# ---------------------------------------------------------------- decisions (pure)


def new_pending(
    backend: str, snapshot: Mapping[str, Any], seconds: float, what: str, now: float
) -> PendingRevert:
    return PendingRevert(secrets.token_hex(6), backend, now + seconds, dict(snapshot), what)


def seconds_left(pending: PendingRevert, now: float) -> float:
    return max(0.0, pending.deadline - now)


def is_due(pending: PendingRevert, now: float) -> bool:
    """The snapshot goes back once the deadline passed (the file still being there means
    nobody confirmed the change)."""
    return now >= pending.deadline


def arming_method(systemd_is_init: bool, same_namespaces: bool, systemd_run_found: bool) -> str:
    """A systemd timer only where systemd runs this very system: a process in another
    network or mount namespace (a lab Pi, a container) would have the host restore the
    host's firewall. Everywhere else, the detached watchdog."""
    return "systemd" if systemd_is_init and same_namespaces and systemd_run_found else "watchdog"


def unit_name(revert_id: str) -> str:
    return f"{UNIT_PREFIX}{revert_id}"


def watchdog_argv(python: str, path: Path, revert_id: str, detach: bool) -> list[str]:
    return [python, "-m", MODULE, *(["--detach"] if detach else []), str(path), revert_id]


def systemd_run_argv(python: str, path: Path, pending: PendingRevert, now: float) -> list[str]:
    """A transient timer that starts the watchdog (which then restores at once) when the
    deadline comes; --collect leaves nothing behind, failed or not."""
    seconds = max(1, math.ceil(seconds_left(pending, now)))
    return [
        "systemd-run",
        f"--unit={unit_name(pending.id)}",
        f"--on-active={seconds}s",
        "--timer-property=AccuracySec=100ms",
        "--collect",
        f"--description=picoord: restore the firewall unless change {pending.id} is confirmed",
        *watchdog_argv(python, path, pending.id, detach=False),
    ]


def systemd_stop_argv(revert_id: str) -> list[str]:
    name = unit_name(revert_id)
    return ["systemctl", "stop", f"{name}.timer", f"{name}.service"]


def command_record(context: ActionContext) -> list[dict[str, Any]]:
    return [
        {"argv": list(c.argv), "exit_code": c.exit_code, "seconds": c.seconds, "output_tail": c.output_tail}
        for c in context.commands
    ]


# ---------------------------------------------------------------- files and the lock


def pending_path(state_dir: Path) -> Path:
    return Path(state_dir) / PENDING_NAME


def read_pending(path: Path) -> PendingRevert | None:
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return None
    return PendingRevert.from_json(data)


@contextlib.contextmanager
def locked(state_dir: Path) -> Iterator[None]:
    """The one lock under which the pending file is claimed, by the agent or the watchdog."""
    Path(state_dir).mkdir(parents=True, exist_ok=True, mode=0o700)
    fd = os.open(Path(state_dir) / LOCK_NAME, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def claim(state_dir: Path, revert_id: str) -> bool:
    """Take the pending revert away from whoever else would act on it: True when it was
    still there (the caller now decides), False when the watchdog already restored."""
    path = pending_path(state_dir)
    with locked(state_dir):
        try:
            pending = read_pending(path)
        except ValueError:
            pending = None
        if pending is None or pending.id != revert_id:
            return False
        path.unlink()
        return True


def restore_snapshot(context: ActionContext, backend: str, snapshot: Mapping[str, Any]) -> None:
    importlib.import_module(BACKEND_MODULES[backend]).restore_snapshot(context, snapshot)


def restore_pending(state_dir: Path, revert_id: str, now: float | None = None) -> dict[str, Any] | None:
    """Restore the snapshot if the pending file still carries `revert_id` and is due, under
    the lock; the file goes in every case (a failed restore is recorded, never retried in a
    loop). Returns the record written, or None when there was nothing to do."""
    path = pending_path(state_dir)
    with locked(state_dir):
        pending = read_pending(path)
        if pending is None or pending.id != revert_id:
            return None
        if not is_due(pending, time.time() if now is None else now):
            return None
        context = ActionContext(
            dry_run=False, deadline=time.monotonic() + RESTORE_SECONDS, state_dir=Path(state_dir)
        )
        error = ""
        try:
            restore_snapshot(context, pending.backend, pending.snapshot)
        except Exception as failure:  # recorded and reported loudly below
            error = str(failure) or repr(failure)
        record = {
            "id": pending.id,
            "what": pending.what,
            "restored_at": time.time(),
            "ok": not error,
            "error": error,
            "commands": command_record(context),
        }
        write_atomically(Path(state_dir) / RECORD_NAME, json.dumps(record, indent=1).encode(), 0o600)
        path.unlink()
    return record


def last_record(state_dir: Path, revert_id: str) -> dict[str, Any] | None:
    try:
        record = json.loads((Path(state_dir) / RECORD_NAME).read_bytes())
    except (OSError, ValueError):
        return None
    return record if isinstance(record, dict) and record.get("id") == revert_id else None


# ---------------------------------------------------------------- arming and disarming


def _same_namespaces_as_init() -> bool:
    try:
        return all(
            os.readlink(f"/proc/self/ns/{ns}") == os.readlink(f"/proc/1/ns/{ns}") for ns in ("net", "mnt")
        )
    except OSError:
        return False


def choose_method() -> str:
    return arming_method(
        os.path.isdir("/run/systemd/system"),
        _same_namespaces_as_init(),
        shutil.which("systemd-run") is not None,
    )


def launch(context: ActionContext, path: Path, pending: PendingRevert, method: str) -> Armed:
    """Start what fires at the deadline; ActionFailed when it could not be started."""
    if method == "systemd":
        argv = systemd_run_argv(sys.executable, path, pending, time.time())
    else:
        argv = watchdog_argv(sys.executable, path, pending.id, detach=True)
    done = context.read(argv, LAUNCH_TIMEOUT)
    if not done.ok:
        what = "systemd timer (systemd-run)" if method == "systemd" else f"detached watchdog ({MODULE})"
        raise ActionFailed(f"starting the {what} failed: {(done.stderr or done.stdout).strip()[-300:]}")
    pid = 0
    if method == "watchdog":
        try:
            pid = int(done.stdout.split()[-1])
        except (IndexError, ValueError):
            raise ActionFailed(f"the watchdog launcher printed no pid: {done.stdout[-200:]!r}") from None
    return Armed(method, path, pending.id, pid)


def arm(context: ActionContext, pending: PendingRevert, method: str | None = None) -> Armed:
    """Write the pending revert, then start its timer or watchdog. On failure the file is
    removed again and ActionFailed says so (the caller has changed nothing yet)."""
    path = pending_path(context.state_dir)
    with locked(context.state_dir):
        try:
            stale = read_pending(path)
        except ValueError:
            stale = None
        if stale is not None:
            raise ActionFailed(
                f"an earlier firewall change ({stale.what or stale.id}) is still unconfirmed and will be "
                f"reverted within {seconds_left(stale, time.time()):.0f} s; try again after that"
            )
        write_atomically(path, pending.to_json(), 0o600)
    try:
        return launch(context, path, pending, method or choose_method())
    except Exception:
        with contextlib.suppress(OSError):
            claim(context.state_dir, pending.id)
        raise


def _is_our_watchdog(pid: int, path: Path, revert_id: str) -> bool:
    try:
        words = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return False
    return MODULE.encode() in words and str(path).encode() in words and revert_id.encode() in words


def disarm(context: ActionContext, armed: Armed) -> None:
    """Stop the timer or the watchdog (after `claim` removed the file, so a watchdog that
    wakes up meanwhile finds nothing to do either way)."""
    if armed.method == "systemd":
        context.read(systemd_stop_argv(armed.id), STOP_TIMEOUT)
        return
    if armed.pid and _is_our_watchdog(armed.pid, armed.path, armed.id):
        with contextlib.suppress(ProcessLookupError):
            os.kill(armed.pid, signal.SIGTERM)
        end = time.monotonic() + 5
        while _is_our_watchdog(armed.pid, armed.path, armed.id) and time.monotonic() < end:
            time.sleep(0.02)


def rearm_on_start(state_dir: Path) -> str | None:
    """What the agent does first on start: a pending revert left on disk (the agent died in
    the confirm window) is armed again for the rest of its window, or restored at once
    when the deadline passed. Returns what it did, for the log (None: nothing pending)."""
    path = pending_path(state_dir)
    try:
        pending = read_pending(path)
    except ValueError as error:
        bad = path.with_name(path.name + ".bad")
        os.replace(path, bad)
        return f"FIREWALL: unreadable pending revert moved to {bad} ({error}); check the node's firewall"
    if pending is None:
        return None
    if is_due(pending, time.time()):
        record = restore_pending(state_dir, pending.id)
        if record is None:
            return None
        if not record["ok"]:
            return f"FIREWALL RESTORE FAILED for unconfirmed change {pending.id}: {record['error']}"
        return f"restored the firewall rules from before unconfirmed change {pending.id} ({pending.what})"
    context = ActionContext(
        dry_run=False, deadline=time.monotonic() + LAUNCH_TIMEOUT * 2, state_dir=Path(state_dir)
    )
    method = choose_method()
    if method == "systemd":
        active = context.read(
            ["systemctl", "is-active", "--quiet", f"{unit_name(pending.id)}.timer"], STOP_TIMEOUT
        )
        if active.ok:
            return f"the revert of unconfirmed change {pending.id} is still armed (systemd timer)"
    armed = launch(context, path, pending, method)
    return (
        f"re-armed the revert of unconfirmed change {pending.id} ({pending.what}) for "
        f"{seconds_left(pending, time.time()):.0f} s more ({armed.method})"
    )


# ---------------------------------------------------------------- the process that fires


def _log(message: str) -> None:
    print(
        f"{time.strftime('%Y-%m-%dT%H:%M:%S')} picoord firewall watchdog[{os.getpid()}]: {message}",
        file=sys.stderr,
        flush=True,
    )


def detach(path: Path, revert_id: str) -> int:
    """Start the watchdog in its own session, output to a log beside the pending file,
    print its pid and return: the caller's process (and group) may die, it lives on."""
    log_path = path.parent / LOG_NAME
    with contextlib.suppress(OSError):
        if log_path.stat().st_size > LOG_LIMIT:  # a few lines per change: keep one old log
            os.replace(log_path, log_path.with_name(LOG_NAME + ".1"))
    log = open(log_path, "ab")  # noqa: SIM115 - handed to the child
    with log:
        child = subprocess.Popen(
            watchdog_argv(sys.executable, path, revert_id, detach=False),
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=log,
            start_new_session=True,
            close_fds=True,
            cwd="/",
        )
    print(child.pid, flush=True)
    return 0


def watch(path: Path, revert_id: str) -> int:
    """Sleep until the deadline (looking whether the file went away), then restore."""
    _log(f"watching {path} for change {revert_id}")
    while True:
        try:
            pending = read_pending(path)
        except ValueError as error:
            _log(f"FIREWALL: the pending revert {path} is unreadable ({error}); not restoring from it")
            return 1
        if pending is None or pending.id != revert_id:
            _log(f"change {revert_id} was confirmed; nothing to restore")
            return 0
        left = seconds_left(pending, time.time())
        if left > 0:
            time.sleep(min(left, POLL))
            continue
        record = restore_pending(path.parent, revert_id)
        if record is None:
            _log(f"change {revert_id} was confirmed at the last moment; nothing to restore")
            return 0
        for command in record["commands"]:
            _log(f"ran {command['argv']} -> exit {command['exit_code']}")
        if not record["ok"]:
            _log(
                f"FIREWALL RESTORE FAILED for change {revert_id}: {record['error']}; fix it from the console"
            )
            return 1
        _log(f"change {revert_id} was not confirmed in time: restored the previous rules")
        return 0


def main(argv: Sequence[str] | None = None) -> int:
    words = list(sys.argv[1:] if argv is None else argv)
    detached = words[:1] == ["--detach"]
    if detached:
        words = words[1:]
    if len(words) != 2:
        print(f"usage: python3 -m {MODULE} [--detach] PENDING-FILE ID", file=sys.stderr)
        return 2
    path, revert_id = Path(words[0]), words[1]
    return detach(path, revert_id) if detached else watch(path, revert_id)


if __name__ == "__main__":
    raise SystemExit(main())

"""The pure parts of the firewall revert watchdog: what the pending file says, when to
restore, how it is armed, and the claim that decides between the agent and the watchdog.
The processes themselves (a SIGKILLed agent, a re-armed revert) are proven in the lab:
tests/lab/test_firewall_lab.py."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from picoord.agent.actions.base import ActionContext, ActionFailed
from picoord.agent.actions.firewall import guard, watchdog
from picoord.agent.actions.firewall.watchdog import PendingRevert
from picoord.v1 import agent_pb2

PENDING = PendingRevert("a1b2c3d4e5f6", "nftables", 1_800_000_000.5, {"table": None}, "nftables policy")


def test_the_pending_file_round_trips_and_says_what_to_restore() -> None:
    data = json.loads(PENDING.to_json())
    assert data == {
        "format": 1,
        "id": "a1b2c3d4e5f6",
        "backend": "nftables",
        "deadline": 1_800_000_000.5,
        "snapshot": {"table": None},
        "what": "nftables policy",
    }
    assert PendingRevert.from_json(PENDING.to_json()) == PENDING


def _with(**changes: Any) -> bytes:
    data = json.loads(PENDING.to_json())
    for key, value in changes.items():
        if value is None:
            data.pop(key)
        else:
            data[key] = value
    return json.dumps(data).encode()


@pytest.mark.parametrize(
    ("data", "named"),
    [
        (b"{", "not JSON"),
        (b"[]", "format"),
        (_with(format=2), "format"),
        (_with(id=None), "id"),
        (_with(id="../../etc"), "id"),
        (_with(id="x" * 33), "id"),
        (_with(backend="iptables"), "backend"),
        (_with(deadline="soon"), "deadline"),
        (_with(deadline=True), "deadline"),
        (_with(deadline=-1), "deadline"),
        (_with(snapshot="nft flush ruleset"), "snapshot"),
        (_with(what=None), "what"),
    ],
)
def test_a_pending_file_that_cannot_be_trusted_is_refused_naming_why(data: bytes, named: str) -> None:
    with pytest.raises(ValueError, match=named):
        PendingRevert.from_json(data)


@pytest.mark.parametrize(
    ("now", "due", "left"),
    [
        (PENDING.deadline - 10, False, 10.0),
        (PENDING.deadline - 0.25, False, 0.25),
        (PENDING.deadline, True, 0.0),
        (PENDING.deadline + 3600, True, 0.0),
    ],
)
def test_the_snapshot_goes_back_once_the_deadline_passed(now: float, due: bool, left: float) -> None:
    assert watchdog.is_due(PENDING, now) is due
    assert watchdog.seconds_left(PENDING, now) == pytest.approx(left)


@pytest.mark.parametrize(
    ("systemd_is_init", "same_namespaces", "systemd_run", "method"),
    [
        (True, True, True, "systemd"),
        (True, False, True, "watchdog"),  # a lab Pi or container: the host's systemd must not act
        (True, True, False, "watchdog"),
        (False, True, True, "watchdog"),
        (False, False, False, "watchdog"),
    ],
)
def test_a_systemd_timer_only_where_systemd_runs_this_very_system(
    systemd_is_init: bool, same_namespaces: bool, systemd_run: bool, method: str
) -> None:
    assert watchdog.arming_method(systemd_is_init, same_namespaces, systemd_run) == method


def test_the_timer_and_the_watchdog_are_argv_lists_naming_the_file_and_id() -> None:
    path = Path("/var/lib/picoord/agent/firewall-revert.json")
    argv = watchdog.systemd_run_argv("/usr/bin/python3", path, PENDING, PENDING.deadline - 12.2)
    assert argv[:5] == [
        "systemd-run",
        "--unit=picoord-fw-revert-a1b2c3d4e5f6",
        "--on-active=13s",
        "--timer-property=AccuracySec=100ms",
        "--collect",
    ]
    assert argv[-5:] == ["/usr/bin/python3", "-m", watchdog.MODULE, str(path), PENDING.id]
    assert watchdog.systemd_run_argv("p", path, PENDING, PENDING.deadline + 5)[2] == "--on-active=1s"
    assert watchdog.watchdog_argv("py", path, "abc", detach=True) == [
        "py",
        "-m",
        watchdog.MODULE,
        "--detach",
        str(path),
        "abc",
    ]
    assert watchdog.systemd_stop_argv("abc") == [
        "systemctl",
        "stop",
        "picoord-fw-revert-abc.timer",
        "picoord-fw-revert-abc.service",
    ]


def test_whoever_claims_first_decides_and_the_other_learns_it(tmp_path: Path) -> None:
    path = watchdog.pending_path(tmp_path)
    path.write_bytes(PENDING.to_json())
    assert not watchdog.claim(tmp_path, "000000000000")  # another change's id: not ours
    assert path.exists()
    assert watchdog.claim(tmp_path, PENDING.id)
    assert not path.exists()
    assert not watchdog.claim(tmp_path, PENDING.id)  # the second one finds it gone


def test_a_revert_not_yet_due_is_left_alone_and_a_due_one_is_restored_and_recorded(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    restored: list[tuple[str, dict[str, Any]]] = []

    def restore(context: ActionContext, backend: str, snapshot: dict[str, Any]) -> None:
        restored.append((backend, dict(snapshot)))
        context.commands.append(agent_pb2.ActionResult().commands.add(argv=["nft", "-f", "x"], exit_code=0))

    monkeypatch.setattr(watchdog, "restore_snapshot", restore)
    watchdog.pending_path(tmp_path).write_bytes(PENDING.to_json())
    assert watchdog.restore_pending(tmp_path, PENDING.id, now=PENDING.deadline - 1) is None
    assert restored == [] and watchdog.pending_path(tmp_path).exists()
    record = watchdog.restore_pending(tmp_path, PENDING.id, now=PENDING.deadline)
    assert record is not None and record["ok"] and record["commands"][0]["argv"] == ["nft", "-f", "x"]
    assert restored == [("nftables", {"table": None})]
    assert not watchdog.pending_path(tmp_path).exists()
    assert watchdog.last_record(tmp_path, PENDING.id) == record
    assert watchdog.restore_pending(tmp_path, PENDING.id, now=PENDING.deadline) is None  # only once


def test_a_failed_restore_is_recorded_once_and_not_retried(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def fail(context: ActionContext, backend: str, snapshot: dict[str, Any]) -> None:
        raise ActionFailed("nft exited 1: syntax error")

    monkeypatch.setattr(watchdog, "restore_snapshot", fail)
    watchdog.pending_path(tmp_path).write_bytes(PENDING.to_json())
    record = watchdog.restore_pending(tmp_path, PENDING.id, now=PENDING.deadline)
    assert record is not None and not record["ok"] and "syntax error" in record["error"]
    assert not watchdog.pending_path(tmp_path).exists()


def test_a_second_change_waits_for_an_unconfirmed_one(tmp_path: Path) -> None:
    later = PendingRevert("ffffffffffff", "ufw", time.time() + 60, {}, "ufw policy")
    watchdog.pending_path(tmp_path).write_bytes(later.to_json())
    context = ActionContext(dry_run=False, deadline=time.monotonic() + 30, state_dir=tmp_path)
    with pytest.raises(ActionFailed, match=r"ufw policy\) is still unconfirmed"):
        watchdog.arm(context, PENDING, method="watchdog")
    assert watchdog.read_pending(watchdog.pending_path(tmp_path)) == later


def test_a_watchdog_that_cannot_start_leaves_no_pending_file(tmp_path: Path) -> None:
    def nothing_starts(argv: Any, timeout: float) -> Any:
        from picoord.agent.commands import CommandResult

        return CommandResult(tuple(argv), 1, "", "exec failed")

    context = ActionContext(
        dry_run=False, deadline=time.monotonic() + 30, state_dir=tmp_path, run=nothing_starts
    )
    with pytest.raises(ActionFailed, match="exec failed"):
        watchdog.arm(context, PENDING, method="watchdog")
    assert not watchdog.pending_path(tmp_path).exists()


def test_nothing_pending_on_start_means_nothing_to_do(tmp_path: Path) -> None:
    assert watchdog.rearm_on_start(tmp_path) is None


def test_an_unreadable_pending_file_on_start_is_set_aside_loudly(tmp_path: Path) -> None:
    watchdog.pending_path(tmp_path).write_bytes(b"{ half written")
    said = watchdog.rearm_on_start(tmp_path)
    assert said is not None and said.startswith("FIREWALL: unreadable pending revert")
    assert not watchdog.pending_path(tmp_path).exists()
    assert (tmp_path / "firewall-revert.json.bad").exists()


def test_the_watchdog_process_exits_when_its_change_was_confirmed(tmp_path: Path) -> None:
    """The real module run as a process: nothing pending, it says so and exits 0."""
    import subprocess

    done = subprocess.run(
        [*watchdog.watchdog_argv(sys.executable, watchdog.pending_path(tmp_path), "abc", detach=False)],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert done.returncode == 0 and "was confirmed; nothing to restore" in done.stderr


def test_when_the_watchdog_was_first_the_agent_reports_its_restore(tmp_path: Path) -> None:
    """The agent's probe came back too late: the watchdog had claimed and restored."""

    def arm(ctx: ActionContext, pending: PendingRevert) -> watchdog.Armed:
        watchdog.pending_path(tmp_path).write_bytes(pending.to_json())
        return watchdog.Armed("watchdog", watchdog.pending_path(tmp_path), pending.id)

    def watchdog_fires(ctx: ActionContext) -> None:
        pending = watchdog.read_pending(watchdog.pending_path(tmp_path))
        assert pending is not None
        watchdog.pending_path(tmp_path).unlink()
        record = {"id": pending.id, "ok": True, "error": "", "commands": []}
        (tmp_path / watchdog.RECORD_NAME).write_text(json.dumps(record))

    outcome = guard.confirm_or_revert(
        ActionContext(dry_run=False, deadline=time.monotonic() + 60, state_dir=tmp_path),
        apply=watchdog_fires,
        restore=lambda ctx: pytest.fail("the agent must not restore a second time"),
        endpoints=[guard.Endpoint("10.213.0.1", 7443, ("10.213.0.1",))],
        window=2,
        what="test policy",
        backend="nftables",
        snapshot={"table": None},
        probe=lambda endpoints, window: (True, "ok"),
        arm=arm,
        disarm=lambda ctx, armed: None,
    )
    assert outcome.outcome == agent_pb2.ACTION_OUTCOME_REVERTED
    assert "the revert watchdog restored the previous rules" in outcome.message

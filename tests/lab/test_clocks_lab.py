"""Agents whose clock is wrong, under libfaketime (Debian's faketime): days behind at join,
days behind or ahead after enrollment, and minutes behind. The agent names the clock and
the fix in one line instead of a raw TLS error, and comes back by itself once the clock is
right, with no restart and no new join; the coordinator measures every node's offset.

Lab Pis share the machine's one clock: only each faked agent's view of it moves (the lab's
clock files), nothing here sets the system time."""

from __future__ import annotations

import datetime as dt
import re
import subprocess
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from picoord.agent.state import AgentFiles
from picoord.common.defaults import JOIN_TOKEN_ENV
from picoord.coordinator.admin_snapshot import STALE_SECONDS
from picoord.lab import netns
from picoord.lab.cluster import Lab, faketime_argv
from tests.conftest import _down_all, require_root_or_fail

NODES = ["pi1", "pi2", "pi3"]
SERVER_VALIDITY_DAYS = 2  # so an agent 3 days ahead sees the server certificate as expired
CLOCK_LINE = re.compile(
    r"this node's clock says (\d{4}-\d\d-\d\d \d\d:\d\d) UTC, but the coordinator's certificate "
    r"(is valid from|expired at) (\d{4}-\d\d-\d\d \d\d:\d\d) UTC: set the time \(timedatectl, NTP\); "
)
RAW_TLS = ("TSI_PROTOCOL_FAILURE", "SSL_ERROR_SSL", "Handshake failed", "CERTIFICATE_VERIFY_FAILED")
RECOVERY = 75.0  # the agent's backoff reaches 30 s (with jitter) while the clock is wrong


@pytest.fixture(scope="module")
def lab(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Lab]:
    require_root_or_fail()
    made = Lab(
        tmp_path_factory.mktemp("clocks"),
        faked_clocks=NODES,
        coordinator_args=["--server-cert-validity", f"{SERVER_VALIDITY_DAYS}d"],
        heartbeat_timeout=3.0,
        down_timeout=6.0,
    )
    try:
        made.up(len(NODES))
        yield made
    finally:
        _down_all([made])


def day(offset_days: float) -> str:
    """The date (UTC) that is `offset_days` away from now."""
    return (dt.datetime.now(dt.UTC) + dt.timedelta(days=offset_days)).strftime("%Y-%m-%d")


def wait_for_clock_line(lab: Lab, node: str, after: int, timeout: float = 30.0) -> re.Match[str]:
    deadline = time.monotonic() + timeout
    while True:
        log = lab.log_path(node).read_text(errors="replace")[after:]
        found = CLOCK_LINE.search(log)
        if found:
            return found
        if time.monotonic() >= deadline:
            raise AssertionError(f"no clock line in the {node} log after {timeout:g}s:\n{log[-3000:]}")
        time.sleep(0.5)


def restart_with_clock(lab: Lab, node: str, offset: str) -> tuple[int, int]:
    """The agent started again with its clock at `offset`: its pid and where its log starts."""
    lab.kill_agent(node)
    lab.set_clock(node, offset)
    after = lab.log_path(node).stat().st_size
    lab.start_agent(node)
    return lab.processes[node].pid, after


def test_days_behind_at_join_names_the_clock_and_keeps_the_token(lab: Lab, tmp_path: Path) -> None:
    token = lab.create_token(uses=1)
    spec = tmp_path / "clock"
    argv = lab.in_pi(
        "pi1", faketime_argv(spec, lab.join_argv(token["ca_cert_hash"], "late1", tmp_path / "state"))
    )

    def join() -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            argv,
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
            stdin=subprocess.DEVNULL,
            env=netns.lab_env({JOIN_TOKEN_ENV: token["token"]}),
        )

    spec.write_text("-3d\n")
    refused = join()
    assert refused.returncode != 0
    found = CLOCK_LINE.search(refused.stderr)
    assert found is not None, refused.stderr
    assert found.group(1).startswith(day(-3))
    assert found.group(2) == "is valid from"
    assert "then run this join again" in refused.stderr
    assert not any(marker in refused.stderr for marker in RAW_TLS), refused.stderr

    spec.write_text("-3m\n")  # minutes behind: inside the certificates' backdating
    joined = join()
    assert joined.returncode == 0, joined.stderr  # the one-use token was not spent by the refusal
    lab.coordctl("node", "remove", "late1", check=True)


def test_days_behind_after_enrollment_then_back_by_itself(lab: Lab) -> None:
    credentials = AgentFiles(lab.agent_state_dir("pi2")).credentials_path.read_bytes()
    pid, after = restart_with_clock(lab, "pi2", "-3d")
    found = wait_for_clock_line(lab, "pi2", after)
    assert found.group(1).startswith(day(-3))
    assert found.group(2) == "is valid from"
    lab.wait_for_status("Down", ["pi2"], timeout=30)
    log = lab.log_path("pi2").read_text(errors="replace")[after:]
    assert "picoord-agent retries by itself" in log
    assert not any(marker in log for marker in RAW_TLS), log[-3000:]

    lab.set_clock("pi2", "+0")
    lab.wait_ready(["pi2"], timeout=RECOVERY)
    assert lab.processes["pi2"].pid == pid and lab.is_running("pi2")  # no restart
    assert AgentFiles(lab.agent_state_dir("pi2")).credentials_path.read_bytes() == credentials  # no join


def test_days_ahead_sees_the_server_certificate_expired_then_back_by_itself(lab: Lab) -> None:
    pid, after = restart_with_clock(lab, "pi1", "+3d")
    found = wait_for_clock_line(lab, "pi1", after)
    assert found.group(1).startswith(day(3))
    assert found.group(2) == "expired at"
    log = lab.log_path("pi1").read_text(errors="replace")[after:]
    assert not any(marker in log for marker in RAW_TLS), log[-3000:]

    lab.set_clock("pi1", "+0")
    lab.wait_ready(["pi1"], timeout=RECOVERY)
    assert lab.processes["pi1"].pid == pid and lab.is_running("pi1")


def test_a_year_ahead_is_named_a_clock_not_an_ended_certificate(lab: Lab) -> None:
    """Past the node certificate's end by its own clock: the coordinator's certificates are
    past theirs too, so the fix is the clock, not a new join."""
    pid, after = restart_with_clock(lab, "pi1", "+400d")
    found = wait_for_clock_line(lab, "pi1", after)
    assert found.group(1).startswith(day(400))
    assert found.group(2) == "expired at"
    log = lab.log_path("pi1").read_text(errors="replace")[after:]
    assert "join" not in log.replace("start: ", ""), log[-3000:]  # no advice to join again

    lab.set_clock("pi1", "+0")
    lab.wait_ready(["pi1"], timeout=RECOVERY)
    assert lab.processes["pi1"].pid == pid and lab.is_running("pi1")


def test_minutes_behind_connects_and_the_offset_is_measured(lab: Lab) -> None:
    restart_with_clock(lab, "pi3", "-3m")
    lab.wait_ready(["pi3"], timeout=30)
    deadline = time.monotonic() + 20
    while (offset := lab.coordctl_json("node", "show", "pi3")["clock_offset_seconds"]) is None:
        assert time.monotonic() < deadline, "pi3's offset was never measured"
        time.sleep(0.5)
    assert -182.0 < offset < -178.0
    # `nodes` answers from a snapshot whose time-driven parts (the offset among them) may
    # lag by up to STALE_SECONDS (docs/nodes.md): `node show` reads the node itself.
    deadline = time.monotonic() + STALE_SECONDS + 2.0
    while not re.search(r"pi3 .* 3m behind", table := lab.coordctl("nodes", check=True).stdout):
        assert time.monotonic() < deadline, table
        time.sleep(0.5)
    shown = lab.coordctl("node", "show", "pi3", check=True).stdout
    assert "Clock" in shown and "against the coordinator (3m behind)" in shown, shown
    with urllib.request.urlopen(lab.metrics_url, timeout=10) as reply:
        exposition = reply.read().decode()
    exported = re.search(r'^node_timex_offset_seconds\{instance="pi3"\} (\S+)$', exposition, re.MULTILINE)
    assert exported is not None and -182.0 < float(exported.group(1)) < -178.0
    for node in ("pi1", "pi2"):  # right clocks: measured, and no CLOCK entry past 1 s
        assert abs(lab.coordctl_json("node", "show", node)["clock_offset_seconds"]) < 1.0

    lab.set_clock("pi3", "+0")  # leave the module's lab as it found it

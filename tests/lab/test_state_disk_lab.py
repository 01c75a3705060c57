"""A real coordinator whose state disk fills up under two connected Pis: it keeps serving
sessions, `coordctl nodes` and metrics, refuses changes with a clear UNAVAILABLE, and takes
them again once space returns, with no restart."""

from __future__ import annotations

import re
import time
import urllib.request
from collections.abc import Callable

import pytest

from picoord.lab.cluster import Lab
from tests.test_store_faults import fill, mount_tmpfs, unmount

pytestmark = pytest.mark.lab

FULL_FOR = 18.0  # longer than three flushes and the 15 s the issue asks for


def scrape(lab: Lab) -> dict[str, float]:
    """The coordinator's own figures (unlabelled series) from /metrics."""
    with urllib.request.urlopen(lab.metrics_url, timeout=10) as reply:
        text = reply.read().decode()
    return {
        match[1]: float(match[2])
        for match in re.finditer(r"^(picoord_coordinator_\w+) (\S+)$", text, re.MULTILINE)
    } | {"pi_samples": float(len(re.findall(r'^node_load1\{instance="pi\d"\}', text, re.MULTILINE)))}


def test_a_full_state_disk_keeps_sessions_and_metrics_and_heals(lab_factory: Callable[..., Lab]) -> None:
    lab = lab_factory()
    state_dir = lab.coordinator_state_dir
    mount_tmpfs(state_dir, "2m")
    try:
        lab.up(2)
        filler = fill(state_dir)
        started = time.monotonic()
        messages = scrape(lab)["picoord_coordinator_messages_received_total"]
        while time.monotonic() - started < FULL_FOR:
            time.sleep(3.0)
            assert lab.is_running("coordinator"), lab.log_tail("coordinator")
            assert lab.node_statuses() == {"pi1": "Ready", "pi2": "Ready"}  # `coordctl nodes` works
            figures = scrape(lab)
            assert figures["picoord_coordinator_sessions"] == 2.0 and figures["pi_samples"] == 2.0
            assert figures["picoord_coordinator_messages_received_total"] > messages  # metrics flow
            messages = figures["picoord_coordinator_messages_received_total"]
        figures = scrape(lab)
        assert figures["picoord_coordinator_store_writable"] == 0.0
        assert figures["picoord_coordinator_store_write_failures_total"] >= 3  # one per flush at least

        refused = lab.coordctl("token", "create")
        assert refused.returncode != 0
        assert f"unavailable: state disk full at {state_dir}" in refused.stderr, refused.stderr
        log = lab.log_path("coordinator").read_text()
        assert log.count("state store refuses writes") == 1  # a line per change, not per failure

        filler.unlink()
        assert lab.create_token()["token"]  # the next write succeeds: no restart, no operator step
        assert scrape(lab)["picoord_coordinator_store_writable"] == 1.0
        assert lab.node_statuses() == {"pi1": "Ready", "pi2": "Ready"}
        assert "state store takes writes again" in lab.log_path("coordinator").read_text()
    finally:
        lab.down()
        unmount(state_dir)

"""Liveness below Python: a cut link, a frozen agent process and a frozen Pi each end the
node's session within the heartbeat timeout, through the HTTP/2 keepalive pings gRPC's core
sends and times out (the agent sends no heartbeat between its samples); the node shows
NotReady and disconnected, the coordinator logs one session end per fault, and the node is
Ready again once the fault is undone."""

from __future__ import annotations

import contextlib
import signal
import time
from collections.abc import Iterator

import psutil
import pytest

from picoord.agent.commands import run_command
from picoord.coordinator.ctl.client import socket_channel
from picoord.lab.cluster import Lab
from picoord.v1 import admin_pb2, admin_pb2_grpc
from tests.conftest import _module_lab

HEARTBEAT_TIMEOUT = 3.0
POLL = 0.1
# The keepalive closes a silent connection between 2/3 of the timeout and the timeout; the
# poll, the admin call and a loaded 2-core machine add a little.
SLACK = 1.0
NODE = "pi1"


@pytest.fixture(scope="module")
def lab(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Lab]:
    yield from _module_lab(
        tmp_path_factory, 1, "liveness", heartbeat_timeout=HEARTBEAT_TIMEOUT, down_timeout=60.0
    )


def node_view(lab: Lab) -> admin_pb2.NodeSummary:
    channel = socket_channel(lab.admin_socket)
    try:
        reply = admin_pb2_grpc.AdminStub(channel).ListNodes(admin_pb2.ListNodesRequest(), timeout=5)
    finally:
        channel.close()
    (node,) = [node for node in reply.nodes if node.name == NODE]
    return node


def agent_process(lab: Lab) -> psutil.Process:
    """The Pi's `picoord-agent run` (the lab's record, or the process it exec'd into)."""
    record = psutil.Process(lab.processes[NODE].pid)
    for process in [record, *record.children(recursive=True)]:
        if "picoord-agent" in " ".join(process.cmdline()) and "run" in process.cmdline():
            return process
    raise AssertionError(f"no agent process under pid {record.pid}: {record.cmdline()}")


@contextlib.contextmanager
def fault(lab: Lab, link: bool, freeze: bool) -> Iterator[None]:
    """The Pi's link down and/or its agent stopped; always undone on the way out."""
    veth = lab.network.pi(NODE).veth_host if lab.network else ""
    agent = agent_process(lab)
    try:
        if link:
            done = run_command(["ip", "link", "set", "dev", veth, "down"], timeout=10)
            assert done.ok, done.stderr
        if freeze:
            agent.send_signal(signal.SIGSTOP)
        yield
    finally:
        if link:
            run_command(["ip", "link", "set", "dev", veth, "up"], timeout=10)
        if freeze:
            with contextlib.suppress(psutil.Error):
                agent.send_signal(signal.SIGCONT)


def sessions_ended(lab: Lab) -> int:
    return lab.log_path("coordinator").read_text(errors="replace").count("session ended")


@pytest.mark.parametrize(
    ("case", "link", "freeze"),
    [("cut link", True, False), ("frozen agent process", False, True), ("frozen Pi", True, True)],
)
def test_a_silent_node_is_not_ready_within_the_heartbeat_timeout(
    lab: Lab, case: str, link: bool, freeze: bool
) -> None:
    lab.wait_ready([NODE], timeout=60)
    assert node_view(lab).connected
    ended_before = sessions_ended(lab)
    with fault(lab, link, freeze):
        started = time.monotonic()
        while time.monotonic() - started < HEARTBEAT_TIMEOUT + SLACK + 5:
            view = node_view(lab)
            if view.status != admin_pb2.NODE_STATUS_READY:
                break
            time.sleep(POLL)
        took = time.monotonic() - started
        print(f"{case}: NotReady after {took:.2f} s (heartbeat timeout {HEARTBEAT_TIMEOUT:g} s)")
        assert view.status == admin_pb2.NODE_STATUS_NOT_READY, f"{case}: still Ready after {took:.1f} s"
        # the session itself ended: the keepalive's doing, not a stale last-seen time
        assert not view.connected, f"{case}: NotReady but the session is still open"
        assert took <= HEARTBEAT_TIMEOUT + SLACK, f"{case}: NotReady only after {took:.2f} s"
        time.sleep(1.0)
        assert sessions_ended(lab) - ended_before == 1, "one session end per disconnect"
    lab.wait_ready([NODE], timeout=60)
    assert node_view(lab).connected


def test_an_agent_at_rest_sends_samples_only(lab: Lab) -> None:
    """No heartbeat between samples: the Welcome's interval is the metrics interval."""
    lab.wait_ready([NODE], timeout=60)
    before = messages_received(lab)
    time.sleep(5.0)
    per_second = (messages_received(lab) - before) / 5.0
    # the lab's agents sample every second (lab metrics_interval 1); heartbeats every
    # 0.75 s on top (the previous default) would make it about 2.3 a second
    assert 0.5 <= per_second <= 1.5, per_second


def messages_received(lab: Lab) -> float:
    import urllib.request

    with urllib.request.urlopen(lab.metrics_url, timeout=10) as reply:
        for line in reply.read().decode().splitlines():
            if line.startswith("picoord_coordinator_messages_received_total "):
                return float(line.split()[1])
    raise AssertionError("no picoord_coordinator_messages_received_total")

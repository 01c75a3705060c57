"""A node sending 4 MB metric samples through a real mTLS session (issue 6's second row):
each is refused with a clear status and counted in /metrics, the coordinator's memory
stays flat, its log gets at most a line per minute of it, and the node stays listed."""

from __future__ import annotations

import urllib.request
from pathlib import Path

import grpc
import pytest

from picoord.lab.cluster import Lab
from picoord.v1 import agent_pb2, node_pb2
from tests.lab.helpers import hello, node_credentials, open_session

SAMPLES = 30
SERIES = 'picoord_coordinator_refused_messages_total{kind="metrics",reason="message_too_large"}'


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise AssertionError(f"no VmRSS for pid {pid}")


def scrape(lab: Lab) -> str:
    with urllib.request.urlopen(lab.metrics_url, timeout=10) as reply:
        return reply.read().decode()


def test_four_megabyte_samples_are_refused_counted_and_cost_no_memory(lab1: Lab) -> None:
    fat = node_pb2.MetricsSample(
        timestamp=1.8e9, cpu_percent=5.0, filesystems=[node_pb2.FilesystemUsage(device="x" * 15_000)] * 256
    )
    assert fat.ByteSize() > 3_800_000
    messages = [hello("pi1"), agent_pb2.AgentMessage(metrics=fat)]
    pid = lab1.processes["coordinator"].pid
    lab1.kill_agent("pi1")  # the hostile client takes the node's place; the real agent would race it
    rss = []
    for index in range(SAMPLES):
        with pytest.raises(grpc.RpcError) as raised:
            open_session(lab1.coordinator_address, node_credentials(lab1, "pi1"), messages)
        assert raised.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert raised.value.details() == (
            f"message_too_large: metrics sample is {fat.ByteSize()} bytes, the limit is 65536"
        )
        if index in (4, SAMPLES - 1):
            rss.append(rss_mib(pid))
    assert rss[1] - rss[0] < 40, f"coordinator RSS grew from {rss[0]:.0f} to {rss[1]:.0f} MiB"
    assert f"{SERIES} {SAMPLES}.0" in scrape(lab1)
    assert [node["name"] for node in lab1.coordctl_json("nodes")] == ["pi1"]
    refusals_logged = lab1.log_tail("coordinator", lines=2000).count("agent message refused")
    assert 1 <= refusals_logged <= 2  # one line per node per minute, with a count of the rest
    lab1.start_agent("pi1")
    lab1.wait_ready(timeout=20)  # the real agent is back, and its own samples are taken again
    assert lab1.coordctl_json("node", "show", "pi1", "--samples", "5")["recent_metrics"]


def state_bytes(lab: Lab) -> int:
    return sum(path.stat().st_size for path in lab.coordinator_state_dir.glob("state.db*"))


def test_a_four_megabyte_hello_is_refused_and_never_written(lab1: Lab) -> None:
    """Row three of the issue: a 4 MB Hello was written to SQLite as is."""
    hardware = node_pb2.Hardware(
        hostname="pi1", disks=[node_pb2.Disk(device="d" * 250, mountpoint="m" * 250)] * 256
    )
    fat = agent_pb2.AgentMessage(hello=agent_pb2.Hello(node_name="pi1", agent_version="x", hardware=hardware))
    hardware_before = lab1.coordctl_json("node", "show", "pi1")["hardware"]
    size_before = state_bytes(lab1)
    lab1.kill_agent("pi1")
    try:
        for _ in range(20):
            with pytest.raises(grpc.RpcError) as raised:
                open_session(lab1.coordinator_address, node_credentials(lab1, "pi1"), [fat])
            assert raised.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert raised.value.details() == (
                f"message_too_large: hello is {fat.hello.ByteSize()} bytes, the limit is 65536"
            )
    finally:
        lab1.start_agent("pi1")
    assert state_bytes(lab1) - size_before < 256 * 1024
    assert 'kind="hello",reason="message_too_large"} 20.0' in scrape(lab1)
    lab1.wait_ready(timeout=20)
    assert lab1.coordctl_json("node", "show", "pi1")["hardware"] == hardware_before

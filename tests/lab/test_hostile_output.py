"""A node that reports hostile strings, end to end: a real coordinator stores what a crafted
Hello and sample say, and the operator's real `coordctl` and Prometheus show it literally."""

from __future__ import annotations

import json
import time
import urllib.request
from collections.abc import Callable

import grpc
import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from picoord.lab.cluster import Lab
from picoord.v1 import agent_pb2, node_pb2
from tests.lab.helpers import node_credentials, open_session

OS_NAME = "[/x]"
MODEL = "[bold red]pwned[/]"
CPU_MODEL = "\x1b[31mred\x1b[0m"
KERNEL = "\x9b2J\x07"
DEVICE = '[link=http://x]y[/link] "quoted" back\\slash\nnewline\r'
FORBIDDEN = ("\x1b", "\x07", "\r", "\x9b")


def hostile_session(lab: Lab) -> None:
    """pi1's agent is gone; in its place, a client with pi1's certificate says hostile things."""
    hardware = node_pb2.Hardware(
        arch="aarch64",
        os_name=OS_NAME,
        machine_model=MODEL,
        cpu_model=CPU_MODEL,
        kernel=KERNEL,
        disks=[node_pb2.Disk(device=DEVICE, mountpoint="/", fstype="ext4", total_bytes=1)],
    )
    sample = node_pb2.MetricsSample(
        timestamp=time.time(),
        filesystems=[node_pb2.FilesystemUsage(device=DEVICE, mountpoint="/", fstype="ext4", size_bytes=10)],
    )
    messages = [
        agent_pb2.AgentMessage(
            hello=agent_pb2.Hello(node_name="pi1", agent_version="0.1.0", hardware=hardware)
        ),
        agent_pb2.AgentMessage(metrics=sample),
    ]
    try:
        open_session(lab.coordinator_address, node_credentials(lab, "pi1"), messages)
    except grpc.RpcError as error:  # the stream may end by deadline: the messages were taken
        assert error.code() == grpc.StatusCode.DEADLINE_EXCEEDED, error.details()


def assert_literal(text: str) -> None:
    assert not [code for code in FORBIDDEN if code in text], text


@pytest.fixture
def hostile_lab(lab_factory: Callable[..., Lab]) -> Lab:
    lab = lab_factory(1)
    lab.kill_agent("pi1")
    hostile_session(lab)
    return lab


def test_coordctl_and_prometheus_show_a_hostile_node_literally(hostile_lab: Lab) -> None:
    lab = hostile_lab
    nodes = lab.coordctl("nodes", check=True).stdout
    assert_literal(nodes)
    assert OS_NAME in nodes and MODEL in nodes

    shown = lab.coordctl("node", "show", "pi1", check=True).stdout
    assert_literal(shown)
    for text in (OS_NAME, MODEL, "\\x1b[31mred\\x1b[0m", "\\x9b2J\\x07", "[link=http://x]y[/link]"):
        assert text in shown
    assert '"quoted" back\\slash\\x0anewline\\x0d' in shown

    for fmt, load in (("json", json.loads), ("yaml", yaml.safe_load)):
        out = lab.coordctl("node", "show", "pi1", "-o", fmt, check=True).stdout
        assert_literal(out)
        hardware = load(out)["hardware"]
        assert (hardware["os_name"], hardware["cpu_model"], hardware["kernel"]) == (
            OS_NAME,
            CPU_MODEL,
            KERNEL,
        )
        assert hardware["disks"][0]["device"] == DEVICE

    with urllib.request.urlopen(lab.metrics_url, timeout=10) as reply:
        exposition = reply.read().decode()
    devices = {
        sample.labels["device"]
        for family in text_string_to_metric_families(exposition)
        if family.name == "node_filesystem_size_bytes"
        for sample in family.samples
        if sample.labels["instance"] == "pi1"
    }
    assert devices == {DEVICE}

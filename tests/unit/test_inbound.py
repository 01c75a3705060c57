"""Every agent message is checked before it touches state."""

import math

import pytest

from picoord.coordinator.inbound import MalformedMessage, check_followup, check_hello
from picoord.v1 import agent_pb2, node_pb2


def hello(name: str = "pi1", **hardware: object) -> agent_pb2.AgentMessage:
    return agent_pb2.AgentMessage(
        hello=agent_pb2.Hello(node_name=name, agent_version="0.1.0", hardware=node_pb2.Hardware(**hardware))
    )


def test_a_good_hello_passes() -> None:
    assert check_hello(hello(arch="aarch64", cpu_cores=4), "pi1").hardware.cpu_cores == 4


@pytest.mark.parametrize(
    ("message", "code"),
    [
        (agent_pb2.AgentMessage(heartbeat=agent_pb2.Heartbeat(timestamp=1.0)), "hello_expected"),
        (agent_pb2.AgentMessage(), "hello_expected"),
        (hello("pi2"), "name_mismatch"),
        (hello("PI1"), "malformed_message"),
        (hello(hostname="x" * 257), "malformed_message"),
        (
            hello(interfaces=[node_pb2.NetworkInterface(name=f"veth{i}") for i in range(513)]),
            "malformed_message",
        ),
    ],
)
def test_bad_hellos(message: agent_pb2.AgentMessage, code: str) -> None:
    with pytest.raises(MalformedMessage) as raised:
        check_hello(message, "pi1")
    assert raised.value.code == code


def metrics(**fields: object) -> agent_pb2.AgentMessage:
    values: dict[str, object] = {"timestamp": 1.7e9, "cpu_percent": 12.0}
    values.update(fields)
    return agent_pb2.AgentMessage(metrics=node_pb2.MetricsSample(**values))


@pytest.mark.parametrize(
    ("message", "kind"),
    [
        (metrics(), "metrics"),
        (agent_pb2.AgentMessage(heartbeat=agent_pb2.Heartbeat(timestamp=1.0)), "heartbeat"),
        (agent_pb2.AgentMessage(event=agent_pb2.Event(kind="restarted", message="ok")), "event"),
        (agent_pb2.AgentMessage(action_result=agent_pb2.ActionResult(action_id="a1")), "action_result"),
    ],
)
def test_good_followups(message: agent_pb2.AgentMessage, kind: str) -> None:
    assert check_followup(message) == kind


@pytest.mark.parametrize(
    ("message", "code"),
    [
        (agent_pb2.AgentMessage(), "malformed_message"),
        (hello(), "duplicate_hello"),
        (metrics(timestamp=0.0), "malformed_message"),
        (metrics(timestamp=math.nan), "malformed_message"),
        (metrics(cpu_percent=101.0), "malformed_message"),
        (metrics(cpu_percent=-1.0), "malformed_message"),
        (metrics(load1=math.inf), "malformed_message"),
        (metrics(cpus=[node_pb2.CpuTimes(cpu=i) for i in range(1025)]), "malformed_message"),
        (metrics(temperatures=[node_pb2.Temperature(celsius=math.nan)]), "malformed_message"),
        (agent_pb2.AgentMessage(heartbeat=agent_pb2.Heartbeat(timestamp=math.inf)), "malformed_message"),
        (agent_pb2.AgentMessage(event=agent_pb2.Event(message="x" * 4097)), "malformed_message"),
    ],
)
def test_bad_followups(message: agent_pb2.AgentMessage, code: str) -> None:
    with pytest.raises(MalformedMessage) as raised:
        check_followup(message)
    assert raised.value.code == code

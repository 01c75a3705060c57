"""Checks on every message an agent sends, before any of it touches state.

A malformed message ends that agent's session with a clear error; it never reaches the
store or the metrics history, and it never disturbs other sessions.
"""

from __future__ import annotations

import math

from picoord.common.checks.workloads import check_reports
from picoord.common.names import InvalidName, validate_node_name
from picoord.common.validation import FieldError
from picoord.v1 import agent_pb2, node_pb2

MAX_TEXT = 256
MAX_CPUS = 1024
MAX_FILESYSTEMS = 256
MAX_INTERFACES = 512
MAX_TEMPERATURES = 128
MAX_ADDRESSES = 64


class MalformedMessage(ValueError):
    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code


def _text(field: str, value: str) -> None:
    if len(value) > MAX_TEXT:
        raise MalformedMessage("malformed_message", f"{field} is longer than {MAX_TEXT} characters")


def _count(field: str, values: object, limit: int) -> None:
    if len(values) > limit:  # type: ignore[arg-type]
        raise MalformedMessage("malformed_message", f"{field} has more than {limit} entries")


def _finite(field: str, value: float) -> None:
    if not math.isfinite(value):
        raise MalformedMessage("malformed_message", f"{field} is not a finite number")


def check_hello(message: agent_pb2.AgentMessage, certified_name: str) -> agent_pb2.Hello:
    if message.WhichOneof("body") != "hello":
        raise MalformedMessage("hello_expected", "the first message of a session must be hello")
    hello = message.hello
    try:
        validate_node_name(hello.node_name)
    except InvalidName as error:
        raise MalformedMessage("malformed_message", str(error)) from None
    if hello.node_name != certified_name:
        raise MalformedMessage(
            "name_mismatch",
            f"hello claims node {hello.node_name!r} but the client certificate is for {certified_name!r}",
        )
    _text("agent_version", hello.agent_version)
    check_hardware(hello.hardware)
    return hello


def check_hardware(hardware: node_pb2.Hardware) -> None:
    for field in ("hostname", "arch", "cpu_model", "os_name", "kernel", "machine_model"):
        _text(f"hardware.{field}", getattr(hardware, field))
    _count("hardware.disks", hardware.disks, MAX_FILESYSTEMS)
    _count("hardware.interfaces", hardware.interfaces, MAX_INTERFACES)
    for interface in hardware.interfaces:
        _text("hardware.interfaces.name", interface.name)
        _count("hardware.interfaces.addresses", interface.addresses, MAX_ADDRESSES)
    _count("hardware.gpus", hardware.gpus, 64)


def check_sample(sample: node_pb2.MetricsSample) -> None:
    _finite("metrics.timestamp", sample.timestamp)
    if sample.timestamp <= 0:
        raise MalformedMessage("malformed_message", "metrics.timestamp must be positive")
    _finite("metrics.cpu_percent", sample.cpu_percent)
    if not 0 <= sample.cpu_percent <= 100:
        raise MalformedMessage("malformed_message", "metrics.cpu_percent must be between 0 and 100")
    for field in ("load1", "load5", "load15", "boot_time"):
        _finite(f"metrics.{field}", getattr(sample, field))
    _count("metrics.cpus", sample.cpus, MAX_CPUS)
    _count("metrics.filesystems", sample.filesystems, MAX_FILESYSTEMS)
    _count("metrics.network", sample.network, MAX_INTERFACES)
    _count("metrics.temperatures", sample.temperatures, MAX_TEMPERATURES)
    for temperature in sample.temperatures:
        _finite("metrics.temperatures.celsius", temperature.celsius)
        _text("metrics.temperatures.type", temperature.type)
    for filesystem in sample.filesystems:
        _text("metrics.filesystems.mountpoint", filesystem.mountpoint)
    for counters in sample.network:
        _text("metrics.network.device", counters.device)


def check_followup(message: agent_pb2.AgentMessage) -> str:
    """Validate a message after hello; return which kind it is."""
    kind = message.WhichOneof("body")
    if kind is None:
        raise MalformedMessage("malformed_message", "empty message")
    if kind == "hello":
        raise MalformedMessage("duplicate_hello", "hello may only be sent once per session")
    if kind == "metrics":
        check_sample(message.metrics)
    elif kind == "heartbeat":
        _finite("heartbeat.timestamp", message.heartbeat.timestamp)
    elif kind == "action_result":
        check_action_result(message.action_result)
    elif kind == "event":
        _text("event.kind", message.event.kind)
        if len(message.event.message) > 4096:
            raise MalformedMessage("malformed_message", "event.message is longer than 4096 characters")
    elif kind == "replicas":
        try:
            check_reports(message.replicas)
        except FieldError as error:
            raise MalformedMessage("malformed_message", f"replicas: {error}") from None
    return kind


MAX_COMMANDS = 256
MAX_RESULT_TEXT = 64 * 1024


def check_action_result(result: agent_pb2.ActionResult) -> None:
    _text("action_result.action_id", result.action_id)
    if len(result.message) > MAX_RESULT_TEXT or len(result.in_place) > MAX_RESULT_TEXT:
        raise MalformedMessage("malformed_message", f"action_result text is longer than {MAX_RESULT_TEXT}")
    _count("action_result.commands", result.commands, MAX_COMMANDS)
    _count("action_result.facts", result.facts, 64)
    for command in result.commands:
        _count("action_result.commands.argv", command.argv, 512)
        if len(command.output_tail) > MAX_RESULT_TEXT:
            raise MalformedMessage("malformed_message", "a command's output tail is too long")

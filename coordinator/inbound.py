"""Checks on every message an agent sends, before any of it touches state.

A message is first held to its kind's byte budget (`limits.MESSAGE_BYTES`), then every
string and every repeated field in it to its own limit, looked up in the tables below by
the field's protobuf name. A field missing from the tables is a bug the unit tests catch
(and meanwhile gets the strictest default), so a new proto field cannot arrive unbounded.

A refused message ends that agent's session with a clear error; it never reaches the
store or the metrics history, and it never disturbs other sessions.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from google.protobuf.descriptor import Descriptor, FieldDescriptor
from google.protobuf.message import Message

from picoord.common import limits
from picoord.common.checks.workloads import check_reports, read_older_agents_states
from picoord.common.names import InvalidName, validate_node_name
from picoord.common.node_series import METRIC_NAME, family_of
from picoord.common.validation import FieldError
from picoord.v1 import agent_pb2, node_pb2

TOO_LARGE = "message_too_large"
MALFORMED = "malformed_message"

# Most characters of each string field (bytes for bytes fields), keyed "Message.field";
# "Message.field[]" is each item of a repeated string.
TEXT_LIMITS: dict[str, int] = {
    "Hello.node_name": limits.NODE_NAME,
    "Hello.agent_version": limits.TEXT,
    **{
        f"Hardware.{name}": limits.TEXT
        for name in ("hostname", "arch", "cpu_model", "os_name", "kernel", "machine_model")
    },
    **{
        f"Uname.{name}": limits.TEXT
        for name in ("sysname", "nodename", "release", "version", "machine", "domainname")
    },
    "SeriesKey.name": limits.TEXT,
    "SeriesKey.label_values[]": limits.TEXT,
    "Disk.device": limits.TEXT,
    "Disk.mountpoint": limits.TEXT,
    "Disk.fstype": limits.TEXT,
    "NetworkInterface.name": limits.TEXT,
    "NetworkInterface.mac": limits.TEXT,
    "NetworkInterface.addresses[]": limits.TEXT,
    "Gpu.vendor": limits.TEXT,
    "Gpu.name": limits.TEXT,
    "Gpu.driver_version": limits.TEXT,
    "DockerInfo.version": limits.TEXT,
    "DockerInfo.api_version": limits.TEXT,
    "FilesystemUsage.device": limits.TEXT,
    "FilesystemUsage.mountpoint": limits.TEXT,
    "FilesystemUsage.fstype": limits.TEXT,
    "NetworkCounters.device": limits.TEXT,
    "Temperature.zone": limits.TEXT,
    "Temperature.type": limits.TEXT,
    "ActionResult.action_id": limits.TEXT,
    "ActionResult.message": limits.RESULT_TEXT,
    "ActionResult.in_place": limits.RESULT_TEXT,
    "CommandRecord.argv[]": limits.ARGV_ITEM,
    "CommandRecord.output_tail": limits.RESULT_TEXT,
    "Fact.key": limits.FACT_KEY,
    "Fact.value": limits.FACT_VALUE,
    "Event.kind": limits.EVENT_KIND,
    "Event.message": limits.EVENT_MESSAGE,
    "Event.AttributesEntry.key": limits.EVENT_ATTRIBUTE_KEY,
    "Event.AttributesEntry.value": limits.EVENT_ATTRIBUTE_VALUE,
    "EnrollRequest.token": limits.BOOTSTRAP_TOKEN,
    "EnrollRequest.node_name": limits.NODE_NAME,
    "EnrollRequest.csr_pem": limits.CSR_BYTES,
    "EnrollRequest.LabelsEntry.key": limits.LABEL_KEY,
    "EnrollRequest.LabelsEntry.value": limits.LABEL_VALUE,
    "RenewCertificate.csr_pem": limits.CSR_BYTES,
    **{
        f"ReplicaReport.{name}": limits.TEXT
        for name in ("service", "replica", "container_id", "state_word", "address")
    },
    "ReplicaReport.message": limits.REPLICA_MESSAGE,
    "ReplicaReports.volumes_removed[]": limits.TEXT,
    "ReplicaReports.networks_present[]": limits.NETWORK_NAME,
    "ReplicaReports.virtual_addresses_held[]": limits.IP_ADDRESS,
    "LogChunk.request_id": limits.TEXT,
    "LogChunk.error": limits.REPLICA_MESSAGE,
    "LogLine.text": limits.LOG_LINE_BYTES,
}

# Most entries of each repeated or map field, keyed "Message.field".
COUNT_LIMITS: dict[str, int] = {
    "Hardware.disks": limits.FILESYSTEMS,
    "Hardware.interfaces": limits.INTERFACES,
    "Hardware.gpus": limits.GPUS,
    "NetworkInterface.addresses": limits.ADDRESSES,
    "Hardware.series": limits.SERIES,
    "SeriesKey.label_values": limits.SERIES_LABELS,
    "MetricsSample.series_values": limits.SERIES,
    "MetricsSample.cpus": limits.CPUS,
    "MetricsSample.filesystems": limits.FILESYSTEMS,
    "MetricsSample.network": limits.INTERFACES,
    "MetricsSample.temperatures": limits.TEMPERATURES,
    "ActionResult.commands": limits.COMMANDS,
    "ActionResult.facts": limits.FACTS,
    "CommandRecord.argv": limits.ARGV,
    "Event.attributes": limits.EVENT_ATTRIBUTES,
    "EnrollRequest.labels": limits.LABELS,
    "ReplicaReports.replicas": limits.REPLICAS_PER_NODE,
    "ReplicaReports.volumes_removed": limits.VOLUME_REMOVALS,
    "ReplicaReports.networks_present": limits.OVERLAY_NETWORKS,
    "ReplicaReports.virtual_addresses_held": limits.VIRTUAL_ADDRESSES,
    "LogChunk.lines": limits.LOG_CHUNK_LINES,
}

# What a field missing from the tables gets: the strictest sensible bound.
DEFAULT_TEXT = limits.TEXT
DEFAULT_COUNT = 64


class MalformedMessage(ValueError):
    """A refused message: `code` is the machine-readable reason (message_too_large,
    malformed_message, hello_expected, name_mismatch, duplicate_hello), `kind` the message
    kind it was refused as ("unknown" when it could not be read at all)."""

    def __init__(self, code: str, message: str, kind: str = "unknown") -> None:
        super().__init__(message)
        self.code = code
        self.kind = kind


def _key(field: FieldDescriptor) -> str:
    return field.full_name.removeprefix(f"{field.file.package}.")


def _is_repeated(field: FieldDescriptor) -> bool:
    # protobuf 5.x+ deprecate and then drop `label`; Debian 12's 3.21 only has `label`.
    repeated = getattr(field, "is_repeated", None)
    return bool(repeated) if repeated is not None else field.label == FieldDescriptor.LABEL_REPEATED


@dataclass(frozen=True)
class _Rule:
    """How one field is bounded: `count` for repeated and map fields, `text` for a string
    or bytes value (or each item), `child` for a message value (or each item)."""

    name: str
    count: int | None
    text: int | None
    child: Descriptor | None
    map_key: int | None = None  # for maps: limits on each key and value text
    map_value: int | None = None


def _text_limit(key: str, field: FieldDescriptor) -> int | None:
    if field.type not in (FieldDescriptor.TYPE_STRING, FieldDescriptor.TYPE_BYTES):
        return None
    return TEXT_LIMITS.get(key, DEFAULT_TEXT)


_BOUNDED: dict[Descriptor, bool] = {}


def _bounded(descriptor: Descriptor) -> bool:
    """Whether a message of this type holds anything a limit applies to (a string, bytes, a
    repeated field or a map), itself or below. A type that does not (a CpuTimes: numbers
    only) is never walked into: at 1,000 samples a second the walk into every CPU's times
    was most of the bounds check's cost."""
    known = _BOUNDED.get(descriptor)
    if known is not None:
        return known
    _BOUNDED[descriptor] = True  # a type that contains itself: walked, to be safe
    found = any(
        _is_repeated(field)
        or field.type in (FieldDescriptor.TYPE_STRING, FieldDescriptor.TYPE_BYTES)
        or (field.message_type is not None and _bounded(field.message_type))
        for field in descriptor.fields
    )
    _BOUNDED[descriptor] = found
    return found


def _walked(descriptor: Descriptor | None) -> Descriptor | None:
    return descriptor if descriptor is not None and _bounded(descriptor) else None


def _rule(field: FieldDescriptor) -> _Rule:
    key = _key(field)
    if not _is_repeated(field):
        child = _walked(field.message_type) if field.type == FieldDescriptor.TYPE_MESSAGE else None
        return _Rule(field.name, None, _text_limit(key, field), child)
    count = COUNT_LIMITS.get(key, DEFAULT_COUNT)
    entry = field.message_type
    if entry is not None and entry.GetOptions().map_entry:
        key_field, value_field = entry.fields_by_name["key"], entry.fields_by_name["value"]
        return _Rule(
            field.name,
            count,
            None,
            _walked(value_field.message_type),
            map_key=_text_limit(_key(key_field), key_field),
            map_value=_text_limit(_key(value_field), value_field),
        )
    if entry is not None:
        return _Rule(field.name, count, None, _walked(entry))
    return _Rule(
        field.name,
        count,
        TEXT_LIMITS.get(f"{key}[]", DEFAULT_TEXT) if _text_limit(key, field) else None,
        None,
    )


_RULES: dict[FieldDescriptor, _Rule] = {}


def _rules_of(descriptor: Descriptor) -> None:
    for field in descriptor.fields:
        if field in _RULES:
            continue
        _RULES[field] = _rule(field)
        if field.message_type is not None:
            _rules_of(field.message_type)


_rules_of(agent_pb2.AgentMessage.DESCRIPTOR)
_rules_of(agent_pb2.EnrollRequest.DESCRIPTOR)


@dataclass(frozen=True)
class _Check:
    """One field of a type that a limit applies to, as the walk reads it: a singular message
    is looked into only when it is set (`present`)."""

    rule: _Rule
    present: bool


_CHECKS: dict[Descriptor, tuple[_Check, ...]] = {}


def _checks(descriptor: Descriptor) -> tuple[_Check, ...]:
    """The type's fields that a limit applies to, in field-number order (the order the
    first field over its limit is named in). Numbers are never read: a Pi's sample is mostly
    numbers, and reading them (ListFields) was half the bounds check's cost."""
    known = _CHECKS.get(descriptor)
    if known is not None:
        return known
    checks = []
    for field in sorted(descriptor.fields, key=lambda field: field.number):
        rule = _RULES.get(field) or _rule(field)
        if rule.count is not None or rule.text is not None or rule.child is not None:
            checks.append(_Check(rule, rule.count is None and rule.child is not None))
    _CHECKS[descriptor] = found = tuple(checks)
    return found


class _OverLimit(Exception):
    """Raised inside the walk with the path from the failing field upwards; turned into
    MalformedMessage at the top, so no path text is built for a message that passes."""

    def __init__(self, detail: str, *path: str) -> None:
        self.detail = detail
        self.path = list(path)


def _too_long(value: str | bytes, limit: int) -> str:
    unit = "bytes" if isinstance(value, bytes) else "characters"
    return f"is {len(value)} {unit} long, the limit is {limit}"


def _walk(message: Message) -> None:
    for check in _checks(message.DESCRIPTOR):
        rule = check.rule
        if check.present and not message.HasField(rule.name):
            continue
        value = getattr(message, rule.name)
        try:
            if rule.count is not None:
                if len(value) > rule.count:
                    raise _OverLimit(f"has {len(value)} entries, the limit is {rule.count}")
                if rule.map_key is not None or rule.map_value is not None:
                    for map_key in value:
                        if rule.map_key is not None and len(map_key) > rule.map_key:
                            raise _OverLimit(_too_long(map_key, rule.map_key), " key")
                        item = value[map_key]
                        try:
                            if rule.child is not None:
                                _walk(item)
                            elif rule.map_value is not None and len(item) > rule.map_value:
                                raise _OverLimit(_too_long(item, rule.map_value))
                        except _OverLimit as over:
                            over.path.append(f"[{map_key!r}]")
                            raise
                elif rule.child is not None:
                    for index, item in enumerate(value):
                        try:
                            _walk(item)
                        except _OverLimit as over:
                            over.path.append(f"[{index}]")
                            raise
                elif rule.text is not None:
                    for index, item in enumerate(value):
                        if len(item) > rule.text:
                            raise _OverLimit(_too_long(item, rule.text), f"[{index}]")
            elif rule.child is not None:
                _walk(value)
            elif rule.text is not None and len(value) > rule.text:
                raise _OverLimit(_too_long(value, rule.text))
        except _OverLimit as over:
            over.path.append(f".{rule.name}")
            raise


def check_bounds(message: Message, where: str, kind: str) -> None:
    """Every string and repeated field under `message` within its limit; MalformedMessage
    naming the first field that is not (e.g. "metrics.filesystems[3].device")."""
    try:
        _walk(message)
    except _OverLimit as over:
        path = where + "".join(reversed(over.path))
        raise MalformedMessage(MALFORMED, f"{path} {over.detail}", kind) from None


def check_budget(kind: str, body: Message) -> None:
    """The message kind's byte budget, checked before anything else is looked at."""
    size = body.ByteSize()
    budget = limits.MESSAGE_BYTES.get(kind, min(limits.MESSAGE_BYTES.values()))
    if size > budget:
        name = limits.MESSAGE_NAMES.get(kind, kind)
        raise MalformedMessage(TOO_LARGE, f"{name} is {size} bytes, the limit is {budget}", kind)


def _finite(field: str, value: float, kind: str) -> None:
    if not math.isfinite(value):
        raise MalformedMessage(MALFORMED, f"{field} is not a finite number", kind)


def check_hello(message: agent_pb2.AgentMessage, certified_name: str) -> agent_pb2.Hello:
    if message.WhichOneof("body") != "hello":
        raise MalformedMessage(
            "hello_expected",
            "the first message of a session must be hello",
            message.WhichOneof("body") or "unknown",
        )
    hello = message.hello
    check_budget("hello", hello)
    check_bounds(hello, "hello", "hello")
    try:
        validate_node_name(hello.node_name)
    except InvalidName as error:
        raise MalformedMessage(MALFORMED, str(error), "hello") from None
    if hello.node_name != certified_name:
        raise MalformedMessage(
            "name_mismatch",
            f"hello claims node {hello.node_name!r} but the client certificate is for {certified_name!r}",
            "hello",
        )
    _finite("hello.hardware.boot_time", hello.hardware.boot_time, "hello")
    check_series(hello.hardware)
    return hello


def check_series(hardware: node_pb2.Hardware) -> None:
    """The declared series become metric names and labels on /metrics: each name must be a
    valid metric name, and a family this side knows must get its own number of labels."""
    for index, key in enumerate(hardware.series):
        where = f"hello.hardware.series[{index}]"
        if not METRIC_NAME.match(key.name):
            raise MalformedMessage(MALFORMED, f"{where}.name {key.name!r} is not a metric name", "hello")
        family = family_of(key.name)
        if family is not None and len(key.label_values) != len(family.labels):
            raise MalformedMessage(
                MALFORMED,
                f"{where} {key.name} has {len(key.label_values)} label values, it takes "
                f"{len(family.labels)} ({', '.join(family.labels) or 'none'})",
                "hello",
            )


# The SoC and disk temperatures a running machine can report, in °C.
PLAUSIBLE_CELSIUS = (-40.0, 150.0)


def _implausible(field: str, why: str) -> MalformedMessage:
    return MalformedMessage(MALFORMED, f"implausible sample: metrics.{field} {why}", "metrics")


def check_plausible(sample: node_pb2.MetricsSample, hardware: node_pb2.Hardware) -> None:
    """A sample agrees with itself and with the hardware its session's hello reported (which
    placement in turn holds against the hardware recorded at enrollment): available memory
    and swap within their totals, the totals those of the hello, no more CPUs than it has
    cores, temperatures a machine can have. Load and temperature within these remain the
    node's word (docs/architecture.md, "What a node can and cannot claim")."""
    if sample.memory_available_bytes > sample.memory_total_bytes:
        raise _implausible("memory_available_bytes", "is more than memory_total_bytes")
    if sample.memory_free_bytes > sample.memory_total_bytes:
        raise _implausible("memory_free_bytes", "is more than memory_total_bytes")
    if sample.swap_free_bytes > sample.swap_total_bytes:
        raise _implausible("swap_free_bytes", "is more than swap_total_bytes")
    if hardware.memory_total_bytes and sample.memory_total_bytes not in (0, hardware.memory_total_bytes):
        raise _implausible(
            "memory_total_bytes",
            f"is {sample.memory_total_bytes}, the hello reported {hardware.memory_total_bytes}",
        )
    if hardware.cpu_cores and len(sample.cpus) > hardware.cpu_cores:
        raise _implausible(
            "cpus", f"has {len(sample.cpus)} entries, the hello reported {hardware.cpu_cores} cores"
        )
    low, high = PLAUSIBLE_CELSIUS
    for index, temperature in enumerate(sample.temperatures):
        if not low <= temperature.celsius <= high:
            raise _implausible(f"temperatures[{index}].celsius", f"is outside {low:g}..{high:g}")


def check_sample(sample: node_pb2.MetricsSample) -> None:
    """The numbers of a sample; its sizes are check_bounds' job."""
    _finite("metrics.timestamp", sample.timestamp, "metrics")
    if sample.timestamp <= 0:
        raise MalformedMessage(MALFORMED, "metrics.timestamp must be positive", "metrics")
    _finite("metrics.cpu_percent", sample.cpu_percent, "metrics")
    if not 0 <= sample.cpu_percent <= 100:
        raise MalformedMessage(MALFORMED, "metrics.cpu_percent must be between 0 and 100", "metrics")
    for field in ("load1", "load5", "load15", "boot_time"):
        _finite(f"metrics.{field}", getattr(sample, field), "metrics")
    for index, temperature in enumerate(sample.temperatures):
        _finite(f"metrics.temperatures[{index}].celsius", temperature.celsius, "metrics")


def check_followup(message: agent_pb2.AgentMessage, hardware: node_pb2.Hardware | None = None) -> str:
    """Validate a message after hello; return which kind it is. With the hello's `hardware`,
    a sample is also held to it (check_plausible)."""
    kind = message.WhichOneof("body")
    if kind is None:
        raise MalformedMessage(MALFORMED, "empty message")
    if kind == "hello":
        raise MalformedMessage("duplicate_hello", "hello may only be sent once per session", kind)
    body = getattr(message, kind)
    check_budget(kind, body)
    check_bounds(body, kind, kind)
    if kind == "metrics":
        check_sample(message.metrics)
        if hardware is not None:
            check_plausible(message.metrics, hardware)
    elif kind == "heartbeat":
        _finite("heartbeat.timestamp", message.heartbeat.timestamp, kind)
    elif kind == "event":
        _finite("event.timestamp", message.event.timestamp, kind)
    elif kind == "log_chunk":
        for index, line in enumerate(message.log_chunk.lines):
            _finite(f"log_chunk.lines[{index}].timestamp", line.timestamp, kind)
    elif kind == "replicas":
        try:
            check_reports(message.replicas)
            read_older_agents_states(message.replicas)
        except FieldError as error:
            raise MalformedMessage(MALFORMED, f"replicas: {error}", kind) from None
    return kind


def check_enroll_request(request: agent_pb2.EnrollRequest) -> None:
    """Sizes of an EnrollRequest (its byte budget, then each field), before anything in it
    is parsed, compared or logged. The enrollment servicer checks the meaning."""
    check_budget("enroll", request)
    check_bounds(request, "enroll", "enroll")

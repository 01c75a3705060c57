"""Property-based fuzzing of the inbound checks: whatever an agent sends, check_hello and
check_followup either accept it or raise MalformedMessage, never anything else, and never
accept a message over its kind's byte budget or with a field over its limit.

Three sources of input: random bytes parsed as an AgentMessage, valid messages with
fields blown up (long strings, many entries, odd numbers), and valid serialized messages
with their bytes mutated. The number of inputs tried is printed at the end of the module
(run with -s to see it).
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Iterator

import pytest
from google.protobuf.descriptor import Descriptor, FieldDescriptor
from google.protobuf.message import DecodeError, Message
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from picoord.common import limits
from picoord.coordinator.inbound import (
    COUNT_LIMITS,
    TEXT_LIMITS,
    MalformedMessage,
    _is_repeated,
    _key,
    check_followup,
    check_hello,
)
from picoord.v1 import actions_pb2, agent_pb2, node_pb2

NODE = "pi1"
TRIED: Counter[str] = Counter()
OUTCOMES: Counter[str] = Counter()
FUZZ = settings(
    max_examples=2000,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.large_base_example],
)


@pytest.fixture(scope="module", autouse=True)
def report_inputs_tried() -> Iterator[None]:
    yield
    print(f"\ninbound fuzzing: {sum(TRIED.values())} inputs tried ({dict(TRIED)}); {dict(OUTCOMES)}")


def valid_messages() -> list[agent_pb2.AgentMessage]:
    """One realistic message of each kind, the seeds the mutations start from."""
    hardware = node_pb2.Hardware(
        hostname="pi1",
        arch="aarch64",
        cpu_model="Cortex-A72",
        cpu_cores=4,
        os_name="Debian GNU/Linux 12 (bookworm)",
        kernel="6.1.0-rpi7-rpi-v8",
        machine_model="Raspberry Pi 4 Model B Rev 1.4",
        raspberry_pi=True,
        disks=[node_pb2.Disk(device="/dev/mmcblk0p2", mountpoint="/", fstype="ext4", total_bytes=31 << 30)],
        interfaces=[
            node_pb2.NetworkInterface(
                name="eth0", mac="dc:a6:32:00:00:01", addresses=["10.0.0.5/24", "fe80::1/64"], up=True
            )
        ],
        gpus=[node_pb2.Gpu(vendor="broadcom", name="VideoCore VI")],
        docker=node_pb2.DockerInfo(present=True, version="24.0.5", api_version="1.43"),
        boot_time=1.7e9,
    )
    sample = node_pb2.MetricsSample(
        timestamp=1.7e9,
        cpu_percent=12.5,
        cpus=[node_pb2.CpuTimes(cpu=i, user=10.0, idle=90.0) for i in range(4)],
        load1=0.5,
        filesystems=[node_pb2.FilesystemUsage(device="/dev/mmcblk0p2", mountpoint="/", fstype="ext4")],
        network=[node_pb2.NetworkCounters(device="eth0", receive_bytes=100, transmit_bytes=50)],
        temperatures=[node_pb2.Temperature(zone="thermal_zone0", type="cpu-thermal", celsius=48.2)],
        boot_time=1.7e9,
    )
    result = agent_pb2.ActionResult(
        action_id="a1",
        outcome=agent_pb2.ACTION_OUTCOME_SUCCEEDED,
        message="applied",
        commands=[actions_pb2.CommandRecord(argv=["ufw", "allow", "22/tcp"], ran=True, output_tail="ok")],
        facts=[actions_pb2.Fact(key="swarm.node_id", value="abc")],
        in_place="nothing",
    )
    return [
        agent_pb2.AgentMessage(
            hello=agent_pb2.Hello(node_name=NODE, agent_version="0.1.0", hardware=hardware)
        ),
        agent_pb2.AgentMessage(metrics=sample),
        agent_pb2.AgentMessage(heartbeat=agent_pb2.Heartbeat(timestamp=1.7e9)),
        agent_pb2.AgentMessage(action_result=result),
        agent_pb2.AgentMessage(
            event=agent_pb2.Event(kind="restarted", message="ok", timestamp=1.7e9, attributes={"a": "b"})
        ),
    ]


SEEDS = valid_messages()


def within_limits(message: Message) -> bool:
    """An independent walk over every field (set or not) against the tables."""
    for field in message.DESCRIPTOR.fields:
        key = _key(field)
        value = getattr(message, field.name)
        if _is_repeated(field):
            if len(value) > COUNT_LIMITS[key]:
                return False
            if field.message_type is not None and field.message_type.GetOptions().map_entry:
                entry = field.message_type
                for map_key in value:
                    if len(map_key) > TEXT_LIMITS[_key(entry.fields_by_name["key"])]:
                        return False
                    if len(value[map_key]) > TEXT_LIMITS[_key(entry.fields_by_name["value"])]:
                        return False
            elif field.message_type is not None:
                if not all(within_limits(item) for item in value):
                    return False
            elif field.type == FieldDescriptor.TYPE_STRING and any(
                len(item) > TEXT_LIMITS[f"{key}[]"] for item in value
            ):
                return False
        elif field.type == FieldDescriptor.TYPE_MESSAGE:
            if message.HasField(field.name) and not within_limits(value):
                return False
        elif (
            field.type in (FieldDescriptor.TYPE_STRING, FieldDescriptor.TYPE_BYTES)
            and len(value) > TEXT_LIMITS[key]
        ):
            return False
    return True


def run_checks(message: agent_pb2.AgentMessage, as_first: bool) -> str | None:
    """The check the servicer would run; the kind when accepted, None when refused. Any
    exception but MalformedMessage fails the test; so does accepting anything oversized."""
    try:
        if as_first:
            check_hello(message, NODE)
            kind = "hello"
        else:
            kind = check_followup(message)
    except MalformedMessage as error:
        assert error.code in {
            "message_too_large",
            "malformed_message",
            "hello_expected",
            "name_mismatch",
            "duplicate_hello",
        }
        assert len(str(error)) < 1024
        OUTCOMES[f"refused {error.code}"] += 1
        return None
    body = getattr(message, kind)
    assert body.ByteSize() <= limits.MESSAGE_BYTES[kind]
    assert within_limits(body)
    OUTCOMES[f"accepted {kind}"] += 1
    return kind


# --- 1. random bytes -----------------------------------------------------------------------


@settings(FUZZ, max_examples=2000)
@given(payload=st.binary(max_size=4096), as_first=st.booleans())
def test_random_bytes(payload: bytes, as_first: bool) -> None:
    TRIED["random bytes"] += 1
    try:
        message = agent_pb2.AgentMessage.FromString(payload)
    except DecodeError:
        OUTCOMES["refused undecodable"] += 1
        return  # the servicer refuses these as malformed_message before any check
    run_checks(message, as_first)


# --- 2. valid messages, fields blown up -----------------------------------------------------

LENGTHS = st.one_of(
    st.sampled_from([0, 1, 63, 64, 255, 256, 257, 1024, 4096, 4097, 16384, 16385, 65536, 65537, 300_000]),
    st.integers(min_value=0, max_value=70_000),
)
# For each item of a repeated field: long enough to cross every item limit, short enough
# that thousands of them stay cheap to build.
ITEM_LENGTHS = st.one_of(
    st.sampled_from([0, 1, 63, 64, 256, 257, 1024, 1025, 4096, 4097]),
    st.integers(min_value=0, max_value=5000),
)
COUNTS = st.one_of(
    st.sampled_from([0, 1, 32, 33, 64, 65, 128, 129, 256, 257, 512, 513, 1024, 1025, 3000]),
    st.integers(min_value=0, max_value=1100),
)
FLOATS = st.one_of(st.floats(allow_nan=True, allow_infinity=True), st.sampled_from([0.0, -1.0, 101.0, 1e308]))
CHARS = st.sampled_from(["x", "é", "\x1b", "[", "\x00", "🙂"])


SIGNED_32 = (
    FieldDescriptor.TYPE_ENUM,
    FieldDescriptor.TYPE_INT32,
    FieldDescriptor.TYPE_SINT32,
    FieldDescriptor.TYPE_SFIXED32,
)


def _blow_up(message: Message, data: st.DataObject, depth: int = 0) -> None:
    """Change one field somewhere under `message`: a long text, many entries, odd numbers."""
    descriptor: Descriptor = message.DESCRIPTOR
    field = data.draw(st.sampled_from(list(descriptor.fields)))
    if field.message_type is not None and field.message_type.GetOptions().map_entry:
        key_length, value = data.draw(ITEM_LENGTHS), data.draw(CHARS) * data.draw(ITEM_LENGTHS)
        getattr(message, field.name).update(
            {f"{index:06d}".ljust(key_length, "k"): value for index in range(data.draw(COUNTS))}
        )
    elif field.message_type is not None:
        if _is_repeated(field):
            container = getattr(message, field.name)
            if data.draw(st.booleans()) or depth > 3:
                template = container.add()
                container.extend([template] * data.draw(COUNTS))
            else:
                _blow_up(container.add(), data, depth + 1)
        else:
            _blow_up(getattr(message, field.name), data, depth + 1)
    elif field.type == FieldDescriptor.TYPE_STRING:
        if _is_repeated(field):
            getattr(message, field.name).extend(
                [data.draw(CHARS) * data.draw(ITEM_LENGTHS)] * data.draw(COUNTS)
            )
        else:
            setattr(message, field.name, data.draw(CHARS) * data.draw(LENGTHS))
    elif field.type == FieldDescriptor.TYPE_BYTES:
        setattr(message, field.name, b"\xff" * data.draw(LENGTHS))
    elif field.type in (FieldDescriptor.TYPE_DOUBLE, FieldDescriptor.TYPE_FLOAT):
        setattr(message, field.name, data.draw(FLOATS))
    elif field.type == FieldDescriptor.TYPE_BOOL:
        setattr(message, field.name, data.draw(st.booleans()))
    elif field.type in SIGNED_32:
        setattr(message, field.name, data.draw(st.integers(-(2**31), 2**31 - 1)))
    elif field.type in (FieldDescriptor.TYPE_UINT32, FieldDescriptor.TYPE_FIXED32):
        setattr(message, field.name, data.draw(st.integers(0, 2**32 - 1)))
    elif _is_repeated(field):  # packed integers (series_values): only their count is bounded
        getattr(message, field.name).extend([data.draw(st.integers(0, 2**62))] * data.draw(COUNTS))
    else:
        setattr(message, field.name, data.draw(st.integers(0, 2**63 - 1)))


@settings(FUZZ, max_examples=800)
@given(seed=st.sampled_from(range(len(SEEDS))), changes=st.integers(1, 4), data=st.data())
def test_valid_messages_with_fields_blown_up(seed: int, changes: int, data: st.DataObject) -> None:
    TRIED["blown-up fields"] += 1
    message = agent_pb2.AgentMessage()
    message.CopyFrom(SEEDS[seed])
    kind = message.WhichOneof("body")
    for _ in range(changes):
        _blow_up(getattr(message, kind), data)
    run_checks(message, as_first=kind == "hello")


# --- 3. valid serialized messages, bytes mutated ---------------------------------------------


@st.composite
def mutated_bytes(draw: st.DrawFn) -> bytes:
    data = bytearray(SEEDS[draw(st.integers(0, len(SEEDS) - 1))].SerializeToString())
    for _ in range(draw(st.integers(1, 6))):
        operation = draw(st.sampled_from(["flip", "insert", "delete", "duplicate", "truncate", "splice"]))
        at = draw(st.integers(0, len(data)))
        if operation == "flip" and data:
            at = min(at, len(data) - 1)
            data[at] ^= 1 << draw(st.integers(0, 7))
        elif operation == "insert":
            data[at:at] = draw(st.binary(min_size=1, max_size=16))
        elif operation == "delete":
            del data[at : at + draw(st.integers(1, 8))]
        elif operation == "duplicate" and len(data) < 1024 * 1024:  # big enough to cross any budget
            end = draw(st.integers(at, len(data)))
            data[at:at] = data[at:end] * draw(st.integers(1, 64))
        elif operation == "truncate":
            del data[at:]
        else:  # another seed's bytes spliced in: a valid field in an unexpected place
            data[at:at] = SEEDS[draw(st.integers(0, len(SEEDS) - 1))].SerializeToString()
    return bytes(data)


@settings(FUZZ, max_examples=1000)
@given(payload=mutated_bytes(), as_first=st.booleans())
def test_mutated_serialized_messages(payload: bytes, as_first: bool) -> None:
    TRIED["mutated bytes"] += 1
    try:
        message = agent_pb2.AgentMessage.FromString(payload)
    except DecodeError:
        OUTCOMES["refused undecodable"] += 1
        return
    run_checks(message, as_first)


# --- the seeds themselves pass: the fuzzing starts from valid ground ----------------------------


@pytest.mark.parametrize("message", SEEDS, ids=lambda message: message.WhichOneof("body"))
def test_seeds_are_accepted(message: agent_pb2.AgentMessage) -> None:
    kind = message.WhichOneof("body")
    assert run_checks(message, as_first=kind == "hello") == kind


def test_a_nan_timestamp_or_a_huge_field_is_refused_not_crashed() -> None:
    """Plain regressions: a NaN timestamp and a 300 KB device string, refused, not crashed."""
    sample = agent_pb2.AgentMessage()
    sample.CopyFrom(SEEDS[1])
    sample.metrics.timestamp = math.nan
    assert run_checks(sample, as_first=False) is None
    sample.metrics.timestamp = 1.7e9
    sample.metrics.filesystems[0].device = "x" * 300_000
    assert run_checks(sample, as_first=False) is None

"""Every agent message is checked before it touches state."""

import math

import pytest
from google.protobuf.descriptor import Descriptor, FieldDescriptor

from picoord.common import limits
from picoord.coordinator.inbound import (
    COUNT_LIMITS,
    TEXT_LIMITS,
    MalformedMessage,
    _bounded,
    _checks,
    _is_repeated,
    _key,
    check_enroll_request,
    check_followup,
    check_hello,
    check_plausible,
)
from picoord.v1 import actions_pb2, agent_pb2, node_pb2


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


# --- Bounds: every field has a limit, the byte budget comes first -------------------------


def _fields(descriptor: Descriptor, seen: set[str]) -> list[FieldDescriptor]:
    found = []
    for field in descriptor.fields:
        if field.full_name in seen:
            continue
        seen.add(field.full_name)
        found.append(field)
        if field.message_type is not None:
            found += _fields(field.message_type, seen)
    return found


INBOUND_FIELDS = _fields(agent_pb2.AgentMessage.DESCRIPTOR, set()) + _fields(
    agent_pb2.EnrollRequest.DESCRIPTOR, set()
)


@pytest.mark.parametrize("field", INBOUND_FIELDS, ids=lambda field: _key(field))
def test_every_inbound_field_has_its_own_limit(field: FieldDescriptor) -> None:
    """A new proto field must get a limit in the tables, not the fallback."""
    key = _key(field)
    is_map_entry = field.containing_type.GetOptions().map_entry
    if _is_repeated(field):
        assert key in COUNT_LIMITS
        if field.type == FieldDescriptor.TYPE_STRING:
            assert f"{key}[]" in TEXT_LIMITS
    elif field.type in (FieldDescriptor.TYPE_STRING, FieldDescriptor.TYPE_BYTES):
        assert key in TEXT_LIMITS
    elif not is_map_entry:
        assert field.type != FieldDescriptor.TYPE_GROUP


def test_every_table_entry_names_a_real_field() -> None:
    keys = {_key(field) for field in INBOUND_FIELDS}
    assert {key.removesuffix("[]") for key in TEXT_LIMITS} <= keys
    assert set(COUNT_LIMITS) <= keys


def test_budgets_are_well_under_grpc_limit() -> None:
    assert max(limits.MESSAGE_BYTES.values()) <= limits.GRPC_RECEIVE_BYTES // 8
    assert set(limits.MESSAGE_NAMES) == set(limits.MESSAGE_BYTES)


def sample(**fields: object) -> node_pb2.MetricsSample:
    return metrics(**fields).metrics


def result(**fields: object) -> agent_pb2.AgentMessage:
    values: dict[str, object] = {"action_id": "a1", **fields}
    return agent_pb2.AgentMessage(action_result=agent_pb2.ActionResult(**values))


def event(**fields: object) -> agent_pb2.AgentMessage:
    values: dict[str, object] = {"kind": "k", **fields}
    return agent_pb2.AgentMessage(event=agent_pb2.Event(**values))


LONG = "x" * 257
FS = node_pb2.FilesystemUsage

# (message, field path the error names): one over-long or over-full field at a time.
OVER_LIMIT_FOLLOWUPS = [
    (metrics(filesystems=[FS(device=LONG)]), "metrics.filesystems[0].device is 257 characters"),
    (metrics(filesystems=[FS(), FS(fstype=LONG)]), "metrics.filesystems[1].fstype is 257"),
    (metrics(filesystems=[FS(mountpoint=LONG)]), "metrics.filesystems[0].mountpoint is 257"),
    (metrics(filesystems=[FS()] * 257), "metrics.filesystems has 257 entries, the limit is 256"),
    (metrics(network=[node_pb2.NetworkCounters(device=LONG)]), "metrics.network[0].device"),
    (metrics(network=[node_pb2.NetworkCounters()] * 513), "metrics.network has 513 entries"),
    (metrics(temperatures=[node_pb2.Temperature(zone=LONG)]), "metrics.temperatures[0].zone"),
    (metrics(temperatures=[node_pb2.Temperature(type=LONG)]), "metrics.temperatures[0].type"),
    (metrics(temperatures=[node_pb2.Temperature()] * 129), "metrics.temperatures has 129 entries"),
    (metrics(cpus=[node_pb2.CpuTimes(cpu=i) for i in range(1025)]), "metrics.cpus has 1025 entries"),
    (result(action_id=LONG), "action_result.action_id is 257"),
    (result(message="m" * (64 * 1024 + 1)), "action_result.message is 65537"),
    (result(in_place="m" * (64 * 1024 + 1)), "action_result.in_place is 65537"),
    (result(facts=[actions_pb2.Fact(key=LONG)]), "action_result.facts[0].key is 257"),
    (result(facts=[actions_pb2.Fact(key="k", value="v" * 16385)]), "action_result.facts[0].value is 16385"),
    (result(facts=[actions_pb2.Fact(key="k")] * 65), "action_result.facts has 65 entries"),
    (result(commands=[actions_pb2.CommandRecord(argv=["a" * 4097])]), "commands[0].argv[0] is 4097"),
    (result(commands=[actions_pb2.CommandRecord(argv=["a"] * 513)]), "commands[0].argv has 513 entries"),
    (
        result(commands=[actions_pb2.CommandRecord(output_tail="o" * 65537)]),
        "action_result.commands[0].output_tail is 65537",
    ),
    (result(commands=[actions_pb2.CommandRecord()] * 257), "action_result.commands has 257 entries"),
    (event(kind=LONG), "event.kind is 257"),
    (event(message="m" * 4097), "event.message is 4097 characters long, the limit is 4096"),
    (event(attributes={"k" * 65: "v"}), "event.attributes key is 65"),
    (event(attributes={"k": "v" * 1025}), "event.attributes['k'] is 1025"),
    (event(attributes={f"k{i}": "v" for i in range(33)}), "event.attributes has 33 entries"),
    (event(timestamp=math.nan), "event.timestamp is not a finite number"),
]


@pytest.mark.parametrize(("message", "error"), OVER_LIMIT_FOLLOWUPS)
def test_over_limit_followups_name_the_field(message: agent_pb2.AgentMessage, error: str) -> None:
    with pytest.raises(MalformedMessage) as raised:
        check_followup(message)
    assert raised.value.code == "malformed_message"
    assert raised.value.kind == message.WhichOneof("body")
    assert error in str(raised.value)


NIC = node_pb2.NetworkInterface
OVER_LIMIT_HELLOS = [
    (hello(disks=[node_pb2.Disk(device=LONG)]), "hello.hardware.disks[0].device is 257"),
    (hello(disks=[node_pb2.Disk(mountpoint=LONG)]), "hello.hardware.disks[0].mountpoint"),
    (hello(disks=[node_pb2.Disk(fstype=LONG)]), "hello.hardware.disks[0].fstype"),
    (hello(disks=[node_pb2.Disk()] * 257), "hello.hardware.disks has 257 entries"),
    (hello(interfaces=[NIC(mac=LONG)]), "hello.hardware.interfaces[0].mac"),
    (hello(interfaces=[NIC(name=LONG)]), "hello.hardware.interfaces[0].name"),
    (hello(interfaces=[NIC(addresses=[LONG])]), "hello.hardware.interfaces[0].addresses[0] is 257"),
    (hello(interfaces=[NIC(addresses=["a"] * 65)]), "interfaces[0].addresses has 65 entries"),
    (hello(gpus=[node_pb2.Gpu(name=LONG)]), "hello.hardware.gpus[0].name"),
    (hello(gpus=[node_pb2.Gpu(vendor=LONG)]), "hello.hardware.gpus[0].vendor"),
    (hello(gpus=[node_pb2.Gpu(driver_version=LONG)]), "hello.hardware.gpus[0].driver_version"),
    (hello(gpus=[node_pb2.Gpu()] * 65), "hello.hardware.gpus has 65 entries"),
    (hello(docker=node_pb2.DockerInfo(version=LONG)), "hello.hardware.docker.version"),
    (hello(os_name=LONG), "hello.hardware.os_name is 257"),
    (hello(boot_time=math.inf), "hello.hardware.boot_time is not a finite number"),
    (hello("p" * 64), "hello.node_name is 64 characters long, the limit is 63"),
]


@pytest.mark.parametrize(("message", "error"), OVER_LIMIT_HELLOS)
def test_over_limit_hellos_name_the_field(message: agent_pb2.AgentMessage, error: str) -> None:
    with pytest.raises(MalformedMessage) as raised:
        check_hello(message, "pi1")
    assert (raised.value.code, raised.value.kind) == ("malformed_message", "hello")
    assert error in str(raised.value)


def test_a_huge_node_name_never_reaches_the_error_text() -> None:
    with pytest.raises(MalformedMessage) as raised:
        check_hello(hello("a" * 100_000), "pi1")
    assert len(str(raised.value)) < 200


def _blown(size: int) -> list[node_pb2.FilesystemUsage]:
    """Filesystems within every per-field limit that together weigh about `size` bytes."""
    one = FS(device="d" * 250, mountpoint="m" * 250, fstype="f" * 250)
    return [one] * min(256, size // one.ByteSize() + 1)


TOO_LARGE = [
    (metrics(filesystems=_blown(70_000)), "metrics sample is", 65536),
    (hello(disks=[node_pb2.Disk(device="d" * 250, mountpoint="m" * 250)] * 256), "hello is", 65536),
    (event(attributes={f"k{i}": "v" * 1024 for i in range(9)}), "event is", 8192),
    (
        result(commands=[actions_pb2.CommandRecord(output_tail="o" * 60_000)] * 5),
        "action result is",
        262144,
    ),
]


@pytest.mark.parametrize(("message", "name", "budget"), TOO_LARGE)
def test_over_budget_messages_are_too_large(message: agent_pb2.AgentMessage, name: str, budget: int) -> None:
    kind = message.WhichOneof("body")
    size = getattr(message, kind).ByteSize()
    check = (lambda: check_hello(message, "pi1")) if kind == "hello" else (lambda: check_followup(message))
    with pytest.raises(MalformedMessage) as raised:
        check()
    assert (raised.value.code, raised.value.kind) == ("message_too_large", kind)
    assert str(raised.value) == f"{name} {size} bytes, the limit is {budget}"


def test_four_megabyte_sample_is_named_in_the_error() -> None:
    fat = sample(filesystems=[FS(device="x" * 15_000)] * 256)
    with pytest.raises(MalformedMessage) as raised:
        check_followup(agent_pb2.AgentMessage(metrics=fat))
    assert str(raised.value) == f"metrics sample is {fat.ByteSize()} bytes, the limit is 65536"
    assert fat.ByteSize() > 3_800_000


def test_unknown_fields_count_against_the_budget() -> None:
    """Bytes a newer (or hostile) agent adds under unused field numbers weigh too."""
    padding = b"\xfa\x3f" + b"\x80\x80\x04" + b"z" * 65536  # field 1007, length-delimited, 65536 bytes
    body = node_pb2.MetricsSample.FromString(sample().SerializeToString() + padding)
    with pytest.raises(MalformedMessage) as raised:
        check_followup(agent_pb2.AgentMessage(metrics=body))
    assert raised.value.code == "message_too_large"


ENROLL = dict(token="abcdef.0123456789abcdef", node_name="pi1", csr_pem=b"-----BEGIN")
BAD_ENROLLS = [
    ({**ENROLL, "node_name": "n" * 1_000_000}, "message_too_large", "enroll request is"),
    ({**ENROLL, "node_name": "n" * 64}, "malformed_message", "enroll.node_name is 64 characters"),
    ({**ENROLL, "token": "t" * 257}, "malformed_message", "enroll.token is 257"),
    ({**ENROLL, "csr_pem": b"c" * 16385}, "malformed_message", "enroll.csr_pem is 16385 bytes"),
    ({**ENROLL, "labels": {"k" * 318: "v"}}, "malformed_message", "enroll.labels key is 318"),
    ({**ENROLL, "labels": {"k": "v" * 64}}, "malformed_message", "enroll.labels['k'] is 64"),
    ({**ENROLL, "labels": {f"k{i}": "v" for i in range(65)}}, "malformed_message", "has 65 entries"),
]


@pytest.mark.parametrize(("fields", "code", "error"), BAD_ENROLLS)
def test_bad_enroll_requests(fields: dict, code: str, error: str) -> None:
    with pytest.raises(MalformedMessage) as raised:
        check_enroll_request(agent_pb2.EnrollRequest(**fields))
    assert raised.value.code == code
    assert error in str(raised.value)
    assert len(str(raised.value)) < 200


def test_a_good_enroll_request_passes() -> None:
    check_enroll_request(agent_pb2.EnrollRequest(**ENROLL, labels={"role": "storage"}))


def test_what_this_machine_reports_fits_every_limit() -> None:
    """Positive control: the real agent's hello and samples from this host pass."""
    from picoord.agent.hardware import collect_hardware
    from picoord.agent.metrics import MetricsSampler

    sampler = MetricsSampler()
    try:
        samples = [sampler.sample(), sampler.sample()]
    finally:
        sampler.close()
    message = agent_pb2.AgentMessage(
        hello=agent_pb2.Hello(node_name="pi1", agent_version="0.1.0", hardware=collect_hardware())
    )
    check_hello(message, "pi1")
    for one in samples:
        assert check_followup(agent_pb2.AgentMessage(metrics=one)) == "metrics"


GIB = 1 << 30
PI_HARDWARE = node_pb2.Hardware(cpu_cores=4, memory_total_bytes=GIB)


def pi_sample(**fields: object) -> node_pb2.MetricsSample:
    temperatures = fields.pop("temperatures", [50.0])
    cpus = fields.pop("cpus", 4)
    values = {"timestamp": 1.8e9, "memory_total_bytes": GIB, "memory_available_bytes": GIB // 2, **fields}
    sample = node_pb2.MetricsSample(**values)
    for celsius in temperatures:  # type: ignore[attr-defined]
        sample.temperatures.add(zone="thermal_zone0", type="cpu-thermal", celsius=celsius)
    for _ in range(cpus):  # type: ignore[call-overload]
        sample.cpus.add()
    return sample


@pytest.mark.parametrize(
    ("sample", "refusal"),
    [
        (pi_sample(), None),
        (pi_sample(memory_total_bytes=0, memory_available_bytes=0), None),  # memory unknown
        (pi_sample(temperatures=[20.0], cpu_percent=0.0), None),  # cool and idle: the node's word
        (pi_sample(memory_available_bytes=64 * GIB), "metrics.memory_available_bytes is more than"),
        (pi_sample(memory_free_bytes=2 * GIB), "metrics.memory_free_bytes is more than"),
        (pi_sample(swap_total_bytes=1, swap_free_bytes=2), "metrics.swap_free_bytes is more than"),
        (
            pi_sample(memory_total_bytes=64 * GIB, memory_available_bytes=60 * GIB),
            f"metrics.memory_total_bytes is {64 * GIB}, the hello reported {GIB}",
        ),
        (pi_sample(cpus=64), "metrics.cpus has 64 entries, the hello reported 4 cores"),
        (pi_sample(temperatures=[-273.0]), "metrics.temperatures[0].celsius is outside -40..150"),
        (pi_sample(temperatures=[50.0, 900.0]), "metrics.temperatures[1].celsius is outside -40..150"),
    ],
)
def test_samples_are_held_to_themselves_and_their_hello(
    sample: node_pb2.MetricsSample, refusal: str | None
) -> None:
    message = agent_pb2.AgentMessage(metrics=sample)
    if refusal is None:
        check_plausible(sample, PI_HARDWARE)
        assert check_followup(message, PI_HARDWARE) == "metrics"
        return
    with pytest.raises(MalformedMessage) as raised:
        check_followup(message, PI_HARDWARE)
    assert raised.value.code == "malformed_message" and raised.value.kind == "metrics"
    assert str(raised.value).startswith("implausible sample: ") and refusal in str(raised.value)


def test_a_sample_of_hardware_the_hello_did_not_report_is_not_compared() -> None:
    unknown = node_pb2.Hardware()  # an agent that could not read its totals
    check_plausible(pi_sample(memory_total_bytes=64 * GIB, memory_available_bytes=GIB, cpus=64), unknown)


@pytest.mark.parametrize(
    ("descriptor", "bounded"),
    [
        (node_pb2.CpuTimes.DESCRIPTOR, False),  # numbers only: never walked into
        (node_pb2.MetricsSample.DESCRIPTOR, True),  # repeated fields, devices' names
        (node_pb2.FilesystemUsage.DESCRIPTOR, True),  # a device and a mountpoint
        (agent_pb2.AgentMessage.DESCRIPTOR, True),
    ],
)
def test_only_types_that_hold_something_bounded_are_walked(descriptor: Descriptor, bounded: bool) -> None:
    assert _bounded(descriptor) is bounded


@pytest.mark.parametrize(
    ("descriptor", "read"),
    [
        # Numbers are never read; a repeated field of numbers has its count checked.
        (
            node_pb2.MetricsSample.DESCRIPTOR,
            ["cpus", "filesystems", "network", "temperatures", "series_values"],
        ),
        (node_pb2.CpuTimes.DESCRIPTOR, []),
        (node_pb2.Temperature.DESCRIPTOR, ["zone", "type"]),
    ],
)
def test_the_walk_reads_only_the_fields_a_limit_applies_to(descriptor: Descriptor, read: list[str]) -> None:
    assert [check.rule.name for check in _checks(descriptor)] == read


def test_a_message_body_is_looked_into_only_when_it_is_set() -> None:
    checks = {check.rule.name: check for check in _checks(agent_pb2.AgentMessage.DESCRIPTOR)}
    assert {"hello", "metrics", "replicas"} <= checks.keys()
    assert "heartbeat" not in checks  # a number only
    assert all(check.present for check in checks.values())


def test_a_repeated_numbers_only_field_still_has_its_count_checked() -> None:
    sample = node_pb2.MetricsSample(
        cpus=[node_pb2.CpuTimes(cpu=n) for n in range(COUNT_LIMITS["MetricsSample.cpus"] + 1)]
    )
    with pytest.raises(MalformedMessage, match=r"metrics\.cpus has \d+ entries"):
        check_followup(agent_pb2.AgentMessage(metrics=sample), node_pb2.Hardware())

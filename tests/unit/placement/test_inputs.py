"""Hardware and metrics messages into the scheduler's plain data."""

from picoord.coordinator.placement.inputs import load_from_sample, node_from
from picoord.coordinator.placement.scheduler import Load, Request, is_hot, place
from picoord.v1 import node_pb2

MIB = 1024 * 1024


def sample(**fields):
    temperatures = fields.pop("temperatures", [])
    message = node_pb2.MetricsSample(**fields)
    for zone, kind, celsius in temperatures:
        message.temperatures.add(zone=zone, type=kind, celsius=celsius)
    return message


def test_no_sample_means_unknown_load():
    assert load_from_sample(None) == Load()


def test_a_pi_sample():
    pi = sample(
        cpu_percent=37.5,
        memory_total_bytes=1024 * MIB,
        memory_available_bytes=600 * MIB,
        temperatures=[("thermal_zone0", "cpu-thermal", 81.2)],
        throttled_available=True,
        throttled=0x50005,
    )
    assert load_from_sample(pi) == Load(37.5, 600 * MIB, 81.2, 0x50005)


def test_throttle_bits_count_only_when_the_agent_could_read_them():
    desktop = sample(
        cpu_percent=5, memory_total_bytes=55 * 1024 * MIB, throttled_available=False, throttled=7
    )
    assert load_from_sample(desktop).throttled == 0
    assert load_from_sample(desktop).soc_celsius is None


def test_node_from_hardware_and_a_hot_sample():
    hardware = node_pb2.Hardware(
        hostname="raspberrypi", arch="aarch64", cpu_cores=4, memory_total_bytes=1024 * MIB
    )
    hot = sample(
        cpu_percent=10,
        memory_total_bytes=1024 * MIB,
        memory_available_bytes=900 * MIB,
        temperatures=[("thermal_zone0", "cpu-thermal", 85.0)],
    )
    node = node_from("pi1", hardware, hot, {"disk": "ssd"}, ready=True)
    assert (node.name, node.facts.arch, node.facts.hostname, node.facts.labels) == (
        "pi1",
        "aarch64",
        "raspberrypi",
        {"disk": "ssd"},
    )
    assert (node.memory_bytes, node.cpu_cores, node.gpus, node.ready, node.draining) == (
        1024 * MIB,
        4,
        0,
        True,
        False,
    )
    assert is_hot(node)
    cool = node_from("pi2", hardware, sample(cpu_percent=10, memory_total_bytes=1024 * MIB), {}, ready=True)
    assert place([node, cool], [], Request("mcp", 1)).assignments == ("pi2",)


def test_gpus_are_counted():
    hardware = node_pb2.Hardware(arch="x86_64", cpu_cores=16, memory_total_bytes=55 * 1024 * MIB)
    hardware.gpus.add(vendor="nvidia", name="RTX")
    assert node_from("desktop", hardware, None, {}, ready=True).gpus == 1

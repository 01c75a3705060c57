"""Hardware and metrics messages into the scheduler's plain data."""

import pytest

from picoord.coordinator.placement.constraints import parse_constraint
from picoord.coordinator.placement.inputs import (
    Enrolled,
    accepted_labels,
    hardware_changes,
    hostname_fact,
    load_from_sample,
    names_by_fold,
    node_from,
    roles_from_actions,
)
from picoord.coordinator.placement.scheduler import Load, Request, is_hot, place
from picoord.v1 import admin_pb2, agent_pb2, node_pb2

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


# --- node restriction: placement reads the coordinator's record, not the node's word ---------

GIB = 1024 * MIB
PI = node_pb2.Hardware(hostname="pi2", arch="aarch64", cpu_cores=4, memory_total_bytes=1 * GIB)


def hw(**changes: object) -> node_pb2.Hardware:
    """PI with some fields changed (gpus: a count of GPUs)."""
    result = node_pb2.Hardware()
    result.CopyFrom(PI)
    for _ in range(int(changes.pop("gpus", 0))):  # type: ignore[call-overload]
        result.gpus.add(vendor="nvidia", name="A100", memory_bytes=80 * GIB)
    for key, value in changes.items():
        setattr(result, key, value)
    return result


@pytest.mark.parametrize(
    ("reported", "changes"),
    [
        (hw(), []),
        (hw(hostname="renamed", kernel="6.6"), []),  # not what placement reads
        (hw(memory_total_bytes=64 * GIB), ["memory 1.0 GiB -> 64.0 GiB"]),
        (hw(cpu_cores=64), ["cores 4 -> 64"]),
        (hw(arch="x86_64"), ["arch aarch64 -> x86_64"]),
        (hw(gpus=2), ["gpus 0 -> 2"]),
        (
            hw(cpu_cores=64, memory_total_bytes=64 * GIB, gpus=2),
            ["cores 4 -> 64", "memory 1.0 GiB -> 64.0 GiB", "gpus 0 -> 2"],
        ),
    ],
)
def test_hardware_changes_are_what_placement_would_read_differently(reported, changes):
    assert hardware_changes(PI, reported) == changes


@pytest.mark.parametrize(
    ("name", "hostname", "others", "fact"),
    [
        ("pi2", "raspberrypi", {"pi1"}, "raspberrypi"),
        ("pi2", "pi1", {"pi1"}, ""),  # another node's name: no fact
        ("pi2", "PI1", {"pi1"}, ""),  # matched as constraints match, case-insensitively
        ("pi2", "pi2", {"pi1", "pi2"}, "pi2"),  # its own name is its own
        ("pi2", "pi1", set(), "pi1"),  # no node of that name (yet): harmless
        ("pi2", "pi1", {"PI1", "pi2"}, ""),  # another node's name, whatever its case
        ("pi2", "PI2", {"pi2"}, "PI2"),  # its own name in another case is its own
    ],
)
def test_a_hostname_never_names_another_node(name, hostname, others, fact):
    assert hostname_fact(name, hostname, names_by_fold(others)) == fact


def record(node, kind, outcome=agent_pb2.ACTION_OUTCOME_SUCCEEDED, at=1.0, dry_run=False):
    return admin_pb2.ActionRecord(
        node=node, kind=kind, outcome=outcome, started_at=at, finished_at=at + 1, dry_run=dry_run
    )


@pytest.mark.parametrize(
    ("records", "roles"),
    [
        ([], {}),
        (
            [record("desktop", "swarm_init"), record("pi1", "swarm_join")],
            {"desktop": "manager", "pi1": "worker"},
        ),
        ([record("desktop", "kubeadm_init", agent_pb2.ACTION_OUTCOME_UNCHANGED)], {"desktop": "manager"}),
        ([record("desktop", "k3s_server")], {"desktop": "manager"}),
        ([record("pi1", "swarm_init", agent_pb2.ACTION_OUTCOME_FAILED)], {}),  # never took effect
        ([record("pi1", "swarm_init", agent_pb2.ACTION_OUTCOME_PLANNED, dry_run=True)], {}),
        ([record("pi1", "swarm_init", at=1), record("pi1", "swarm_leave", at=5)], {"pi1": "worker"}),
        ([record("pi1", "swarm_leave", at=5), record("pi1", "swarm_init", at=9)], {"pi1": "manager"}),
        ([record("pi1", "mount"), record("pi1", "firewall")], {}),  # not membership
    ],
)
def test_roles_are_the_membership_actions_the_coordinator_ran(records, roles):
    assert roles_from_actions(records) == roles


def test_accepted_labels_leave_out_the_pending():
    assert accepted_labels({"role": "manager", "zone": "a"}, {"role"}) == {"zone": "a"}


@pytest.mark.parametrize(
    ("labels", "reported", "enrolled", "role", "constraint", "matches", "held"),
    [
        # row 1: 64 cores, 64 GiB, 2 GPUs reported after enrollment: the recorded ones count, held
        ({}, hw(cpu_cores=64, memory_total_bytes=64 * GIB, gpus=2), Enrolled(PI), "worker", None, None, 3),
        # row 2: pi2 recorded hostname pi1 -> no node.hostname fact; its own name still matches
        (
            {},
            hw(hostname="pi1"),
            Enrolled(hw(hostname="pi1"), node_names=names_by_fold({"pi1"})),
            "worker",
            "node.hostname == pi1",
            False,
            0,
        ),
        (
            {},
            hw(),
            Enrolled(PI, node_names=names_by_fold(["pi1"])),
            "worker",
            "node.hostname == pi2",
            True,
            0,
        ),
        # a later hello's hostname is no fact either: the recorded one is
        ({}, hw(hostname="db"), Enrolled(PI), "worker", "node.hostname == db", False, 0),
        # row 3: role=manager asked for at join: neither node.role nor node.labels.role
        (
            {"role": "manager"},
            hw(),
            Enrolled(PI, pending_labels={"role"}),
            "worker",
            "node.role == manager",
            False,
            0,
        ),
        (
            {"role": "manager"},
            hw(),
            Enrolled(PI, pending_labels={"role"}),
            "worker",
            "node.labels.role == manager",
            False,
            0,
        ),
        # positive controls: an operator's (accepted) label, the coordinator's role
        ({"role": "manager"}, hw(), Enrolled(PI), "worker", "node.labels.role == manager", True, 0),
        ({}, hw(), Enrolled(PI), "manager", "node.role == manager", True, 0),
    ],
)
def test_node_from_takes_facts_from_the_record(labels, reported, enrolled, role, constraint, matches, held):
    node = node_from("pi2", reported, None, labels, ready=True, role=role, enrolled=enrolled)
    assert (node.cpu_cores, node.memory_bytes, node.gpus) == (4, 1 * GIB, 0)
    assert len(node.held) == held
    if constraint is not None:
        request = Request("db", 1, constraints=(parse_constraint("c", constraint),))
        assert bool(place([node], [], request).assignments) is matches


def test_a_held_node_takes_no_new_replica_and_an_accepted_one_does():
    big = hw(memory_total_bytes=64 * GIB)
    held = node_from("pi2", big, None, {}, ready=True, enrolled=Enrolled(PI))
    placement = place([held], [], Request("db", 1))
    assert placement.assignments == ()
    assert (
        "held: it reports memory 1.0 GiB -> 64.0 GiB (coordctl node accept pi2)"
        in placement.rejected.values()
    )
    accepted = node_from("pi2", big, None, {}, ready=True, enrolled=Enrolled(big))
    assert (accepted.held, accepted.memory_bytes) == ((), 64 * GIB)
    assert place([accepted], [], Request("db", 1)).assignments == ("pi2",)

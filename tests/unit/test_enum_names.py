"""Each wire enum has one table of names, and it covers every value both ways: node status
and action outcome in coordinator/status.py, the workload and certificate enums in
common/vocabulary.py."""

import pytest

from picoord.common.vocabulary import CertificateState, ReplicaHealth, ReplicaState, RolloutStatus, WireWord
from picoord.coordinator.status import OUTCOME_NAMES, STATUS_NAMES, STATUS_TO_WIRE, Status
from picoord.v1 import admin_pb2, agent_pb2, services_pb2, workloads_pb2

VOCABULARY = [
    (RolloutStatus, services_pb2.RolloutStatus),
    (ReplicaState, workloads_pb2.ReplicaState),
    (ReplicaHealth, workloads_pb2.ReplicaHealth),
    (CertificateState, admin_pb2.CertificateState),
]


def test_every_status_has_a_wire_value_and_back() -> None:
    assert set(STATUS_TO_WIRE) == set(Status)
    assert {STATUS_NAMES[STATUS_TO_WIRE[status]] for status in Status} == {status.value for status in Status}


@pytest.mark.parametrize(
    ("names", "enum"),
    [(STATUS_NAMES, admin_pb2.NodeStatus), (OUTCOME_NAMES, agent_pb2.ActionOutcome)],
)
def test_every_wire_value_has_a_name(names: dict[int, str], enum: object) -> None:
    assert set(names) == set(enum.values())
    assert len(set(names.values())) == len(names)  # no two values print alike


@pytest.mark.parametrize(("words", "enum"), VOCABULARY)
def test_every_wire_value_has_one_word_and_back(words: type[WireWord], enum: object) -> None:
    assert sorted(member.wire for member in words) == sorted(enum.values())  # each value exactly once
    for member in words:
        assert words.from_wire(member.wire) is member
        assert words.from_word(member.value) is member
    assert len({member.value for member in words}) == len(words)  # no two values print alike


@pytest.mark.parametrize(("words", "enum"), VOCABULARY)
def test_each_word_sits_on_the_wire_value_of_its_name(words: type[WireWord], enum: object) -> None:
    """A swapped number (PAUSED sent as COMPLETE's) would print the wrong word on the other side."""
    for member in words:
        if member.wire != 0:  # the unspecified value has its own word: "not rolled out", "unknown", ...
            assert enum.Name(member.wire).endswith("_" + member.name), member


@pytest.mark.parametrize(("words", "enum"), VOCABULARY)
def test_a_value_or_word_this_build_does_not_know_reads_as_unspecified(
    words: type[WireWord], enum: object
) -> None:
    unspecified = words.from_wire(0)
    assert unspecified.wire == 0
    assert words.from_wire(max(enum.values()) + 1) is unspecified
    assert words.from_word("no such word") is unspecified


def test_the_words_users_see() -> None:
    """coordctl prints these, and picoord_rollout_status has one series per rollout word, in
    this order: renaming one changes what users and their alerts read."""
    assert list(RolloutStatus) == [
        "not rolled out",
        "progressing",
        "rolling back",
        "paused",
        "complete",
        "rolled back",
        "failed",
        "failing",
    ]
    under_way = [status for status in RolloutStatus if status.under_way]
    assert under_way == ["progressing", "rolling back", "failing"]
    assert list(ReplicaHealth) == ["-", "starting", "healthy", "unhealthy", "no check"]
    assert list(CertificateState) == ["none", "valid", "expired", "revoked"]
    # the agent reports Docker's container states by their own words
    docker = ("created", "running", "paused", "restarting", "removing", "exited", "dead")
    assert all(ReplicaState.from_word(word) == word for word in docker)

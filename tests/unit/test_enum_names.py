"""Each wire enum has one table of names (coordinator/status.py), and it covers every value."""

import pytest

from picoord.coordinator.status import OUTCOME_NAMES, STATUS_NAMES, STATUS_TO_WIRE, Status
from picoord.v1 import admin_pb2, agent_pb2


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

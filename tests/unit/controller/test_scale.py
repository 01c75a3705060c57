"""Table tests of scaling, pure: when `coordctl scale` is refused, and what the next tick
does with a scaled rollout (starts, stops, the reason replicas cannot be placed), with no
new revision."""

from __future__ import annotations

import dataclasses

import pytest

from picoord.coordinator.controller.decide import decide, scale_refusal, scaled
from picoord.coordinator.rollout import planner
from picoord.coordinator.rollout.replicas import HEALTHY, RUNNING
from tests.unit.controller.test_decide import facts, replica, service

BIG = "resources: {requests: {memory: 600Mi}}\n"  # one per node (1 GiB each)


@pytest.mark.parametrize(
    ("record", "count", "says"),
    [
        (service(status=planner.COMPLETE), 5, None),
        (service(status=planner.COMPLETE), 0, None),
        (service(status=planner.PROGRESSING), 3, None),  # a rollout under way takes the new count
        (service(status=planner.COMPLETE), 1001, "1001 is not a replica count (0-1000)"),
        (service(status=planner.COMPLETE, extra="mode: global\n"), 2, "typo is global"),
        (
            dataclasses.replace(service(), rollout=None),
            2,
            "not rolled out yet: `coordctl rollout typo` first",
        ),
    ],
)
def test_when_scale_is_refused(record, count: int, says: str | None) -> None:
    why = scale_refusal(record, count)
    assert (why is None) if says is None else (why is not None and says in why)


def test_scaled_keeps_the_revision_and_changes_only_the_count() -> None:
    rollout = service(status=planner.COMPLETE, revision=4).rollout
    assert rollout is not None
    assert scaled(rollout, 7) == dataclasses.replace(rollout, replicas=7)
    assert scaled(rollout, 7).revision == 4


def _scaled_record(count: int, extra: str = ""):
    record = service(status=planner.COMPLETE, extra=extra)
    assert record.rollout is not None
    return dataclasses.replace(record, rollout=scaled(record.rollout, count))


TWO = [
    replica("typo.1", "1", RUNNING, node="pi1", health=HEALTHY),
    replica("typo.2", "2", RUNNING, node="pi2", health=HEALTHY),
]


@pytest.mark.parametrize(
    ("count", "starts", "stops"),
    [(3, 1, 0), (2, 0, 0), (1, 0, 1), (0, 0, 2)],
)
def test_the_next_tick_starts_or_stops_to_the_new_count(count: int, starts: int, stops: int) -> None:
    out = decide(facts(TWO, record=_scaled_record(count)))
    assert len(out.starts) == starts and len(out.stops) == stops
    assert all(start.revision == 1 for start in out.starts)  # nothing new rolls
    assert all("more than" in why for _, why in out.stops)


def test_a_count_the_nodes_cannot_hold_says_why() -> None:
    out = decide(facts(TWO, record=_scaled_record(5, BIG)))
    assert len(out.starts) == 1  # the third node takes one
    assert out.unplaced.get("typo")

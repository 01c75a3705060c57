"""The read views of the published snapshot: a slot waiting out its start backoff shows in
`coordctl ps` with the reason and the next try, and a settled service that cannot keep its
replicas running shows as failing in `coordctl services` (issue 15)."""

from __future__ import annotations

import dataclasses

import pytest

from picoord.common.vocabulary import ReplicaState, RolloutStatus
from picoord.coordinator.controller.backoff import Backoff
from picoord.coordinator.controller.records import ReplicaRecord
from picoord.coordinator.controller.views import Snapshot, figures, replicas_view, services_view
from picoord.coordinator.rollout import planner
from picoord.coordinator.rollout.replicas import PENDING, Replica
from tests.unit.controller.test_decide import NOW, service

REASON = "cannot pull 10.0.0.1:5000/mcp-sever:1: manifest unknown: manifest unknown"


def snapshot(status: str, backoffs: list[Backoff], records: list[ReplicaRecord] = ()) -> Snapshot:  # type: ignore[assignment]
    record = service(status=status)
    return Snapshot(
        at=NOW,
        services={"typo": record},
        records=tuple(records),
        replicas={r.id: Replica(r.id, r.service, r.node, r.revision, PENDING, slot=r.slot) for r in records},
        specs={("typo", 1): record.spec},
        backoffs={b.key: b for b in backoffs},
    )


def test_a_slot_in_backoff_shows_its_last_attempt_reason_and_next_try() -> None:
    held = Backoff("typo", "1", 1, 3, NOW - 10, REASON, "pi2", ("typo.3", "typo.5"))
    [row] = replicas_view(snapshot(planner.FAILED_ROLLOUT, [held]), "typo", NOW)
    assert (row.replica, row.node, ReplicaState.from_wire(row.state), row.restarts) == (
        "typo.5",
        "pi2",
        "backoff",
        3,
    )
    assert row.message == "cannot pull 10.0.0.1:5000/mcp-sever…; next try in 30 s"
    assert len(row.message) <= 60  # coordctl ps's MESSAGE column


def test_a_slot_whose_next_try_runs_shows_that_replica_only() -> None:
    held = Backoff("typo", "1", 1, 1, NOW - 20, REASON, "pi2", ("typo.3",))
    trying = ReplicaRecord("typo.4", "typo", 1, "pi1", NOW, slot="1")
    rows = replicas_view(snapshot(planner.FAILED_ROLLOUT, [held], [trying]), "typo", NOW)
    assert [(r.replica, ReplicaState.from_wire(r.state), r.node_unreachable) for r in rows] == [
        ("typo.4", "pending", True)
    ]


@pytest.mark.parametrize(
    ("status", "revision", "shown"),
    [
        (planner.COMPLETE, 1, "failing"),
        (planner.COMPLETE, 7, "complete"),  # another revision's backoff: not this one's trouble
        (planner.FAILED_ROLLOUT, 1, "failed"),
        (planner.PROGRESSING, 1, "progressing"),
    ],
)
def test_a_settled_service_with_a_slot_in_backoff_is_failing(status: str, revision: int, shown: str) -> None:
    held = Backoff("typo", "2", revision, 1, NOW, REASON)
    view = snapshot(status, [held])
    [info] = services_view(view)
    [figure] = figures(dataclasses.replace(view))
    assert RolloutStatus.from_wire(info.rollout_status) == figure.rollout_status == shown

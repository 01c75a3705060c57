"""Table tests of the controller's one pure tick, decide(facts) -> decisions: start
backoff per slot (issue 15), forgetting confirmed stops, placement, wake-ups."""

from __future__ import annotations

import dataclasses

import pytest

from picoord.common.limits import SLOT_HISTORY, START_BACKOFF_RESET_AFTER
from picoord.coordinator.controller import backoff
from picoord.coordinator.controller.backoff import Backoff
from picoord.coordinator.controller.decide import Facts, decide, global_targets, refusal
from picoord.coordinator.controller.records import ServiceRecord
from picoord.coordinator.placement.constraints import NodeFacts
from picoord.coordinator.placement.scheduler import Node
from picoord.coordinator.reconcile.reconciler import NodeStatus
from picoord.coordinator.rollout import planner
from picoord.coordinator.rollout.replicas import FAILED, HEALTHY, PENDING, RUNNING, UNHEALTHY, Replica
from picoord.coordinator.workloads.reader import read_workloads
from picoord.coordinator.workloads.spec import ServiceSpec

NOW = 1_000_000.0
NODES = ("pi1", "pi2", "pi3")


def spec(image: str = "no-such-image:1", replicas: int = 2, extra: str = "") -> ServiceSpec:
    count = f"replicas: {replicas}\n" if "global" not in extra else ""
    text = f"kind: Service\nname: typo\nimage: {image}\n{count}update: {{monitor: 0s}}\n{extra}"
    [found] = read_workloads(text).services
    return found


def service(
    revision: int = 1, status: str = planner.FAILED_ROLLOUT, replicas: int = 2, extra: str = ""
) -> ServiceRecord:
    the_spec = spec(replicas=replicas, extra=extra)
    nodes = NODES if the_spec.mode == "global" else None
    rollout = planner.begin(
        "typo",
        revision,
        None,
        replicas,
        the_spec.update,
        NOW - 100,
        has_health_check=False,
        global_nodes=nodes,
    )
    return ServiceRecord(
        "typo", the_spec, NOW - 200, "typo.yaml", dataclasses.replace(rollout, status=status), 9
    )


def replica(rid: str, slot: str, state: str = RUNNING, **fields: object) -> Replica:
    values: dict[str, object] = {"created_at": NOW - 50, "since": NOW - 50, "health_since": NOW - 50}
    values.update(fields)
    node = str(values.pop("node", "pi1"))
    revision = int(values.pop("revision", 1))  # type: ignore[call-overload]
    return Replica(rid, "typo", node, revision, state=state, slot=slot, **values)  # type: ignore[arg-type]


def facts(
    replicas: list[Replica],
    backoffs: list[Backoff] = (),  # type: ignore[assignment]
    now: float = NOW,
    record: ServiceRecord | None = None,
    **more: object,
) -> Facts:
    record = record or service()
    nodes = {name: Node(NodeFacts(name), memory_bytes=1 << 30, cpu_cores=4) for name in NODES}
    statuses = tuple(NodeStatus(name, True, NOW - 1000) for name in NODES)
    values: dict[str, object] = {
        "now": now,
        "services": {"typo": record},
        "replicas": {r.id: r for r in replicas},
        "nodes": nodes,
        "statuses": statuses,
        "specs": {("typo", record.rollout.target if record.rollout else 1): record.spec},
        "backoffs": {b.key: b for b in backoffs},
    }
    values.update(more)
    return Facts(**values)  # type: ignore[arg-type]


def held(slot: str, failures: int, failed_at: float, revision: int = 1) -> Backoff:
    return Backoff(
        "typo", slot, revision, failures, failed_at, "cannot pull no-such-image:1", "pi1", ("typo.1",)
    )


@pytest.mark.parametrize(
    ("failures", "seconds"),
    [(0, 0.0), (1, 10.0), (2, 20.0), (3, 40.0), (4, 80.0), (5, 160.0), (6, 300.0), (7, 300.0), (500, 300.0)],
)
def test_the_backoff_doubles_from_10_s_and_caps_at_5_min(failures: int, seconds: float) -> None:
    assert backoff.delay(failures) == seconds


def test_a_replica_that_failed_to_start_is_stopped_and_its_slot_waits() -> None:
    failed = replica("typo.1", "1", FAILED, failure="cannot pull no-such-image:1: not found")
    out = decide(facts([failed, replica("typo.2", "2")]))
    assert out.stops == (("typo.1", "exited: cannot pull no-such-image:1: not found"),)
    assert out.starts == ()  # not replaced before its backoff
    [after] = out.backoffs
    assert (after.slot, after.failures, after.failed_at, after.attempts) == ("1", 1, NOW, ("typo.1",))
    assert after.reason == "cannot pull no-such-image:1: not found"
    assert out.wake_at == NOW + 10.0
    assert any("next try in 10 s" in line for _, line in out.notes)


@pytest.mark.parametrize(
    ("failures", "elapsed", "starts"),
    [
        (1, 0.0, 0),
        (1, 9.9, 0),
        (1, 10.0, 1),
        (2, 19.0, 0),
        (2, 20.0, 1),
        (3, 39.0, 0),
        (6, 299.0, 0),
        (6, 300.0, 1),
        (30, 300.0, 1),
    ],
)
def test_the_slot_is_filled_again_only_when_its_backoff_ends(
    failures: int, elapsed: float, starts: int
) -> None:
    out = decide(facts([replica("typo.2", "2")], [held("1", failures, NOW - elapsed)]))
    assert [(s.slot, s.revision) for s in out.starts] == [("1", 1)] * starts
    if not starts:
        assert out.wake_at == NOW - elapsed + backoff.delay(failures)


def test_a_failure_in_a_row_doubles_the_backoff_and_a_first_one_restarts_the_count() -> None:
    failed = replica("typo.7", "1", FAILED, failure="exit code 1")
    [after] = decide(facts([failed], [held("1", 2, NOW - 30)])).backoffs
    assert (after.failures, after.attempts) == (3, ("typo.1", "typo.7"))
    [other] = decide(facts([failed], [held("1", 4, NOW - 500, revision=9)])).backoffs
    assert (other.failures, other.revision) == (1, 1)  # another revision failed before: count anew


def test_an_unhealthy_replica_counts_as_a_failure_too() -> None:
    sick = replica("typo.1", "1", RUNNING, health=UNHEALTHY, failure="HTTP 500")
    record = service(
        status=planner.COMPLETE, extra="ports: [{target: 80}]\nhealth: {http: {path: /, port: 80}}\n"
    )
    out = decide(facts([sick, replica("typo.2", "2", health=HEALTHY)], record=record))
    assert [b.failures for b in out.backoffs] == [1] and out.starts == ()


@pytest.mark.parametrize(
    ("served_for", "cleared"),
    [(START_BACKOFF_RESET_AFTER, True), (START_BACKOFF_RESET_AFTER + 100, True), (30.0, False), (0.0, False)],
)
def test_a_replica_that_serves_long_enough_resets_its_slot(served_for: float, cleared: bool) -> None:
    serving = replica("typo.9", "1", since=NOW - served_for, health_since=NOW - served_for)
    out = decide(facts([serving, replica("typo.2", "2")], [held("1", 5, NOW - 400)]))
    assert out.cleared == ((("typo", "1"),) if cleared else ())
    if not cleared:
        assert out.wake_at == NOW - served_for + START_BACKOFF_RESET_AFTER


def test_history_is_pruned_per_slot() -> None:
    state = None
    for attempt in range(1, 13):
        state = backoff.failed(state, "typo", "1", 1, f"typo.{attempt}", "pi1", "cannot pull", NOW + attempt)
    assert state is not None
    assert state.failures == 12
    assert state.attempts == tuple(f"typo.{n}" for n in range(13 - SLOT_HISTORY, 13))


def test_another_revision_starts_at_once_and_a_rollback_is_never_held() -> None:
    record = dataclasses.replace(service(), rollout=dataclasses.replace(service().rollout, revision=2))  # type: ignore[arg-type]
    out = decide(
        facts([], [held("1", 3, NOW), held("2", 3, NOW)], record=record, specs={("typo", 2): spec("good:1")})
    )
    assert sorted((s.slot, s.revision) for s in out.starts) == [("1", 2), ("2", 2)]


def test_held_slots_are_not_dodged_by_starting_in_a_higher_slot() -> None:
    out = decide(facts([], [held("1", 1, NOW), held("2", 1, NOW - 10)]))
    assert [(s.slot, s.reason) for s in out.starts] == [("2", "2 of 2 replicas")]


def test_a_new_replica_takes_the_lowest_free_slot_and_a_node() -> None:
    out = decide(facts([replica("typo.1", "1", node="pi1")], record=service(status=planner.COMPLETE)))
    [start] = out.starts
    assert (start.slot, start.revision) == ("2", 1) and start.node in NODES


def test_a_global_service_keys_its_slots_by_node() -> None:
    record = service(replicas=0, status=planner.COMPLETE, extra="mode: global\n")
    out = decide(facts([replica("typo.1", "pi1", node="pi1")], [held("pi2", 1, NOW)], record=record))
    assert [(s.node, s.slot) for s in out.starts] == [("pi3", "pi3")]
    assert global_targets(record.spec, facts([], record=record)) == NODES


def test_a_confirmed_stop_is_forgotten_and_frees_its_room_in_the_same_tick() -> None:
    going = replica("typo.1", "1", RUNNING, stopping=True)
    out = decide(
        facts(
            [going, replica("typo.2", "2")],
            gone=frozenset({"typo.1"}),
            record=service(status=planner.COMPLETE),
        )
    )
    assert out.forget == ("typo.1",)
    assert [s.slot for s in out.starts] == ["1"]


def test_a_stop_not_yet_confirmed_is_kept() -> None:
    going = replica("typo.1", "1", RUNNING, stopping=True)
    out = decide(facts([going, replica("typo.2", "2")], record=service(status=planner.COMPLETE)))
    assert out.forget == () and out.stops == ()


@pytest.mark.parametrize(
    ("connected", "since", "silent_at", "wake_at"),
    [
        (False, NOW - 2, {}, NOW + 3),  # the 5 s grace of a closed session ends
        (True, NOW - 1000, {"pi1": NOW + 4}, NOW + 9),  # a silent node turns lost 5 s after not Ready
        (True, NOW - 1000, {"pi3": NOW + 4}, None),  # a node without replicas needs no look
    ],
)
def test_failover_deadlines_wake_the_controller(
    connected: bool, since: float, silent_at: dict[str, float], wake_at: float | None
) -> None:
    statuses = (
        NodeStatus("pi1", connected, since),
        *(NodeStatus(n, True, NOW - 1000) for n in ("pi2", "pi3")),
    )
    out = decide(
        facts(
            [replica("typo.1", "1", node="pi1"), replica("typo.2", "2", node="pi2")],
            record=service(status=planner.COMPLETE),
            statuses=statuses,
            silent_at=silent_at,
        )
    )
    assert out.starts == () and out.wake_at == wake_at


def test_a_lost_node_is_replaced_once_its_grace_ended() -> None:
    statuses = (NodeStatus("pi1", False, NOW - 6), *(NodeStatus(n, True, NOW - 1000) for n in ("pi2", "pi3")))
    lost = replica("typo.1", "1", node="pi1")
    out = decide(
        facts(
            [lost, replica("typo.2", "2", node="pi2")],
            record=service(status=planner.COMPLETE),
            statuses=statuses,
        )
    )
    assert out.replaced == ("typo.1",)
    [start] = out.starts
    assert start.node != "pi1"


def test_a_first_rollout_waits_for_its_dependencies_and_says_so_once() -> None:
    record = service(status=planner.PROGRESSING)
    record = dataclasses.replace(record, spec=dataclasses.replace(record.spec, depends_on=("db",)))
    db = ServiceRecord("db", spec(), NOW, "", None, 1)
    first = decide(facts([], record=record, services={"typo": record, "db": db}))
    assert first.starts == () and first.waiting == {"typo": "waiting for db to have a healthy replica"}
    again = decide(facts([], record=record, services={"typo": record, "db": db}, waiting=first.waiting))
    assert again.notes == () and again.starts == ()


def test_a_rolling_first_revision_that_fails_backs_off_its_slots() -> None:
    record = service(status=planner.PROGRESSING)
    failing = [
        replica(f"typo.{n}", str(n), FAILED, created_at=NOW - 5, failure="cannot pull") for n in (1, 2)
    ]
    out = decide(facts(failing, record=record))
    [rollout] = out.rollouts
    assert rollout.status == planner.FAILED_ROLLOUT
    assert sorted(b.slot for b in out.backoffs) == ["1", "2"] and out.starts == ()


def test_a_start_that_fits_nowhere_is_reported_once() -> None:
    record = service(status=planner.COMPLETE, extra="resources: {requests: {memory: 4Gi}}\n")
    out = decide(facts([], record=record))
    assert out.starts == () and "not placed" in out.unplaced["typo"]
    again = decide(facts([], record=record, unplaced=out.unplaced))
    assert not any("not placed" in line for _, line in again.notes)


def test_a_pending_replica_needs_no_start() -> None:
    out = decide(facts([replica("typo.1", "1", PENDING), replica("typo.2", "2", PENDING)]))
    assert out.starts == () and out.stops == ()


def test_a_rollout_is_refused_before_anything_starts_when_nothing_fits() -> None:
    big = spec(extra="resources: {requests: {memory: 4Gi}}\n")
    assert "cannot be placed" in (refusal(big, facts([]), []) or "")
    assert refusal(spec(), facts([]), []) is None

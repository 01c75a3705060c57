"""The rollout step function: single steps as tables, whole rollouts through a simulation."""

import itertools
from dataclasses import replace

import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from picoord.coordinator.rollout.planner import (
    COMPLETE,
    DELAYING,
    FAILED_ROLLOUT,
    MONITORING,
    PAUSED,
    PROGRESSING,
    UPDATING,
    WAITING_FOR_HEALTH,
    WAITING_FOR_ROOM,
    Failure,
    StartReplica,
    Step,
    StopReplica,
    begin,
    pause,
    resume,
    step,
)
from picoord.coordinator.rollout.policy import (
    CONTINUE,
    PAUSE,
    START_FIRST,
    UpdatePolicy,
    validate_update_policy,
)
from picoord.coordinator.rollout.replicas import (
    FAILED,
    HEALTH_STARTING,
    PENDING,
    RUNNING,
    STARTING,
    STOPPED,
    UNHEALTHY,
    UNKNOWN,
    Replica,
)
from tests.unit.rollout.simulation import (
    EXITS,
    HANGS,
    RESTARTS,
    UNHEALTHY_OUTCOME,
    Simulation,
    running,
)

NOW = 1000.0
STARTED = 500.0


DEFAULT = UpdatePolicy()


def rollout(replicas=3, policy=DEFAULT, previous=1, **changes):
    base = begin("mcp", 2, previous, replicas, validate_update_policy(policy), STARTED)
    return replace(base, **changes)


def olds(count=3, revision=1):
    return [running(f"old{i}", revision, f"pi{i}", at=0.0) for i in range(1, count + 1)]


def new(rid, node="pi9", state=RUNNING, health="healthy", created=NOW - 20, health_since=NOW - 10, **kw):
    return Replica(rid, "mcp", node, 2, state, health, created, created, health_since, **kw)


# --- single steps -------------------------------------------------------------------------


def test_first_deploy_starts_every_replica_at_once():
    result = step(rollout(previous=None), [], NOW)
    assert result.starts == (StartReplica(2, None, "revision 2"),) * 3
    assert result.stops == ()
    assert result.rollout.status == PROGRESSING


@pytest.mark.parametrize(
    ("policy", "replicas", "stops", "starts"),
    [
        (UpdatePolicy(), 3, ["old1"], 0),  # stop-first, parallelism 1
        (UpdatePolicy(parallelism=2), 3, ["old1", "old2"], 0),
        (UpdatePolicy(parallelism=0), 3, ["old1", "old2", "old3"], 0),  # all at once
        (UpdatePolicy(order=START_FIRST), 3, [], 1),
        (UpdatePolicy(order=START_FIRST, parallelism=2), 3, [], 2),
        # Kubernetes' 25%/25% on 4 with every worker free: one down, one up, as a Deployment does
        (UpdatePolicy(parallelism=0, max_surge="25%", max_unavailable="25%"), 4, ["old1"], 1),
        # surge 2, nothing may go down: two up first even with stop-first
        (UpdatePolicy(parallelism=0, max_surge=2, max_unavailable=0), 4, [], 2),
        # more workers than the bounds allow: the bounds win
        (UpdatePolicy(parallelism=3, max_unavailable=1), 4, ["old1"], 0),
        (UpdatePolicy(parallelism=3, order=START_FIRST, max_surge=1, max_unavailable=0), 4, [], 1),
        (UpdatePolicy(parallelism=0, max_surge="50%", max_unavailable="50%"), 4, ["old1", "old2"], 2),
    ],
)
def test_first_batch_within_the_bounds(policy, replicas, stops, starts):
    result = step(rollout(replicas, policy), olds(replicas), NOW)
    assert [stop.replica for stop in result.stops] == stops
    assert len(result.starts) == starts
    assert all(stop.reason == "updating to revision 2" for stop in result.stops)


def test_stop_first_waits_for_the_stop_then_refills():
    stopping = [replace(olds()[0], stopping=True), *olds()[1:]]
    waiting = step(rollout(), stopping, NOW)
    assert (waiting.stops, waiting.starts) == ((), ())
    assert waiting.waiting == "waiting for stopped replicas to go (3 present, at most 3)"
    assert waiting.phase == WAITING_FOR_ROOM
    refill = step(rollout(), olds()[1:], NOW)  # old1 is gone
    assert refill.starts == (StartReplica(2, None, "revision 2"),)
    assert refill.stops == ()
    assert refill.phase == UPDATING


@pytest.mark.parametrize(
    ("replica", "waiting"),
    [
        (
            new("n1", state=PENDING, health=UNKNOWN),
            "waiting for 1 replica(s) of revision 2 to become healthy",
        ),
        (
            new("n1", state=STARTING, health=UNKNOWN),
            "waiting for 1 replica(s) of revision 2 to become healthy",
        ),
        (new("n1", health=HEALTH_STARTING), "waiting for 1 replica(s) of revision 2 to become healthy"),
    ],
)
def test_a_worker_waits_for_its_new_replica(replica, waiting):
    result = step(rollout(), [*olds()[1:], replica], NOW)
    assert (result.stops, result.starts, result.waiting) == ((), (), waiting)
    assert result.phase == WAITING_FOR_HEALTH


def test_delay_between_batches_and_wake_at():
    policy = UpdatePolicy(delay=10)
    replicas = [*olds()[1:], new("n1", health_since=NOW - 4)]
    result = step(rollout(policy=policy), replicas, NOW)
    assert (result.stops, result.starts) == ((), ())
    assert result.waiting == "waiting 10 s between batches"
    assert result.phase == DELAYING
    assert result.wake_at == NOW + 1  # the monitor window ends first (healthy at NOW-4, monitor 5)
    later = step(rollout(policy=policy), replicas, NOW + 6)
    assert [stop.replica for stop in later.stops] == ["old2"]


def test_stop_first_next_batch_when_the_new_replica_is_healthy():
    # healthy for a second: its monitor window still runs, but its worker is free (as Swarm)
    result = step(rollout(), [*olds()[1:], new("n1", health_since=NOW - 1)], NOW)
    assert [stop.replica for stop in result.stops] == ["old2"]


def test_start_first_stops_the_surplus_old_once_the_new_one_is_healthy():
    policy = UpdatePolicy(order=START_FIRST)
    in_flight = step(rollout(policy=policy), [*olds(), new("n1", health=HEALTH_STARTING)], NOW)
    assert (in_flight.stops, in_flight.starts) == ((), ())
    healthy = step(rollout(policy=policy), [*olds(), new("n1")], NOW)
    assert healthy.stops == (StopReplica("old1", "pi1", "replaced by revision 2"),)
    assert healthy.starts == ()  # the old one has to go before the next new one
    gone = step(rollout(policy=policy), [*olds()[1:], new("n1")], NOW)
    assert gone.starts == (StartReplica(2, None, "revision 2"),)


def test_unavailable_old_replicas_go_first_and_cost_no_availability():
    replicas = olds()
    replicas[2] = replace(replicas[2], health=UNHEALTHY)
    result = step(rollout(policy=UpdatePolicy(parallelism=2)), replicas, NOW)
    # old3 (unhealthy) first; then old1 would leave 1 available < 3 - 2: allowed (1 >= 1)
    assert [stop.replica for stop in result.stops] == ["old3", "old1"]


def test_never_below_min_available_waits_for_room():
    replicas = olds()
    replicas[0] = replace(replicas[0], health=HEALTH_STARTING)  # already unavailable
    replicas[1] = replace(replicas[1], health=HEALTH_STARTING)
    policy = UpdatePolicy(max_unavailable=1, max_surge=0)
    result = step(rollout(policy=policy), replicas, NOW)
    # only the unavailable ones may go: old1 (the worker's one); old3 is the last available
    assert [stop.replica for stop in result.stops] == ["old1"]


def test_waiting_for_room_when_the_bounds_block():
    replicas = [replace(r, health=HEALTH_STARTING) if r.id != "old3" else r for r in olds()]
    replicas = [*replicas[2:], new("n1", node="pi7"), new("n2", node="pi8")]
    # 1 old available and 2 new healthy; nothing to do but the old one: 3 available, 2 must stay
    result = step(rollout(policy=UpdatePolicy(max_unavailable=1)), replicas, NOW)
    assert [stop.replica for stop in result.stops] == ["old3"]


def test_complete_when_every_new_replica_passed_its_monitor_window():
    done = [new(f"n{i}", health_since=NOW - 5) for i in range(3)]
    result = step(rollout(), done, NOW)
    assert result.rollout.status == COMPLETE
    assert result.rollout.state == "complete"
    assert result.events == ("rollout of mcp to revision 2 complete",)
    assert step(result.rollout, done, NOW + 100) == Step(result.rollout, phase=COMPLETE)  # finished: no-op
    assert result.phase == COMPLETE
    monitored = step(rollout(), [*done[:2], new("n9", health_since=NOW - 4)], NOW)
    assert monitored.rollout.status == PROGRESSING
    assert monitored.waiting == "monitoring 1 replica(s) for 5 s"
    assert monitored.phase == MONITORING
    assert monitored.wake_at == NOW + 1


def test_not_complete_while_an_old_replica_is_still_stopping():
    replicas = [*(new(f"n{i}", health_since=0) for i in range(3)), replace(olds()[0], stopping=True)]
    result = step(rollout(), replicas, NOW)
    assert result.rollout.status == PROGRESSING


def test_surplus_new_replicas_are_stopped_unavailable_then_newest_first():
    replicas = [new(f"n{i}", health_since=0) for i in range(4)]
    result = step(rollout(), replicas, NOW)  # scaled from 4 to 3 mid-rollout
    assert result.stops == (StopReplica("n0", "pi9", "more than 3 replicas"),)
    assert result.rollout.status == PROGRESSING
    replicas[3] = replace(replicas[3], created_at=NOW - 5)
    replicas[1] = replace(replicas[1], health=HEALTH_STARTING)
    result = step(rollout(2, UpdatePolicy(parallelism=0)), replicas, NOW)
    assert [stop.replica for stop in result.stops] == ["n1", "n3"]
    done = step(rollout(), replicas[:3], NOW)
    assert done.rollout.status == PROGRESSING  # n1 is not healthy yet


# --- failures -----------------------------------------------------------------------------

BROKEN = [
    (
        new("n1", health=UNHEALTHY, failure="http GET /health: 500"),
        "failed its health check: http GET /health: 500",
    ),
    (new("n1", state=FAILED, health=UNKNOWN, failure="exit code 1"), "exited: exit code 1"),
    (new("n1", state=FAILED, health=UNKNOWN), "exited"),
    (new("n1", restarts=2, health=HEALTH_STARTING), "was restarted 2 times"),
    (
        new("n1", restarts=1, health=HEALTH_STARTING, failure="exit code 137"),
        "was restarted 1 time: exit code 137",
    ),
    (
        new("n1", state=PENDING, health=UNKNOWN, created=NOW - 301),
        "was not healthy 300 s after it was started",
    ),
    (new("n1", health=HEALTH_STARTING, created=NOW - 301), "was not healthy 300 s after it was started"),
]


@pytest.mark.parametrize(("replica", "what"), BROKEN)
def test_a_failure_rolls_back_naming_replica_node_and_check(replica, what):
    replicas = [*olds()[1:], replace(replica, node="pi3")]
    result = step(rollout(), replicas, NOW)
    failure = Failure("n1", "pi3", 2, what)
    assert result.rollout.failures == (failure,)
    assert result.rollout.rolling_back
    assert result.rollout.target == 1
    assert result.rollout.state == "rolling back"
    message = f"rolling back mcp from revision 2 to revision 1: replica n1 on pi3 (revision 2) {what}"
    assert result.rollout.message == message
    assert result.events == (f"mcp: replica n1 on pi3 (revision 2) {what}", message)
    assert StopReplica("n1", "pi3", "failed during the rollout") in result.stops or replica.state == FAILED


@pytest.mark.parametrize(("replica", "what"), BROKEN)
def test_failure_with_no_earlier_revision_fails_the_rollout(replica, what):
    result = step(rollout(previous=None), [replica], NOW)
    assert result.rollout.status == FAILED_ROLLOUT
    assert result.phase == FAILED_ROLLOUT
    assert result.starts == ()
    assert result.rollout.message.startswith("rollout of mcp to revision 2 failed and there is no earlier")
    assert what in result.rollout.message


def test_a_replica_healthy_within_the_deadline_is_no_failure():
    ok = new("n1", health=HEALTH_STARTING, created=NOW - 299)
    assert step(rollout(), [*olds()[1:], ok], NOW).rollout.failures == ()
    assert step(rollout(), [*olds()[1:], ok], NOW, ready_deadline=100).rollout.failures != ()


def test_replicas_not_started_by_this_rollout_are_not_its_failures():
    # a revision-2 replica from before this rollout began (e.g. a previous attempt)
    old_attempt = new("n0", health=UNHEALTHY, created=STARTED - 50)
    result = step(rollout(), [*olds()[1:], old_attempt], NOW)
    assert result.rollout.failures == ()
    assert StopReplica("n0", "pi9", "unhealthy") in result.stops


def test_failed_old_replicas_are_cleaned_up_but_are_no_failure():
    replicas = olds()
    replicas[1] = replace(replicas[1], state=FAILED)
    result = step(rollout(), replicas, NOW)
    assert result.rollout.failures == ()
    assert StopReplica("old2", "pi2", "exited") in result.stops


def test_pause_action_stops_moving_until_resumed():
    paused_policy = UpdatePolicy(failure_action=PAUSE)
    replicas = [*olds()[1:], new("n1", health=UNHEALTHY)]
    result = step(rollout(policy=paused_policy), replicas, NOW)
    assert result.rollout.status == PAUSED
    assert result.rollout.message == (
        "rollout of mcp to revision 2 paused: replica n1 on pi9 (revision 2) failed its health check"
    )
    assert result.stops == (StopReplica("n1", "pi9", "failed during the rollout"),)
    assert result.starts == ()
    # still paused with the failed replica gone: nothing moves
    again = step(result.rollout, olds()[1:], NOW + 50)
    assert (again.stops, again.starts, again.rollout.status) == ((), (), PAUSED)
    assert again.waiting == result.rollout.message
    assert again.phase == PAUSED
    resumed = resume(again.rollout)
    assert (resumed.status, resumed.tolerated_failures, resumed.message) == (PROGRESSING, 1, "")
    going = step(resumed, olds()[1:], NOW + 60)
    assert going.starts == (StartReplica(2, None, "revision 2"),)


def test_operator_pause_and_resume():
    paused = pause(rollout())
    assert (paused.status, paused.message) == (PAUSED, "paused by the operator")
    result = step(paused, olds(), NOW)
    assert (result.stops, result.starts, result.waiting) == ((), (), "paused by the operator")
    assert pause(paused, "again") == paused  # pausing twice changes nothing
    assert resume(rollout()) == rollout()  # resuming what is not paused changes nothing
    assert [s.replica for s in step(resume(paused), olds(), NOW).stops] == ["old1"]


def test_continue_replaces_the_failed_replica_and_goes_on():
    policy = UpdatePolicy(failure_action=CONTINUE)
    replicas = [*olds()[1:], new("n1", health=UNHEALTHY)]
    result = step(rollout(policy=policy), replicas, NOW)
    assert result.rollout.status == PROGRESSING and not result.rollout.rolling_back
    assert result.events[-1] == "mcp: continuing despite 1 failure(s)"
    assert result.stops == (StopReplica("n1", "pi9", "failed during the rollout"),)
    gone = step(result.rollout, olds()[1:], NOW + 1)
    assert gone.starts == (StartReplica(2, None, "revision 2"),)
    assert gone.events == ()  # a failure is reported once


@pytest.mark.parametrize(
    ("ratio", "replicas", "failures", "rolls_back"),
    [
        (0.0, 4, 1, True),
        (0.25, 4, 1, False),  # 1 <= 0.25 * 4
        (0.25, 4, 2, True),
        (0.5, 4, 2, False),
        (0.5, 4, 3, True),
        (1.0, 4, 4, False),
        (0.2, 10, 2, False),
        (0.2, 10, 3, True),
    ],
)
def test_max_failure_ratio_over_the_replicas(ratio, replicas, failures, rolls_back):
    policy = UpdatePolicy(parallelism=0, max_failure_ratio=ratio)
    broken = [new(f"n{i}", node=f"pi{i}", health=UNHEALTHY) for i in range(failures)]
    result = step(rollout(replicas, policy), [*olds(replicas - failures), *broken], NOW)
    assert len(result.rollout.failures) == failures
    assert result.rollout.rolling_back is rolls_back


def test_failures_accumulate_across_steps_for_the_ratio():
    policy = UpdatePolicy(max_failure_ratio=0.25)
    first = step(rollout(4, policy), [*olds(3), new("n1", health=UNHEALTHY)], NOW)
    assert not first.rollout.rolling_back
    # n1 is gone now; n2 fails: 2 of 4 > 25%
    second = step(first.rollout, [*olds(3), new("n2", health=UNHEALTHY)], NOW + 10)
    assert second.rollout.rolling_back
    assert [f.replica for f in second.rollout.failures] == ["n1", "n2"]


def test_rollback_targets_the_previous_revision_and_a_failure_there_pauses():
    rolled = step(rollout(), [*olds()[1:], new("n1", health=UNHEALTHY)], NOW).rollout
    assert rolled.target == 1 and rolled.phase_started_at == NOW
    # refilling the stopped slot with revision 1, which fails too
    back = Replica("b1", "mcp", "pi1", 1, RUNNING, UNHEALTHY, NOW + 1, NOW + 1, NOW + 2)
    result = step(rolled, [*olds()[1:], back], NOW + 3)
    assert result.rollout.status == PAUSED
    assert result.rollout.message == (
        "rollback of mcp to revision 1 failed, paused: replica b1 on pi1 (revision 1) failed its health check"
    )


def test_a_rollback_completes_as_rolled_back():
    rolled = replace(rollout(), rolling_back=True, failures=(Failure("n1", "pi3", 2, "exited"),))
    result = step(rolled, olds(), NOW)
    assert result.rollout.status == COMPLETE
    assert result.rollout.state == "rolled back"
    assert (
        result.rollout.message == "rolled back mcp to revision 1 after: replica n1 on pi3 (revision 2) exited"
    )


def test_other_services_are_ignored():
    other = running("db1", 7, service="db")
    assert step(rollout(), [*olds(), other], NOW) == step(rollout(), olds(), NOW)


def test_stopped_replicas_do_not_count():
    gone = replace(olds()[0], state=STOPPED)
    result = step(rollout(), [gone, *olds()[1:]], NOW)
    assert result.starts == (StartReplica(2, None, "revision 2"),)


def test_without_a_health_check_running_is_healthy():
    no_check = rollout(has_health_check=False)
    replica = Replica("n1", "mcp", "pi9", 2, RUNNING, UNKNOWN, STARTED + 10, NOW - 1, STARTED + 10)
    result = step(no_check, [*olds()[1:], replica], NOW)
    assert [s.replica for s in result.stops] == ["old2"]  # n1 counts as available


# --- global services ----------------------------------------------------------------------


def global_rollout(policy=DEFAULT):
    return rollout(policy=policy, global_nodes=("pi1", "pi2", "pi3"))


def test_global_stop_first_refills_the_same_node():
    first = step(global_rollout(), olds(), NOW)
    assert [s.replica for s in first.stops] == ["old1"]
    refill = step(global_rollout(), olds()[1:], NOW)
    assert refill.starts == (StartReplica(2, "pi1", "revision 2"),)


def test_global_start_first_adds_beside_the_old_then_removes_it():
    policy = UpdatePolicy(order=START_FIRST)
    first = step(global_rollout(policy), olds(), NOW)
    assert first.starts == (StartReplica(2, "pi1", "revision 2"),)
    healthy = step(global_rollout(policy), [*olds(), new("n1", node="pi1")], NOW)
    assert healthy.stops == (StopReplica("old1", "pi1", "replaced by revision 2"),)


def test_global_new_node_gets_a_replica():
    result = step(global_rollout(), [running("x", 2, "pi1", 0), running("y", 2, "pi2", 0)], NOW)
    assert result.starts == (StartReplica(2, "pi3", "revision 2"),)


# --- whole rollouts -----------------------------------------------------------------------


def simulate(policy=DEFAULT, replicas=3, outcomes=None, previous=1, has_health_check=True):
    start = begin("mcp", 2, previous, replicas, validate_update_policy(policy), NOW, has_health_check)
    existing = olds(replicas) if previous else []
    return Simulation(start, existing, NOW, outcomes or {})


@pytest.mark.parametrize(
    "policy",
    [
        UpdatePolicy(),
        UpdatePolicy(parallelism=2),
        UpdatePolicy(parallelism=0),
        UpdatePolicy(order=START_FIRST),
        UpdatePolicy(order=START_FIRST, parallelism=2),
        UpdatePolicy(delay=3),
        UpdatePolicy(monitor=0),
        UpdatePolicy(parallelism=0, max_surge="25%", max_unavailable="25%"),
        UpdatePolicy(parallelism=0, max_surge=1, max_unavailable=0),
        UpdatePolicy(parallelism=0, max_surge=0, max_unavailable="50%"),
    ],
)
@pytest.mark.parametrize("replicas", [1, 3, 5])
def test_a_healthy_rollout_completes_within_the_bounds(policy, replicas):
    sim = simulate(policy, replicas)
    surge, unavailable = validate_update_policy(policy).bounds(replicas)
    final = sim.run()
    assert final.status == COMPLETE and not final.rolling_back
    assert sim.revisions() == [2] * replicas
    assert sim.max_present <= replicas + surge
    assert sim.min_available >= replicas - unavailable


def test_parallelism_one_updates_one_at_a_time():
    sim = simulate(UpdatePolicy(), 3)
    sim.run()
    stops = [s for result in sim.steps for s in result.stops]
    assert [s.replica for s in stops] == ["old1", "old2", "old3"]
    assert all(len(result.stops) + len(result.starts) <= 1 for result in sim.steps)


def test_delay_spaces_the_batches():
    sim = simulate(UpdatePolicy(delay=10), 3)
    sim.run()
    stop_times = [NOW + i for i, result in enumerate(sim.steps) for _ in result.stops]
    assert all(b - a >= 10 for a, b in itertools.pairwise(stop_times))


@pytest.mark.parametrize("outcome", [UNHEALTHY_OUTCOME, EXITS, RESTARTS, HANGS])
@pytest.mark.parametrize("order", ["stop-first", START_FIRST])
def test_a_broken_revision_is_rolled_back_by_itself(outcome, order):
    sim = simulate(UpdatePolicy(order=order), 3, outcomes={2: outcome})
    sim.now = NOW
    final = sim.run(limit=800)
    assert final.status == COMPLETE and final.rolling_back
    assert final.state == "rolled back"
    assert sim.revisions() == [1, 1, 1]
    assert len(final.failures) == 1
    assert final.message.startswith("rolled back mcp to revision 1 after: replica mcp-r2-1 on ")
    surge, unavailable = final.policy.bounds(3)
    assert sim.max_present <= 3 + surge
    assert sim.min_available >= 3 - unavailable


def test_a_broken_first_deploy_fails():
    sim = simulate(UpdatePolicy(), 2, outcomes={2: EXITS}, previous=None)
    final = sim.run()
    assert final.status == FAILED_ROLLOUT
    assert "exited: exit code 1" in final.message


def test_pause_action_leaves_the_rest_running():
    sim = simulate(UpdatePolicy(failure_action=PAUSE), 3, outcomes={2: UNHEALTHY_OUTCOME})
    final = sim.run()
    assert final.status == PAUSED
    sim.call()  # removes the failed replica
    sim.advance()
    assert sim.revisions() == [1, 1]  # one old stopped for the batch, the rest still serve


def test_continue_retries_and_finishes_if_later_replicas_are_healthy():
    sim = simulate(UpdatePolicy(failure_action=CONTINUE), 3, outcomes={2: UNHEALTHY_OUTCOME})
    for _ in range(12):
        sim.call()
        sim.advance()
    assert len(sim.rollout.failures) >= 2  # keeps retrying
    sim.outcomes[2] = "healthy"
    final = sim.run()
    assert final.status == COMPLETE and not final.rolling_back
    assert sim.revisions() == [2, 2, 2]


@pytest.mark.parametrize("crash_at", [0, 1, 2, 3, 5, 8, 13])
def test_a_coordinator_restart_mid_rollout_resumes_with_the_same_decisions(crash_at):
    sim = simulate(UpdatePolicy(parallelism=2, order=START_FIRST), 4)
    for _ in range(crash_at):
        sim.call()
        sim.advance()
    # a new coordinator has only the stored rollout and what the agents report
    stored, reported, now = sim.rollout, list(sim.replicas), sim.now
    assert step(stored, reported, now) == step(stored, reported, now)
    final = sim.run()
    assert final.status == COMPLETE
    assert sim.max_present <= 4 + 2


@settings(max_examples=150, deadline=None)
@given(
    replicas=st.integers(1, 6),
    parallelism=st.integers(0, 3),
    order=st.sampled_from(["stop-first", START_FIRST]),
    surge=st.one_of(st.none(), st.integers(0, 3), st.sampled_from(["25%", "50%", "100%"])),
    unavailable=st.one_of(st.none(), st.integers(0, 3), st.sampled_from(["25%", "50%"])),
    broken=st.booleans(),
    delay=st.sampled_from([0, 2]),
)
def test_bounds_hold_for_any_policy(replicas, parallelism, order, surge, unavailable, broken, delay):
    policy = UpdatePolicy(parallelism, delay, surge, unavailable, order)
    try:
        policy = validate_update_policy(policy)
    except ValueError:
        assume(False)
    max_surge, max_unavailable = policy.bounds(replicas)
    sim = simulate(policy, replicas, outcomes={2: UNHEALTHY_OUTCOME} if broken else {})
    final = sim.run(limit=1000)
    assert final.status == COMPLETE
    assert final.rolling_back is broken
    assert sim.revisions() == [1 if broken else 2] * replicas
    assert sim.max_present <= replicas + max_surge
    assert sim.min_available >= replicas - max_unavailable


def test_replaced_replicas_are_invisible_to_the_planner():
    # the reconciler wrote off old3 (its node is lost): the planner refills its slot
    replicas = [*olds()[:2], replace(olds()[2], replaced=True)]
    result = step(rollout(), replicas, NOW)
    assert result.starts == (StartReplica(2, None, "revision 2"),)
    assert all(stop.replica != "old3" for stop in result.stops)

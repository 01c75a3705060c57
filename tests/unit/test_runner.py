"""The apply runner's scheduling over a plan, with nodes answering from a table."""

import asyncio
from pathlib import Path

import pytest

from picoord.coordinator.apply.action_planner import NodeView, plan
from picoord.coordinator.apply.cluster_spec import parse_spec
from picoord.coordinator.apply.runner import ApplyRun
from picoord.coordinator.cluster import NodeUnavailable
from picoord.coordinator.store import StateUnavailable
from picoord.v1 import actions_pb2, admin_pb2, agent_pb2

OK, SAME, FAIL, PLANNED = (
    agent_pb2.ACTION_OUTCOME_SUCCEEDED,
    agent_pb2.ACTION_OUTCOME_UNCHANGED,
    agent_pb2.ACTION_OUTCOME_FAILED,
    agent_pb2.ACTION_OUTCOME_PLANNED,
)
SKIPPED = agent_pb2.ACTION_OUTCOME_SKIPPED
TOKEN = "SWMTKN-1-" + "a" * 50 + "-" + "b" * 25
INVENTORY = [NodeView(f"pi{i}", {}, "aarch64", f"10.0.0.{10 + i}") for i in range(1, 4)]
SPEC = """
kind: ClusterMembership
name: swarm
engine: swarm
manager: pi1
workers: [pi2, pi3]
---
kind: Mount
name: scratch
type: tmpfs
target: /mnt/scratch
nodes: [pi2]
---
kind: FirewallPolicy
name: fw
nodes: [pi2]
rules: [{action: allow, port: 22, protocol: tcp}, {action: allow, from: 10.0.0.0/24, comment: the swarm}]
"""


def run(
    answers: dict[tuple[str, str], object],
    dry_run: bool = False,
    facts: bool = True,
    refuse_records: frozenset[str] = frozenset(),
):
    """Run SPEC; `answers[(node, kind)]` is an outcome, or an exception to raise. Records of
    the actions named in `refuse_records` (e.g. "started:mount@pi2") fail as on a full disk."""
    sent: list[tuple[str, agent_pb2.ActionRequest]] = []
    events: list[admin_pb2.ApplyEvent] = []
    records: list[admin_pb2.ActionRecord] = []

    async def dispatch(node: str, request: agent_pb2.ActionRequest, timeout: float) -> agent_pb2.ActionResult:
        sent.append((node, request))
        kind = request.action.WhichOneof("kind")
        answer = answers.get((node, kind), OK)
        if isinstance(answer, Exception):
            raise answer
        result = agent_pb2.ActionResult(
            action_id=request.action_id, outcome=answer, message=f"{kind} on {node}"
        )
        if kind == "swarm_init" and facts:
            result.facts.extend(
                [
                    actions_pb2.Fact(key="swarm.worker_token", value=TOKEN, secret=True),
                    actions_pb2.Fact(key="swarm.manager_address", value="10.0.0.11:2377"),
                ]
            )
        return result

    async def emit(event: admin_pb2.ApplyEvent) -> None:
        events.append(event)

    async def record(r: admin_pb2.ActionRecord) -> None:
        phase = "finished" if r.finished_at else "started"
        if f"{phase}:{r.step.split(':')[1]}" in refuse_records:
            raise StateUnavailable("full", Path("/var/lib/picoord"))
        records.append(admin_pb2.ActionRecord.FromString(r.SerializeToString()))

    apply = ApplyRun(dispatch, emit, record, dry_run, "op@desk")
    summary = asyncio.run(apply.run(plan(parse_spec(SPEC), INVENTORY)))
    return summary, sent, events, records, apply


def outcomes(apply: ApplyRun) -> dict[str, int]:
    return {step.split(":")[1]: outcome for step, outcome in apply.outcomes.items()}


def test_everything_succeeds_and_tokens_flow_to_the_joins() -> None:
    summary, sent, _, records, _ = run({})
    assert summary.converged and summary.changed == 5 and summary.failed == 0
    joins = [request for node, request in sent if request.action.WhichOneof("kind") == "swarm_join"]
    assert {j.action.swarm_join.join_token for j in joins} == {TOKEN}
    assert {j.action.swarm_join.manager_address for j in joins} == {"10.0.0.11:2377"}
    kinds_on_pi2 = [r.action.WhichOneof("kind") for node, r in sent if node == "pi2"]
    assert kinds_on_pi2.index("firewall") > kinds_on_pi2.index("mount")  # the firewall last
    assert all(TOKEN not in r.SerializeToString().decode(errors="replace") for r in records)  # never stored


def test_a_second_apply_that_changes_nothing() -> None:
    answers = {
        (f"pi{i}", k): SAME for i in range(1, 4) for k in ("swarm_init", "swarm_join", "mount", "firewall")
    }
    summary, *_ = run(answers)
    assert summary.converged and (summary.changed, summary.unchanged, summary.failed) == (0, 5, 0)


def test_a_failed_manager_skips_the_joins_and_nothing_else() -> None:
    summary, sent, _, _, apply = run({("pi1", "swarm_init"): FAIL})
    assert not summary.converged and summary.failed == 3
    assert outcomes(apply) == {
        "init@pi1": FAIL,
        "join@pi2": SKIPPED,
        "join@pi3": SKIPPED,
        "mount@pi2": OK,
        "firewall@pi2": OK,  # ordered after the join, but it does not require it
    }
    assert not [r for _, r in sent if r.action.WhichOneof("kind") == "swarm_join"]


def test_one_node_failing_leaves_the_others_standing() -> None:
    summary, _, _, _, apply = run({("pi3", "swarm_join"): NodeUnavailable("pi3 is not connected")})
    assert outcomes(apply)["join@pi3"] == FAIL and outcomes(apply)["join@pi2"] == OK
    assert summary.failed == 1 and summary.changed == 4


def test_a_timeout_is_a_failure_with_a_reason() -> None:
    _, _, events, _, apply = run({("pi2", "mount"): TimeoutError()})
    assert outcomes(apply)["mount@pi2"] == FAIL
    finished = [e.finished for e in events if e.WhichOneof("event") == "finished"]
    assert any("no result from pi2" in record.message for record in finished)


def test_dry_run_plans_joins_whose_token_does_not_exist_yet() -> None:
    summary, sent, _, _, apply = run({("pi1", "swarm_init"): PLANNED}, dry_run=True, facts=False)
    assert summary.converged
    assert all(request.dry_run for _, request in sent)
    assert outcomes(apply)["join@pi2"] == PLANNED
    assert not [r for _, r in sent if r.action.WhichOneof("kind") == "swarm_join"]  # said by the coordinator


def test_a_real_run_without_the_token_fails_the_joins() -> None:
    _, _, events, _, apply = run({}, facts=False)
    assert outcomes(apply)["join@pi2"] == FAIL
    messages = [e.finished.message for e in events if e.WhichOneof("event") == "finished"]
    assert "ClusterMembership/swarm:init@pi1 reported no swarm.manager_address" in messages


def test_every_action_is_recorded_at_start_and_end() -> None:
    _, sent, events, records, _ = run({})
    started = [e.started.action_id for e in events if e.WhichOneof("event") == "started"]
    assert started == [request.action_id for _, request in sent]
    finals = {r.action_id: r for r in records if r.finished_at}
    assert set(finals) == set(started)
    assert all(r.requested_by == "op@desk" and r.outcome == OK for r in finals.values())


@pytest.mark.parametrize("dry_run", [True, False])
def test_requests_carry_the_mode_and_a_timeout(dry_run: bool) -> None:
    _, sent, *_ = run({}, dry_run=dry_run)
    assert all(r.dry_run is dry_run and r.timeout_seconds > 0 for _, r in sent)


def test_an_action_whose_start_cannot_be_recorded_is_not_sent() -> None:
    """A full state disk at the start of an action: it is never sent, so the history cannot
    miss an action that ran; the operator sees why."""
    summary, sent, events, records, apply = run({}, refuse_records=frozenset({"started:mount@pi2"}))
    assert ("pi2", "mount") not in [(node, r.action.WhichOneof("kind")) for node, r in sent]
    assert outcomes(apply)["mount@pi2"] == FAIL and outcomes(apply)["firewall@pi2"] == OK
    finished = {
        e.finished.step.split(":")[1]: e.finished for e in events if e.WhichOneof("event") == "finished"
    }
    assert finished["mount@pi2"].message == "not sent: state disk full at /var/lib/picoord"
    assert not [r for r in records if r.step.endswith("mount@pi2")]
    assert summary.failed == 1


def test_an_outcome_that_cannot_be_recorded_still_reaches_the_operator() -> None:
    _, _, events, records, apply = run({}, refuse_records=frozenset({"finished:mount@pi2"}))
    assert outcomes(apply)["mount@pi2"] == OK
    finished = {
        e.finished.step.split(":")[1]: e.finished for e in events if e.WhichOneof("event") == "finished"
    }
    assert finished["mount@pi2"].message == "mount on pi2 (not recorded: state disk full at /var/lib/picoord)"
    assert [r.finished_at for r in records if r.step.endswith("mount@pi2")] == [0.0]  # only its start

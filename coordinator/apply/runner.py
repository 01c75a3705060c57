"""Carry out a plan: send each step to its node when what it needs is done, fill in facts
from earlier steps, record every action, and report progress as it happens.

The scheduling is a small loop over the planner's graph; sending, recording and
reporting are passed in, so the loop is tested without sessions or a database.
Partial failure is the normal case on a rack of Pis: a failed step skips only the steps
that require it, and every other node's results stand.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field

from picoord.coordinator.apply.action_planner import Step
from picoord.coordinator.cluster import NodeUnavailable
from picoord.coordinator.store import StateUnavailable
from picoord.v1 import actions_pb2, admin_pb2, agent_pb2

CONVERGED = frozenset(
    {agent_pb2.ACTION_OUTCOME_SUCCEEDED, agent_pb2.ACTION_OUTCOME_UNCHANGED, agent_pb2.ACTION_OUTCOME_PLANNED}
)
CHANGED = frozenset({agent_pb2.ACTION_OUTCOME_SUCCEEDED, agent_pb2.ACTION_OUTCOME_PLANNED})

# How long a node may take for one action, by kind; the agent bounds each command too.
STEP_TIMEOUTS = {
    "kubeadm_init": 900.0,
    "kubeadm_join": 600.0,
    "k3s_server": 600.0,
    "k3s_agent": 600.0,
    "swarm_init": 120.0,
    "swarm_join": 120.0,
    "gluster_volume": 180.0,
    "firewall": 120.0,
}
DEFAULT_STEP_TIMEOUT = 120.0
REPLY_GRACE = 15.0


def step_timeout(kind: str, action: actions_pb2.Action) -> float:
    """A firewall change waits up to its confirm window before and after applying, and may
    then restore: it needs twice the window and some."""
    if kind == "firewall":
        return max(STEP_TIMEOUTS["firewall"], 2 * action.firewall.confirm_within_seconds + 30)
    return STEP_TIMEOUTS.get(
        kind, DEFAULT_STEP_TIMEOUT
    )  # beyond the action's own timeout, for the result to travel back


Dispatch = Callable[[str, agent_pb2.ActionRequest, float], Awaitable[agent_pb2.ActionResult]]
Emit = Callable[[admin_pb2.ApplyEvent], Awaitable[None]]
Record = Callable[[admin_pb2.ActionRecord], Awaitable[None]]


@dataclass
class ApplyRun:
    dispatch: Dispatch
    emit: Emit
    record: Record
    dry_run: bool
    requested_by: str
    apply_id: str = field(default_factory=lambda: uuid.uuid4().hex[:12])
    clock: Callable[[], float] = time.time
    facts: dict[str, dict[str, str]] = field(default_factory=dict)
    outcomes: dict[str, int] = field(default_factory=dict)

    async def run(self, steps: Sequence[Step]) -> admin_pb2.ApplySummary:
        pending = list(steps)
        running: dict[asyncio.Task[None], Step] = {}
        while pending or running:
            for step in list(pending):
                if all(dep in self.outcomes for dep in (*step.after, *step.requires)):
                    pending.remove(step)
                    running[asyncio.create_task(self._run_step(step))] = step
            if not running:
                raise AssertionError(f"steps wait on steps that never run: {[s.id for s in pending]}")
            done, _ = await asyncio.wait(running, return_when=asyncio.FIRST_COMPLETED)
            for task in done:
                del running[task]
                task.result()
        return self.summary()

    def summary(self) -> admin_pb2.ApplySummary:
        outcomes = list(self.outcomes.values())
        return admin_pb2.ApplySummary(
            apply_id=self.apply_id,
            converged=all(outcome in CONVERGED for outcome in outcomes),
            changed=sum(outcome in CHANGED for outcome in outcomes),
            unchanged=outcomes.count(agent_pb2.ACTION_OUTCOME_UNCHANGED),
            failed=sum(outcome not in CONVERGED for outcome in outcomes),
        )

    def _new_record(self, step: Step) -> admin_pb2.ActionRecord:
        return admin_pb2.ActionRecord(
            action_id=uuid.uuid4().hex,
            apply_id=self.apply_id,
            step=step.id,
            document=step.document,
            node=step.node,
            kind=step.kind,
            requested_by=self.requested_by,
            dry_run=self.dry_run,
            started_at=self.clock(),
        )

    async def _finish(
        self, step: Step, record: admin_pb2.ActionRecord, outcome: int, message: str, store: bool = True
    ) -> None:
        record.outcome = outcome
        record.message = message
        record.finished_at = self.clock()
        self.outcomes[step.id] = outcome
        if store:
            try:
                await self.record(record)
            except StateUnavailable as error:  # the operator still sees the outcome
                record.message = f"{message} (not recorded: {error})" if message else f"not recorded: {error}"
        await self.emit(admin_pb2.ApplyEvent(finished=record))

    async def _run_step(self, step: Step) -> None:
        record = self._new_record(step)
        failed = [dep for dep in step.requires if self.outcomes[dep] not in CONVERGED]
        if failed:
            await self._finish(
                step, record, agent_pb2.ACTION_OUTCOME_SKIPPED, f"skipped: {failed[0]} did not succeed"
            )
            return
        action = actions_pb2.Action()
        action.CopyFrom(step.action)
        missing = self._fill_inputs(step, action)
        if missing:
            if self.dry_run:  # e.g. a join token that exists only once the manager has initialised
                message = f"would run once {missing.step} has run (its {missing.key} is not known yet)"
                await self._finish(step, record, agent_pb2.ACTION_OUTCOME_PLANNED, message)
            else:
                message = f"{missing.step} reported no {missing.key}"
                await self._finish(step, record, agent_pb2.ACTION_OUTCOME_FAILED, message)
            return
        timeout = step_timeout(step.kind, action)
        request = agent_pb2.ActionRequest(
            action_id=record.action_id, dry_run=self.dry_run, timeout_seconds=timeout, action=action
        )
        try:
            await self.record(record)
        except StateUnavailable as error:
            # never send what the history could not show: a crash would hide that it began
            await self._finish(
                step, record, agent_pb2.ACTION_OUTCOME_FAILED, f"not sent: {error}", store=False
            )
            return
        await self.emit(admin_pb2.ApplyEvent(started=record))
        try:
            result = await self.dispatch(step.node, request, timeout + REPLY_GRACE)
        except NodeUnavailable as error:
            await self._finish(step, record, agent_pb2.ACTION_OUTCOME_FAILED, str(error))
            return
        except TimeoutError:
            message = f"no result from {step.node} within {timeout + REPLY_GRACE:.0f} s"
            await self._finish(step, record, agent_pb2.ACTION_OUTCOME_FAILED, message)
            return
        record.commands.extend(result.commands)
        record.in_place = result.in_place
        # Facts feed later steps; secret ones (join tokens) stay in memory, never in records.
        self.facts[step.id] = {fact.key: fact.value for fact in result.facts}
        await self._finish(step, record, result.outcome or agent_pb2.ACTION_OUTCOME_FAILED, result.message)

    def _fill_inputs(self, step: Step, action: actions_pb2.Action) -> object | None:
        """Set each input field from its fact; return the first missing FactRef, if any."""
        for path, ref in step.inputs:
            value = self.facts.get(ref.step, {}).get(ref.key)
            if not value:
                return ref
            message_name, field_name = path.split(".", 1)
            setattr(getattr(action, message_name), field_name, value)
        return None

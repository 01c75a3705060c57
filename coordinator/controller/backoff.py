"""When a replica slot that cannot start is tried again: pure rules over plain data.

A replica that fails to start (the image cannot be pulled, the container exits at once
or reports unhealthy) is stopped, and its slot is filled again only after a delay that
doubles with each failure in a row, from START_BACKOFF_FIRST to START_BACKOFF_MAX, as
Kubernetes' ImagePullBackOff and CrashLoopBackOff do and as Swarm's restart delay spaces
its tasks. A replica that then serves START_BACKOFF_RESET_AFTER seconds clears it. The
backoff belongs to one revision: a rollout to another revision (or a rollback) starts at
once, and so does a new rollout of the same one (the operator acted; the shell clears the
service's backoffs when a rollout begins).

Stored (one row per slot, see records.py), so a restarted coordinator keeps spacing the
attempts instead of starting over at full speed. The attempts remembered per slot are
bounded (SLOT_HISTORY, Swarm's task history limit): retries never grow the store.
"""

from __future__ import annotations

from dataclasses import dataclass

from picoord.common.limits import SLOT_HISTORY, START_BACKOFF_FIRST, START_BACKOFF_MAX


@dataclass(frozen=True)
class Backoff:
    """One replica slot's failures in a row, and what the last one was."""

    service: str
    slot: str
    revision: int  # the revision that failed: only its starts wait
    failures: int  # in a row
    failed_at: float
    reason: str  # the agent's words for the last failure
    node: str = ""  # where the last attempt ran
    attempts: tuple[str, ...] = ()  # the replica ids tried, oldest first, at most SLOT_HISTORY

    @property
    def key(self) -> tuple[str, str]:
        return (self.service, self.slot)

    @property
    def retry_at(self) -> float:
        return self.failed_at + delay(self.failures)

    def holds(self, revision: int, now: float) -> bool:
        """Whether a start of `revision` in this slot must still wait."""
        return revision == self.revision and now < self.retry_at


def delay(failures: int) -> float:
    """Seconds before the next try after `failures` failures in a row: 10, 20, 40 ... 300."""
    if failures <= 0:
        return 0.0
    return min(START_BACKOFF_FIRST * 2.0 ** min(failures - 1, 32), START_BACKOFF_MAX)


def failed(
    previous: Backoff | None,
    service: str,
    slot: str,
    revision: int,
    replica: str,
    node: str,
    reason: str,
    now: float,
) -> Backoff:
    """The slot's backoff after one more failure (the count restarts for another revision)."""
    same = previous is not None and previous.revision == revision
    count = previous.failures + 1 if same and previous is not None else 1
    attempts = (*(previous.attempts if previous is not None else ()), replica)[-SLOT_HISTORY:]
    return Backoff(service, slot, revision, count, now, reason, node, attempts)


def describe(backoff: Backoff, now: float, width: int = 36) -> str:
    """What `coordctl ps` says of a slot in backoff, short enough for its MESSAGE column:
    the reason (cut with an ellipsis) and when the next try is."""
    reason = backoff.reason or "failed to start"
    if len(reason) > width:
        reason = reason[: width - 1].rstrip() + "…"
    return f"{reason}; next try in {max(0.0, backoff.retry_at - now):.0f} s"

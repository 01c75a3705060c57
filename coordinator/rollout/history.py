"""Revision history and undo, as operations on a list of revisions (no store, no clock).

Kubernetes' semantics: every distinct spec is a revision with a rising number; applying
the spec that is already current adds nothing; applying (or undoing to) an older spec
makes it the newest revision under a new number and drops its old entry, so the history
never holds the same spec twice. Undo goes to the previous revision or to a given one.
The store keeps the list; the spec is opaque here (any value that compares by content,
e.g. the canonical text of a ServiceSpec).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

HISTORY_LIMIT = 10  # revisions kept, as Kubernetes' revisionHistoryLimit


class RevisionError(ValueError):
    """An undo that cannot be done: no history, unknown revision, already there."""


@dataclass(frozen=True)
class Revision:
    number: int
    spec: Any
    created_at: float
    cause: str = ""  # what made it: "apply -f mcp.yaml", "rollout --image ...", "undo to 2"


def current(history: Sequence[Revision]) -> Revision | None:
    return max(history, key=lambda revision: revision.number, default=None)


def record(
    history: Sequence[Revision], spec: Any, now: float, cause: str = "", limit: int = HISTORY_LIMIT
) -> tuple[list[Revision], Revision, bool]:
    """(history, the current revision, whether it is new) after applying `spec`."""
    latest = current(history)
    if latest is not None and latest.spec == spec:
        return list(history), latest, False
    number = (latest.number if latest else 0) + 1
    revision = Revision(number, spec, now, cause)
    kept = [old for old in history if old.spec != spec]
    kept = sorted([*kept, revision], key=lambda r: r.number)
    if limit > 0 and len(kept) > limit:
        kept = kept[-limit:]
    return kept, revision, True


def previous(history: Sequence[Revision]) -> Revision | None:
    """The revision before the current one: the rollback target of a rollout."""
    ordered = sorted(history, key=lambda revision: revision.number)
    return ordered[-2] if len(ordered) >= 2 else None


def undo(
    history: Sequence[Revision],
    now: float,
    to_revision: int | None = None,
    limit: int = HISTORY_LIMIT,
    running: int | None = None,
) -> tuple[list[Revision], Revision]:
    """Roll the spec back to the revision before the one `running` (default: the newest),
    or to `to_revision`, as a new revision. After a failed update was rolled back by
    itself, the newest revision is not the one that runs: undo goes back from what runs."""
    latest = current(history)
    if latest is None:
        raise RevisionError("no revisions to undo")
    now_number = running if running is not None else latest.number
    if to_revision is None:
        older = [revision for revision in history if revision.number < now_number]
        if not older:
            what = "only" if len(history) == 1 else "oldest"
            raise RevisionError(f"revision {now_number} is the {what} revision; nothing to undo")
        target = max(older, key=lambda revision: revision.number)
    else:
        found = [revision for revision in history if revision.number == to_revision]
        if not found:
            known = ", ".join(str(revision.number) for revision in sorted(history, key=lambda r: r.number))
            raise RevisionError(f"revision {to_revision} not found (known: {known})")
        target = found[0]
        if target.number == now_number:
            raise RevisionError(f"revision {to_revision} is already the current revision")
    updated, revision, _ = record(history, target.spec, now, f"undo to revision {target.number}", limit)
    return updated, revision

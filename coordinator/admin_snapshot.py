"""Admin reads that do not grow with the calls: `coordctl nodes` and `top` are answered from
a snapshot of every node's row. A selector and a limit are applied to the snapshot, so a
terminal asks for the rows it can show; the unfiltered answer is built once per snapshot.

When to rebuild (at 5,000 nodes a build takes about 30 ms of CPU, several times that under load):
- no snapshot yet, or what rows show changed (the cluster's `generation`: a node record,
  a session opened or ended, a role): rebuilt before answering, so an operator sees their
  own change, and a node that went away, at once;
- older than `max_age` (last seen, Ready-by-silence and clock offsets move with time): the
  caller gets the current snapshot at once and one rebuild starts behind it, so no call
  waits for a build while calls keep coming and the cluster holds still;
- older than `max_stale` (nobody asked for a while): rebuilt before answering.
A build yields to the event loop every SLICE rows, so sessions and other calls are never
held for a whole build.

`at_once` is the same rule for a caller off the event loop (the admin server's threads,
admin_threads.py): a snapshot it may take now, else None and the call goes to the loop. A
snapshot is never changed once built, so any thread may read it. The read replica
(admin_replica.py) applies the same rule, `answerable`, to the copies it is sent.

`matching` and `answerable` are the pure part (table-tested); `SnapshotCache` only decides
when to rebuild.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Generic, TypeVar

import structlog

log = structlog.get_logger("picoord.coordinator.admin")

Row = TypeVar("Row")
Item = TypeVar("Item")
Answer = TypeVar("Answer")

SNAPSHOT_SECONDS = 1.0  # how stale a row's time-driven parts (last seen, Ready by silence) may be
STALE_SECONDS = 5.0  # older than this, a caller waits for a rebuild rather than take it
SLICE = 250  # rows built between two yields to the event loop (a few ms at 5,000 nodes)


def matching(
    labels: Sequence[Mapping[str, str]], selector: Mapping[str, str], limit: int
) -> tuple[list[int], int]:
    """The indexes of the rows whose labels carry every pair of `selector`, the first `limit`
    of them (0: all), and how many matched before the limit."""
    picked = [
        index
        for index, row_labels in enumerate(labels)
        if all(row_labels.get(key) == value for key, value in selector.items())
    ]
    return (picked[:limit] if limit else picked), len(picked)


async def in_slices(items: Iterable[Item], size: int = SLICE) -> AsyncIterator[Item]:
    """`items`, yielding to the event loop after every `size` of them."""
    for index, item in enumerate(items, 1):
        yield item
        if not index % size:
            await asyncio.sleep(0)


@dataclass(frozen=True)
class Built(Generic[Row]):
    """What a build returns: the answer with every row, its rows, and each row's node labels."""

    whole: object  # never changed once built: every unfiltered call returns it
    # In name order: the answer's own repeated field (a list of its 5,000 rows took as long
    # to make as the rows themselves).
    rows: Sequence[Row]
    labels: list[Mapping[str, str]]  # for selectors


@dataclass(frozen=True)
class Snapshot(Built[Row]):
    """A build, with the cluster generation it started at and when."""

    generation: int
    built_at: float

    def answer(
        self, selector: Mapping[str, str], limit: int, make: Callable[[list[Row], int], Answer]
    ) -> Answer:
        """The answer to a call with this selector and limit: the whole one when neither is
        given, else `make(rows, matched)` from the rows that match."""
        if not selector and not limit:
            return self.whole  # type: ignore[return-value]
        picked, matched = matching(self.labels, selector, limit)
        return make([self.rows[i] for i in picked], matched)


def answerable(
    latest: Snapshot[Row] | None, generation: int, now: float, max_age: float, max_stale: float
) -> tuple[Snapshot[Row] | None, bool]:
    """The snapshot a caller may take now (None: build first: there is none, what rows show
    changed since, or it is older than `max_stale`, never less than `max_age`), and whether
    it is aged (older than `max_age`: one rebuild behind the callers is due)."""
    if latest is None or latest.generation != generation:
        return None, False
    age = now - latest.built_at
    if age >= max(max_stale, max_age):
        return None, False
    return latest, age >= max_age


class SnapshotCache(Generic[Row]):
    """The latest snapshot, rebuilt by `build` as the module says; one build at a time,
    shared by every caller waiting for it."""

    def __init__(
        self,
        build: Callable[[], Awaitable[Built[Row]]],
        max_age: float = SNAPSHOT_SECONDS,
        max_stale: float = STALE_SECONDS,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._build = build
        self.max_age = max_age
        self.max_stale = max_stale
        self._clock = clock
        self._latest: Snapshot[Row] | None = None
        self._lock = asyncio.Lock()
        self._refresh: asyncio.Task[Snapshot[Row]] | None = None
        self._loop: asyncio.AbstractEventLoop | None = None  # where builds run, from the first get
        self.builds = 0
        # Told of every snapshot built, on the loop (the read replica is sent a copy).
        self.on_built: Callable[[Snapshot[Row]], None] | None = None

    def _answerable(self, generation: int) -> tuple[Snapshot[Row] | None, bool]:
        return answerable(self._latest, generation, self._clock(), self.max_age, self.max_stale)

    async def get(self, generation: Callable[[], int]) -> Snapshot[Row]:
        self._loop = asyncio.get_running_loop()
        current, aged = self._answerable(generation())
        if current is None:
            return await self._rebuild(generation)
        if aged:
            self.refresh_behind(generation)
        return current

    def at_once(self, generation: Callable[[], int]) -> Snapshot[Row] | None:
        """From any thread: the snapshot `get` would answer without waiting for a build (a
        rebuild behind it started on the loop when it is aged), or None when `get` would
        build first: that caller must go to the loop."""
        current, aged = self._answerable(generation())
        loop = self._loop
        if current is None or loop is None:
            return None
        if aged:
            with contextlib.suppress(RuntimeError):  # the loop is closed: the coordinator stops
                loop.call_soon_threadsafe(self.refresh_behind, generation)
        return current

    def refresh_behind(self, generation: Callable[[], int]) -> None:
        """On the loop: one rebuild behind the callers, unless one is running."""
        if self._refresh is None or self._refresh.done():
            self._refresh = asyncio.create_task(self._rebuild(generation))
            self._refresh.add_done_callback(_log_failure)

    async def _rebuild(self, generation: Callable[[], int]) -> Snapshot[Row]:
        async with self._lock:
            current, aged = self._answerable(generation())
            if current is not None and not aged:  # built meanwhile by another caller
                return current
            started, at = generation(), self._clock()
            built = await self._build()
            self.builds += 1
            self._latest = latest = Snapshot(built.whole, built.rows, built.labels, started, at)
            if self.on_built is not None:
                self.on_built(latest)
            return latest


def _log_failure(task: asyncio.Task[object]) -> None:
    """A rebuild behind the callers has nobody awaiting it: its failure is logged here (the
    next caller then builds before answering, and sees the error itself)."""
    if not task.cancelled() and task.exception() is not None:
        log.warning("admin snapshot rebuild failed", error=repr(task.exception()))

"""Admin reads that do not grow with the calls: `coordctl nodes` and `top` are answered from
a snapshot of every node's row, rebuilt at most once a second, or at once after a change of
the cluster's records or sessions (the cluster's `generation`). A selector and a limit are
applied to the snapshot, so a terminal asks for the rows it can show.

`matching` is the pure part (table-tested); `SnapshotCache` only decides when to rebuild.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Generic, TypeVar

Row = TypeVar("Row")

SNAPSHOT_SECONDS = 1.0  # how stale a row's time-driven parts (last seen, Ready by silence) may be


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


@dataclass(frozen=True)
class Snapshot(Generic[Row]):
    rows: list[Row]  # in name order
    labels: list[Mapping[str, str]]  # each row's node labels, for selectors
    generation: int
    built_at: float


class SnapshotCache(Generic[Row]):
    """The latest snapshot, rebuilt by `build` when the cluster changed or it is older than
    `max_age`; concurrent callers share one rebuild."""

    def __init__(
        self,
        build: Callable[[], Awaitable[tuple[list[Row], list[Mapping[str, str]]]]],
        max_age: float = SNAPSHOT_SECONDS,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._build = build
        self.max_age = max_age
        self._clock = clock
        self._latest: Snapshot[Row] | None = None
        self._lock = asyncio.Lock()
        self.builds = 0

    def _fresh(self, generation: int) -> Snapshot[Row] | None:
        latest = self._latest
        if (
            latest is not None
            and latest.generation == generation
            and self._clock() - latest.built_at < self.max_age
        ):
            return latest
        return None

    async def get(self, generation: Callable[[], int]) -> Snapshot[Row]:
        fresh = self._fresh(generation())
        if fresh is not None:
            return fresh
        async with self._lock:
            fresh = self._fresh(generation())  # another caller may have rebuilt meanwhile
            if fresh is not None:
                return fresh
            started, at = generation(), self._clock()
            rows, labels = await self._build()
            self.builds += 1
            self._latest = Snapshot(rows, labels, started, at)
            return self._latest

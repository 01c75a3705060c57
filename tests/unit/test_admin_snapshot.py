"""The admin snapshot: which rows a selector and a limit pick, and when it is rebuilt."""

from __future__ import annotations

import asyncio

import pytest

from picoord.coordinator.admin_snapshot import SnapshotCache, matching

LABELS = [
    {"zone": "desk", "disk": "ssd"},
    {"zone": "shelf"},
    {"zone": "desk"},
    {},
    {"zone": "desk", "disk": "ssd"},
]


@pytest.mark.parametrize(
    ("selector", "limit", "picked", "matched"),
    [
        ({}, 0, [0, 1, 2, 3, 4], 5),
        ({}, 2, [0, 1], 5),
        ({"zone": "desk"}, 0, [0, 2, 4], 3),
        ({"zone": "desk"}, 1, [0], 3),
        ({"zone": "desk", "disk": "ssd"}, 0, [0, 4], 2),
        ({"zone": "nowhere"}, 0, [], 0),
        ({"disk": ""}, 0, [], 0),  # a label that is absent is not an empty one
        ({}, 99, [0, 1, 2, 3, 4], 5),
    ],
)
def test_matching(selector: dict, limit: int, picked: list[int], matched: int) -> None:
    assert matching(LABELS, selector, limit) == (picked, matched)


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_rebuilt_on_a_change_or_after_a_second_and_shared_by_concurrent_callers() -> None:
    clock, generation, built = Clock(), [0], []

    async def build() -> tuple[list[int], list[dict[str, str]]]:
        built.append(clock.now)
        await asyncio.sleep(0.01)  # a store read
        return [len(built)], [{}]

    async def scenario() -> None:
        cache = SnapshotCache(build, max_age=1.0, clock=clock)
        first, second = await asyncio.gather(
            cache.get(lambda: generation[0]), cache.get(lambda: generation[0])
        )
        assert first is second and cache.builds == 1
        clock.now += 0.5
        assert (await cache.get(lambda: generation[0])).rows == [1]  # fresh: no rebuild
        generation[0] += 1  # a node or session changed
        assert (await cache.get(lambda: generation[0])).rows == [2]
        clock.now += 1.0  # a second old: last seen and Ready-by-silence may have moved
        assert (await cache.get(lambda: generation[0])).rows == [3]
        assert cache.builds == 3

    asyncio.run(scenario())

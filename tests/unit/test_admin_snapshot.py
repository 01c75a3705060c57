"""The admin snapshot: which rows a selector and a limit pick, and when it is rebuilt."""

from __future__ import annotations

import asyncio

import pytest

from picoord.coordinator.admin_snapshot import Built, Snapshot, SnapshotCache, answerable, in_slices, matching

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


def _cache(clock: Clock, built: list[float], seconds: float = 0.01) -> SnapshotCache[int]:
    async def build() -> Built[int]:
        built.append(clock.now)
        await asyncio.sleep(seconds)  # a build yields to the loop in slices
        return Built(f"whole {len(built)}", [len(built)], [{}])

    return SnapshotCache(build, max_age=1.0, max_stale=2.0, clock=clock)


def test_a_change_is_rebuilt_before_answering_and_concurrent_callers_share_one_build() -> None:
    clock, generation, built = Clock(), [0], []

    async def scenario() -> None:
        cache = _cache(clock, built)
        first, second = await asyncio.gather(
            cache.get(lambda: generation[0]), cache.get(lambda: generation[0])
        )
        assert first is second and cache.builds == 1 and first.whole == "whole 1"
        clock.now += 0.5
        assert (await cache.get(lambda: generation[0])).rows == [1]  # fresh: no rebuild
        generation[0] += 1  # a node record or a session changed: the caller waits for it
        assert (await cache.get(lambda: generation[0])).rows == [2]
        clock.now += 5.0  # nobody asked for longer than max_stale: rebuilt before answering
        assert (await cache.get(lambda: generation[0])).rows == [3]
        assert cache.builds == 3

    asyncio.run(scenario())


def test_an_aged_snapshot_is_answered_at_once_and_rebuilt_behind_the_call() -> None:
    clock, generation, built = Clock(), [0], []

    async def scenario() -> None:
        cache = _cache(clock, built, seconds=0.05)
        await cache.get(lambda: generation[0])
        clock.now += 1.5  # past max_age, within max_stale: time-driven parts only
        answered = await asyncio.wait_for(cache.get(lambda: generation[0]), 0.01)
        again = await cache.get(lambda: generation[0])
        await asyncio.sleep(0)  # the build behind the calls starts (3.12 runs wait_for inline)
        assert answered.rows == again.rows == [1]  # neither waited for the build
        assert len(built) == 2  # one build behind, not one per call
        await asyncio.sleep(0.1)
        assert (await cache.get(lambda: generation[0])).rows == [2] and cache.builds == 2

    asyncio.run(scenario())


def test_at_once_gives_what_get_would_answer_without_a_build_and_asks_the_loop_for_one_when_aged() -> None:
    """The admin server's threads ask `at_once`: None sends the call to the loop."""
    clock, generation, built = Clock(), [0], []

    async def scenario() -> None:
        cache = _cache(clock, built)
        assert cache.at_once(lambda: generation[0]) is None  # nothing built yet
        first = await cache.get(lambda: generation[0])
        assert cache.at_once(lambda: generation[0]) is first  # fresh
        clock.now += 1.5  # aged, within max_stale: answered, and one rebuild asked of the loop
        answered = [await asyncio.to_thread(cache.at_once, lambda: generation[0]) for _ in range(3)]
        assert answered == [first] * 3
        await asyncio.sleep(0.05)  # the loop ran the one rebuild it was handed
        assert built == [100.0, 101.5] and cache.at_once(lambda: generation[0]).rows == [2]
        generation[0] += 1  # a change: only a build before answering shows it
        assert cache.at_once(lambda: generation[0]) is None
        await cache.get(lambda: generation[0])
        clock.now += 5.0  # nobody asked for longer than max_stale
        assert cache.at_once(lambda: generation[0]) is None

    asyncio.run(scenario())


def test_a_snapshot_answers_whole_or_by_selector_and_limit() -> None:
    snapshot = Snapshot("whole", ["a", "b", "c", "d", "e"], LABELS, 0, 0.0)
    assert snapshot.answer({}, 0, lambda rows, matched: (rows, matched)) == "whole"
    assert snapshot.answer({"zone": "desk"}, 2, lambda rows, matched: (rows, matched)) == (["a", "c"], 3)
    assert snapshot.answer({}, 1, lambda rows, matched: (rows, matched)) == (["a"], 5)


def test_in_slices_yields_every_item_and_lets_the_loop_run_between_slices() -> None:
    async def scenario() -> tuple[list[int], int]:
        ticks = 0

        async def ticker() -> None:
            nonlocal ticks
            while True:
                ticks += 1
                await asyncio.sleep(0)

        task = asyncio.create_task(ticker())
        await asyncio.sleep(0)
        before = ticks
        items = [item async for item in in_slices(range(10), size=3)]
        task.cancel()
        return items, ticks - before

    items, ran = asyncio.run(scenario())
    assert items == list(range(10))
    assert ran == 3  # after items 3, 6 and 9


SNAP = Snapshot("whole", [1], [{}], generation=7, built_at=100.0)


@pytest.mark.parametrize(
    ("latest", "generation", "now", "taken", "aged", "max_stale"),
    [
        (None, 7, 100.0, None, False, 5.0),  # nothing built yet
        (SNAP, 8, 100.0, None, False, 5.0),  # what rows show changed since
        (SNAP, 7, 100.5, SNAP, False, 5.0),  # fresh
        (SNAP, 7, 101.0, SNAP, True, 5.0),  # aged: answered, one rebuild behind
        (SNAP, 7, 104.9, SNAP, True, 5.0),
        (SNAP, 7, 105.0, None, False, 5.0),  # stale: rebuilt before answering
        # max_stale below max_age counts as max_age: never stale before it is aged
        (SNAP, 7, 100.5, SNAP, False, 0.2),
        (SNAP, 7, 101.0, None, False, 0.2),
    ],
)
def test_answerable(
    latest: Snapshot | None,
    generation: int,
    now: float,
    taken: Snapshot | None,
    aged: bool,
    max_stale: float,
) -> None:
    assert answerable(latest, generation, now, max_age=1.0, max_stale=max_stale) == (taken, aged)


def test_every_build_is_handed_to_on_built() -> None:
    clock, built, handed = Clock(), [], []

    async def scenario() -> None:
        cache = _cache(clock, built)
        cache.on_built = handed.append
        first = await cache.get(lambda: 0)
        again = await cache.get(lambda: 0)  # the same snapshot: no build, nothing handed
        changed = await cache.get(lambda: 1)
        assert handed == [first, changed]
        assert again is first

    asyncio.run(scenario())

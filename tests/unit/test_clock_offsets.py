"""Each node's clock offset from the times its messages carry and when they arrive."""

from __future__ import annotations

from collections import deque

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from picoord.coordinator.clock_offsets import MAX_OBSERVATIONS, ClockOffsets, estimate
from picoord.coordinator.ctl.output import clock_offset_text
from picoord.coordinator.prometheus import NodeState, render_nodes
from picoord.coordinator.status import Status


@pytest.mark.parametrize(
    ("differences", "expected"),
    [
        ([], None),
        ([-0.004], -0.004),
        ([-0.030, -0.002, -0.250], -0.002),  # delays only ever lower the difference
        ([119.8, 119.99, 119.5], 119.99),  # two minutes ahead
        ([-259200.2, -259200.01], -259200.01),  # three days behind
    ],
)
def test_the_least_delayed_difference_is_the_offset(differences: list[float], expected: float | None) -> None:
    found = estimate([(100.0, difference) for difference in differences], 100.0, 60.0)
    assert (found and found[0]) == expected


@pytest.mark.parametrize(
    ("observations", "now", "expected"),
    [
        ([], 100.0, None),
        ([(39.0, 1.0), (40.0, 2.0)], 100.0, (2.0, 40.0)),  # 60 s before 100 is 40: in; 39 is out
        ([(39.0, 9.0), (40.0, 2.0)], 100.0, (2.0, 40.0)),  # the largest, of those in the window
        ([(30.0, 5.0), (90.0, -1.0), (100.0, -2.0)], 100.0, (-1.0, 90.0)),
        ([(50.0, 3.0), (95.0, 3.0)], 100.0, (3.0, 95.0)),  # a tie: the later one, it lasts longer
    ],
)
def test_only_recent_observations_count(
    observations: list[tuple[float, float]], now: float, expected: tuple[float, float] | None
) -> None:
    assert estimate(observations, now, 60.0) == expected


def _steps(clock_span: int) -> st.SearchStrategy[list[tuple[bool, int, int]]]:
    """Observe (offset, arrival) or ask at a time, in any order; the coordinator's clock
    anywhere in 0..clock_span, so it may step back."""
    step = st.tuples(st.booleans(), st.integers(min_value=-5, max_value=5), st.integers(0, clock_span))
    return st.lists(step, max_size=200)


# (observe: agent time, arrival) or (ask: at, expected); the cases where a kept estimate
# could outlive what it was taken from
_ASK = "ask"
_KEPT_ESTIMATE_CASES = {
    "it leaves the window by time": [(5.0, 0.0), (_ASK, 0.0, 5.0), (61.0, 61.0), (_ASK, 30.0, 0.0)],
    "it is pushed out by newer ones": [
        (5.0, 0.0),
        (_ASK, 0.0, 5.0),
        *[(1.0, 1.0)] * MAX_OBSERVATIONS,
        (_ASK, 1.0, 0.0),
    ],
    "a larger one arrives after the clock stepped back": [
        (1.0, 1.0),
        (2.0, 0.0),
        (_ASK, 61.0, 0.0),  # (0.0, 2.0) is out of the window at 61
        (1.0, 0.0),
        (_ASK, 0.0, 2.0),  # and in again at 0
    ],
}


@pytest.mark.parametrize("steps", _KEPT_ESTIMATE_CASES.values(), ids=_KEPT_ESTIMATE_CASES.keys())
def test_a_kept_estimate_goes_when_what_it_came_from_goes(steps: list[tuple]) -> None:
    offsets = ClockOffsets(span=60.0)
    for step in steps:
        if step[0] == _ASK:
            assert offsets.offset("pi1", step[1]) == step[2]
        else:
            offsets.observe("pi1", *step)


@settings(max_examples=300)
@given(st.one_of(_steps(300), _steps(40)))  # 40: more than MAX_OBSERVATIONS in one window
def test_the_kept_estimate_is_always_the_window_maximum_taken_afresh(
    steps: list[tuple[bool, int, int]],
) -> None:
    """However observations and questions interleave, and whichever way the coordinator's
    clock moves, the estimate kept between them equals the one worked out from the last
    MAX_OBSERVATIONS observations at that moment."""
    offsets = ClockOffsets(span=60.0)
    kept: deque[tuple[float, float]] = deque(maxlen=MAX_OBSERVATIONS)  # as observe keeps them
    for observing, offset, at in steps:
        if observing:
            offsets.observe("pi1", float(at + offset), float(at))
            while kept and at - kept[0][0] > 60.0:
                kept.popleft()
            kept.append((float(at), float(offset)))
        else:
            expected = estimate(kept, float(at), 60.0)
            assert offsets.offset("pi1", float(at)) == (expected and expected[0])


def test_a_clock_set_right_shows_within_one_window() -> None:
    offsets = ClockOffsets(span=60.0)
    assert offsets.offset("pi1", 1000.0) is None
    for second in range(0, 60, 5):  # 2 minutes behind, messages delayed 0 to 40 ms
        offsets.observe("pi1", 1000.0 + second - 120.0 - (second % 3) * 0.02, 1000.0 + second)
    assert offsets.offset("pi1", 1059.0) == pytest.approx(-120.0)
    for second in range(60, 125, 5):  # NTP answered
        offsets.observe("pi1", 1000.0 + second - 0.003, 1000.0 + second)
    assert offsets.offset("pi1", 1124.0) == pytest.approx(-0.003)
    assert offsets.offset("pi2", 1124.0) is None
    assert offsets.offset("pi1", 1124.0 + 61.0) is None  # silent for a window: not measured
    offsets.forget("pi1")
    assert offsets.offset("pi1", 1124.0) is None


@pytest.mark.parametrize(
    ("offset", "threshold", "expected"),
    [
        (None, 1.0, "-"),
        (0.004, 1.0, "-"),
        (-1.0, 1.0, "-"),
        (-1.5, 1.0, "1.5s behind"),
        (2.25, 1.0, "2.25s ahead"),
        (-130.0, 1.0, "2m behind"),
        (-259200.4, 1.0, "3d behind"),
        (0.004, 0.0, "0.004s ahead"),
    ],
)
def test_the_clock_column_names_offsets_past_the_threshold(
    offset: float | None, threshold: float, expected: str
) -> None:
    assert clock_offset_text(offset, threshold) == expected


def test_the_offset_is_exported_as_node_exporters_timex_offset() -> None:
    nodes = [
        NodeState("pi1", Status.READY, None, clock_offset=-120.5),
        NodeState("pi2", Status.READY, None),  # not measured: no series
    ]
    exposition = render_nodes(nodes)
    assert "# TYPE node_timex_offset_seconds gauge\n" in exposition
    assert 'node_timex_offset_seconds{instance="pi1"} -120.5\n' in exposition
    assert 'node_timex_offset_seconds{instance="pi2"}' not in exposition

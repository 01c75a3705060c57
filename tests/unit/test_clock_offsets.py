"""Each node's clock offset from the times its messages carry and when they arrive."""

from __future__ import annotations

import pytest

from picoord.coordinator.clock_offsets import ClockOffsets, estimate_offset, in_window
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
    assert estimate_offset(differences) == expected


@pytest.mark.parametrize(
    ("observations", "now", "expected"),
    [
        ([], 100.0, []),
        ([(39.0, 1.0), (40.0, 2.0)], 100.0, [2.0]),  # 60 s before 100 is 40: in; 39 is out
        ([(30.0, 5.0), (90.0, -1.0), (100.0, -2.0)], 100.0, [-1.0, -2.0]),
    ],
)
def test_only_recent_observations_count(
    observations: list[tuple[float, float]], now: float, expected: list[float]
) -> None:
    assert in_window(observations, now, 60.0) == expected


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

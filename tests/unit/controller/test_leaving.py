"""Leave before stopping (decide.leaving): a stopped replica that served a published port
keeps running until every Ready node applied an assignment without it, or the wait ends."""

from __future__ import annotations

import pytest

from picoord.coordinator.controller.decide import LEAVE_WAIT, Leaving, leaving

NOW = 1000.0
READY = ("pi1", "pi2", "pi3")
OWED = {"pi1": 10, "pi2": 11, "pi3": 12}


@pytest.mark.parametrize(
    ("state", "acked", "ready", "held"),
    [
        (Leaving(NOW, None), {}, READY, True),  # nothing sent yet
        (Leaving(NOW, OWED), {"pi1": 10, "pi2": 11}, READY, True),  # pi3 has not applied it
        (Leaving(NOW, OWED), {"pi1": 10, "pi2": 11, "pi3": 12}, READY, False),  # all applied it
        (Leaving(NOW, OWED), {"pi1": 99, "pi2": 99, "pi3": 99}, READY, False),  # or a later one
        (Leaving(NOW, OWED), {"pi1": 10, "pi2": 11}, ("pi1", "pi2"), False),  # pi3 not Ready: not waited for
        (Leaving(NOW, OWED), {"pi1": 10, "pi2": 11, "pi3": 11}, READY, True),  # pi3 on an older one
        (Leaving(NOW - LEAVE_WAIT, OWED), {}, READY, False),  # the wait is over
        (Leaving(NOW - LEAVE_WAIT, None), {}, READY, False),
        (Leaving(NOW, {}), {}, READY, False),  # sent, and no node was Ready
    ],
)
def test_a_replica_leaves_before_it_stops(state: Leaving, acked: dict, ready: tuple, held: bool) -> None:  # type: ignore[type-arg]
    found, wake = leaving({"mcp.1": state}, acked, ready, NOW)
    assert (found == {"mcp.1"}) is held
    assert wake == (state.since + LEAVE_WAIT if held else None)


def test_the_earliest_wait_is_when_to_look_again() -> None:
    left = {"mcp.1": Leaving(NOW - 1, OWED), "mcp.2": Leaving(NOW - 3, OWED), "mcp.3": Leaving(NOW, {})}
    found, wake = leaving(left, {}, READY, NOW)
    assert found == {"mcp.1", "mcp.2"}
    assert wake == NOW - 3 + LEAVE_WAIT

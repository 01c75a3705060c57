"""Node status is a pure function of (connected, last seen, now, timeouts)."""

import pytest

from picoord.coordinator.status import Status, StatusTimeouts, node_status

T = StatusTimeouts(not_ready_after=20, down_after=60)
NOW = 1_000_000.0


@pytest.mark.parametrize(
    ("connected", "silence", "expected"),
    [
        (True, 0, Status.READY),
        (True, 19.9, Status.READY),
        (True, 20, Status.READY),  # the boundary still counts as heard from
        (True, 20.1, Status.NOT_READY),  # connected but silent: a hung agent
        (True, 60, Status.NOT_READY),
        (True, 60.1, Status.DOWN),
        (False, 0, Status.NOT_READY),  # session just dropped: not Ready, not yet Down
        (False, 59, Status.NOT_READY),
        (False, 61, Status.DOWN),
        (True, -5, Status.READY),  # clock step backwards does not make a node Down
    ],
)
def test_status_from_silence(connected: bool, silence: float, expected: Status) -> None:
    assert node_status(connected, NOW - silence, NOW, T) is expected


@pytest.mark.parametrize("connected", [True, False])
def test_never_seen_is_down(connected: bool) -> None:
    assert node_status(connected, 0.0, NOW, T) is Status.DOWN


@pytest.mark.parametrize(("not_ready", "down"), [(0, 10), (-1, 10), (30, 20)])
def test_inconsistent_timeouts_are_refused(not_ready: float, down: float) -> None:
    with pytest.raises(ValueError, match="timeouts"):
        StatusTimeouts(not_ready, down)

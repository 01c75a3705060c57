"""coordctl rollout's exit code: 0 only when healthy at the new revision, or, with --detach,
when the rollout it started is under way."""

import pytest

from picoord.common.vocabulary import RolloutStatus
from picoord.coordinator.ctl.workloads import follow, rollout_exit_code
from picoord.v1 import services_pb2


def info(status: str, rolling_back: bool = False) -> services_pb2.RolloutInfo:
    return services_pb2.RolloutInfo(
        service="mcp", revision=2, desired=3, status=RolloutStatus(status).wire, rolling_back=rolling_back
    )


@pytest.mark.parametrize(
    ("status", "rolling_back", "detached", "code"),
    [
        ("complete", False, False, 0),
        ("complete", True, False, 1),  # rolled back
        ("failed", False, False, 1),
        ("paused", False, False, 1),
        ("progressing", False, False, 1),  # the stream ended before the rollout did
        ("progressing", False, True, 0),  # --detach: started and going
        ("complete", False, True, 0),
        ("progressing", True, True, 1),  # --detach, but already rolling back
        ("failed", False, True, 1),
        ("paused", False, True, 1),
    ],
)
def test_rollout_exit_code(status: str, rolling_back: bool, detached: bool, code: int) -> None:
    assert rollout_exit_code(info(status, rolling_back), detached) == code


def test_no_progress_at_all_is_a_failure() -> None:
    assert rollout_exit_code(None, True) == 1


def test_detached_rollout_says_how_to_follow_it(capsys: pytest.CaptureFixture[str]) -> None:
    events = [services_pb2.RolloutEvent(progress=info("progressing"))]
    assert follow(events, "table", detached=True) == 0
    assert "coordctl rollout status mcp --watch" in capsys.readouterr().out

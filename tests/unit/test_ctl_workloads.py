"""coordctl's workload verbs without a coordinator: the words of `rollout`, the progress
line, and the exit code of a followed rollout (0 only when healthy at its revision)."""

from __future__ import annotations

import pytest

from picoord.common.vocabulary import RolloutStatus
from picoord.coordinator.ctl.workloads import UsageError, _rollout_words, follow, progress_line
from picoord.v1 import services_pb2


@pytest.mark.parametrize(
    ("words", "expected"),
    [
        (["mcp"], ("start", "mcp")),
        (["status", "mcp"], ("status", "mcp")),
        (["undo", "mcp"], ("undo", "mcp")),
        (["start", "status"], ("start", "status")),  # a service named like a verb
        (["status"], ("start", "status")),
    ],
)
def test_rollout_words(words: list[str], expected: tuple[str, str]) -> None:
    assert _rollout_words(words) == expected


@pytest.mark.parametrize("words", [["a", "b", "c"], ["rollback", "mcp"], ["mcp", "status"]])
def test_rollout_words_refused(words: list[str]) -> None:
    with pytest.raises(UsageError, match="use `rollout NAME`"):
        _rollout_words(words)


def info(status: str = "not rolled out", **fields: object) -> services_pb2.RolloutInfo:
    """A RolloutInfo with the status given by its word."""
    base = {"service": "mcp", "revision": 2, "desired": 3, "updated": 1, "healthy": 1, "available": 2}
    return services_pb2.RolloutInfo(**{**base, **fields}, status=RolloutStatus(status).wire)


@pytest.mark.parametrize(
    ("rollout", "line"),
    [
        (
            info(status="progressing", message="moving"),
            "mcp revision 2: 1/3 updated, 1 healthy, 2 available; progressing",
        ),
        (
            info(status="rolled back", rolling_back=True, message="mcp.7 failed"),
            "mcp rolling back to revision 2: 1/3 updated, 1 healthy, 2 available; rolled back (mcp.7 failed)",
        ),
    ],
)
def test_progress_line(rollout: services_pb2.RolloutInfo, line: str) -> None:
    assert progress_line(rollout) == line


@pytest.mark.parametrize(
    ("last", "code"),
    [
        (info(status="complete"), 0),
        (info(status="complete", rolling_back=True), 1),  # rolled back: not what was asked
        (info(status="paused"), 1),
        (info(status="failed"), 1),
    ],
)
def test_follow_exits_zero_only_when_healthy_at_the_new_revision(
    last: services_pb2.RolloutInfo, code: int, capsys: pytest.CaptureFixture[str]
) -> None:
    events = [
        services_pb2.RolloutEvent(note="starting mcp.4 on pi1 (revision 2)"),
        services_pb2.RolloutEvent(progress=last),
    ]
    assert follow(events, "table") == code
    assert "starting mcp.4 on pi1" in capsys.readouterr().out

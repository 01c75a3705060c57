"""One node's fair share of the session port (issue 18): how many sessions at once, how
often it may open one, how fast it may send, and a node that stops reading."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from picoord.coordinator.cluster import Cluster, LiveSession
from picoord.coordinator.rate_limit import ThrottlePolicy
from picoord.coordinator.servicers import session as session_module
from picoord.coordinator.servicers.session import OverLimit, SessionLimits, SessionServicer
from picoord.coordinator.status import StatusTimeouts
from picoord.coordinator.store import Store
from picoord.coordinator.telemetry import MetricsHistory
from picoord.v1 import agent_pb2

LIMITS = SessionLimits(
    streams_per_node=2,
    opens=ThrottlePolicy(max_failures=3, window=60.0, ban=30.0),
    messages=ThrottlePolicy(max_failures=5, window=10.0, ban=10.0),
)


@pytest.fixture
def servicer(tmp_path: Path) -> SessionServicer:
    store = Store(tmp_path / "state.db")
    cluster = Cluster(store, StatusTimeouts(), MetricsHistory(4))
    clock = {"now": 100.0}
    made = SessionServicer(cluster, 5.0, 5.0, limits=LIMITS, monotonic=lambda: clock["now"])
    made.clock = clock  # type: ignore[attr-defined]
    yield made
    store.close()


def test_session_opens_are_counted_per_node_and_paused_past_the_rate(servicer: SessionServicer) -> None:
    assert [servicer._admit("pi2") for _ in range(2)] == ["", ""]
    assert servicer._admit("pi2") == "node 'pi2' opened 3 sessions in 60s; retry in 30 s"
    assert servicer._admit("pi2").startswith("too many sessions opened by node 'pi2'; retry in")
    assert servicer._admit("pi1") == ""  # another node's share is its own
    servicer.clock["now"] += 31  # type: ignore[attr-defined]
    assert servicer._admit("pi2") == ""


def test_at_most_two_sessions_at_once_per_node(servicer: SessionServicer) -> None:
    servicer._streams["pi2"] = 2
    assert servicer._admit("pi2") == "node 'pi2' already has 2 sessions open"
    servicer._streams["pi2"] = 1
    assert servicer._admit("pi2") == ""


def test_messages_past_the_rate_end_the_session(servicer: SessionServicer) -> None:
    for _ in range(4):
        servicer._count_message("pi2")
    with pytest.raises(OverLimit, match="node 'pi2' sent more than 5 messages in 10s; retry in 10 s"):
        servicer._count_message("pi2")
    with pytest.raises(OverLimit):  # paused: the next session's messages too, until the pause ends
        servicer._count_message("pi2")
    servicer._count_message("pi1")
    servicer.clock["now"] += 11  # type: ignore[attr-defined]
    servicer._count_message("pi2")


def test_without_limits_nothing_is_counted(tmp_path: Path) -> None:
    store = Store(tmp_path / "state.db")
    free = SessionServicer(Cluster(store, StatusTimeouts(), MetricsHistory(4)), 5.0, 5.0)
    assert [free._admit("pi2") for _ in range(100)] == [""] * 100
    for _ in range(100):
        free._count_message("pi2")
    store.close()


class _StuckContext:
    """A stream whose node takes nothing: every write waits for ever."""

    async def write(self, message: agent_pb2.CoordinatorMessage) -> None:
        await asyncio.Event().wait()


async def test_a_node_that_stops_reading_has_its_session_closed(
    servicer: SessionServicer, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(session_module, "SEND_TIMEOUT", 0.05)
    live = LiveSession(node="pi2", serial="s1")
    await asyncio.wait_for(servicer._send(_StuckContext(), live, agent_pb2.CoordinatorMessage()), 5)
    assert live.closed.is_set() and "stopped reading" in live.close_reason

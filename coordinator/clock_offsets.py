"""Each node's clock offset, measured from the times its session messages carry.

A heartbeat or sample says when the agent sent it by the agent's clock; the coordinator
notes when it arrived by its own. Their difference is the offset (node minus coordinator)
minus the message's delay, and delay is never negative, so the largest difference over a
recent window is the estimate least spoiled by delay (NTP's minimum-delay filter, without
the round trip). A clock set right shows within one window.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterable

OFFSET_WINDOW_SECONDS = 60.0  # heartbeats come every few seconds: a dozen or more per window
MAX_OBSERVATIONS = 64  # a bound on memory whatever a node sends
CLOCK_OFFSET_WARNING_SECONDS = 1.0  # past this `coordctl nodes` names the clock


def estimate_offset(differences: Iterable[float]) -> float | None:
    """The offset from (agent time - arrival time) differences: the least delayed, the largest."""
    return max(differences, default=None)


def in_window(observations: Iterable[tuple[float, float]], now: float, span: float) -> list[float]:
    """The differences of (arrival, difference) observations no older than `span` at `now`."""
    return [difference for arrived, difference in observations if now - arrived <= span]


class ClockOffsets:
    """The recent (arrival, difference) observations of each node, and the estimate from them."""

    def __init__(self, span: float = OFFSET_WINDOW_SECONDS) -> None:
        self.span = span
        self._observations: dict[str, deque[tuple[float, float]]] = {}

    def observe(self, node: str, agent_time: float, arrived: float) -> None:
        window = self._observations.setdefault(node, deque(maxlen=MAX_OBSERVATIONS))
        while window and arrived - window[0][0] > self.span:
            window.popleft()
        window.append((arrived, agent_time - arrived))

    def offset(self, node: str, now: float) -> float | None:
        """Seconds the node's clock is ahead of the coordinator's (negative: behind); None
        when the node sent no time within the window."""
        return estimate_offset(in_window(self._observations.get(node, ()), now, self.span))

    def forget(self, node: str) -> None:
        self._observations.pop(node, None)

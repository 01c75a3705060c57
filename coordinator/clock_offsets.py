"""Each node's clock offset, measured from the times its session messages carry.

A heartbeat or sample says when the agent sent it by the agent's clock; the coordinator
notes when it arrived by its own. Their difference is the offset (node minus coordinator)
minus the message's delay, and delay is never negative, so the largest difference over a
recent window is the estimate least spoiled by delay (NTP's minimum-delay filter, without
the round trip). A clock set right shows within one window.

`coordctl nodes` asks every node's offset with every snapshot (once a second at 5,000
nodes), far more often than a node sends a time, so each node's estimate is kept with the
span of time over which it holds (`_Best`) and worked out again only when that ends or an
observation changes it: the answer is the same as the window's maximum taken afresh.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterable
from typing import NamedTuple

OFFSET_WINDOW_SECONDS = 60.0  # heartbeats come every few seconds: a dozen or more per window
MAX_OBSERVATIONS = 64  # a bound on memory whatever a node sends
CLOCK_OFFSET_WARNING_SECONDS = 1.0  # past this `coordctl nodes` names the clock


def estimate(
    observations: Iterable[tuple[float, float]], now: float, span: float
) -> tuple[float, float] | None:
    """The offset from (arrival, agent time - arrival) observations no older than `span` at
    `now`: the least delayed difference, the largest, with when it arrived (None: none is
    recent)."""
    recent = ((difference, arrived) for arrived, difference in observations if now - arrived <= span)
    return max(recent, default=None)


class _Best(NamedTuple):
    """A node's estimate and the times `now` over which it stays the window's maximum: from
    when it was taken until the observation it came from leaves the window. An earlier
    `now` (the coordinator's clock stepped back) works it out again."""

    offset: float
    since: float
    until: float


class ClockOffsets:
    """The recent (arrival, difference) observations of each node, and the estimate from them."""

    def __init__(self, span: float = OFFSET_WINDOW_SECONDS) -> None:
        self.span = span
        self._observations: dict[str, deque[tuple[float, float]]] = {}
        self._best: dict[str, _Best] = {}

    def observe(self, node: str, agent_time: float, arrived: float) -> None:
        window = self._observations.setdefault(node, deque(maxlen=MAX_OBSERVATIONS))
        left: list[float] = []  # differences of the observations this one pushes out
        while window and arrived - window[0][0] > self.span:
            left.append(window.popleft()[1])
        if len(window) == MAX_OBSERVATIONS:  # the append pushes the oldest out
            left.append(window[0][1])
        difference = agent_time - arrived
        window.append((arrived, difference))
        best = self._best.get(node)
        if best is None:
            return
        if any(gone >= best.offset for gone in left):  # the estimate may have been one of them
            del self._best[node]
        elif difference > best.offset:  # the maximum for as long as it is in the window
            self._best[node] = _Best(difference, best.since, arrived + self.span)

    def offset(self, node: str, now: float) -> float | None:
        """Seconds the node's clock is ahead of the coordinator's (negative: behind); None
        when the node sent no time within the window."""
        best = self._best.get(node)
        if best is not None and best.since <= now <= best.until:
            return best.offset
        found = estimate(self._observations.get(node, ()), now, self.span)
        if found is None:
            return None
        offset, arrived = found
        self._best[node] = _Best(offset, now, arrived + self.span)
        return offset

    def forget(self, node: str) -> None:
        self._observations.pop(node, None)
        self._best.pop(node, None)

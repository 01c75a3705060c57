"""`coordctl logs`, the pure part: lines out of a container's log, bounded and chunked on
the agent, merged in time order on the coordinator.

A replica's output crosses its node's session, which also carries the node's reports and
samples: so every stream spends from a byte bucket, the node's streams together from
another, and what does not fit is dropped and counted (the operator sees a line saying
how much), never queued without bound. The agent imports this module on its first log
request only.
"""

from __future__ import annotations

import heapq
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from datetime import datetime

from picoord.common import limits


@dataclass
class ByteBucket:
    """A token bucket of bytes: `rate` a second, at most `burst` saved up. take() says
    whether `count` bytes may go now, and spends them if so."""

    rate: float
    burst: float
    tokens: float = -1.0  # -1: full at the first take
    at: float = 0.0

    def take(self, count: int, now: float) -> bool:
        if self.tokens < 0:
            self.tokens, self.at = self.burst, now
        self.tokens = min(self.burst, self.tokens + max(0.0, now - self.at) * self.rate)
        self.at = now
        if count > self.tokens:
            return False
        self.tokens -= count
        return True


@dataclass(frozen=True)
class Line:
    """One line of a replica's output: dockerd's timestamp, which stream, the bytes (no newline)."""

    timestamp: float
    stderr: bool
    text: bytes


def split_timestamp(line: bytes) -> tuple[float, bytes]:
    """dockerd's `timestamps=1` prefix ("2026-12-06T21:15:31.123456789Z ") off a line:
    (unix seconds, the rest). A line without one (cut by the line bound) gets 0."""
    stamp, space, rest = line.partition(b" ")
    if not space or not stamp[:4].isdigit():
        return 0.0, line
    text = stamp.decode("ascii", "replace").replace("Z", "+00:00")
    whole, dot, fraction = text.partition(".")
    if dot:  # nanoseconds: Python reads at most six digits
        digits = fraction[: len(fraction) - len(fraction.lstrip("0123456789"))]
        text = f"{whole}.{(digits + '000000')[:6]}{fraction[len(digits) :]}"
    try:
        return datetime.fromisoformat(text).timestamp(), rest
    except ValueError:
        return 0.0, line


@dataclass
class LineSplitter:
    """Payload pieces of one stream type in, whole lines out; a line longer than
    `limit` is cut there and the rest of it counted in `dropped` (bytes)."""

    limit: int = limits.LOG_LINE_BYTES
    dropped: int = 0
    _partial: dict[bool, bytearray] = field(default_factory=dict)
    _cutting: dict[bool, bool] = field(default_factory=dict)

    def feed(self, stderr: bool, data: bytes) -> list[Line]:
        out = []
        partial = self._partial.setdefault(stderr, bytearray())
        pieces = data.split(b"\n")
        for index, body in enumerate(pieces):
            ends = index < len(pieces) - 1  # only "\n" ends a line: any other byte is text
            if self._cutting.get(stderr):
                self.dropped += len(body)
            else:
                room = self.limit - len(partial)
                partial += body[:room]
                if len(body) > room:
                    self.dropped += len(body) - room
                    self._cutting[stderr] = True
                    out.append(self._line(stderr, bytes(partial)))
                    partial.clear()
            if ends:
                if not self._cutting.pop(stderr, False):
                    out.append(self._line(stderr, bytes(partial)))
                partial.clear()
        return out

    def flush(self) -> list[Line]:
        """The last lines, without their newline (the stream ended)."""
        out = [self._line(stderr, bytes(rest)) for stderr, rest in self._partial.items() if rest]
        self._partial.clear()
        return out

    @staticmethod
    def _line(stderr: bool, raw: bytes) -> Line:
        timestamp, text = split_timestamp(raw)
        return Line(timestamp, stderr, text)


def line_size(line: Line) -> int:
    """What a line costs of a budget: its text and a little framing."""
    return len(line.text) + 16


def admit(lines: Iterable[Line], buckets: Iterable[ByteBucket], now: float) -> tuple[list[Line], int]:
    """The lines every bucket has room for, in order, and the bytes of those dropped."""
    kept, dropped, chosen = [], 0, list(buckets)
    for line in lines:
        cost = line_size(line)
        if all(bucket.take(cost, now) for bucket in chosen):
            kept.append(line)
        else:
            dropped += len(line.text)
    return kept, dropped


def chunks(lines: list[Line]) -> Iterator[list[Line]]:
    """The lines in runs of at most LOG_CHUNK_BYTES and LOG_CHUNK_LINES (one LogChunk each)."""
    run: list[Line] = []
    size = 0
    for line in lines:
        cost = line_size(line)
        if run and (size + cost > limits.LOG_CHUNK_BYTES or len(run) >= limits.LOG_CHUNK_LINES):
            yield run
            run, size = [], 0
        run.append(line)
        size += cost
    if run:
        yield run


@dataclass(frozen=True)
class Entry:
    """A line on the coordinator, with where it came from."""

    timestamp: float
    replica: str
    node: str
    stderr: bool
    text: bytes


def merged(streams: Iterable[Iterable[Entry]]) -> list[Entry]:
    """Streams each in time order, merged into one in time order (ties by replica)."""
    return list(heapq.merge(*streams, key=lambda entry: (entry.timestamp, entry.replica)))


def dropped_note(replica: str, node: str, count: int) -> str:
    """The line the operator sees where output was left out."""
    return f"-- {replica} on {node}: {count} bytes of output dropped (over the log budget) --"

"""`coordctl logs` on the coordinator: ask the nodes for their replicas' output over their
sessions and hand each operator's call the chunks that come back.

Bounded at each step: a node's chunks spend from its byte bucket here too (whatever its
agent does), each stream holds at most LOG_PENDING_BYTES of lines for its operator's call
(a slow reader makes the rest dropped, counted and said so, never queued; the session's
reader never waits for an operator), and a chunk for a request the
node was not asked (or another node's) is ignored.
"""

from __future__ import annotations

import asyncio
import itertools
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field

import structlog

from picoord.common import limits
from picoord.common.logs import LogThrottle
from picoord.common.logstream import ByteBucket, Entry, dropped_note, merged
from picoord.coordinator.cluster import Cluster
from picoord.v1 import agent_pb2, services_pb2

log = structlog.get_logger("picoord.coordinator.logs")

MERGE_WINDOW = 0.3  # with follow: lines arriving this close together are merged in time order


@dataclass
class LogStream:
    """One replica's output on its way to one operator's call. `queue` holds its chunks, the
    last one with `end`; `dropped` counts the bytes left out here."""

    request_id: str
    replica: str
    node: str
    queue: asyncio.Queue[agent_pb2.LogChunk] = field(default_factory=asyncio.Queue)
    held: int = 0  # line bytes in the queue
    dropped: int = 0
    ended: bool = False
    error: str = ""

    def entries(self, chunk: agent_pb2.LogChunk) -> list[Entry]:
        """The chunk's lines (taken off the queue: their bytes are no longer held)."""
        self.held -= chunk_bytes(chunk)
        return [
            Entry(line.timestamp, self.replica, self.node, line.stderr, line.text) for line in chunk.lines
        ]

    def notes(self, chunk: agent_pb2.LogChunk) -> list[str]:
        """What the operator is told about this chunk besides its lines."""
        notes = []
        dropped, self.dropped = chunk.dropped_bytes + self.dropped, 0
        if dropped:
            notes.append(dropped_note(self.replica, self.node, dropped))
        if chunk.error:
            notes.append(f"-- {self.replica} on {self.node}: {chunk.error} --")
        return notes


class LogHub:
    """The open log streams, by request id, whatever the node or operator call."""

    def __init__(self, cluster: Cluster, monotonic: Callable[[], float] = time.monotonic) -> None:
        self.cluster = cluster
        self.monotonic = monotonic
        self._streams: dict[str, LogStream] = {}
        self._buckets: dict[str, ByteBucket] = {}
        self._ids = itertools.count(1)
        self._log = LogThrottle(every=60.0)

    async def open(self, node: str, replica: str, follow: bool, tail: int, since: float) -> LogStream | None:
        """Ask the node for the replica's output; None when the node has no session."""
        session = self.cluster.sessions.get(node)
        if session is None or session.closed.is_set():
            return None
        stream = LogStream(f"logs-{next(self._ids)}", replica, node)
        self._streams[stream.request_id] = stream
        request = agent_pb2.LogRequest(
            request_id=stream.request_id, replica=replica, follow=follow, tail=tail, since=since
        )
        await session.outbox.put(agent_pb2.CoordinatorMessage(logs=request))
        return stream

    async def close(self, stream: LogStream) -> None:
        """The operator is done: forget the stream and, if it still runs, stop it on the node."""
        if self._streams.pop(stream.request_id, None) is None or stream.ended:
            return
        session = self.cluster.sessions.get(stream.node)
        if session is not None and not session.closed.is_set():
            cancel = agent_pb2.LogRequest(request_id=stream.request_id, replica=stream.replica, cancel=True)
            await session.outbox.put(agent_pb2.CoordinatorMessage(logs=cancel))

    def deliver(self, node: str, chunk: agent_pb2.LogChunk) -> None:
        """A chunk from a node's session (already checked for size by inbound)."""
        stream = self._streams.get(chunk.request_id)
        if stream is None or stream.node != node or stream.ended:
            admitted, _ = self._log.admit(f"stray:{node}", self.monotonic())
            if admitted:
                log.info("ignoring a log chunk nobody asked this node for", node=node)
            return
        bucket = self._buckets.setdefault(node, ByteBucket(limits.LOG_NODE_RATE, limits.LOG_NODE_BURST))
        size = chunk_bytes(chunk)
        if chunk.end:
            stream.ended = True
        if stream.held + size > limits.LOG_PENDING_BYTES or not bucket.take(size, self.monotonic()):
            stream.dropped += size
            if not chunk.end:
                return
            kept = agent_pb2.LogChunk(
                request_id=chunk.request_id, end=True, error=chunk.error, dropped_bytes=chunk.dropped_bytes
            )
            chunk = kept
        self._put(stream, chunk)

    def node_gone(self, node: str) -> None:
        """The node's session ended: its streams end, saying why."""
        for stream in [s for s in self._streams.values() if s.node == node and not s.ended]:
            stream.ended = True
            self._put(stream, agent_pb2.LogChunk(end=True, error="the node's session ended"))

    @staticmethod
    def _put(stream: LogStream, chunk: agent_pb2.LogChunk) -> None:
        stream.held += chunk_bytes(chunk)
        stream.queue.put_nowait(chunk)


def chunk_bytes(chunk: agent_pb2.LogChunk) -> int:
    return sum(len(line.text) for line in chunk.lines)


def log_targets(
    replicas: list[services_pb2.ReplicaInfo], connected: set[str]
) -> tuple[list[tuple[str, str]], list[str]]:
    """Whose output to ask for: (replica, node) for each replica on a node with a session,
    newest revision first when a slot shows twice; and a line for each replica whose output
    cannot be had (no node yet, its node away)."""
    targets: dict[str, str] = {}
    notes, seen = [], set()
    for replica in sorted(replicas, key=lambda r: (r.replica, -r.revision)):
        if replica.replica in seen:
            continue
        seen.add(replica.replica)
        if not replica.node:
            notes.append(f"-- {replica.replica}: not placed on a node yet: no output --")
        elif replica.node_unreachable or replica.node not in connected:
            notes.append(
                f"-- {replica.replica} on {replica.node}: the node is away: its output is not available --"
            )
        else:
            targets[replica.replica] = replica.node
    return sorted(targets.items()), notes


def _event(entry: Entry) -> services_pb2.LogsEvent:
    return services_pb2.LogsEvent(
        line=services_pb2.LogEntry(
            replica=entry.replica,
            node=entry.node,
            timestamp=entry.timestamp,
            stderr=entry.stderr,
            text=entry.text,
        )
    )


async def relay(
    streams: list[LogStream], follow: bool, deadline: float
) -> AsyncIterator[services_pb2.LogsEvent]:
    """The streams' lines, merged in time order: without follow all at once when every
    stream ended (or at `deadline`, monotonic); with follow, what arrived in each
    MERGE_WINDOW. Lines the operator would wait on past the deadline are said to be missing."""
    buffered: dict[str, list[Entry]] = {stream.request_id: [] for stream in streams}
    notes: list[str] = []
    open_streams = list(streams)
    while open_streams:
        waits = {asyncio.ensure_future(stream.queue.get()): stream for stream in open_streams}
        left = None if follow else deadline - time.monotonic()
        done, pending = await asyncio.wait(waits, timeout=left, return_when=asyncio.FIRST_COMPLETED)
        for task in pending:
            task.cancel()
        if not done:
            notes += [
                f"-- {s.replica} on {s.node}: no answer in time: output may be missing --"
                for s in open_streams
            ]
            break
        if follow:
            await asyncio.sleep(MERGE_WINDOW)  # the others' lines of the same moment
        for task in done:
            stream = waits[task]
            chunks = [task.result()]
            while not stream.queue.empty():
                chunks.append(stream.queue.get_nowait())
            for chunk in chunks:
                buffered[stream.request_id] += stream.entries(chunk)
                notes += stream.notes(chunk)
                if chunk.end:
                    open_streams.remove(stream)
                    break
        if follow:
            for entry in merged(buffered.values()):
                yield _event(entry)
            for note in notes:
                yield services_pb2.LogsEvent(note=note)
            buffered = {key: [] for key in buffered}
            notes = []
    for entry in merged(buffered.values()):
        yield _event(entry)
    for note in notes:
        yield services_pb2.LogsEvent(note=note)

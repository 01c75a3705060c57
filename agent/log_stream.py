"""`coordctl logs` on the node: read a replica's container log through the Engine API and
send it up the session in bounded chunks. Loaded on the first log request only (an idle
agent imports none of it).

Each request runs in its own thread (a blocking read of dockerd's stream); what it reads
is split into lines, admitted through the stream's and the node's byte buckets (what does
not fit is counted and reported as dropped), and put on the session's queue only while
that queue is less than half full: a stream waits for the coordinator rather than crowding
out the node's reports and heartbeats.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable
from concurrent.futures import TimeoutError as FutureTimeout

import structlog

from picoord.agent.docker_api import CALL_ERRORS, CALL_TIMEOUT, STDERR, DockerAPI, FrameReader, Reply, explain
from picoord.agent.runtime.model import LABEL_MANAGED, LABEL_REPLICA
from picoord.common import limits
from picoord.common.logstream import ByteBucket, Line, LineSplitter, admit, chunks
from picoord.v1 import agent_pb2

log = structlog.get_logger("picoord.agent.logs")

ROOM_WAIT = 60.0  # the longest a stream waits for room on the session before it gives up
# Lines are held while more of dockerd's stream is on its way (it sends each line as its own
# piece) and sent when the stream pauses, when half a chunk is held, or at the latest this
# long after the last chunk: a burst goes up in few large chunks, a trickle in a few
# messages a second, far below the coordinator's per-node message share (SessionLimits).
CHUNK_SPACING = 0.25
DROPPED_EVERY = 1.0  # a flood past the budget: its dropped count goes up at most this often


def chunk_message(
    request_id: str, lines: list[Line], dropped: int = 0, end: bool = False, error: str = ""
) -> agent_pb2.AgentMessage:
    return agent_pb2.AgentMessage(
        log_chunk=agent_pb2.LogChunk(
            request_id=request_id,
            lines=[
                agent_pb2.LogLine(timestamp=line.timestamp, stderr=line.stderr, text=line.text)
                for line in lines
            ],
            dropped_bytes=dropped,
            end=end,
            error=error[: limits.REPLICA_MESSAGE],
        )
    )


async def put_with_room(outbox: asyncio.Queue, message: agent_pb2.AgentMessage) -> None:
    """Queue the chunk once the session's queue is less than half full."""
    while outbox.qsize() >= outbox.maxsize // 2:
        await asyncio.sleep(0.05)
    outbox.put_nowait(message)


class LogStreams:
    """The node's open log streams, by request id."""

    def __init__(self, docker_socket: str) -> None:
        self.docker_socket = docker_socket
        self.node_bucket = ByteBucket(limits.LOG_NODE_RATE, limits.LOG_NODE_BURST)
        self.messages = ByteBucket(limits.LOG_NODE_MESSAGES, limits.LOG_NODE_MESSAGE_BURST)
        self._lock = threading.Lock()
        self._open: dict[str, _Stream] = {}

    def handle(
        self, request: agent_pb2.LogRequest, loop: asyncio.AbstractEventLoop, outbox: asyncio.Queue
    ) -> None:
        """Start (or, with cancel, stop) one stream; the answer goes up the session."""

        def send(message: agent_pb2.AgentMessage) -> None:
            asyncio.run_coroutine_threadsafe(put_with_room(outbox, message), loop).result(ROOM_WAIT)

        with self._lock:
            if request.cancel:
                stream = self._open.pop(request.request_id, None)
                if stream is not None:
                    stream.stop()
                return
            if request.request_id in self._open or len(self._open) >= limits.LOG_STREAMS_PER_NODE:
                refusal = f"this node already serves {limits.LOG_STREAMS_PER_NODE} log streams"
                if request.request_id in self._open:
                    refusal = "a stream with this request id is open"
                if not outbox.full():  # called on the session's loop
                    outbox.put_nowait(chunk_message(request.request_id, [], end=True, error=refusal))
                return
            stream = _Stream(request, self, send)
            self._open[request.request_id] = stream
        threading.Thread(target=stream.run, name=f"logs-{request.replica}", daemon=True).start()

    def stop_all(self) -> None:
        """The session ended: its streams have nobody to go to."""
        with self._lock:
            streams, self._open = list(self._open.values()), {}
        for stream in streams:
            stream.stop()

    def turn(self, stopped: threading.Event) -> bool:
        """Wait until the node may send another log chunk; False when the stream stopped."""
        while True:
            with self._lock:
                if self.messages.take(1, time.monotonic()):
                    return True
            if stopped.wait(1.0 / limits.LOG_NODE_MESSAGES):
                return False

    def _done(self, request_id: str) -> None:
        with self._lock:
            self._open.pop(request_id, None)


class _Stream:
    def __init__(
        self,
        request: agent_pb2.LogRequest,
        owner: LogStreams,
        send: Callable[[agent_pb2.AgentMessage], None],
    ) -> None:
        self.request = request
        self.owner = owner
        self.send = send
        self.stopped = threading.Event()
        self.reply: Reply | None = None
        self.bucket = ByteBucket(limits.LOG_STREAM_RATE, limits.LOG_STREAM_BURST)
        self.dropped = 0  # bytes dropped and not said yet
        self.cut = False  # the log was longer than the budget: its rest was not read
        self.dropped_said = 0.0
        self.sent_at = 0.0

    def stop(self) -> None:
        self.stopped.set()
        reply = self.reply
        if reply is not None:
            reply.abort()  # wakes the thread blocked reading a followed log

    def run(self) -> None:
        error = ""
        try:
            self._read()
        except CALL_ERRORS as failure:
            error = "" if self.stopped.is_set() else f"cannot read the container's log: {explain(failure)}"
        except FutureTimeout:
            error = "the coordinator took no log chunk for a minute"
        finally:
            self.owner._done(self.request.request_id)
        if self.cut:
            error = (
                f"the log is longer than one stream's budget ({limits.LOG_STREAM_BURST // 2**20} MiB): "
                "the rest was not read; see the latest with --tail N or --since"
            )
        if not self.stopped.is_set():
            try:
                self.send(chunk_message(self.request.request_id, [], end=True, error=error))
            except (FutureTimeout, RuntimeError):
                log.warning("log stream ended with nobody to tell", replica=self.request.replica)

    def _read(self) -> None:
        request = self.request
        client = DockerAPI(self.owner.docker_socket)
        labels = [f"{LABEL_MANAGED}=true", f"{LABEL_REPLICA}={request.replica}"]
        found = client.containers(all_states=True, filters={"label": labels})
        if not found:
            raise ValueError(f"no container of replica {request.replica} on this node")
        container = max(found, key=lambda summary: summary.get("Created", 0))["Id"]
        tty = bool(client.inspect_container(container).get("Config", {}).get("Tty"))
        self.reply = client.logs(
            container,
            request.follow,
            request.tail,
            request.since,
            timeout=None if request.follow else CALL_TIMEOUT,
        )
        if self.stopped.is_set():
            self.reply.abort()
        frames, splitter = FrameReader(), LineSplitter()
        held: list[Line] = []
        try:
            while not self.stopped.is_set():
                if held and not self._more_soon(held):
                    over_budget = self._send(held, splitter)
                    held = []
                    if over_budget and not request.follow:
                        # Past the budget without follow: the rest would only be read to be
                        # dropped (a 50 MB log is a minute of dockerd's time on a Pi).
                        self.cut = True
                        break
                data = self.reply.read_some()
                if not data:
                    break
                pieces = [(1, data)] if tty else frames.feed(data)
                held += [line for kind, payload in pieces for line in splitter.feed(kind == STDERR, payload)]
            if not self.stopped.is_set():
                self._send([] if self.cut else held + splitter.flush(), splitter, last=True)
        finally:
            self.reply.close()

    def _more_soon(self, held: list[Line]) -> bool:
        """Whether to keep holding `held` for more: room for a line in its chunk, and dockerd
        sends more before CHUNK_SPACING since the last chunk is up."""
        if sum(len(line.text) for line in held) >= limits.LOG_CHUNK_BYTES - limits.LOG_LINE_BYTES:
            return False
        assert self.reply is not None
        return self.reply.readable(max(0.0, self.sent_at + CHUNK_SPACING - time.monotonic()))

    def _send(self, lines: list[Line], splitter: LineSplitter, last: bool = False) -> bool:
        """Admit the lines through the buckets and send them; whether a bucket refused some.
        Dropped bytes are added up and said with the next lines, or on their own at most
        every DROPPED_EVERY seconds (a flood past the budget costs no message per read)."""
        now = time.monotonic()
        self.sent_at = now
        kept, dropped = admit(lines, (self.bucket, self.owner.node_bucket), now)
        self.dropped += dropped + splitter.dropped
        splitter.dropped = 0
        runs = list(chunks(kept))
        if not runs and self.dropped and (last or now - self.dropped_said >= DROPPED_EVERY):
            runs = [[]]
        for run in runs:
            if not self.owner.turn(self.stopped):
                break
            self.send(chunk_message(self.request.request_id, run, self.dropped))
            self.dropped, self.dropped_said = 0, now
        return dropped > 0

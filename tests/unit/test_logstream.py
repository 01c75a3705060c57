"""`coordctl logs`: the pure pieces (Docker's stream demux, lines, budgets, chunks, merging,
which replicas to ask) and the coordinator's hub bounds."""

from __future__ import annotations

import asyncio
import struct

import pytest

from picoord.agent.docker_api import STDERR, FrameReader, demultiplex
from picoord.common import limits
from picoord.common.logstream import (
    ByteBucket,
    Entry,
    Line,
    LineSplitter,
    admit,
    chunks,
    merged,
    split_timestamp,
)
from picoord.coordinator.ctl.workloads import log_line
from picoord.coordinator.logs import LogHub, log_targets
from picoord.v1 import agent_pb2, services_pb2


def frame(stream: int, payload: bytes) -> bytes:
    return struct.pack(">BxxxL", stream, len(payload)) + payload


STREAM = frame(1, b"out one\n") + frame(2, b"err one\n") + frame(1, b"out two\n")


@pytest.mark.parametrize("piece", [1, 3, 7, 8, 9, 100])
def test_frames_split_anywhere_give_the_same_payloads(piece: int) -> None:
    reader = FrameReader()
    got: list[tuple[int, bytes]] = []
    for start in range(0, len(STREAM), piece):
        got += reader.feed(STREAM[start : start + piece])
    joined: dict[int, bytes] = {}
    for stream, payload in got:
        joined[stream] = joined.get(stream, b"") + payload
    assert joined == {1: b"out one\nout two\n", STDERR: b"err one\n"}
    order = [stream for index, (stream, _) in enumerate(got) if index == 0 or got[index - 1][0] != stream]
    assert order == [1, STDERR, 1]  # frames kept in their order


def test_demultiplex_keeps_what_a_truncated_frame_brought() -> None:
    assert demultiplex(STREAM + frame(1, b"cut short")[:-4]) == b"out one\nerr one\nout two\ncut s"


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        (b"2026-12-06T21:15:31.123456789Z hello", (1796591731.123456, b"hello")),
        (b"2026-12-06T21:15:31Z a b", (1796591731.0, b"a b")),
        (b"no stamp here", (0.0, b"no stamp here")),
        (b"2026-99-99T00:00:00Z bad", (0.0, b"2026-99-99T00:00:00Z bad")),
        (b"", (0.0, b"")),
    ],
)
def test_split_timestamp(raw: bytes, expected: tuple[float, bytes]) -> None:
    stamp, text = split_timestamp(raw)
    assert (round(stamp, 6), text) == expected


STAMP = b"2026-12-06T21:15:31Z "


@pytest.mark.parametrize(
    ("pieces", "lines", "dropped"),
    [
        ([STAMP + b"one\n" + STAMP + b"two\n"], [b"one", b"two"], 0),
        ([STAMP + b"sp", b"lit\n"], [b"split"], 0),
        ([STAMP + b"\x1b[31mred\r\x0bstill one line\n"], [b"\x1b[31mred\r\x0bstill one line"], 0),
        ([STAMP + b"x" * 40 + b"\n" + STAMP + b"ok\n"], [b"x" * 39, b"ok"], 1),
        ([STAMP + b"x" * 30, b"y" * 30 + b"\n"], [b"x" * 30 + b"y" * 9], 21),
    ],
)
def test_line_splitter_cuts_long_lines_and_counts_the_rest(
    pieces: list[bytes], lines: list[bytes], dropped: int
) -> None:
    splitter = LineSplitter(limit=60)
    got = [line for piece in pieces for line in splitter.feed(False, piece)]
    assert [line.text for line in got] == lines
    assert splitter.dropped == dropped


def test_line_splitter_keeps_stdout_and_stderr_apart_and_flushes_the_last_line() -> None:
    splitter = LineSplitter()
    assert splitter.feed(False, STAMP + b"half of out") == []
    assert [(line.stderr, line.text) for line in splitter.feed(True, STAMP + b"err\n")] == [(True, b"err")]
    assert [(line.stderr, line.text) for line in splitter.flush()] == [(False, b"half of out")]


def test_byte_bucket_spends_and_refills() -> None:
    bucket = ByteBucket(rate=100, burst=1000)
    assert bucket.take(1000, 0.0)
    assert not bucket.take(1, 0.0)
    assert bucket.take(100, 1.0)
    assert not bucket.take(200, 2.0)  # 100 refilled, not 200
    assert bucket.take(1000, 100.0)  # never more than the burst saved
    assert not bucket.take(1, 100.0)


def test_admit_drops_what_any_bucket_refuses_and_counts_it() -> None:
    lines = [Line(float(i), False, b"x" * 84) for i in range(10)]  # 100 bytes each with framing
    stream, node = ByteBucket(0, 1000), ByteBucket(0, 350)
    kept, dropped = admit(lines, (stream, node), 0.0)
    assert len(kept) == 3
    assert dropped == 7 * 84


def test_chunks_respect_bytes_and_lines() -> None:
    big = [Line(0.0, False, b"x" * (limits.LOG_CHUNK_BYTES // 4)) for _ in range(10)]
    runs = list(chunks(big))
    assert [len(run) for run in runs] == [3, 3, 3, 1]
    many = [Line(0.0, False, b"") for _ in range(limits.LOG_CHUNK_LINES + 1)]
    assert [len(run) for run in chunks(many)] == [limits.LOG_CHUNK_LINES, 1]
    assert list(chunks([])) == []


def test_merged_is_in_time_order_across_replicas() -> None:
    a = [Entry(1.0, "web.1", "pi1", False, b"a1"), Entry(3.0, "web.1", "pi1", False, b"a3")]
    b = [Entry(2.0, "web.2", "pi2", False, b"b2"), Entry(3.0, "web.2", "pi2", False, b"b3")]
    assert [e.text for e in merged([b, a])] == [b"a1", b"b2", b"a3", b"b3"]
    assert merged([]) == []


def replica(name: str, node: str, revision: int = 1, away: bool = False) -> services_pb2.ReplicaInfo:
    return services_pb2.ReplicaInfo(replica=name, node=node, revision=revision, node_unreachable=away)


@pytest.mark.parametrize(
    ("replicas", "connected", "targets", "said"),
    [
        (
            [replica("w.1", "pi1"), replica("w.2", "pi2")],
            {"pi1", "pi2"},
            [("w.1", "pi1"), ("w.2", "pi2")],
            [],
        ),
        (
            [replica("w.1", "pi1"), replica("w.2", "pi2")],
            {"pi1"},
            [("w.1", "pi1")],
            ["w.2 on pi2: the node is away"],
        ),
        ([replica("w.1", "pi1", away=True)], {"pi1"}, [], ["w.1 on pi1: the node is away"]),
        ([replica("w.1", "")], {"pi1"}, [], ["w.1: not placed"]),
        ([replica("w.1", "pi1", 1), replica("w.1", "pi2", 2)], {"pi1", "pi2"}, [("w.1", "pi2")], []),
    ],
)
def test_log_targets(
    replicas: list[services_pb2.ReplicaInfo],
    connected: set[str],
    targets: list[tuple[str, str]],
    said: list[str],
) -> None:
    got, notes = log_targets(replicas, connected)
    assert got == targets
    assert len(notes) == len(said)
    for note, words in zip(notes, said, strict=True):
        assert words in note


def test_a_log_line_is_printed_literally() -> None:
    entry = services_pb2.LogEntry(replica="w.1", node="pi1", text=b"\x1b[2J\x1b]0;owned\x07ok\r\xff")
    line = log_line(entry)
    assert line == "w.1@pi1 | \\x1b[2J\\x1b]0;owned\\x07ok\\x0d\ufffd"
    assert "\x1b" not in line and "\r" not in line


class _Session:
    def __init__(self) -> None:
        self.outbox: asyncio.Queue[agent_pb2.CoordinatorMessage] = asyncio.Queue()
        self.closed = asyncio.Event()


class _Cluster:
    def __init__(self, *nodes: str) -> None:
        self.sessions = {node: _Session() for node in nodes}


def chunk(request_id: str, size: int = 10, end: bool = False) -> agent_pb2.LogChunk:
    return agent_pb2.LogChunk(request_id=request_id, lines=[agent_pb2.LogLine(text=b"x" * size)], end=end)


def test_the_hub_asks_the_node_and_bounds_what_it_holds() -> None:
    async def scenario() -> None:
        cluster = _Cluster("pi1", "pi2")
        hub = LogHub(cluster, monotonic=lambda: 0.0)  # type: ignore[arg-type]
        assert await hub.open("pi3", "w.3", False, 0, 0.0) is None  # no session: away
        stream = await hub.open("pi1", "w.1", True, 5, 0.0)
        assert stream is not None
        sent = cluster.sessions["pi1"].outbox.get_nowait().logs
        assert (sent.replica, sent.follow, sent.tail) == ("w.1", True, 5)
        hub.deliver("pi2", chunk(stream.request_id))  # another node's word for it: ignored
        assert stream.queue.empty()
        hub.deliver("pi1", chunk(stream.request_id, limits.LOG_PENDING_BYTES - 10))
        hub.deliver("pi1", chunk(stream.request_id, 10))
        hub.deliver("pi1", chunk(stream.request_id, 1))  # nobody read them yet: no room
        assert (stream.queue.qsize(), stream.held, stream.dropped) == (2, limits.LOG_PENDING_BYTES, 1)
        stream.entries(stream.queue.get_nowait())  # the operator's call takes one
        hub.deliver("pi1", chunk(stream.request_id, 20, end=True))  # the node's burst is spent:
        assert (stream.queue.qsize(), stream.held, stream.dropped) == (2, 10, 21)  # its lines dropped,
        assert stream.queue.get_nowait().lines and stream.queue.get_nowait().end  # the end kept
        assert stream.ended
        await hub.close(stream)
        assert cluster.sessions["pi1"].outbox.empty()  # ended on its own: no cancel sent

    asyncio.run(scenario())


def test_the_hub_drops_past_the_node_budget_and_ends_streams_of_a_gone_node() -> None:
    async def scenario() -> None:
        cluster = _Cluster("pi1")
        hub = LogHub(cluster, monotonic=lambda: 0.0)  # type: ignore[arg-type]
        stream = await hub.open("pi1", "w.1", True, 0, 0.0)
        assert stream is not None
        hub.deliver("pi1", chunk(stream.request_id, limits.LOG_NODE_BURST))
        hub.deliver("pi1", chunk(stream.request_id, 1))  # the burst is spent
        assert stream.queue.qsize() == 1 and stream.dropped == 1
        hub.node_gone("pi1")
        stream.queue.get_nowait()
        last = stream.queue.get_nowait()
        assert last.end and "session ended" in last.error
        other = await hub.open("pi1", "w.2", True, 0, 0.0)
        assert other is not None
        await hub.close(other)  # still running on the node: it is told to stop
        outbox = cluster.sessions["pi1"].outbox
        sent = [outbox.get_nowait().logs for _ in range(outbox.qsize())]
        cancel = sent[-1]
        assert cancel.cancel and cancel.request_id == other.request_id

    asyncio.run(scenario())


def test_a_flood_past_the_budget_costs_few_messages_and_every_dropped_byte_is_said() -> None:
    from picoord.agent.log_stream import LogStreams, _Stream

    sent: list[agent_pb2.AgentMessage] = []
    stream = _Stream(
        agent_pb2.LogRequest(request_id="r1", replica="w.1"), LogStreams("/nonexistent"), sent.append
    )
    stream.stopped.set()  # no pauses between small chunks in a test
    splitter = LineSplitter()
    line = STAMP + b"y" * 999 + b"\n"
    stream.bucket = ByteBucket(0, 64 * 1024)
    total = 0
    for _ in range(50):  # 5 MB in reads of 100 lines: far past a 64 KiB budget
        lines = splitter.feed(False, line * 100)
        total += sum(len(item.text) for item in lines)
        stream._send(lines, splitter)
    stream._send([], splitter, last=True)
    chunks_sent = [message.log_chunk for message in sent]
    shown = sum(len(item.text) for chunk in chunks_sent for item in chunk.lines)
    dropped = sum(chunk.dropped_bytes for chunk in chunks_sent)
    assert shown + dropped == total
    assert shown <= 64 * 1024
    assert len(sent) <= 5  # a few lines' chunks and the dropped count at the end, not one per read

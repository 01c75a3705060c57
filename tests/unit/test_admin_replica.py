"""The admin read replica's parts that need no process: the snapshot frames the coordinator
sends it, the generation cell, and its answering rule."""

from __future__ import annotations

import asyncio
import io
import os
import sys
from pathlib import Path

import pytest

from picoord.coordinator import admin_replica
from picoord.coordinator.admin_reads import NODES, REPLICA_SILENT_AFTER, TOP, replica_alive, replica_socket
from picoord.coordinator.admin_replica import (
    FRAME,
    AdminReplica,
    FrameError,
    FrameReader,
    GenerationCell,
    encode_frame,
    field_entries,
    page,
)
from picoord.coordinator.admin_replica_process import Replica
from picoord.coordinator.admin_snapshot import Snapshot
from picoord.v1 import admin_pb2


def nodes_snapshot(generation: int = 3, built_at: float = 100.0) -> Snapshot[admin_pb2.NodeSummary]:
    """As the coordinator builds it."""
    whole = admin_pb2.ListNodesResponse(
        nodes=[admin_pb2.NodeSummary(name=name) for name in ("pi1", "pi2", "pi3")], matched=3
    )
    labels = [{"zone": "desk"}, {}, {"zone": "desk", "disk": "ssd"}]
    return Snapshot(whole, whole.nodes, labels, generation, built_at)


def test_a_snapshot_crosses_in_a_frame_as_the_wire_bytes_it_was_built_into() -> None:
    sent = nodes_snapshot()
    top = admin_pb2.TopResponse(rows=[admin_pb2.TopRow(name="pi1")], matched=1)
    frames = FrameReader(
        io.BytesIO(
            encode_frame(NODES.kind, sent) + encode_frame(TOP.kind, Snapshot(top, top.rows, [{}], 4, 101.0))
        )
    )
    read, received = frames.next()  # type: ignore[misc]
    assert read is NODES
    assert received.whole == sent.whole.SerializeToString()  # sent on as it came
    assert (received.labels, received.generation, received.built_at) == (sent.labels, 3, 100.0)
    # each row is its slice of the answer: joined, they are an answer with those rows
    rows = admin_pb2.ListNodesResponse.FromString(b"".join(received.rows[1:]))
    assert [row.name for row in rows.nodes] == ["pi2", "pi3"]
    read, received = frames.next()  # type: ignore[misc]
    assert (read, admin_pb2.TopResponse.FromString(received.whole), received.generation) == (TOP, top, 4)
    assert frames.next() is None  # the coordinator closed the pipe


def test_a_page_is_its_rows_slices_and_the_matched_count() -> None:
    whole = nodes_snapshot().whole
    rows = field_entries(whole.SerializeToString(), NODES.rows_number)
    answer = admin_pb2.ListNodesResponse.FromString(page([rows[0], rows[2]], 7, NODES))
    assert answer == admin_pb2.ListNodesResponse(nodes=[whole.nodes[0], whole.nodes[2]], matched=7)
    assert admin_pb2.ListNodesResponse.FromString(page([], 0, NODES)) == admin_pb2.ListNodesResponse()


def test_rows_are_found_past_other_fields_of_every_wire_type() -> None:
    message = admin_pb2.ListNodesResponse(
        nodes=[admin_pb2.NodeSummary(name="pi" + "x" * 200)], matched=300
    )  # a two-byte length and a two-byte varint
    data = admin_pb2.ListNodesResponse(matched=5).SerializeToString() + message.SerializeToString()
    assert [bytes(entry) for entry in field_entries(data, 1)] == [
        admin_pb2.ListNodesResponse(nodes=message.nodes).SerializeToString()
    ]
    with pytest.raises(FrameError, match="ends inside"):
        field_entries(data[:-1], 1)
    with pytest.raises(FrameError, match="wire type 5"):
        field_entries(b"\x0d\x00\x00\x00\x00", 1)  # a fixed32: no answer of ours has one


@pytest.mark.parametrize(
    ("frame", "error"),
    [
        (FRAME.pack(b"x", 1, 1.0, 2, 0) + b"[]", "unknown snapshot kind"),
        (FRAME.pack(b"n", 1, 1.0, 2, 0)[:-3], "ended inside"),
        (FRAME.pack(b"n", 1, 1.0, 40, 0) + b"[]", "ended inside"),
        (FRAME.pack(b"n", 1, 1.0, 2**31, 0), "bytes"),
        (FRAME.pack(b"n", 1, 1.0, 4, 0) + b"[{}]", "labels for 1"),
        (FRAME.pack(b"n", 1, 1.0, 5, 0) + b'["a"]', "not a list of label maps"),
        (FRAME.pack(b"n", 1, 1.0, 4, 0) + b"[{]]", "not JSON"),
    ],
)
def test_a_frame_that_is_not_whole_or_not_ours_is_refused(frame: bytes, error: str) -> None:
    with pytest.raises(FrameError, match=error):
        FrameReader(io.BytesIO(frame)).next()


def test_labels_that_did_not_change_are_not_parsed_again() -> None:
    frames = FrameReader(io.BytesIO(encode_frame(NODES.kind, nodes_snapshot()) * 2))
    first, again = frames.next(), frames.next()
    assert first is not None and again is not None
    assert again[1].labels is first[1].labels


def test_the_generation_cell_is_shared_through_its_file(tmp_path: Path) -> None:
    writer = GenerationCell(tmp_path / "generation", create=True)
    reader = GenerationCell(tmp_path / "generation")
    assert reader.read() == 0
    writer.write(41)
    writer.write(42)
    assert reader.read() == 42
    writer.close()
    reader.close()


def test_the_replica_listens_beside_the_admin_socket() -> None:
    assert replica_socket(Path("/run/picoord/admin.sock")) == Path("/run/picoord/admin.sock.reads")


def as_the_replica_gets_it(snapshot: Snapshot) -> Snapshot[memoryview]:
    taken = FrameReader(io.BytesIO(encode_frame(NODES.kind, snapshot))).next()
    assert taken is not None
    return taken[1]


class Fixture:
    def __init__(self) -> None:
        self.now = 100.0
        self.generation = 3
        self.asked: list[bytes] = []
        self.replica = Replica(
            lambda: self.generation, self.asked.append, lambda: self.now, max_age=1.0, max_stale=5.0
        )


def test_the_replica_answers_pages_and_selections_from_its_snapshot() -> None:
    f = Fixture()
    f.replica.take(NODES, as_the_replica_gets_it(nodes_snapshot()))
    whole = admin_pb2.ListNodesResponse.FromString(f.replica.answer(NODES, admin_pb2.ListNodesRequest()))
    assert [node.name for node in whole.nodes] == ["pi1", "pi2", "pi3"]
    picked = f.replica.answer(NODES, admin_pb2.ListNodesRequest(selector={"zone": "desk"}, limit=1))
    answer = admin_pb2.ListNodesResponse.FromString(picked)
    assert ([node.name for node in answer.nodes], answer.matched) == (["pi1"], 2)
    assert f.asked == []


@pytest.mark.parametrize(
    ("change", "answered", "asked"),
    [
        ("nothing", True, []),
        ("aged", True, [b"n"]),  # answered, and one rebuild asked for
        ("stale", False, []),  # the coordinator answers (and builds)
        ("generation", False, []),  # a change since: the coordinator answers, showing it
        ("bad selector", False, []),  # the coordinator refuses it, in its words
        ("other read", False, []),  # no Top snapshot yet
    ],
)
def test_the_replica_answers_by_the_coordinators_rule(
    change: str, answered: bool, asked: list[bytes]
) -> None:
    f = Fixture()
    f.replica.take(NODES, as_the_replica_gets_it(nodes_snapshot()))
    read, request = NODES, admin_pb2.ListNodesRequest()
    if change == "aged":
        f.now += 1.5
    elif change == "stale":
        f.now += 5.0
    elif change == "generation":
        f.generation += 1
    elif change == "bad selector":
        request = admin_pb2.ListNodesRequest(selector={"zone": "not a value!"})
    elif change == "other read":
        read, request = TOP, admin_pb2.TopRequest()
    assert (f.replica.answer(read, request) is not None) == answered
    assert f.asked == asked


def test_an_aged_snapshot_asks_for_one_rebuild_not_one_per_call() -> None:
    f = Fixture()
    f.replica.take(NODES, as_the_replica_gets_it(nodes_snapshot()))
    f.now += 1.5
    for _ in range(3):
        f.replica.answer(NODES, admin_pb2.ListNodesRequest())
    f.replica.take(NODES, as_the_replica_gets_it(nodes_snapshot(built_at=101.4)))  # the rebuild it asked for
    f.now += 1.0
    f.replica.answer(NODES, admin_pb2.ListNodesRequest())
    assert f.asked == [b"n", b"n"]


def test_a_replica_that_cannot_start_or_exits_leaves_the_coordinator_serving(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Unstartable, it is only logged (coordctl asks the admin socket); exiting at once, it
    is started again, each time after a longer wait."""
    monkeypatch.setattr(admin_replica, "RESTART_SECONDS", 0.05)
    monkeypatch.setattr(admin_replica, "RESTART_MAX_SECONDS", 0.4)

    async def scenario() -> tuple[int, int]:
        missing = AdminReplica(tmp_path / "a.sock", tmp_path, lambda kind: None, [str(tmp_path / "nothing")])
        await missing.start()
        await asyncio.sleep(0.3)
        await missing.stop()
        exiting = AdminReplica(
            tmp_path / "b.sock", tmp_path, lambda kind: None, [sys.executable, "-c", "raise SystemExit(3)"]
        )
        await exiting.start()
        await asyncio.sleep(1.5)
        await exiting.stop()
        return missing.starts, exiting.starts

    missing_starts, exiting_starts = asyncio.run(scenario())
    assert missing_starts == 0
    # waits of 0.1, 0.2, 0.4, 0.4 s (and the exits themselves) in 1.5 s: never one a tick
    assert 2 <= exiting_starts <= 6


def test_labels_are_made_again_only_when_the_generation_moved(tmp_path: Path) -> None:
    replica = AdminReplica(tmp_path / "admin.sock", tmp_path, lambda kind: None)
    first = replica._labels_of(NODES.kind, nodes_snapshot(generation=3, built_at=100.0))
    again = replica._labels_of(NODES.kind, nodes_snapshot(generation=3, built_at=101.0))
    moved = replica._labels_of(NODES.kind, nodes_snapshot(generation=4, built_at=102.0))
    assert again is first  # the same generation's snapshot one second later: not encoded again
    assert moved is not first and moved == first  # same labels, but made again for the new generation
    replica.cell.close()


@pytest.mark.parametrize(
    ("touched_ago", "alive"),
    [
        pytest.param(0.0, True, id="just touched"),
        pytest.param(REPLICA_SILENT_AFTER - 0.5, True, id="within the silence allowed"),
        pytest.param(REPLICA_SILENT_AFTER + 0.5, False, id="silent too long: stopped"),
        pytest.param(-(REPLICA_SILENT_AFTER + 0.5), False, id="touched in the future: the clock stepped"),
        pytest.param(None, False, id="no socket"),
    ],
)
def test_replica_alive(tmp_path: Path, touched_ago: float | None, alive: bool) -> None:
    socket = tmp_path / "admin.sock.reads"
    now = 1_000_000.0
    if touched_ago is not None:
        socket.touch()
        os.utime(socket, (now - touched_ago, now - touched_ago))
    assert replica_alive(socket, now) is alive

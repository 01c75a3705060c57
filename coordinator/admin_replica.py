"""The admin read replica: `coordctl nodes` and `top` answered by a process of their own.

Why a process: at 5,000 sessions the coordinator's event loop holds its GIL nearly all the
time, and a call answered by one of the coordinator's threads (admin_threads.py) still
waits for that GIL several times over (the relay's copies, gRPC's poller, the call): p99
0.2-0.8 s for a 100-row page, however small the answer. The replica has a GIL of its own.

How (this module is the coordinator's side and what both sides share; the replica's own
is admin_replica_process.py):
- every snapshot the coordinator builds (`SnapshotCache.on_built`) is sent to the replica
  over its stdin: a FRAME header, the rows' labels as JSON, the whole answer as protobuf.
  A thread of ours serializes and writes it, so the loop only hands it over;
- the cluster generation is also written into a small file both processes map
  (`GenerationCell`), so the replica sees a change the moment the coordinator makes it:
  an operator's own change shows at once, as on the admin socket. A rebuild follows
  every burst of changes (`generation_changed`), so the replica is current again without
  a caller waiting for it;
- the replica keeps each answer as those wire bytes and each row as its slice of them
  (`FrameReader`): the whole answer is sent as it came, a page is its rows' slices
  joined, so nothing is parsed or serialized again there;
- the replica answers by the coordinator's own rule (`admin_snapshot.answerable`). When
  a snapshot is aged it writes the read's kind byte to its stdout, and the coordinator
  starts one rebuild behind the callers; what it cannot answer (no snapshot, a change
  since, too stale, a selector to refuse) it forwards to the admin socket as it came, and
  passes the answer or the error on;
- it listens on `replica_socket(admin socket)`, root-only like the admin socket, and
  coordctl asks it first for `nodes` and `top` (the admin socket when it is not there).
  The coordinator starts it again when it exits; it exits when the coordinator's end of
  its stdin closes.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import mmap
import os
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, BinaryIO

import structlog

from picoord.coordinator.admin_reads import READS, SnapshotRead, replica_socket
from picoord.coordinator.admin_snapshot import Snapshot

log = structlog.get_logger("picoord.coordinator.admin")

FRAME = struct.Struct("<1sQdII")  # kind, generation, built_at (monotonic), labels bytes, answer bytes
FRAME_BYTES_MAX = 256 * 1024 * 1024  # a replica refuses a frame part larger than this
_CELL = struct.Struct("<Q")
RESTART_SECONDS = 1.0  # between the replica's exit and its next start, at least
RESTART_MAX_SECONDS = 30.0
BRIEF_LIFE_SECONDS = 10.0  # a replica that exits sooner is started again after twice the wait
FOLLOW_SECONDS = 2.0  # from a change to the rebuild that follows it (one for many changes)
STOP_SECONDS = 3.0  # for the replica to exit once its stdin is closed, before it is killed
PROCESS_MODULE = "picoord.coordinator.admin_replica_process"


class FrameError(ValueError):
    """A frame the replica cannot take: it was not sent by a coordinator of this version."""


def labels_json(snapshot: Snapshot[Any]) -> bytes:
    """A snapshot's row labels as a frame carries them."""
    return json.dumps([dict(each) for each in snapshot.labels], separators=(",", ":")).encode()


def encode_frame(kind: bytes, snapshot: Snapshot[Any], labels: bytes | None = None) -> bytes:
    """A snapshot as the replica reads it (`FrameReader`); `labels`, its `labels_json` when
    the caller has it already."""
    labels = labels_json(snapshot) if labels is None else labels
    whole = snapshot.whole.SerializeToString()  # type: ignore[attr-defined]
    return b"".join(
        (FRAME.pack(kind, snapshot.generation, snapshot.built_at, len(labels), len(whole)), labels, whole)
    )


class FrameReader:
    """The snapshots on a stream, as the replica keeps them: the whole answer as the wire
    bytes the coordinator serialized, and each row as its slice of them (with its field
    tag), so that no answer is parsed or serialized again in the replica, only cut and
    joined (`page`). Labels arrive with every snapshot; their JSON is parsed only when it
    changed."""

    def __init__(self, stream: BinaryIO) -> None:
        self._stream = stream
        self._labels: dict[bytes, tuple[bytes, list[Mapping[str, str]]]] = {}

    def next(self) -> tuple[SnapshotRead, Snapshot[memoryview]] | None:
        """The next snapshot, and which read it answers; None at the stream's end."""
        header = _read_exactly(self._stream, FRAME.size)
        if header is None:
            return None
        kind, generation, built_at, labels_size, whole_size = FRAME.unpack(header)
        read = READS.get(kind)
        if read is None:
            raise FrameError(f"unknown snapshot kind {kind!r}")
        if max(labels_size, whole_size) > FRAME_BYTES_MAX:
            raise FrameError(f"a snapshot of {max(labels_size, whole_size)} bytes")
        labels_text = _read_exactly(self._stream, labels_size)
        whole = _read_exactly(self._stream, whole_size)
        if labels_text is None or whole is None:
            raise FrameError("the stream ended inside a snapshot")
        labels = self._parsed_labels(kind, labels_text)
        rows = field_entries(whole, read.rows_number)
        if len(labels) != len(rows):
            raise FrameError(f"{len(rows)} rows but labels for {len(labels)}")
        return read, Snapshot(whole, rows, labels, generation, built_at)

    def _parsed_labels(self, kind: bytes, text: bytes) -> list[Mapping[str, str]]:
        previous = self._labels.get(kind)
        if previous is not None and previous[0] == text:
            return previous[1]
        try:
            labels = json.loads(text)
        except ValueError as error:
            raise FrameError(f"labels are not JSON: {error}") from error
        if not isinstance(labels, list) or not all(isinstance(each, dict) for each in labels):
            raise FrameError("labels are not a list of label maps")
        self._labels[kind] = (text, labels)
        return labels


def page(rows: Sequence[memoryview], matched: int, read: SnapshotRead) -> bytes:
    """The wire bytes of `read`'s answer carrying these rows (slices from `field_entries`)."""
    return b"".join(rows) + read.answer_type(matched=matched).SerializeToString()


def field_entries(data: bytes, number: int) -> list[memoryview]:
    """Each entry of the length-delimited field `number` in a protobuf message's wire bytes,
    tag and length included: concatenated, they encode a message with those entries."""
    view, entries, at = memoryview(data), [], 0
    try:
        while at < len(data):
            start = at
            tag, at = _varint(data, at)
            wire_type = tag & 7
            if wire_type == 0:
                _, at = _varint(data, at)
            elif wire_type == 2:
                size, at = _varint(data, at)
                at += size
                if tag >> 3 == number:
                    entries.append(view[start:at])
            else:
                raise FrameError(f"wire type {wire_type} in a snapshot")
    except IndexError as error:
        raise FrameError("a snapshot's answer ends inside a field") from error
    if at != len(data):
        raise FrameError("a snapshot's answer ends inside a field")
    return entries


def _varint(data: bytes, at: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        byte = data[at]
        at += 1
        value |= (byte & 0x7F) << shift
        if byte < 0x80:
            return value, at
        shift += 7


def _read_exactly(stream: BinaryIO, size: int) -> bytes | None:
    """`size` bytes, or None when the stream ends before the first of them."""
    parts: list[bytes] = []
    wanted = size
    while wanted:
        part = stream.read(wanted)
        if not part:
            if parts:
                raise FrameError("the stream ended inside a snapshot")
            return None
        parts.append(part)
        wanted -= len(part)
    return b"".join(parts)


class GenerationCell:
    """The cluster generation in a file both processes map: the coordinator writes it at
    every change (`Cluster.generation`), the replica reads it at every call."""

    def __init__(self, path: Path, create: bool = False) -> None:
        self.path = path
        if create:
            path.write_bytes(_CELL.pack(0))
        with path.open("r+b") as file:
            self._map = mmap.mmap(file.fileno(), _CELL.size)

    def write(self, generation: int) -> None:
        _CELL.pack_into(self._map, 0, generation)

    def read(self) -> int:
        return int(_CELL.unpack_from(self._map, 0)[0])

    def close(self) -> None:
        self._map.close()


class AdminReplica:
    """The coordinator's end: starts the replica, sends it snapshots, takes its requests for
    a rebuild (`refresh(kind)`, on the loop), and starts it again when it exits."""

    def __init__(
        self,
        admin_socket: Path,
        directory: Path,
        refresh: Callable[[bytes], None],
        command: Sequence[str] = (sys.executable, "-m", PROCESS_MODULE),
    ) -> None:
        self.admin_socket = admin_socket
        self.socket = replica_socket(admin_socket)
        self.cell = GenerationCell(directory / "generation", create=True)
        self._refresh = refresh
        self._command = list(command)
        self._process: subprocess.Popen[bytes] | None = None
        self._latest: dict[bytes, Snapshot[Any]] = {}
        self._pending: dict[bytes, Snapshot[Any]] = {}  # newest of each read, not yet written
        self._labels_made: dict[bytes, tuple[int, bytes]] = {}  # by read: generation, labels JSON
        self._wake = threading.Condition()
        self._writer: threading.Thread | None = None
        self._supervisor: asyncio.Task[None] | None = None
        self._stopping = False
        self._started_at = 0.0
        self._loop: asyncio.AbstractEventLoop | None = None
        self._follow: asyncio.TimerHandle | None = None
        self.starts = 0

    async def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._spawn()
        self._writer = threading.Thread(target=self._write_frames, name="admin-replica", daemon=True)
        self._writer.start()
        self._supervisor = asyncio.create_task(self._supervise())

    @property
    def pid(self) -> int | None:
        return None if self._process is None else self._process.pid

    def generation_changed(self, generation: int) -> None:
        """On the loop, at every change (`Cluster.publish_generation`): the replica sees it at
        once (and forwards until it has a snapshot of it), and a rebuild follows within
        FOLLOW_SECONDS, so that it answers again soon after the changes stop, rather than
        leave the first caller after them to wait for a build."""
        self.cell.write(generation)
        if self._follow is None and self._loop is not None and not self._stopping:
            self._follow = self._loop.call_later(FOLLOW_SECONDS, self._follow_changes)

    def _follow_changes(self) -> None:
        self._follow = None
        for kind in READS:
            self._refresh(kind)

    def ship(self, read: SnapshotRead, snapshot: Snapshot[Any]) -> None:
        """On the loop: send the replica this snapshot (only the newest of a read is sent)."""
        self._latest[read.kind] = snapshot
        with self._wake:
            self._pending[read.kind] = snapshot
            self._wake.notify()

    def _spawn(self) -> None:
        with contextlib.suppress(FileNotFoundError):
            self.socket.unlink()  # left by a replica that was killed
        self._started_at = time.monotonic()
        try:
            process = subprocess.Popen(
                [
                    *self._command,
                    "--socket",
                    str(self.socket),
                    "--forward",
                    str(self.admin_socket),
                    "--generation",
                    str(self.cell.path),
                ],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                close_fds=True,
                # A session of its own: where the kernel groups CPU time by session (autogroup),
                # the replica is then weighed as a program of its own, not as one more thread
                # beside the coordinator's busy ones (at 5,000 sessions on 2 cores a call waited
                # up to 0.1 s for the CPU). It still exits with us: its stdin ends.
                start_new_session=True,
            )
        except OSError as error:  # coordctl asks the admin socket meanwhile
            log.warning("admin read replica not started", error=str(error))
            return
        assert process.stdout is not None
        os.set_blocking(process.stdout.fileno(), False)
        asyncio.get_running_loop().add_reader(process.stdout.fileno(), self._requests, process)
        self._process = process
        self.starts += 1
        with self._wake:  # a new replica starts from the newest snapshots
            self._pending.update(self._latest)
            self._wake.notify()

    def _requests(self, process: subprocess.Popen[bytes]) -> None:
        """The replica's stdout is readable: kind bytes, each a request for a rebuild."""
        assert process.stdout is not None
        try:
            data = os.read(process.stdout.fileno(), 64)
        except BlockingIOError:
            return
        except OSError:
            data = b""
        if not data:  # it exited: the supervisor starts another
            asyncio.get_running_loop().remove_reader(process.stdout.fileno())
            return
        for kind in {bytes([each]) for each in data}:
            if kind in READS:
                self._refresh(kind)

    def _write_frames(self) -> None:
        """The writer thread: serializes and writes each pending snapshot, newest only."""
        while True:
            with self._wake:
                while not self._pending and not self._stopping:
                    self._wake.wait()
                if self._stopping:
                    return
                pending, self._pending = self._pending, {}
            process = self._process
            if process is None or process.stdin is None:
                continue
            for kind, snapshot in pending.items():
                try:
                    process.stdin.write(encode_frame(kind, snapshot, self._labels_of(kind, snapshot)))
                    process.stdin.flush()
                except (OSError, ValueError):  # it exited (the supervisor starts another) or we stop
                    break

    def _labels_of(self, kind: bytes, snapshot: Snapshot[Any]) -> bytes:
        """In the writer thread: the snapshot's labels JSON, made again only when the
        generation moved (a label changes only with it; snapshots of one generation, one a
        second while callers come, carry the same labels)."""
        made = self._labels_made.get(kind)
        if made is None or made[0] != snapshot.generation:
            made = self._labels_made[kind] = (snapshot.generation, labels_json(snapshot))
        return made[1]

    async def _supervise(self) -> None:
        """Starts the replica again when it exits, waiting longer each time it lived briefly
        (a replica that cannot start must not fill the journal)."""
        delay = RESTART_SECONDS
        while True:
            await asyncio.sleep(RESTART_SECONDS)
            process = self._process
            if process is not None and process.poll() is None:
                continue
            lived = time.monotonic() - self._started_at
            delay = RESTART_SECONDS if lived > BRIEF_LIFE_SECONDS else min(2 * delay, RESTART_MAX_SECONDS)
            if process is not None:  # else it could not be started: _spawn said why
                log.warning("admin read replica exited", code=process.returncode, restart_in=delay)
                self._forget(process)
                self._process = None
            await asyncio.sleep(delay - RESTART_SECONDS)
            self._spawn()

    def _forget(self, process: subprocess.Popen[bytes]) -> None:
        """Stop reading its stdout and close both pipes (the writer thread's next write fails)."""
        if process.stdout is not None:
            with contextlib.suppress(ValueError, OSError):  # already closed, or at EOF
                asyncio.get_running_loop().remove_reader(process.stdout.fileno())
        for pipe in (process.stdin, process.stdout):
            if pipe is not None:
                with contextlib.suppress(OSError):
                    pipe.close()

    async def stop(self) -> None:
        self._stopping = True
        if self._follow is not None:
            self._follow.cancel()
        if self._supervisor is not None:
            self._supervisor.cancel()
            await asyncio.gather(self._supervisor, return_exceptions=True)
        with self._wake:
            self._wake.notify()
        process = self._process
        if process is not None:
            # It keeps nothing: ended at once, so that a write blocked on a replica that no
            # longer reads (stopped, say) fails rather than hold its pipe's close.
            with contextlib.suppress(ProcessLookupError):
                process.terminate()
            self._forget(process)
            try:
                await asyncio.to_thread(process.wait, STOP_SECONDS)
            except subprocess.TimeoutExpired:
                process.kill()
                await asyncio.to_thread(process.wait)
        if self._writer is not None:
            await asyncio.to_thread(self._writer.join, STOP_SECONDS)
        with contextlib.suppress(FileNotFoundError):
            self.socket.unlink()
        self.cell.close()

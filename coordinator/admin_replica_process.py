"""The admin read replica's process (admin_replica.py says why and how): it takes the
coordinator's snapshots from stdin, answers `ListNodes` and `Top` on its own socket from
them, and forwards to the admin socket what it cannot answer. Answers stay the wire bytes
the coordinator serialized, cut and joined, so a call holds this process's GIL for
about a millisecond.

    python -m picoord.coordinator.admin_replica_process --socket S --forward ADMIN --generation CELL
"""

from __future__ import annotations

import argparse
import concurrent.futures
import contextlib
import functools
import os
import signal
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import grpc
import structlog

from picoord.common import limits
from picoord.common.addresses import grpc_unix_address
from picoord.common.logs import configure_logging
from picoord.common.names import InvalidName
from picoord.coordinator.admin_reads import READS, REPLICA_BEAT, SnapshotRead, checked_selector
from picoord.coordinator.admin_replica import FrameError, FrameReader, GenerationCell, page
from picoord.coordinator.admin_snapshot import SNAPSHOT_SECONDS, STALE_SECONDS, Snapshot, answerable
from picoord.v1 import admin_pb2

log = structlog.get_logger("picoord.coordinator.admin_replica")

REPLICA_THREADS = 8  # calls answered at once; more wait for a thread
FORWARD_SECONDS = 30.0  # a forwarded call's deadline when its caller gave none


class Replica:
    """The newest snapshot of each read and the coordinator's answering rule over them."""

    def __init__(
        self,
        generation: Callable[[], int],
        ask_rebuild: Callable[[bytes], None],
        clock: Callable[[], float] = time.monotonic,
        max_age: float = SNAPSHOT_SECONDS,
        max_stale: float = STALE_SECONDS,
    ) -> None:
        self._generation = generation
        self._ask_rebuild = ask_rebuild
        self._clock = clock
        self.max_age = max_age
        self.max_stale = max_stale
        self._latest: dict[bytes, Snapshot[memoryview]] = {}
        self._asked: dict[bytes, float] = {}  # the built_at of the snapshot a rebuild was asked for

    def take(self, read: SnapshotRead, snapshot: Snapshot[memoryview]) -> None:
        self._latest[read.kind] = snapshot

    def answer(self, read: SnapshotRead, request: Any) -> bytes | None:
        """The answer's wire bytes from a snapshot, or None: the coordinator must answer."""
        try:
            selector = checked_selector(request.selector)
        except InvalidName:
            return None  # the coordinator refuses it, in its words
        snapshot, aged = answerable(
            self._latest.get(read.kind), self._generation(), self._clock(), self.max_age, self.max_stale
        )
        if snapshot is None:
            return None
        if aged and self._asked.get(read.kind) != snapshot.built_at:
            self._asked[read.kind] = snapshot.built_at  # once per snapshot, not once per call
            self._ask_rebuild(read.kind)
        return snapshot.answer(selector, request.limit, functools.partial(page, read=read))


def answer_or_forward(
    replica: Replica,
    read: SnapshotRead,
    forward: Callable[..., bytes],
    request: Any,
    context: grpc.ServicerContext,
) -> bytes:
    """One call: the replica's answer, else the coordinator's (its error passed on as it is)."""
    answer = replica.answer(read, request)
    if answer is not None:
        return answer
    remaining = context.time_remaining()
    timeout = FORWARD_SECONDS if remaining is None else min(remaining, FORWARD_SECONDS)
    try:
        return forward(request, timeout=timeout)
    except grpc.RpcError as error:
        context.abort(error.code(), error.details())  # type: ignore[attr-defined]
        raise  # unreachable: abort raises


def read_handlers(replica: Replica, forward_channel: grpc.Channel) -> grpc.GenericRpcHandler:
    """`ListNodes` and `Top` of the Admin service, answered as wire bytes (every other
    method is UNIMPLEMENTED here); forwarded calls come back as bytes too."""
    service = admin_pb2.DESCRIPTOR.services_by_name["Admin"].full_name
    methods = {}
    for read in READS.values():
        forward = forward_channel.unary_unary(
            f"/{service}/{read.method}",
            request_serializer=read.request_type.SerializeToString,
            response_deserializer=None,
        )
        methods[read.method] = grpc.unary_unary_rpc_method_handler(
            functools.partial(answer_or_forward, replica, read, forward),
            request_deserializer=read.request_type.FromString,
        )
    return grpc.method_handlers_generic_handler(service, methods)


def take_snapshots(replica: Replica, stream: Any) -> None:
    """Until the coordinator closes our stdin: each snapshot it sends becomes the newest."""
    frames = FrameReader(stream)
    while (taken := frames.next()) is not None:
        replica.take(*taken)


def ask_rebuild(kind: bytes) -> None:
    """Tell the coordinator (our stdout) that this read's snapshot is aged."""
    with contextlib.suppress(OSError):  # the coordinator is gone: stdin ends too, and we exit
        os.write(sys.stdout.fileno(), kind)


def serve(socket: Path, forward: Path, generation_cell: Path) -> int:
    cell = GenerationCell(generation_cell)
    replica = Replica(cell.read, ask_rebuild)
    options = [("grpc.max_receive_message_length", limits.GRPC_RECEIVE_BYTES)]  # as the coordinator's
    forward_channel = grpc.insecure_channel(grpc_unix_address(forward), options=options)
    pool = concurrent.futures.ThreadPoolExecutor(REPLICA_THREADS, thread_name_prefix="replica")
    server = grpc.server(pool, options=options)
    server.add_generic_rpc_handlers((read_handlers(replica, forward_channel),))
    os.umask(0o177)  # the socket is born 0600, as the admin socket: only root reads the cluster
    if not server.add_insecure_port(grpc_unix_address(socket)):
        log.error("admin read replica cannot listen", socket=str(socket))
        return 1
    server.start()
    beating = threading.Event()
    threading.Thread(target=beat, args=(socket, beating), name="replica-beat", daemon=True).start()
    try:
        take_snapshots(replica, sys.stdin.buffer)  # to EOF: the coordinator stopped, or stops us
        return 0
    except FrameError as error:
        log.error("admin read replica got a bad snapshot", error=str(error))
        return 1
    finally:
        beating.set()
        server.stop(0).wait()
        forward_channel.close()
        cell.close()


def beat(socket: Path, stop: threading.Event) -> None:
    """Our sign of life for coordctl (`replica_alive`): the socket touched every REPLICA_BEAT."""
    while not stop.wait(REPLICA_BEAT):
        with contextlib.suppress(OSError):  # unlinked by the coordinator starting our successor
            os.utime(socket)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="admin_replica_process", description=__doc__)
    parser.add_argument("--socket", type=Path, required=True)
    parser.add_argument("--forward", type=Path, required=True, help="the admin socket")
    parser.add_argument("--generation", type=Path, required=True, help="the generation cell's file")
    args = parser.parse_args(argv)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # a terminal's ^C stops the coordinator, which stops us
    configure_logging()
    return serve(args.socket, args.forward, args.generation)


if __name__ == "__main__":
    raise SystemExit(main())

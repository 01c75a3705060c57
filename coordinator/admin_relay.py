"""The admin socket's front: who is calling, from the kernel, not from the client's word.

gRPC does not tell a servicer the credentials of a unix-socket peer (grpc/grpc#15511,
#28755), and a client can write anything into `requested_by`. So the coordinator accepts
the admin socket itself, asks the kernel who connected (SO_PEERCRED: uid and pid at
connect time), and relays the bytes to the admin gRPC server on a private socket, from a
socket bound to its own path in a root-only directory. That path is the peer name gRPC
reports to the servicer, and the relay registers it with the caller's credentials before
it connects (see `peers.LOCAL_OPERATORS`). The admin gRPC server is a server of its own,
bound only to the private socket, so the agent ports' troubles never queue its calls.

The bytes are copied by two threads per connection, not on the event loop: at 5,000
sessions every turn of the loop waits behind sessions' messages, and a 1 MB `coordctl
nodes` answer relayed in 64 KiB pieces on the loop took one turn a piece (admin p99 in
seconds). Accepting and naming the caller stay on the loop.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import os
import shutil
import socket
import struct
import tempfile
import threading
from pathlib import Path

import structlog

from picoord.common.addresses import grpc_unix_address
from picoord.coordinator.servicers.peers import LocalOperators, local_operator

log = structlog.get_logger("picoord.coordinator.admin")

SUN_PATH_MAX = 107  # bytes of a unix socket path, without the terminating NUL
RELAY_CHUNK = 64 * 1024
ADMIN_BACKLOG = 64  # connections waiting to be accepted
_UCRED = struct.Struct("3i")  # struct ucred: pid, uid, gid


def peer_credentials(sock: socket.socket) -> tuple[int, int]:
    """(pid, uid) of the process that connected this unix socket, as the kernel recorded it."""
    pid, uid, _gid = _UCRED.unpack(sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _UCRED.size))
    return pid, uid


def private_directory(admin_socket: Path) -> Path:
    """A fresh root-only directory for the private sockets: next to the admin socket when
    the paths fit a unix socket address, else a new directory in /tmp."""
    beside = Path(f"{admin_socket}.relay")
    if len(str(beside / "c4294967295").encode()) <= SUN_PATH_MAX:
        with contextlib.suppress(FileNotFoundError):
            shutil.rmtree(beside)  # left behind by a killed coordinator
        beside.mkdir(mode=0o700)
        return beside
    return Path(tempfile.mkdtemp(prefix="picoord-admin-", dir="/tmp"))


class AdminRelay:
    def __init__(self, admin_socket: Path, operators: LocalOperators) -> None:
        self.admin_socket = admin_socket
        self.operators = operators
        self.directory = private_directory(admin_socket)
        self.internal_socket = self.directory / "grpc.sock"
        self._numbers = itertools.count()
        self._listener: socket.socket | None = None
        self._accepting: asyncio.Task[None] | None = None
        self._relays: set[asyncio.Task[None]] = set()

    @property
    def internal_address(self) -> str:
        """Where the admin gRPC server listens: only the relay connects there."""
        return grpc_unix_address(self.internal_socket)

    async def start(self) -> None:
        self.admin_socket.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        with contextlib.suppress(FileNotFoundError):
            self.admin_socket.unlink()
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        previous = os.umask(0o177)  # the socket is born 0600: only root may administer
        try:
            listener.bind(str(self.admin_socket))
        except OSError:
            listener.close()
            raise
        finally:
            os.umask(previous)
        listener.listen(ADMIN_BACKLOG)
        listener.setblocking(False)
        self._listener = listener
        self._accepting = asyncio.create_task(self._accept(listener))

    async def close(self) -> None:
        if self._accepting is not None:
            self._accepting.cancel()
            await asyncio.gather(self._accepting, return_exceptions=True)
        if self._listener is not None:
            self._listener.close()
        for task in list(self._relays):
            task.cancel()
        await asyncio.gather(*self._relays, return_exceptions=True)
        with contextlib.suppress(FileNotFoundError):
            self.admin_socket.unlink()
        shutil.rmtree(self.directory, ignore_errors=True)

    async def _accept(self, listener: socket.socket) -> None:
        loop = asyncio.get_running_loop()
        while True:
            try:
                outer, _ = await loop.sock_accept(listener)
            except OSError as error:  # out of descriptors, say: the socket stays open
                log.warning("admin connection not accepted", error=str(error))
                await asyncio.sleep(0.1)
                continue
            task = asyncio.create_task(self._accepted(outer))
            self._relays.add(task)
            task.add_done_callback(self._relays.discard)

    async def _accepted(self, outer: socket.socket) -> None:
        try:
            await self._relay(outer)
        except OSError as error:
            log.warning("admin connection failed", error=str(error))
        finally:
            outer.close()

    async def _relay(self, outer: socket.socket) -> None:
        pid, uid = peer_credentials(outer)
        operator = await asyncio.to_thread(local_operator, pid, uid)
        path = self.directory / f"c{next(self._numbers)}"
        peer = f"unix:{path}"
        inner = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            inner.bind(str(path))
            inner.setblocking(False)
            self.operators.register(peer, operator)  # before gRPC can see the connection
            await asyncio.get_running_loop().sock_connect(inner, str(self.internal_socket))
            await _splice(outer, inner)
        finally:
            self.operators.forget(peer)
            inner.close()
            with contextlib.suppress(FileNotFoundError):
                path.unlink()


async def _splice(a: socket.socket, b: socket.socket) -> None:
    """Copy both ways, each in a thread of its own, until either side ends; then end both.
    Cancelled (the coordinator stops), both sockets are shut down, which ends the threads."""
    loop = asyncio.get_running_loop()
    ended = loop.create_future()
    running = [2]
    lock = threading.Lock()

    def shut_both() -> None:
        for sock in (a, b):
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)

    def finished() -> None:
        if not ended.done():
            ended.set_result(None)

    def copy(source: socket.socket, target: socket.socket) -> None:
        try:
            while data := source.recv(RELAY_CHUNK):
                target.sendall(data)
        except OSError:
            pass
        finally:
            shut_both()
            with lock:
                running[0] -= 1
                last = running[0] == 0
            if last:
                with contextlib.suppress(RuntimeError):  # the loop is already closed
                    loop.call_soon_threadsafe(finished)

    for sock in (a, b):
        sock.setblocking(True)
    for source, target in ((a, b), (b, a)):
        threading.Thread(target=copy, args=(source, target), name="admin-relay", daemon=True).start()
    try:
        await asyncio.shield(ended)
    finally:
        shut_both()
        await ended  # both threads are out of the sockets before the caller closes them

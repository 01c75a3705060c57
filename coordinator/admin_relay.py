"""The admin socket's front: who is calling, from the kernel, not from the client's word.

gRPC does not tell a servicer the credentials of a unix-socket peer (grpc/grpc#15511,
#28755), and a client can write anything into `requested_by`. So the coordinator accepts
the admin socket itself, asks the kernel who connected (SO_PEERCRED: uid and pid at
connect time), and relays the bytes to the admin gRPC server on a private socket, from a
socket bound to its own path in a root-only directory. That path is the peer name gRPC
reports to the servicer, and the relay registers it with the caller's credentials before
it connects (see `peers.LOCAL_OPERATORS`). The admin gRPC server is a server of its own,
bound only to the private socket, so the agent ports' troubles never queue its calls.
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
from pathlib import Path

import structlog

from picoord.common.addresses import grpc_unix_address
from picoord.coordinator.servicers.peers import LocalOperators, local_operator

log = structlog.get_logger("picoord.coordinator.admin")

SUN_PATH_MAX = 107  # bytes of a unix socket path, without the terminating NUL
RELAY_CHUNK = 64 * 1024
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
        self._server: asyncio.Server | None = None
        self._relays: set[asyncio.Task[None]] = set()

    @property
    def internal_address(self) -> str:
        """Where the admin gRPC server listens: only the relay connects there."""
        return grpc_unix_address(self.internal_socket)

    async def start(self) -> None:
        self.admin_socket.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        with contextlib.suppress(FileNotFoundError):
            self.admin_socket.unlink()
        previous = os.umask(0o177)  # the socket is born 0600: only root may administer
        try:
            self._server = await asyncio.start_unix_server(self._accepted, path=str(self.admin_socket))
        finally:
            os.umask(previous)

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
        for task in list(self._relays):
            task.cancel()
        await asyncio.gather(*self._relays, return_exceptions=True)
        with contextlib.suppress(FileNotFoundError):
            self.admin_socket.unlink()
        shutil.rmtree(self.directory, ignore_errors=True)

    async def _accepted(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._relays.add(task)
        try:
            await self._relay(reader, writer)
        except (OSError, asyncio.IncompleteReadError) as error:
            log.warning("admin connection failed", error=str(error))
        finally:
            self._relays.discard(task)
            writer.close()

    async def _relay(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        pid, uid = peer_credentials(writer.get_extra_info("socket"))
        operator = await asyncio.to_thread(local_operator, pid, uid)
        path = self.directory / f"c{next(self._numbers)}"
        peer = f"unix:{path}"
        inner = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            inner.bind(str(path))
            inner.setblocking(False)
            self.operators.register(peer, operator)  # before gRPC can see the connection
            await asyncio.get_running_loop().sock_connect(inner, str(self.internal_socket))
            inner_reader, inner_writer = await asyncio.open_unix_connection(sock=inner)
            inner = None  # the stream owns it now
            try:
                await _pump_both(reader, writer, inner_reader, inner_writer)
            finally:
                inner_writer.close()
        finally:
            self.operators.forget(peer)
            if inner is not None:
                inner.close()
            with contextlib.suppress(FileNotFoundError):
                path.unlink()


async def _pump_both(
    a_reader: asyncio.StreamReader,
    a_writer: asyncio.StreamWriter,
    b_reader: asyncio.StreamReader,
    b_writer: asyncio.StreamWriter,
) -> None:
    """Copy both ways until either side ends, then end both."""
    tasks = {asyncio.create_task(_pump(a_reader, b_writer)), asyncio.create_task(_pump(b_reader, a_writer))}
    try:
        await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


async def _pump(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    with contextlib.suppress(ConnectionError):
        while data := await reader.read(RELAY_CHUNK):
            writer.write(data)
            await writer.drain()

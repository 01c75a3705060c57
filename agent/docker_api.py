"""The agent's one Docker Engine API client: a few calls on dockerd's unix socket.

Its users (the workload runtime in runtime/engine.py, the hardware report in hardware.py,
the Swarm executor in actions/swarm.py, the lab's dockerd readiness check) hold the
decisions; this module only speaks the API, the way docker-py's APIClient stands apart
from its models. Calls and request bodies are the ones docker-py's APIClient made, under
its names, so each user reads as it did on the SDK.

Why not docker-py (python3-docker): loading it into a running agent on Debian 12's
python3 adds 20 MiB of RSS (requests, urllib3 and, through docker.credentials, setuptools'
pkg_resources; bench/engine_client_rss.py), against an agent budget of 40 MiB on a Pi.
Why not http.client either: it (with the email parser it pulls in) costs an idle agent
about 1 MiB, and an idle agent only asks dockerd for its version. So the HTTP is the
little dockerd needs: one request a connection (`Connection: close`), and a reply whose
body is sized, chunked, or runs to the close (a hijacked exec stream). Every read is
bounded and has the call's timeout.
"""

from __future__ import annotations

import contextlib
import json
import select
import socket
import struct
import urllib.parse
from collections.abc import Iterator, Mapping
from typing import Any

from picoord.common.defaults import DOCKER_SOCKET

CALL_TIMEOUT = 30.0
PULL_TIMEOUT = 300.0
RESPONSE_LIMIT = 16 * 2**20  # bytes read from one reply (a container list, an inspect)
EXEC_OUTPUT_LIMIT = 2**20  # bytes of a health command's output kept (only its tail is reported)
HEADER_LIMIT = 64 * 1024  # bytes of one status, header or chunk-size line
HEADERS = 100  # header lines in one reply
READ_SIZE = 65536
STREAM_HEADER = struct.Struct(">BxxxL")  # stream type, 3 padding bytes, payload length
NO_BODY = frozenset({204, 304})
NOT_FOUND = 404


class DockerAPIError(Exception):
    """dockerd answered with an error status; `explanation` is its message."""

    def __init__(self, status: int, explanation: str) -> None:
        super().__init__(f"{status}: {explanation}")
        self.status = status
        self.explanation = explanation


CALL_ERRORS: tuple[type[BaseException], ...] = (OSError, ValueError, DockerAPIError)
"""What a call can raise: the socket's errors (a timeout, a refused or dropped connection),
a reply that is not HTTP or not JSON, and dockerd's own refusals."""


def explain(error: BaseException) -> str:
    """What went wrong, for the operator: dockerd's message when it gave one."""
    explanation = getattr(error, "explanation", None)
    return str(explanation or error) or type(error).__name__


# --- pure: the wire ----------------------------------------------------------------------------


def wire_filters(filters: Mapping[str, Any]) -> str:
    """The Engine API's `filters` query value: every filter a list of values."""
    return json.dumps({key: value if isinstance(value, list) else [value] for key, value in filters.items()})


def error_message(body: bytes) -> str:
    """dockerd's {"message": ...}, or the body's start when it is not JSON."""
    try:
        message = json.loads(body).get("message")
    except (ValueError, AttributeError):
        message = None
    return str(message or body[:500].decode(errors="replace").strip() or "no message")


STDERR = 2  # the stream type of stderr frames (0 stdin, 1 stdout)


class FrameReader:
    """Docker's multiplexed stdout/stderr stream (8-byte frame headers) read as it arrives:
    feed() takes bytes in any pieces and returns the (stream type, payload) pieces they
    complete. A frame's payload may come out in several pieces (never held whole in memory)."""

    def __init__(self) -> None:
        self._header = b""
        self._stream = 0
        self._left = 0  # payload bytes of the current frame still to come

    def feed(self, data: bytes) -> list[tuple[int, bytes]]:
        out: list[tuple[int, bytes]] = []
        view = memoryview(data)
        while view:
            if self._left:
                piece, view = view[: self._left], view[self._left :]
                self._left -= len(piece)
                out.append((self._stream, bytes(piece)))
                continue
            need = STREAM_HEADER.size - len(self._header)
            self._header += bytes(view[:need])
            view = view[need:]
            if len(self._header) == STREAM_HEADER.size:
                self._stream, self._left = STREAM_HEADER.unpack(self._header)
                self._header = b""
        return out


def demultiplex(stream: bytes) -> bytes:
    """The payloads of Docker's multiplexed stdout/stderr stream (8-byte frame headers), in
    order, as docker-py's exec_start gave them; a truncated last frame keeps what arrived."""
    return b"".join(payload for _, payload in FrameReader().feed(stream))


def request_bytes(method: str, target: str, body: bytes | None, headers: Mapping[str, str]) -> bytes:
    """One HTTP/1.1 request that asks dockerd to close the connection after its answer."""
    lines = [f"{method} {target} HTTP/1.1", "Host: docker", "Connection: close"]
    lines += [f"{name}: {value}" for name, value in headers.items()]
    if body is not None:
        lines.append(f"Content-Length: {len(body)}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + (body or b"")


def status_of(line: bytes) -> int:
    """The status code of an HTTP status line; ValueError when it is not one."""
    words = line.split()
    if len(words) < 2 or not words[0].startswith(b"HTTP/") or not words[1].isdigit():
        raise ValueError("not an HTTP answer")
    return int(words[1])


# --- the shell: one exchange on the socket -----------------------------------------------------


class Reply:
    """dockerd's answer to one request: status, headers, and its body read on demand (whole,
    line by line as it streams, or bounded). close() drops the connection."""

    def __init__(self, sock: socket.socket) -> None:
        self._sock = sock
        self._file = sock.makefile("rb")
        self.status = status_of(self._line())
        self.headers: dict[str, str] = {}
        for _ in range(HEADERS + 1):
            line = self._line()
            if not line.strip():
                break
            name, _, value = line.decode("latin-1").partition(":")
            self.headers[name.strip().lower()] = value.strip()
        else:
            raise ValueError(f"more than {HEADERS} header lines")
        self._pieces = self._body()
        self._buffer = b""

    def _line(self) -> bytes:
        line = self._file.readline(HEADER_LIMIT)
        if not line:
            raise ConnectionError("dockerd closed the connection before it answered")
        return line

    def _body(self) -> Iterator[bytes]:
        """The body's bytes as they arrive, whichever way the reply frames them."""
        if self.status in NO_BODY or 100 <= self.status < 200:
            return
        if "chunked" in self.headers.get("transfer-encoding", "").lower():
            while size := int(self._line().split(b";")[0].strip() or b"0", 16):
                data = self._file.read(size)
                if len(data) < size:
                    raise ConnectionError("dockerd's reply ended inside a chunk")
                yield data
                self._line()  # the CRLF after a chunk
            return
        left = int(self.headers["content-length"]) if "content-length" in self.headers else -1
        while left != 0 and (data := self._file.read1(READ_SIZE if left < 0 else min(left, READ_SIZE))):
            left -= len(data) if left > 0 else 0
            yield data

    def read_some(self) -> bytes:
        """The body's next piece as it arrived (b"" at its end): for streams read as they come."""
        if self._buffer:
            data, self._buffer = self._buffer, b""
            return data
        return next(self._pieces, b"")

    def read(self, limit: int) -> bytes:
        """The rest of the body, at most `limit` bytes of it."""
        for piece in self._pieces:
            self._buffer += piece
            if len(self._buffer) >= limit:
                break
        data, self._buffer = self._buffer[:limit], self._buffer[limit:]
        return data

    def readline(self, limit: int) -> bytes:
        """The next line of a streamed body (with its newline), at most `limit` bytes; b"" at its end."""
        while b"\n" not in self._buffer and len(self._buffer) < limit:
            piece = next(self._pieces, None)
            if piece is None:
                break
            self._buffer += piece
        end = self._buffer.find(b"\n")
        cut = limit if end < 0 else min(end + 1, limit)
        line, self._buffer = self._buffer[:cut], self._buffer[cut:]
        return line

    def close(self) -> None:
        self._file.close()
        self._sock.close()

    def readable(self, timeout: float) -> bool:
        """Whether more of the body arrives on the socket within `timeout` s; False means
        the stream paused (or what came is in the reader's small buffer: then the caller
        merely acts a little early)."""
        if self._buffer:
            return True
        return bool(select.select([self._sock], [], [], timeout)[0])

    def abort(self) -> None:
        """From another thread: end a read that waits on a followed stream (it then ends)."""
        with contextlib.suppress(OSError):  # already closed
            self._sock.shutdown(socket.SHUT_RDWR)


def exchange(
    socket_path: str,
    method: str,
    target: str,
    body: bytes | None = None,
    headers: Mapping[str, str] | None = None,
    timeout: float = CALL_TIMEOUT,
) -> Reply:
    """Send one request on the unix socket and read the answer's head; the caller closes it."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.settimeout(timeout)
        sock.connect(socket_path)
        sock.sendall(request_bytes(method, target, body, headers or {}))
        return Reply(sock)
    except BaseException:
        sock.close()
        raise


# --- the client ---------------------------------------------------------------------------------


class DockerAPI:
    """The Docker Engine API calls the agent makes, named as docker-py's APIClient named them.
    One connection per call: a few calls a second on a unix socket, no shared state.
    `timeout` applies to each call and may be changed between calls (the Swarm executor
    spends an action's deadline). With `negotiate`, calls use the engine's own API version
    (GET /version first), as docker-py's version="auto" did."""

    def __init__(
        self, socket_path: str = DOCKER_SOCKET, timeout: float = CALL_TIMEOUT, negotiate: bool = True
    ) -> None:
        self.socket_path = str(socket_path)
        self.timeout = timeout
        self.prefix = ""
        if negotiate:
            version = self.version()
            api_version = str(version.get("ApiVersion", ""))
            if not api_version:
                raise DockerAPIError(0, f"GET /version gave no ApiVersion: {str(version)[:200]}")
            self.prefix = "/v" + api_version

    # plumbing
    def _open(
        self,
        method: str,
        path: str,
        query: Mapping[str, Any] | None = None,
        body: Any = None,
        timeout: float | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> Reply:
        """Send one request; return a 2xx reply (the caller closes it)."""
        target = self.prefix + urllib.parse.quote(path, safe="/:")
        if query:
            target += "?" + urllib.parse.urlencode(query)
        payload = None if body is None else json.dumps(body).encode()
        sent = {"Content-Type": "application/json"} if payload is not None else {}
        reply = exchange(
            self.socket_path,
            method,
            target,
            payload,
            {**sent, **(headers or {})},
            self.timeout if timeout is None else timeout,
        )
        if reply.status >= 400:
            try:
                raise DockerAPIError(reply.status, error_message(reply.read(RESPONSE_LIMIT)))
            finally:
                reply.close()
        return reply

    def _json(self, method: str, path: str, query: Mapping[str, Any] | None = None, body: Any = None) -> Any:
        reply = self._open(method, path, query, body)
        try:
            data = reply.read(RESPONSE_LIMIT)
        finally:
            reply.close()
        return json.loads(data) if data.strip() else None

    def _lines(self, reply: Reply) -> Iterator[dict[str, Any]]:
        """dockerd's streamed answer (pull progress, events), one JSON object a line, each
        line bounded; the connection is closed when the stream ends or the reader stops early."""
        try:
            while line := reply.readline(RESPONSE_LIMIT):
                if line.strip():
                    event = json.loads(line)
                    yield event if isinstance(event, dict) else {}
        finally:
            reply.close()

    # the engine
    def version(self) -> dict[str, Any]:
        """GET /version (never versioned): the engine's version and API version."""
        saved, self.prefix = self.prefix, ""
        try:
            version = self._json("GET", "/version")
        finally:
            self.prefix = saved
        if not isinstance(version, dict):
            raise DockerAPIError(0, f"GET /version gave no JSON object: {str(version)[:200]}")
        return version

    def ping(self) -> bool:
        """GET /_ping: whether dockerd answers OK."""
        reply = self._open("GET", "/_ping")
        try:
            return reply.read(64).strip() == b"OK"
        finally:
            reply.close()

    def info(self) -> dict[str, Any]:
        return dict(self._json("GET", "/info"))

    # images
    def inspect_image(self, image: str) -> dict[str, Any]:
        return dict(self._json("GET", f"/images/{image}/json"))

    def pull(
        self, repository: str, tag: str, timeout: float = PULL_TIMEOUT, auth: str | None = None
    ) -> Iterator[dict[str, Any]]:
        """POST /images/create, yielding dockerd's progress messages as they come. `auth` is
        X-Registry-Auth's value (never logged: it holds the registry password)."""
        headers = {"X-Registry-Auth": auth} if auth is not None else {}
        reply = self._open(
            "POST", "/images/create", {"fromImage": repository, "tag": tag}, timeout=timeout, headers=headers
        )
        yield from self._lines(reply)

    # events
    def events(
        self, since: str, until: str, filters: Mapping[str, Any] | None = None
    ) -> Iterator[dict[str, Any]]:
        """GET /events for a past window (until given: dockerd answers and closes), one JSON
        object per line, as docker-py's events(decode=True) gave them."""
        query: dict[str, Any] = {"since": since, "until": until}
        if filters:
            query["filters"] = wire_filters(filters)
        yield from self._lines(self._open("GET", "/events", query))

    # containers
    def containers(
        self, all_states: bool = False, filters: Mapping[str, Any] | None = None
    ) -> list[dict[str, Any]]:
        query: dict[str, Any] = {"all": "1" if all_states else "0"}
        if filters:
            query["filters"] = wire_filters(filters)
        return list(self._json("GET", "/containers/json", query) or [])

    def inspect_container(self, container_id: str) -> dict[str, Any]:
        return dict(self._json("GET", f"/containers/{container_id}/json"))

    def create_container(self, name: str, body: Mapping[str, Any]) -> dict[str, Any]:
        return dict(self._json("POST", "/containers/create", {"name": name}, body))

    def start(self, container_id: str) -> None:
        self._json("POST", f"/containers/{container_id}/start")

    def stop(self, container_id: str, timeout: int = 10) -> None:
        """SIGTERM, SIGKILL after `timeout` s; the HTTP call waits that long and a bit more."""
        reply = self._open(
            "POST", f"/containers/{container_id}/stop", {"t": str(timeout)}, timeout=timeout + self.timeout
        )
        try:
            reply.read(RESPONSE_LIMIT)
        finally:
            reply.close()

    def remove_container(self, container_id: str, force: bool = False) -> None:
        self._json("DELETE", f"/containers/{container_id}", {"force": "1" if force else "0"})

    # volumes
    def volumes(self, filters: Mapping[str, Any] | None = None) -> list[dict[str, Any]]:
        """GET /volumes: the volumes (docker-py's `volumes()['Volumes']`); `dangling` filters
        to those no container uses."""
        query = {"filters": wire_filters(filters)} if filters else None
        listing = self._json("GET", "/volumes", query) or {}
        return list(listing.get("Volumes") or [])

    def remove_volume(self, name: str, force: bool = False) -> None:
        """DELETE /volumes/{name}; dockerd refuses (409) while a container uses it."""
        self._json("DELETE", f"/volumes/{name}", {"force": "1" if force else "0"})

    # networks
    def networks(self, filters: Mapping[str, Any] | None = None) -> list[dict[str, Any]]:
        """GET /networks, as dockerd lists them (`label`, `driver`, `name` filters)."""
        query = {"filters": wire_filters(filters)} if filters else None
        return list(self._json("GET", "/networks", query) or [])

    def inspect_network(self, name: str) -> dict[str, Any]:
        return dict(self._json("GET", f"/networks/{name}"))

    def create_network(self, body: Mapping[str, Any]) -> dict[str, Any]:
        """POST /networks/create (on a Swarm manager, an overlay network is cluster-wide)."""
        return dict(self._json("POST", "/networks/create", None, body) or {})

    def remove_network(self, name: str) -> None:
        """DELETE /networks/{name}; dockerd refuses one in use."""
        self._json("DELETE", f"/networks/{name}")

    def connect_network(self, name: str, container_id: str, aliases: list[str]) -> None:
        """POST /networks/{name}/connect: the container joins it, answering to `aliases`."""
        body = {"Container": container_id, "EndpointConfig": {"Aliases": aliases}}
        self._json("POST", f"/networks/{name}/connect", None, body)

    # exec
    def exec_create(self, container_id: str, cmd: list[str]) -> dict[str, Any]:
        body = {
            "User": "",
            "Privileged": False,
            "Tty": False,
            "AttachStdin": False,
            "AttachStdout": True,
            "AttachStderr": True,
            "Cmd": cmd,
        }
        return dict(self._json("POST", f"/containers/{container_id}/exec", body=body))

    def exec_start(self, exec_id: str, timeout: float | None = None) -> bytes:
        """Run it and return its stdout and stderr; dockerd streams them until the command ends."""
        reply = self._open(
            "POST", f"/exec/{exec_id}/start", body={"Detach": False, "Tty": False}, timeout=timeout
        )
        try:
            return demultiplex(reply.read(EXEC_OUTPUT_LIMIT))
        finally:
            reply.close()

    def logs(
        self, container_id: str, follow: bool, tail: int = 0, since: float = 0.0, timeout: float | None = None
    ) -> Reply:
        """GET /containers/{id}/logs with timestamps: the open reply, read as it streams
        (multiplexed unless the container has a tty); the caller closes it."""
        query = {
            "stdout": "1",
            "stderr": "1",
            "timestamps": "1",
            "follow": "1" if follow else "0",
            "tail": str(tail) if tail else "all",
        }
        if since:
            query["since"] = f"{since:.6f}"
        return self._open("GET", f"/containers/{container_id}/logs", query, timeout=timeout)

    def exec_inspect(self, exec_id: str) -> dict[str, Any]:
        return dict(self._json("GET", f"/exec/{exec_id}/json"))

    # swarm (request bodies as docker-py 5.0.3 sent them: None fields left out)
    def inspect_swarm(self) -> dict[str, Any]:
        return dict(self._json("GET", "/swarm"))

    def init_swarm(self, advertise_addr: str, listen_addr: str = "0.0.0.0:2377") -> str:
        """POST /swarm/init; the new node's ID."""
        body = {"AdvertiseAddr": advertise_addr, "ListenAddr": listen_addr, "ForceNewCluster": False}
        return str(self._json("POST", "/swarm/init", body=body))

    def join_swarm(
        self,
        remote_addrs: list[str],
        join_token: str,
        listen_addr: str = "0.0.0.0:2377",
        advertise_addr: str = "",
    ) -> bool:
        body: dict[str, Any] = {
            "RemoteAddrs": remote_addrs,
            "ListenAddr": listen_addr,
            "JoinToken": join_token,
        }
        if advertise_addr:
            body["AdvertiseAddr"] = advertise_addr
        self._json("POST", "/swarm/join", body=body)
        return True

    def leave_swarm(self, force: bool = False) -> bool:
        """POST /swarm/leave; with force, "not part of a swarm" (406) is no error, as in docker-py."""
        try:
            self._json("POST", "/swarm/leave", {"force": "1" if force else "0"})
        except DockerAPIError as error:
            if not (force and error.status == 406):
                raise
        return True

    def close(self) -> None:
        """Nothing is held between calls; kept for the callers' `with`-less symmetry with docker-py."""

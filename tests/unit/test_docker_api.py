"""The agent's one Engine API client against a fake dockerd on a real unix socket: each way a
reply frames its body (sized, chunked, to the close), streamed JSON lines, dockerd's errors,
and the Swarm calls' requests as docker-py 5.0.3 sent them."""

from __future__ import annotations

import json
import socket
import socketserver
import tempfile
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from picoord.agent.docker_api import (
    DockerAPI,
    DockerAPIError,
    Reply,
    error_message,
    request_bytes,
    status_of,
    wire_filters,
)

VERSION = json.dumps({"Version": "20.10.24", "ApiVersion": "1.41"}).encode()


def sized(status: int, body: bytes, reason: str = "OK") -> bytes:
    return f"HTTP/1.1 {status} {reason}\r\nContent-Length: {len(body)}\r\n\r\n".encode() + body


def chunked(*pieces: bytes) -> bytes:
    chunks = b"".join(f"{len(piece):x}\r\n".encode() + piece + b"\r\n" for piece in pieces)
    return b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n" + chunks + b"0\r\n\r\n"


def to_the_close(body: bytes) -> bytes:
    return b"HTTP/1.1 200 OK\r\nContent-Type: application/vnd.docker.raw-stream\r\n\r\n" + body


class FakeDockerd:
    """Answers each connection with the next canned reply (the version first), recording
    each request's line and body."""

    def __init__(self, replies: list[bytes]) -> None:
        self.replies = [sized(200, VERSION), *replies]
        self.requests: list[tuple[str, bytes]] = []

    def handle(self, connection: socket.socket) -> None:
        data = b""
        while b"\r\n\r\n" not in data:
            data += connection.recv(65536)
        head, _, body = data.partition(b"\r\n\r\n")
        lines = head.decode().split("\r\n")
        length = next(
            (int(line.split(":")[1]) for line in lines if line.lower().startswith("content-length")), 0
        )
        while len(body) < length:
            body += connection.recv(65536)
        self.requests.append((lines[0], body))
        connection.sendall(self.replies.pop(0))


@pytest.fixture
def dockerd() -> Iterator[tuple[FakeDockerd, str]]:
    fake = FakeDockerd([])

    class Handler(socketserver.BaseRequestHandler):
        def handle(self) -> None:
            fake.handle(self.request)

    directory = Path(tempfile.mkdtemp(prefix="picoord-dockerd-"))  # AF_UNIX paths: 108 bytes
    path = directory / "docker.sock"
    server = socketserver.ThreadingUnixStreamServer(str(path), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield fake, str(path)
    finally:
        server.shutdown()
        server.server_close()
        path.unlink(missing_ok=True)
        directory.rmdir()


def client(dockerd: tuple[FakeDockerd, str], *replies: bytes) -> tuple[FakeDockerd, DockerAPI]:
    fake, path = dockerd
    fake.replies += replies
    return fake, DockerAPI(path, timeout=5)


@pytest.mark.parametrize(
    "reply",
    [
        sized(200, b'{"Id": "abc"}'),
        chunked(b'{"Id"', b': "abc"}'),
        to_the_close(b'{"Id": "abc"}'),
    ],
)
def test_a_reply_body_is_read_however_it_is_framed(dockerd: tuple[FakeDockerd, str], reply: bytes) -> None:
    fake, api = client(dockerd, reply)
    assert api.inspect_container("abc") == {"Id": "abc"}
    assert fake.requests[0][0] == "GET /version HTTP/1.1"  # negotiated first, unversioned
    assert fake.requests[1][0] == "GET /v1.41/containers/abc/json HTTP/1.1"


def test_streamed_lines_arrive_one_object_each(dockerd: tuple[FakeDockerd, str]) -> None:
    _, api = client(dockerd, chunked(b'{"status": "a"}\n{"sta', b'tus": "b"}\n\n', b'{"error": "c"}\n'))
    assert list(api.pull("reg:5000/mcp", "1")) == [{"status": "a"}, {"status": "b"}, {"error": "c"}]


def test_dockerds_error_is_raised_with_its_message(dockerd: tuple[FakeDockerd, str]) -> None:
    _, api = client(dockerd, sized(404, b'{"message": "No such container: x"}', "Not Found"))
    with pytest.raises(DockerAPIError, match="No such container: x") as raised:
        api.inspect_container("x")
    assert raised.value.status == 404


def test_swarm_calls_send_what_docker_py_sent(dockerd: tuple[FakeDockerd, str]) -> None:
    fake, api = client(
        dockerd,
        sized(200, b'"node1"'),
        sized(200, b""),
        sized(406, b'{"message": "This node is not part of a swarm"}', "Not Acceptable"),
    )
    assert api.init_swarm("10.0.0.1", "10.0.0.1:2377") == "node1"
    assert api.join_swarm(["10.0.0.1:2377"], "SWMTKN-1-x", advertise_addr="10.0.0.2") is True
    assert api.leave_swarm(force=True) is True  # not in a swarm: nothing to leave
    [init, join, leave] = fake.requests[1:]
    assert init[0] == "POST /v1.41/swarm/init HTTP/1.1"
    assert json.loads(init[1]) == {
        "AdvertiseAddr": "10.0.0.1",
        "ListenAddr": "10.0.0.1:2377",
        "ForceNewCluster": False,
    }
    assert json.loads(join[1]) == {
        "RemoteAddrs": ["10.0.0.1:2377"],
        "ListenAddr": "0.0.0.0:2377",
        "JoinToken": "SWMTKN-1-x",
        "AdvertiseAddr": "10.0.0.2",
    }
    assert leave[0] == "POST /v1.41/swarm/leave?force=1 HTTP/1.1"


def test_leaving_without_force_when_not_in_a_swarm_is_an_error(dockerd: tuple[FakeDockerd, str]) -> None:
    _, api = client(dockerd, sized(406, b'{"message": "This node is not part of a swarm"}', "Not Acceptable"))
    with pytest.raises(DockerAPIError, match="not part of a swarm"):
        api.leave_swarm(force=False)


def test_an_engine_without_an_api_version_is_refused(dockerd: tuple[FakeDockerd, str]) -> None:
    fake, path = dockerd
    fake.replies[0] = sized(200, b'{"Version": "1"}')
    with pytest.raises(DockerAPIError, match="no ApiVersion"):
        DockerAPI(path, timeout=5)


def test_a_reply_cut_inside_a_chunk_is_an_error() -> None:
    left, right = socket.socketpair()
    with left, right:
        left.sendall(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n10\r\nshort")
        left.shutdown(socket.SHUT_WR)
        reply = Reply(right)
        with pytest.raises(ConnectionError, match="inside a chunk"):
            reply.read(100)


@pytest.mark.parametrize(
    ("line", "status"),
    [(b"HTTP/1.1 200 OK\r\n", 200), (b"HTTP/1.0 404 Not Found\r\n", 404), (b"HTTP/1.1 204\r\n", 204)],
)
def test_status_of(line: bytes, status: int) -> None:
    assert status_of(line) == status


@pytest.mark.parametrize("line", [b"", b"SSH-2.0-OpenSSH\r\n", b"HTTP/1.1 OK\r\n", b"<html>\r\n"])
def test_status_of_what_is_not_http(line: bytes) -> None:
    with pytest.raises(ValueError, match="not an HTTP answer"):
        status_of(line)


def test_request_bytes_ask_for_the_close_and_size_the_body() -> None:
    assert request_bytes("POST", "/v1.41/x", b"{}", {"Content-Type": "application/json"}) == (
        b"POST /v1.41/x HTTP/1.1\r\nHost: docker\r\nConnection: close\r\n"
        b"Content-Type: application/json\r\nContent-Length: 2\r\n\r\n{}"
    )
    assert request_bytes("GET", "/_ping", None, {}) == (
        b"GET /_ping HTTP/1.1\r\nHost: docker\r\nConnection: close\r\n\r\n"
    )


@pytest.mark.parametrize(
    ("filters", "wire"),
    [
        ({"label": "picoord.managed=true"}, {"label": ["picoord.managed=true"]}),
        ({"container": "abc", "event": ["die", "oom"]}, {"container": ["abc"], "event": ["die", "oom"]}),
    ],
)
def test_wire_filters(filters: dict[str, object], wire: dict[str, list[str]]) -> None:
    assert json.loads(wire_filters(filters)) == wire


@pytest.mark.parametrize(
    ("body", "message"),
    [
        (b'{"message": "conflict"}', "conflict"),
        (b"<html>bad gateway</html>", "<html>bad gateway</html>"),
        (b"", "no message"),
        (b"[1]", "[1]"),
    ],
)
def test_error_message(body: bytes, message: str) -> None:
    assert error_message(body) == message


def test_volume_calls_send_what_docker_py_sent(dockerd: tuple[FakeDockerd, str]) -> None:
    fake, api = client(
        dockerd,
        sized(200, b'{"Volumes": [{"Name": "pg"}, {"Name": "cache"}], "Warnings": null}'),
        sized(200, b'{"Volumes": null}'),
        sized(204, b"", "No Content"),
        sized(409, b'{"message": "remove pg: volume is in use - [abc]"}', "Conflict"),
    )
    assert [v["Name"] for v in api.volumes()] == ["pg", "cache"]
    assert api.volumes(filters={"dangling": ["true"]}) == []
    api.remove_volume("pg")
    with pytest.raises(DockerAPIError, match="volume is in use") as raised:
        api.remove_volume("pg")
    assert raised.value.status == 409
    [every, dangling, remove, _] = fake.requests[1:]
    assert every[0] == "GET /v1.41/volumes HTTP/1.1"
    assert dangling[0] == "GET /v1.41/volumes?filters=%7B%22dangling%22%3A+%5B%22true%22%5D%7D HTTP/1.1"
    assert remove[0] == "DELETE /v1.41/volumes/pg?force=0 HTTP/1.1"

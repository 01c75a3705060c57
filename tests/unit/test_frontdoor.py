"""The coordinator's front door: enrollment size checks, connection budgets, and who an
operator is (from the admin socket's peer credentials, through the real relay and gRPC)."""

from __future__ import annotations

import asyncio
import os
import pwd
import socket
from pathlib import Path

import grpc
import pytest

from picoord.common.addresses import grpc_unix_address
from picoord.coordinator.admin_relay import AdminRelay, private_directory
from picoord.coordinator.main import FD_RESERVE, MIN_CONNECTIONS_PER_PORT, connections_per_port
from picoord.coordinator.servicers.enrollment import MAX_CSR_BYTES, oversized_field
from picoord.coordinator.servicers.peers import (
    LOCAL_OPERATORS,
    LocalOperator,
    is_operator,
    local_operator,
    login_of,
    operator_identity,
)
from picoord.v1 import agent_pb2

GOOD = dict(token="abcdef.0123456789abcdef", node_name="pi1", csr_pem=b"x" * 100)


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({}, None),
        ({"node_name": "n" * 63}, None),
        ({"node_name": "n" * (1024 * 1024)}, "node_name is too large (1048576 characters, at most 63)"),
        ({"token": "t" * 65}, "token is too large (65 characters, at most 64)"),
        ({"csr_pem": b"c" * (MAX_CSR_BYTES + 1)}, f"csr_pem is too large ({MAX_CSR_BYTES + 1} bytes"),
        ({"labels": {f"k{n}": "v" for n in range(65)}}, "labels is too large (65 entries, at most 64)"),
        ({"labels": {"k" * 400: "v"}}, "a label key is too long (400 characters"),
        ({"labels": {"role": "v" * 64}}, "the value of label 'role' is too long (64 characters"),
    ],
)
def test_oversized_enrollment_fields_are_named_never_quoted(changes: dict, message: str | None) -> None:
    request = agent_pb2.EnrollRequest(**{**GOOD, **changes})
    found = oversized_field(request)
    if message is None:
        assert found is None
    else:
        assert found is not None and found.startswith(message)
        assert len(found) < 200  # the value itself is never in it


@pytest.mark.parametrize(
    ("open_files", "configured", "expected"),
    [
        (4096, 0, (4096 - FD_RESERVE) // 2),
        (65536, 0, (65536 - FD_RESERVE) // 2),
        (500, 0, MIN_CONNECTIONS_PER_PORT),
        (4096, 100, 100),
    ],
)
def test_connections_per_port_keep_a_reserve(open_files: int, configured: int, expected: int) -> None:
    assert connections_per_port(open_files, configured) == expected
    if not configured and expected > MIN_CONNECTIONS_PER_PORT:
        assert 2 * expected + FD_RESERVE <= open_files


@pytest.mark.parametrize(
    ("text", "login"),
    [("0\n", "root"), ("4294967295", None), ("-1", None), ("", None), ("junk", None), ("987654", "987654")],
)
def test_login_of(text: str, login: str | None) -> None:
    assert login_of(text) == login


@pytest.mark.parametrize(
    ("operator", "text"),
    [
        (LocalOperator(uid=0, pid=1234, user="root", login="alice"), "root (uid 0, pid 1234, login alice)"),
        (LocalOperator(uid=0, pid=7, user="root"), "root (uid 0, pid 7)"),
    ],
)
def test_operator_description(operator: LocalOperator, text: str) -> None:
    assert operator.describe() == text


def test_local_operator_reads_loginuid(tmp_path: Path) -> None:
    (tmp_path / "42").mkdir()
    (tmp_path / "42" / "loginuid").write_text("0")
    assert local_operator(42, 0, proc=tmp_path) == LocalOperator(uid=0, pid=42, user="root", login="root")
    assert local_operator(43, 0, proc=tmp_path).login is None  # the process is gone


def test_private_directory_falls_back_when_paths_are_too_long(tmp_path: Path) -> None:
    short = private_directory(tmp_path / "a.sock")
    assert short == tmp_path / "a.sock.relay" and (short.stat().st_mode & 0o777) == 0o700
    deep = tmp_path / ("d" * 100)
    deep.mkdir()
    far = private_directory(deep / "admin.sock")
    try:
        assert far.parent != deep and (far.stat().st_mode & 0o777) == 0o700
    finally:
        far.rmdir()


def _whoami_server() -> grpc.GenericRpcHandler:
    async def whoami(_request: bytes, context: grpc.aio.ServicerContext) -> bytes:
        return f"{is_operator(context)}|{operator_identity(context)}".encode()

    return grpc.method_handlers_generic_handler(
        "test.Who", {"Ami": grpc.unary_unary_rpc_method_handler(whoami)}
    )


async def _call(target: str) -> str:
    async with grpc.aio.insecure_channel(target) as channel:
        reply = await channel.unary_unary("/test.Who/Ami")(b"", timeout=10)
    return reply.decode()


@pytest.mark.parametrize("directory", ["plain", "with space%25"])
def test_the_relay_names_the_caller_from_its_socket_credentials(tmp_path: Path, directory: str) -> None:
    """Through the admin socket a call is an operator's and carries this process's uid and
    pid; straight to the private socket it is no operator's, whatever it claims."""
    tmp_path = tmp_path / directory
    tmp_path.mkdir()

    async def scenario() -> tuple[list[str], str, int, int]:
        relay = AdminRelay(tmp_path / "admin.sock", LOCAL_OPERATORS)
        server = grpc.aio.server()
        server.add_generic_rpc_handlers((_whoami_server(),))
        assert server.add_insecure_port(relay.internal_address)
        await server.start()
        await relay.start()
        try:
            mode = (tmp_path / "admin.sock").stat().st_mode & 0o777
            relayed = [await _call(grpc_unix_address(tmp_path / "admin.sock")) for _ in range(3)]
            direct = await _call(relay.internal_address)
            await asyncio.sleep(0.2)  # the relays see their clients go
            left = len(LOCAL_OPERATORS)
        finally:
            await relay.close()
            await server.stop(0)
        return relayed, direct, left, mode

    relayed, direct, left, mode = asyncio.run(scenario())
    me = pwd.getpwuid(os.getuid()).pw_name
    assert mode == 0o600
    for reply in relayed:
        assert reply.startswith(f"True|{me} (uid {os.getuid()}, pid {os.getpid()}"), reply
    assert direct.startswith("False|unverified peer unix:"), direct
    assert left == 0  # registrations end with their connections
    assert not (tmp_path / "admin.sock").exists() and not (tmp_path / "admin.sock.relay").exists()


def test_socket_credentials_are_the_connecting_process(tmp_path: Path) -> None:
    from picoord.coordinator.admin_relay import peer_credentials

    listener = socket.socket(socket.AF_UNIX)
    listener.bind(str(tmp_path / "s"))
    listener.listen(1)
    client = socket.socket(socket.AF_UNIX)
    client.connect(str(tmp_path / "s"))
    accepted, _ = listener.accept()
    try:
        assert peer_credentials(accepted) == (os.getpid(), os.getuid())
    finally:
        for sock in (accepted, client, listener):
            sock.close()


RAISE_AND_PRINT = "from picoord.coordinator.main import raise_open_files_limit as r; print(r())"


@pytest.mark.parametrize(("soft", "hard"), [(1024, 4096), (4096, 4096), (256, 2048)])
def test_the_open_files_limit_is_raised_to_the_hard_limit(soft: int, hard: int) -> None:
    """In a child process, so this one keeps its limits."""
    import resource
    import subprocess
    import sys

    done = subprocess.run(
        [
            sys.executable,
            "-c",
            "from picoord.coordinator.main import raise_open_files_limit as r; print(r())",
        ],
        capture_output=True,
        text=True,
        timeout=60,
        preexec_fn=lambda: resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard)),
        check=False,
    )
    assert (done.returncode, done.stdout.strip()) == (0, str(hard)), done.stderr

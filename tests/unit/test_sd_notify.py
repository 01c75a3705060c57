"""common/sd_notify: the datagrams systemd's Type=notify and WatchdogSec= rely on, sent to a
real unix datagram socket standing in for systemd's."""

from __future__ import annotations

import asyncio
import os
import socket
from collections.abc import Iterator
from pathlib import Path

import pytest

from picoord.common.sd_notify import feed_watchdog, notify, socket_address, watchdog_period


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (None, None),
        ("", None),
        ("/run/systemd/notify", "/run/systemd/notify"),
        ("@sd-notify-123", b"\0sd-notify-123"),
        ("vsock:2:1234", None),
        ("relative/path", None),
    ],
)
def test_socket_address(value: str | None, expected: str | bytes | None) -> None:
    assert socket_address(value) == expected


@pytest.mark.parametrize(
    ("environ", "expected"),
    [
        ({}, None),
        ({"WATCHDOG_USEC": "30000000"}, 15.0),
        ({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": "42"}, 15.0),
        ({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": "43"}, None),  # for another process
        ({"WATCHDOG_USEC": "0"}, None),
        ({"WATCHDOG_USEC": "-5"}, None),
        ({"WATCHDOG_USEC": "thirty"}, None),
    ],
)
def test_watchdog_period_is_half_of_watchdog_sec(environ: dict[str, str], expected: float | None) -> None:
    assert watchdog_period(environ, 42) == expected


@pytest.fixture
def systemd_socket(tmp_path: Path) -> Iterator[tuple[socket.socket, str]]:
    """A bound datagram socket, as systemd's notify socket is."""
    path = str(tmp_path / "notify")
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as server:
        server.bind(path)
        server.settimeout(5)
        yield server, path


def test_notify_sends_one_datagram(systemd_socket: tuple[socket.socket, str]) -> None:
    server, path = systemd_socket
    assert notify("READY=1", {"NOTIFY_SOCKET": path})
    assert server.recv(4096) == b"READY=1"


def test_notify_reaches_an_abstract_socket() -> None:
    name = f"picoord-test-{os.getpid()}"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as server:
        server.bind(b"\0" + name.encode())
        server.settimeout(5)
        assert notify("STOPPING=1", {"NOTIFY_SOCKET": "@" + name})
        assert server.recv(4096) == b"STOPPING=1"


@pytest.mark.parametrize("environ", [{}, {"NOTIFY_SOCKET": "/nonexistent/notify"}])
def test_notify_without_systemd_is_a_harmless_no(environ: dict[str, str]) -> None:
    assert notify("READY=1", environ) is False


async def test_feed_watchdog_pings_until_cancelled(systemd_socket: tuple[socket.socket, str]) -> None:
    server, path = systemd_socket
    server.setblocking(False)
    environ = {"NOTIFY_SOCKET": path, "WATCHDOG_USEC": "100000", "WATCHDOG_PID": str(os.getpid())}
    task = asyncio.create_task(feed_watchdog(environ))
    await asyncio.sleep(0.32)  # pings at 0, 0.05, 0.10, ... s
    task.cancel()
    pings = []
    while True:
        try:
            pings.append(server.recv(4096))
        except BlockingIOError:
            break
    assert len(pings) >= 4 and set(pings) == {b"WATCHDOG=1"}


async def test_feed_watchdog_returns_without_a_watchdog(systemd_socket: tuple[socket.socket, str]) -> None:
    _, path = systemd_socket
    await asyncio.wait_for(feed_watchdog({"NOTIFY_SOCKET": path}), timeout=1)

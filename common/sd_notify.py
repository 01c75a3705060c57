"""systemd's readiness and watchdog protocol (sd_notify(3)) without libsystemd: one datagram
to the socket named by $NOTIFY_SOCKET. Both units are Type=notify with WatchdogSec=, so
systemd knows when a daemon is really serving and restarts one whose main loop hangs.

Outside systemd (a terminal, the lab, the tests) $NOTIFY_SOCKET is unset and every call
is a no-op, so the daemons need no flag to run either way.
"""

from __future__ import annotations

import asyncio
import os
import socket
from collections.abc import Mapping

NOTIFY_SOCKET_ENV = "NOTIFY_SOCKET"
WATCHDOG_USEC_ENV = "WATCHDOG_USEC"
WATCHDOG_PID_ENV = "WATCHDOG_PID"


def socket_address(value: str | None) -> str | bytes | None:
    """$NOTIFY_SOCKET as a connect() address: a path, or '@name' for the abstract namespace."""
    if not value:
        return None
    if value.startswith("@"):
        return b"\0" + value[1:].encode()
    if value.startswith("/"):
        return value
    return None  # vsock and other forms: not for a daemon on a Pi


def watchdog_period(environ: Mapping[str, str], pid: int) -> float | None:
    """Seconds between WATCHDOG=1 pings (half of WatchdogSec=, as sd_watchdog_enabled(3)
    advises), or None when systemd expects none from this process."""
    try:
        usec = int(environ.get(WATCHDOG_USEC_ENV, ""))
    except ValueError:
        return None
    if usec <= 0:
        return None
    watchdog_pid = environ.get(WATCHDOG_PID_ENV)
    if watchdog_pid is not None and watchdog_pid != str(pid):
        return None  # meant for a parent that exec'd us without clearing it, not for us
    return usec / 1_000_000 / 2


def notify(state: str, environ: Mapping[str, str] | None = None) -> bool:
    """Send one state line ('READY=1', 'WATCHDOG=1', 'STOPPING=1', ...); False when there
    is no systemd to tell, or it could not be told (never fatal: the daemon works on)."""
    address = socket_address((os.environ if environ is None else environ).get(NOTIFY_SOCKET_ENV))
    if address is None:
        return False
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
            sock.connect(address)
            sock.sendall(state.encode())
    except OSError:
        return False
    return True


async def feed_watchdog(environ: Mapping[str, str] | None = None) -> None:
    """Ping systemd's watchdog from the event loop until cancelled: if the loop stalls, the
    pings stop and systemd restarts the daemon. Returns at once when no watchdog is set."""
    environ = os.environ if environ is None else environ
    period = watchdog_period(environ, os.getpid())
    if period is None:
        return
    while True:
        notify("WATCHDOG=1", environ)
        await asyncio.sleep(period)

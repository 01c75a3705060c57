"""LoadBalancer virtual addresses on this node: one keepalived (Debian's, VRRP only) as a
child of the agent, configured from the assignment's VirtualAddress list.

`render_config` is the decision, pure and table-tested: one `vrrp_instance` per address,
on the interface that holds the node's cluster address, every instance BACKUP with
`nopreempt` (VRRP elects the holder by priority, and nobody takes the address from a
working holder), advert_int 1, and unicast adverts to every other node of the subnet (so it
works on a LAN that drops multicast). VRRP is IP protocol 112; a firewall between the
nodes must let it through (unicast here; 224.0.0.18 when a VIP has a single node).

`Keepalived` is the shell around it: it writes the file, starts
`keepalived -n -l -D -P -f CONF -p PID -r VRRPPID` once, sends SIGHUP when the file
changes, stops it (its addresses are released) when no address is assigned, and stops a
keepalived a previous agent left behind before starting its own. `hand_overs` says when a
holder lets an address go, so that the supervisor stops the replicas behind it only after a
peer holds it (docs/virtual-addresses.md, hand-over).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import time
from collections.abc import Iterable, Sequence
from pathlib import Path

import structlog

from picoord.common.addresses import interface_holding
from picoord.common.files import write_atomically
from picoord.v1 import workloads_pb2

log = structlog.get_logger("picoord.agent.networking")

CONFIG = "keepalived.conf"
PID = "keepalived.pid"
VRRP_PID = "vrrp.pid"
STOP_TIMEOUT = 5.0
RESTART_AFTER = 10.0  # a keepalived that exits is started again at most this often


class NoInterface(LookupError):
    """The node holds none of the source addresses the coordinator named."""


def local_interfaces() -> list[tuple[str, list[str]]]:
    """(name, ["10.0.0.5/24", ...]) for this node's interfaces, IPv4 only."""
    import socket

    import psutil

    found = []
    for name, addresses in psutil.net_if_addrs().items():
        texts = []
        for item in addresses:
            if item.family == socket.AF_INET and item.netmask:
                prefix = sum(bin(int(part)).count("1") for part in item.netmask.split("."))
                texts.append(f"{item.address}/{prefix}")
        found.append((name, texts))
    return found


def render_config(
    addresses: Sequence[workloads_pb2.VirtualAddress], interfaces: Iterable[tuple[str, Iterable[str]]]
) -> str:
    """keepalived.conf for the assigned addresses (checked by check_assignment first).
    NoInterface when this node holds none of an address's `source`."""
    interfaces = [(name, list(items)) for name, items in interfaces]
    lines = [
        "# written by picoord-agent from the coordinator's assignment; changes are overwritten",
        "global_defs {",
        "    vrrp_garp_master_delay 1",
        "    vrrp_garp_master_repeat 3",
        "}",
    ]
    for item in sorted(addresses, key=lambda a: a.router_id):
        found = interface_holding(item.source, interfaces)
        if found is None:
            raise NoInterface(f"no interface holds {item.source} (the source of {item.address})")
        interface = found[0]
        lines += [
            "",
            f"vrrp_instance vip_{item.router_id} {{",
            "    state BACKUP",
            f"    interface {interface}",
            f"    virtual_router_id {item.router_id}",
            f"    priority {item.priority}",
            "    advert_int 1",
            "    nopreempt",
        ]
        if item.peers:
            lines.append(f"    unicast_src_ip {item.source}")
            lines.append("    unicast_peer {")
            lines += [f"        {peer}" for peer in sorted(item.peers)]
            lines.append("    }")
        lines += [
            "    virtual_ipaddress {",
            f"        {item.address}/{item.prefix_length} dev {interface}",
            "    }",
            "}",
        ]
    return "\n".join(lines) + "\n"


def held(addresses: Iterable[str], interfaces: Iterable[tuple[str, Iterable[str]]]) -> list[str]:
    """Of `addresses`, those on one of this node's interfaces now (this node holds them)."""
    present = {text.split("/")[0] for _, items in interfaces for text in items}
    return sorted(set(addresses) & present)


def keepalived_argv(program: str, directory: Path) -> list[str]:
    """Foreground (-n), log to the console (-l, -D), the VRRP subsystem only (-P), its files
    in the agent's state directory (no clash with another keepalived on the machine)."""
    return [
        program,
        "-n",
        "-l",
        "-D",
        "-P",
        "-f",
        str(directory / CONFIG),
        "-p",
        str(directory / PID),
        "-r",
        str(directory / VRRP_PID),
    ]


class Keepalived:
    """The node's one keepalived, converged to the assigned addresses."""

    def __init__(self, directory: Path, program: str = "") -> None:
        self.directory = directory
        self.program = program or shutil.which("keepalived") or "/usr/sbin/keepalived"
        self._process: subprocess.Popen[bytes] | None = None
        self._written = ""
        self._checked_leftover = False
        self._closed = False
        self._failed = False  # keepalived would not start (not installed)
        self._restart_at = 0.0

    @property
    def running(self) -> bool:
        return self._process is not None and self._process.poll() is None

    def converge(self, addresses: Sequence[workloads_pb2.VirtualAddress]) -> None:
        if self._closed:
            return
        if not self._checked_leftover:
            self._stop_leftover()
            self._checked_leftover = True
        if not addresses:
            self.stop()
            return
        text = render_config(addresses, local_interfaces())
        if text == self._written and (self.running or self._failed):
            return  # as it should be, or keepalived would not start with this file: said once
        self.directory.mkdir(parents=True, exist_ok=True, mode=0o700)
        write_atomically(self.directory / CONFIG, text.encode(), 0o600)
        self._written = text
        self._failed = False
        if self.running:
            assert self._process is not None
            log.info("reloading keepalived", addresses=[a.address for a in addresses])
            self._process.send_signal(signal.SIGHUP)
            return
        if self._process is not None:  # it exited on its own: said, then started again a while later
            if time.monotonic() < self._restart_at:
                self._written = ""
                return
            log.error("keepalived exited; starting it again", exit_code=self._process.returncode)
        self._restart_at = time.monotonic() + RESTART_AFTER
        log.info("starting keepalived", addresses=[a.address for a in addresses])
        try:
            self._process = subprocess.Popen(
                keepalived_argv(self.program, self.directory), stdin=subprocess.DEVNULL
            )
        except OSError as error:
            self._process = None
            self._failed = True
            log.error("cannot start keepalived (apt install keepalived)", error=str(error)[:200])

    def close(self) -> None:
        """Stop it for good (the agent exits): a tick still running starts no new one."""
        self._closed = True
        self.stop()

    def stop(self) -> None:
        """Stop it: keepalived removes its addresses and tells the peers (priority 0)."""
        process, self._process = self._process, None
        self._written = ""
        if process is None:
            return
        if process.poll() is None:
            log.info("stopping keepalived")
            process.terminate()
            try:
                process.wait(STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(STOP_TIMEOUT)

    def _stop_leftover(self) -> None:
        """A keepalived of an earlier agent (killed without its goodbye) still holding the
        addresses: stopped, if its pid file names a keepalived with our config."""
        with contextlib.suppress(OSError, ValueError):
            pid = int((self.directory / PID).read_text().strip())
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\x00")
            if str(self.directory / CONFIG).encode() in cmdline and b"keepalived" in cmdline[0]:
                log.info("stopping a keepalived left by an earlier agent", pid=pid)
                os.kill(pid, signal.SIGTERM)


def held_addresses(assigned: Sequence[workloads_pb2.VirtualAddress]) -> list[str]:
    """The assigned addresses this node holds now (reported to the coordinator)."""
    if not assigned:
        return []
    return held((item.address for item in assigned), local_interfaces())


HANDOVER_DELAY = 2.0  # seconds a holder keeps an address whose replicas here are being stopped
RELEASE_DRAIN = 1.5  # seconds a released address's services keep serving before their stop


def hand_overs(
    announced: Sequence[workloads_pb2.VirtualAddress],
    assigned: Sequence[workloads_pb2.VirtualAddress],
    held_now: Iterable[str],
    now: float,
) -> list[tuple[workloads_pb2.VirtualAddress, float]]:
    """The addresses this node held and is no longer assigned, each with when keepalived is
    to let it go: HANDOVER_DELAY from now, whatever the reason (a replica here leaving the
    rotation for a rollout or scale-down, or turned unhealthy). The peers the same
    assignment changed get time to be listening, which would miss the priority-0 advert
    otherwise and wait their master-down interval (about 3 s without answers, measured in a
    rollout here); meanwhile this node still answers, its published ports forwarding to the
    healthy replicas elsewhere (service_ports.py). Their services' stops here wait until
    RELEASE_DRAIN after that, so clients are answered until a peer holds the address."""
    kept = {item.address for item in assigned}
    held_set = set(held_now)
    return [
        (item, now + HANDOVER_DELAY)
        for item in announced
        if item.address not in kept and item.address in held_set
    ]

"""The fault suite: hostile nodes, abuse from the network and broken disks, one row each.

Every row starts its own picoord-coordinator on loopback (127.0.0.1 only) with a temp
state dir, does to it what a hostile node, an attacker or a fault would do, and records
what the operator saw, how long until the coordinator was whole again, and whether any
acknowledged data was lost. It prints one table:

    fault | what the user saw | recovery | data lost

Rows (``--only NAME`` runs some of them):

* ``markup``: a node reports rich markup and terminal escapes in its hardware report;
* ``huge-samples``: a node sends 4 MB metric samples once a second for 30 s;
* ``huge-hello``: a node says hello with 4 MB of hardware report;
* ``long-name``: an unauthenticated Enroll with a 1 MB node name;
* ``bad-tokens``: 2,000 Enroll calls with wrong tokens;
* ``raw-tcp``: 5,000 raw TCP connections held open (no TLS) against a coordinator
  limited to 4,096 open files, while coordctl keeps asking;
* ``disk-full``: the state disk (a 4 MiB tmpfs) fills up under live sessions, then frees;
* ``cert-expiry``: a real agent whose certificate lives 60 s (it must renew);
* ``sigkill``: the coordinator is SIGKILLed under 300 sessions and restarted;
* ``enroll-storm``: 300 enrollments at once with one valid token;
* ``image-typo``: a service whose image name has a typo, on three Pis whose agents fail
  every start with the pull error, watched for 60 s (issue 15: attempts per minute and the
  coordinator's CPU);
* ``one-certificate``: one node's certificate against a port capped at 16 connections
  (issue 18): 300 session opens in a row, 16 sessions held while another node's agent
  restarts, 5,000 events and 30,000 renewal requests on one session.

The firewall row (an agent killed inside a firewall change's confirm window) needs a lab
Pi with its own netfilter state: it is a lab test in tests/lab/test_firewall_lab.py (the
watchdog restores the rules of a SIGKILLed agent, ufw and nftables; a restarted agent
re-arms or restores), and the table prints its outcome when ``--with-lab`` is given.

    .venv/bin/python bench/faults.py [--only markup,disk-full] [--json out.json]

Exit status: 0 when every row ran and behaved; 1 when a row misbehaved; 2 when the suite
could not run; 130 when interrupted. Run as root (admin socket, tmpfs mounts).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import socket
import sqlite3
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import grpc
from _common import (
    BIN,
    LOOPBACK,
    BenchError,
    Coordinator,
    Processes,
    bench_workspace,
    cpu_seconds,
    http_get,
    mib,
    raise_nofile_limit,
    table,
)
from fanin import SESSION_OPTIONS, pi_hardware, pi_sample

from picoord.agent.enroll import Endpoint, fetch_pinned_ca, new_key_and_csr
from picoord.common import PROTOCOL_VERSION, VERSION
from picoord.common.addresses import grpc_unix_address
from picoord.v1 import admin_pb2, admin_pb2_grpc, agent_pb2, agent_pb2_grpc, node_pb2, workloads_pb2

MIB = 1024 * 1024


@dataclass
class Row:
    fault: str
    saw: str
    recovery: str
    data_lost: str
    ok: bool
    detail: str = ""


# --- a simulated node on loopback ----------------------------------------------------------------


@dataclass
class SimNode:
    name: str
    key_pem: bytes
    certificate_pem: bytes
    ca_pem: bytes


def new_token(coordinator: Coordinator, uses: int = 0) -> tuple[str, str]:
    reply = coordinator.coordctl("token", "create", "--uses", str(uses)) if uses else None
    reply = reply or coordinator.coordctl("token", "create")
    return reply["token"], reply["ca_cert_hash"]


async def enroll(
    coordinator: Coordinator, name: str, token: str, ca_hash: str, keys: tuple[bytes, bytes] | None = None
) -> SimNode:
    ca_pem = await asyncio.to_thread(fetch_pinned_ca, Endpoint(LOOPBACK, coordinator.port + 1), ca_hash)
    key_pem, csr_pem = keys or new_key_and_csr(name)
    credentials = grpc.ssl_channel_credentials(root_certificates=ca_pem)
    async with grpc.aio.secure_channel(coordinator.enroll_address, credentials) as channel:
        reply = await agent_pb2_grpc.EnrollmentStub(channel).Enroll(
            agent_pb2.EnrollRequest(token=token, node_name=name, csr_pem=csr_pem), timeout=60
        )
    return SimNode(name, key_pem, reply.certificate_pem, ca_pem)


def hello(node: SimNode, hardware: node_pb2.Hardware | None = None) -> agent_pb2.AgentMessage:
    return agent_pb2.AgentMessage(
        hello=agent_pb2.Hello(
            node_name=node.name,
            agent_version=VERSION,
            hardware=hardware or pi_hardware(node.name, 1),
            protocol_version=PROTOCOL_VERSION,
        )
    )


def session_channel(coordinator: Coordinator, node: SimNode) -> grpc.aio.Channel:
    credentials = grpc.ssl_channel_credentials(
        root_certificates=node.ca_pem, private_key=node.key_pem, certificate_chain=node.certificate_pem
    )
    options = [*SESSION_OPTIONS, ("grpc.max_send_message_length", 8 * MIB)]
    return grpc.aio.secure_channel(coordinator.address, credentials, options=options)


async def one_session(
    coordinator: Coordinator,
    node: SimNode,
    first: agent_pb2.AgentMessage,
    then: agent_pb2.AgentMessage | None = None,
    seconds: float = 3.0,
) -> str:
    """Say `first`, then send `then` once a second for `seconds`; return how it ended."""
    async with session_channel(coordinator, node) as channel:
        call = agent_pb2_grpc.AgentSessionStub(channel).Session()
        try:
            await call.write(first)
            reply = await asyncio.wait_for(call.read(), 20)
            if reply is grpc.aio.EOF:
                return "closed without a reply"
            if then is None:
                return "welcomed"
            deadline = time.monotonic() + seconds
            while time.monotonic() < deadline and not call.done():
                await call.write(then)
                await asyncio.sleep(1.0)
        except TimeoutError:
            return "session still open"
        except Exception:  # the call ended: its status says why
            pass
        return await ending(call, 2.0 if not call.done() else 10.0)


async def refused_sample(coordinator: Coordinator, node: SimNode, sample: agent_pb2.AgentMessage) -> str:
    """Hello, then one sample; how the coordinator ended the session (or that it did not)."""
    async with session_channel(coordinator, node) as channel:
        call = agent_pb2_grpc.AgentSessionStub(channel).Session()
        await call.write(hello(node))
        await asyncio.wait_for(call.read(), 20)
        with contextlib.suppress(Exception):
            await call.write(sample)
        return await ending(call)


async def ending(call: grpc.aio.StreamStreamCall, timeout: float = 10.0) -> str:
    """Read what the coordinator still sends (an agent always reads) until the call ends;
    its status, or that it did not end within `timeout`."""
    try:
        async with asyncio.timeout(timeout):
            with contextlib.suppress(grpc.aio.AioRpcError, grpc.aio.UsageError):
                while await call.read() is not grpc.aio.EOF:
                    pass
            code = await call.code()
    except TimeoutError:
        return "session still open"
    return f"{code.name}: {await call.details()}"[:200]


class SessionKeeper:
    """Hold sessions for many nodes, reconnecting each after loss, and count who is up."""

    def __init__(self, coordinator: Coordinator, nodes: list[SimNode]) -> None:
        self.coordinator = coordinator
        self.nodes = nodes
        self.up: set[str] = set()
        self.tasks: list[asyncio.Task[None]] = []

    def start(self) -> None:
        self.tasks = [asyncio.create_task(self._keep(node)) for node in self.nodes]

    async def stop(self) -> None:
        for task in self.tasks:
            task.cancel()
        await asyncio.gather(*self.tasks, return_exceptions=True)

    async def _keep(self, node: SimNode) -> None:
        while True:
            try:
                async with session_channel(self.coordinator, node) as channel:
                    call = agent_pb2_grpc.AgentSessionStub(channel).Session()
                    await call.write(hello(node))
                    reply = await asyncio.wait_for(call.read(), 30)
                    if reply is grpc.aio.EOF:
                        raise BenchError("no welcome")
                    self.up.add(node.name)
                    sample = pi_sample()
                    while True:
                        sample.metrics.timestamp = time.time()
                        await call.write(sample)
                        await asyncio.sleep(1.0)
            except asyncio.CancelledError:
                raise
            except Exception:
                self.up.discard(node.name)
                await asyncio.sleep(0.5)


async def wait_until(check: Callable[[], bool], timeout: float, step: float = 0.2) -> float | None:
    """Seconds until `check()` held, or None after `timeout`."""
    started = time.monotonic()
    while time.monotonic() - started < timeout:
        if check():
            return time.monotonic() - started
        await asyncio.sleep(step)
    return None


def coordctl_text(coordinator: Coordinator, *args: str, timeout: float = 30) -> subprocess.CompletedProcess:
    env = {**os.environ, "COORDCTL_ADMIN_SOCKET": str(coordinator.admin_socket)}
    return subprocess.run(
        [str(BIN / "coordctl"), *args], env=env, capture_output=True, timeout=timeout, check=False
    )


def coordinator_rss(coordinator: Coordinator) -> int:
    assert coordinator.process is not None
    return coordinator.process.memory_info().rss


def log_size(coordinator: Coordinator) -> int:
    return coordinator.log.stat().st_size if coordinator.log.exists() else 0


# --- the rows ----------------------------------------------------------------------------------------


async def row_markup(root: Path, processes: Processes) -> Row:
    coordinator = Coordinator.start(root, processes)
    token, ca_hash = new_token(coordinator)
    node = await enroll(coordinator, "pi-markup", token, ca_hash)
    hardware = pi_hardware(node.name, 1)
    hardware.os_name = "[/x] [bold red]red[/] \x1b[31mESC\x1b[0m"
    hardware.machine_model = "[link=http://example.invalid]y[/link] \x9b2J \x07"
    # One session with the hostile hello, kept open while the operator looks.
    session = asyncio.create_task(one_session(coordinator, node, hello(node, hardware), pi_sample(), 4))
    await asyncio.sleep(2.0)
    nodes = await asyncio.to_thread(coordctl_text, coordinator, "nodes")
    show = await asyncio.to_thread(coordctl_text, coordinator, "node", "show", node.name)
    await session
    out = nodes.stdout + show.stdout
    literal = b"[/x]" in nodes.stdout and b"[bold red]" in nodes.stdout
    clean = not any(byte in out for byte in (b"\x1b", b"\x07", b"\x9b", "\x9b".encode()))
    ok = nodes.returncode == 0 and show.returncode == 0 and literal and clean
    saw = (
        "nodes and node show list it; markup and escapes printed literally"
        if ok
        else f"nodes rc={nodes.returncode} show rc={show.returncode} literal={literal} clean={clean}: "
        + (nodes.stderr or show.stderr).decode(errors="replace")[:120]
    )
    return Row("node reports markup and ESC in os_name", saw, "none needed", "no", ok)


def huge_sample() -> agent_pb2.AgentMessage:
    message = pi_sample()
    del message.metrics.filesystems[:]
    for index in range(256):
        message.metrics.filesystems.add(
            device="d" * 15_000, mountpoint=f"/m{index}", fstype="ext4", size_bytes=1, free_bytes=1
        )
    return message


async def row_huge_samples(root: Path, processes: Processes) -> Row:
    coordinator = Coordinator.start(root, processes)
    token, ca_hash = new_token(coordinator)
    node = await enroll(coordinator, "pi-big", token, ca_hash)
    big = huge_sample()
    rss_before = coordinator_rss(coordinator)
    endings: Counter[str] = Counter()
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:  # a hostile agent reconnects and sends again, once a second
        endings[await refused_sample(coordinator, node, big)] += 1
        await asyncio.sleep(1.0)
    rss_after = coordinator_rss(coordinator)
    listed = [n["name"] for n in coordinator.coordctl("nodes")]
    show = coordctl_text(coordinator, "node", "show", node.name, "-o", "json")
    scrape = len(http_get(f"http://{LOOPBACK}:{coordinator.metrics_port}/metrics"))
    growth = rss_after - rss_before
    refused = "INVALID_ARGUMENT" in endings.most_common(1)[0][0]
    ok = refused and node.name in listed and show.returncode == 0 and growth < 40 * MIB and scrape < MIB
    ending = endings.most_common(1)[0][0]
    return Row(
        "node sends 4 MB samples every second for 30 s",
        f"refused ({ending}); node listed; node show {len(show.stdout) // 1024} KiB; "
        f"scrape {scrape // 1024} KiB",
        "immediate",
        "no",
        ok,
        f"coordinator RSS {mib(rss_before)} -> {mib(rss_after)}; {sum(endings.values())} sessions",
    )


async def row_huge_hello(root: Path, processes: Processes) -> Row:
    coordinator = Coordinator.start(root, processes)
    token, ca_hash = new_token(coordinator)
    node = await enroll(coordinator, "pi-hello", token, ca_hash)

    def db_bytes() -> int:
        return sum(p.stat().st_size for p in coordinator.state_dir.glob("state.db*"))

    before = db_bytes()
    hardware = pi_hardware(node.name, 1)
    for index in range(200):  # within every count limit: only the bytes are hostile
        hardware.disks.add(device="d" * 20_000, mountpoint=f"/m{index}", fstype="ext4")
    ending = await one_session(coordinator, node, hello(node, hardware))
    await asyncio.sleep(6)  # a flush interval
    after = db_bytes()
    ok = ending != "welcomed" and after - before < 256 * 1024
    return Row(
        "node sends a 4 MB hello",
        f"refused ({ending})",
        "immediate",
        "no",
        ok,
        f"state.db+wal {before // 1024} -> {after // 1024} KiB",
    )


async def enroll_raw(coordinator: Coordinator, ca_pem: bytes, request: agent_pb2.EnrollRequest) -> str:
    credentials = grpc.ssl_channel_credentials(root_certificates=ca_pem)
    async with grpc.aio.secure_channel(
        coordinator.enroll_address, credentials, options=[("grpc.max_send_message_length", 8 * MIB)]
    ) as channel:
        try:
            await agent_pb2_grpc.EnrollmentStub(channel).Enroll(request, timeout=30)
            return "OK"
        except grpc.aio.AioRpcError as error:
            return error.code().name


async def row_long_name(root: Path, processes: Processes) -> Row:
    coordinator = Coordinator.start(root, processes)
    _, ca_hash = new_token(coordinator)
    ca_pem = fetch_pinned_ca(Endpoint(LOOPBACK, coordinator.port + 1), ca_hash)
    before = log_size(coordinator)
    codes = Counter()
    for _ in range(10):
        request = agent_pb2.EnrollRequest(token="abcdef.0123456789abcdef", node_name="n" * MIB)
        codes[await enroll_raw(coordinator, ca_pem, request)] += 1
    grown = log_size(coordinator) - before
    ok = "OK" not in codes and grown < 10 * 4096
    return Row(
        "10 Enrolls with a 1 MB node name",
        f"refused ({', '.join(f'{n} {c}' for c, n in codes.items())})",
        "immediate",
        "no",
        ok,
        f"log grew {grown} bytes for 10 MB of names",
    )


async def row_bad_tokens(root: Path, processes: Processes) -> Row:
    coordinator = Coordinator.start(root, processes)
    _, ca_hash = new_token(coordinator)
    ca_pem = fetch_pinned_ca(Endpoint(LOOPBACK, coordinator.port + 1), ca_hash)
    before = log_size(coordinator)
    codes: Counter[str] = Counter()
    limit = asyncio.Semaphore(50)
    _, csr = new_key_and_csr("pi-guess")

    async def attempt(index: int) -> None:
        async with limit:
            request = agent_pb2.EnrollRequest(token=f"abcdef.{index:016d}", node_name="pi-guess", csr_pem=csr)
            codes[await enroll_raw(coordinator, ca_pem, request)] += 1

    started = time.monotonic()
    await asyncio.gather(*(attempt(i) for i in range(2000)))
    elapsed = time.monotonic() - started
    grown = log_size(coordinator) - before
    metrics, _ = coordinator.metrics(["picoord_coordinator_enrollments_throttled_total"])
    throttled = codes.get("RESOURCE_EXHAUSTED", 0)
    ok = "OK" not in codes and throttled > 1500 and grown < 200 * 1024
    return Row(
        "2,000 Enrolls with wrong tokens",
        f"{throttled} throttled, {codes.get('UNAUTHENTICATED', 0)} refused; "
        f"metric {metrics.get('picoord_coordinator_enrollments_throttled_total', 0):.0f}",
        "immediate",
        "no",
        ok,
        f"{2000 / elapsed:.0f} attempts/s; log grew {grown} bytes",
    )


async def row_raw_tcp(root: Path, processes: Processes) -> Row:
    raise_nofile_limit(65536)
    coordinator = Coordinator.start(root, processes, prlimit_nofile=4096)
    held: list[socket.socket] = []
    slowest = 0.0
    failures = 0
    try:
        for index in range(5000):
            port = coordinator.port + (index % 2)
            with contextlib.suppress(OSError):
                sock = socket.socket()
                sock.setblocking(False)
                with contextlib.suppress(BlockingIOError):
                    sock.connect((LOOPBACK, port))
                held.append(sock)
            if index % 500 == 0:
                await asyncio.sleep(0)
        started = time.monotonic()
        while time.monotonic() - started < 10:
            asked = time.monotonic()
            done = await asyncio.to_thread(coordctl_text, coordinator, "nodes", timeout=20)
            slowest = max(slowest, time.monotonic() - asked)
            failures += done.returncode != 0
            await asyncio.sleep(0.5)

        def closed_by_server() -> int:
            count = 0
            for sock in held:
                try:
                    if sock.recv(1) == b"":
                        count += 1
                except BlockingIOError:
                    pass
                except OSError:
                    count += 1
            return count

        dropped_after = await wait_until(lambda: closed_by_server() >= len(held) * 0.99, 60, step=1.0)
    finally:
        for sock in held:
            sock.close()
    ok = failures == 0 and slowest < 5 and dropped_after is not None
    return Row(
        "5,000 raw TCP connections, coordinator at 4,096 files",
        f"coordctl nodes answered {'every time' if not failures else f'with {failures} failures'}, "
        f"slowest {slowest:.2f} s",
        f"connections dropped {dropped_after + 10:.0f} s after opening"
        if dropped_after
        else "not dropped in 70 s",
        "no",
        ok,
        f"{len(held)} connections opened",
    )


@contextlib.contextmanager
def small_tmpfs(path: Path, size: str) -> object:
    path.mkdir(parents=True, exist_ok=True)
    subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size},mode=0700", "tmpfs", str(path)], check=True)
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=False)


async def row_disk_full(root: Path, processes: Processes) -> Row:
    state = root / "coordinator"
    with small_tmpfs(state, "4m"):
        coordinator = Coordinator.start(root, processes)
        token, ca_hash = new_token(coordinator)
        nodes = [await enroll(coordinator, f"pi{i}", token, ca_hash) for i in range(3)]
        keeper = SessionKeeper(coordinator, nodes)
        keeper.start()
        try:
            await wait_until(lambda: len(keeper.up) == 3, 30)
            tokens_before = len(coordinator.coordctl("token", "list"))
            filler = state / "filler"
            with filler.open("wb") as out, contextlib.suppress(OSError):
                while True:
                    out.write(b"\0" * 65536)
                    out.flush()
            failed = coordctl_text(coordinator, "token", "create")
            await asyncio.sleep(15)  # two flush intervals on a full disk
            alive = coordinator.process is not None and coordinator.process.is_running()
            ready = [n["name"] for n in coordinator.coordctl("nodes") if n["status"] == "Ready"]
            filler.unlink()
            freed = time.monotonic()
            healed = await wait_until(
                lambda: coordctl_text(coordinator, "token", "create").returncode == 0, 30, step=0.5
            )
            tokens_after = len(coordinator.coordctl("token", "list"))
            healed_in = time.monotonic() - freed if healed is not None else None
        finally:
            await keeper.stop()
            processes.stop_all()
    message = failed.stderr.decode(errors="replace").strip().splitlines()[-1:] or ["?"]
    ok = failed.returncode != 0 and alive and len(ready) == 3 and healed is not None
    lost = "no" if tokens_after == tokens_before + 1 else f"tokens {tokens_before} -> {tokens_after}"
    return Row(
        "state disk full under 3 live sessions",
        f"token create: {message[0][:90]}; sessions up {len(ready)}/3; coordinator alive={alive}",
        f"{healed_in:.1f} s after space returned" if healed_in is not None else "did not heal in 30 s",
        lost,
        ok and lost == "no",
    )


async def row_cert_expiry(root: Path, processes: Processes) -> Row:
    coordinator = Coordinator.start(root, processes, extra=["--node-cert-validity", "60s"])
    reply = coordinator.coordctl("token", "create")
    agent_dir = root / "agent"
    env = {**os.environ, "PICOORD_JOIN_TOKEN": reply["token"]}
    subprocess.run(
        [str(BIN / "picoord-agent"), "join", coordinator.address, "--ca-cert-hash", reply["ca_cert_hash"],
         "--node-name", "pi-rotate", "--state-dir", str(agent_dir)],
        env=env, check=True, capture_output=True, timeout=60,
    )  # fmt: skip
    first_serial = coordinator.coordctl("node", "show", "pi-rotate")["certificate_serial"]
    processes.start(
        "picoord-agent",
        [str(BIN / "picoord-agent"), "run", "--state-dir", str(agent_dir), "--metrics-interval", "1"],
        root / "agent.log",
    )
    await asyncio.sleep(80)  # past the first certificate's end
    node = coordinator.coordctl("node", "show", "pi-rotate")
    ok = node["status"] == "Ready" and node["certificate_serial"] != first_serial
    return Row(
        "node certificate reaches its end (60 s validity)",
        f"node {node['status']} at 80 s; "
        f"certificate {first_serial[:8]}.. -> {node['certificate_serial'][:8]}..",
        "renewed before its end",
        "no",
        ok,
    )


def node_keys(count: int) -> list[tuple[bytes, bytes]]:
    """Keys and CSRs made before a storm: it measures the coordinator, not this client."""
    return [new_key_and_csr(f"pi{index:03d}") for index in range(count)]


async def enroll_many(
    coordinator: Coordinator, count: int, concurrency: int, keys: list[tuple[bytes, bytes]] | None = None
) -> list[SimNode]:
    token, ca_hash = new_token(coordinator, uses=count)
    limit = asyncio.Semaphore(concurrency)
    keys = keys or node_keys(count)

    async def one(index: int) -> SimNode:
        async with limit:
            return await enroll(coordinator, f"pi{index:03d}", token, ca_hash, keys[index])

    return list(await asyncio.gather(*(one(i) for i in range(count))))


async def row_sigkill(root: Path, processes: Processes) -> Row:
    coordinator = Coordinator.start(root, processes)
    nodes = await enroll_many(coordinator, 300, 20)
    keeper = SessionKeeper(coordinator, nodes)
    keeper.start()
    try:
        if await wait_until(lambda: len(keeper.up) == 300, 120) is None:
            raise BenchError(f"only {len(keeper.up)}/300 sessions came up")
        assert coordinator.process is not None
        coordinator.process.kill()
        killed = time.monotonic()
        processes.forget(coordinator.process.pid)
        await wait_until(lambda: len(keeper.up) < 300, 10, step=0.05)
        restarted = Coordinator.restart(coordinator, processes)
        back = await wait_until(lambda: len(keeper.up) == 300, 120)
        recovery = time.monotonic() - killed if back is not None else None
        enrolled = len(restarted.coordctl("nodes"))
    finally:
        await keeper.stop()
    with contextlib.closing(sqlite3.connect(coordinator.state_dir / "state.db")) as db:
        integrity = db.execute("PRAGMA integrity_check").fetchone()[0]
    ok = recovery is not None and enrolled == 300 and integrity == "ok"
    return Row(
        "coordinator SIGKILL under 300 sessions",
        f"sessions back 300/300; nodes kept {enrolled}/300; integrity {integrity}",
        f"{recovery:.1f} s after the kill" if recovery else "sessions did not come back in 120 s",
        "no" if enrolled == 300 else f"{300 - enrolled} nodes",
        ok,
    )


async def row_enroll_storm(root: Path, processes: Processes) -> Row:
    coordinator = Coordinator.start(root, processes)
    slowest = 0.0

    async def probe(stop: asyncio.Event) -> None:
        """ListNodes over the admin socket, as coordctl calls it (without its start-up)."""
        nonlocal slowest
        async with grpc.aio.insecure_channel(grpc_unix_address(coordinator.admin_socket)) as channel:
            stub = admin_pb2_grpc.AdminStub(channel)
            while not stop.is_set():
                asked = time.monotonic()
                await stub.ListNodes(admin_pb2.ListNodesRequest(), timeout=30)
                slowest = max(slowest, time.monotonic() - asked)
                await asyncio.sleep(0.1)

    keys = node_keys(300)
    stop = asyncio.Event()
    prober = asyncio.create_task(probe(stop))
    started = time.monotonic()
    try:
        nodes = await enroll_many(coordinator, 300, 100, keys)
    finally:
        stop.set()
        await prober
    elapsed = time.monotonic() - started
    listed = len(coordinator.coordctl("nodes"))
    ok = len(nodes) == 300 and listed == 300 and slowest < 2
    return Row(
        "enrollment storm: 300 at once",
        f"all enrolled ({300 / elapsed:.0f}/s); admin ListNodes slowest {slowest:.2f} s",
        f"{elapsed:.1f} s for all",
        "no",
        ok,
    )


async def burst_of_sessions(coordinator: Coordinator, node: SimNode, count: int) -> Counter[str]:
    """`count` sessions one after another: hello, the welcome, gone; how each ended."""
    endings: Counter[str] = Counter()
    async with session_channel(coordinator, node) as channel:
        for _ in range(count):
            call = agent_pb2_grpc.AgentSessionStub(channel).Session()
            try:
                await call.write(hello(node))
                reply = await asyncio.wait_for(call.read(), 10)
                endings["welcomed" if reply is not grpc.aio.EOF else "closed"] += 1
            except grpc.aio.AioRpcError as error:
                endings[error.code().name] += 1
            call.cancel()
    return endings


async def flood(coordinator: Coordinator, node: SimNode, message: agent_pb2.AgentMessage, count: int) -> str:
    """Hello, then `count` copies of `message` as fast as the stream takes them; how it ended."""
    async with session_channel(coordinator, node) as channel:
        call = agent_pb2_grpc.AgentSessionStub(channel).Session()
        await call.write(hello(node))
        await asyncio.wait_for(call.read(), 20)
        sent = 0
        with contextlib.suppress(Exception):
            while sent < count and not call.done():
                await call.write(message)
                sent += 1
        return f"{await ending(call, 30)} after {sent} sent"


OVER_LIMIT_SERIES = 'picoord_coordinator_refused_messages_total{kind="session",reason="over_limit"}'


def over_limit_count(coordinator: Coordinator) -> float:
    """Sessions the coordinator ended because their node went past its share. (The
    client's own status can read INTERNAL: the stream is reset while it still writes.)"""
    for line in http_get(f"http://{LOOPBACK}:{coordinator.metrics_port}/metrics").decode().splitlines():
        if line.startswith(OVER_LIMIT_SERIES + " "):
            return float(line.split()[1])
    return 0.0


async def row_one_certificate(root: Path, processes: Processes) -> Row:
    config = root / "coordinator.toml"
    config.parent.mkdir(parents=True, exist_ok=True)
    config.write_text("max_connections = 16\n")
    coordinator = Coordinator.start(root, processes, extra=("--config", str(config)))
    token, ca_hash = new_token(coordinator)
    hog = await enroll(coordinator, "pi-hog", token, ca_hash)
    honest = await enroll(coordinator, "pi-honest", token, ca_hash)
    log_before = log_size(coordinator)
    burst = await burst_of_sessions(coordinator, hog, 300)
    burst_log = log_size(coordinator) - log_before

    # 16 sessions held from the hog's certificate (the port's whole cap), then the honest
    # node's agent (re)connects, as after a restart
    held = [session_channel(coordinator, hog) for _ in range(16)]
    calls = []
    for channel in held:
        call = agent_pb2_grpc.AgentSessionStub(channel).Session()
        with contextlib.suppress(Exception):
            await call.write(hello(hog))
        calls.append(call)
    await asyncio.sleep(1)
    keeper = SessionKeeper(coordinator, [honest])
    keeper.start()
    honest_after = await wait_until(lambda: "pi-honest" in keeper.up, 90, step=0.5)
    await keeper.stop()
    for call in calls:
        call.cancel()
    for channel in held:
        await channel.close()
    await asyncio.sleep(31)  # the hog's pause on session opens ends

    log_before, cut_before = log_size(coordinator), over_limit_count(coordinator)
    event = agent_pb2.AgentMessage(
        event=agent_pb2.Event(kind="spam", message="x" * 200, timestamp=time.time())
    )
    events = await flood(coordinator, hog, event, 5000)
    events_log = log_size(coordinator) - log_before
    events_cut = over_limit_count(coordinator) - cut_before
    await asyncio.sleep(11)  # the pause on its messages ends
    log_before, cut_before = log_size(coordinator), over_limit_count(coordinator)
    renew = agent_pb2.AgentMessage(
        renew=agent_pb2.RenewCertificate(csr_pem=b"-----BEGIN CERTIFICATE REQUEST-----")
    )
    renewals = await flood(coordinator, hog, renew, 30_000)
    renewals_log = log_size(coordinator) - log_before
    renewals_cut = over_limit_count(coordinator) - cut_before
    with coordinator.log.open("rb") as log:  # a node that sends but never reads fills its outbox
        log.seek(log_before)
        unread = b"it stopped reading" in log.read()
    renewals_end = (
        "cut at its share" if renewals_cut else "ended: it stopped reading" if unread else "not cut"
    )
    ok = (
        burst["welcomed"] <= 60
        and burst["RESOURCE_EXHAUSTED"] >= 200
        and honest_after is not None
        and events_cut == 1
        and (renewals_cut == 1 or unread)
        and max(burst_log, events_log, renewals_log) < 64 * 1024
    )
    return Row(
        "one certificate: 300 opens, 16 held sessions, 5,000 events, 30,000 renewals",
        f"opens: {burst['welcomed']} welcomed, {burst['RESOURCE_EXHAUSTED']} RESOURCE_EXHAUSTED; "
        f"events: {'cut at its share' if events_cut else 'not cut'} ({events}); "
        f"renewals: {renewals_end} ({renewals})",
        f"another node's agent Ready {honest_after:.1f} s after the 16 were held"
        if honest_after is not None
        else "another node's agent not Ready in 90 s",
        "no",
        ok,
        f"log grew {burst_log // 1024} KiB (opens), {events_log // 1024} KiB (events), "
        f"{renewals_log // 1024} KiB (renewals)",
    )


def row_firewall_lab() -> Row:
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "pytest",
            "-q",
            "-x",
            "tests/lab/test_firewall_lab.py",
            "-k",
            "killed_in_the_window or restarted_with_a_pending_revert",
        ],
        cwd=Path(__file__).resolve().parent.parent,
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    last = (done.stdout.strip().splitlines() or ["no output"])[-1]
    return Row(
        "agent SIGKILLed inside a firewall confirm window",
        "the watchdog restored the previous rules" if done.returncode == 0 else f"test failed: {last}",
        "within the window + 5 s",
        "no",
        done.returncode == 0,
        last,
    )


TYPO_IMAGE = "registry.invalid/mcp-sever:1"  # "server" mistyped
TYPO_SECONDS = 60.0


async def play_failing_pi(
    coordinator: Coordinator, node: SimNode, tried: set[str], stop: asyncio.Event
) -> None:
    """An agent whose dockerd cannot pull the image: every replica it is assigned fails at
    once with the pull error, reported as the agent does (on change, and every 10 s)."""
    async with session_channel(coordinator, node) as channel:
        call = agent_pb2_grpc.AgentSessionStub(channel).Session()
        await call.write(hello(node))
        await asyncio.wait_for(call.read(), 30)
        reports = workloads_pb2.ReplicaReports()
        changed = asyncio.Event()

        async def read() -> None:
            while (message := await call.read()) is not grpc.aio.EOF:
                if message.WhichOneof("body") != "assignment":
                    continue
                reports.Clear()
                reports.generation = message.assignment.generation
                for spec in message.assignment.replicas:
                    tried.add(spec.replica)
                    reports.replicas.add(
                        service=spec.service, revision=spec.revision, replica=spec.replica, state="failed",
                        message=f"cannot pull {spec.image}: manifest unknown", since=time.time(),
                    )  # fmt: skip
                changed.set()

        reader = asyncio.create_task(read())
        sample = pi_sample()
        sent_at = 0.0
        try:
            while not stop.is_set():
                sample.metrics.timestamp = time.time()
                await call.write(sample)
                if changed.is_set() or time.monotonic() - sent_at >= 10.0:
                    changed.clear()
                    sent_at = time.monotonic()
                    await call.write(agent_pb2.AgentMessage(replicas=reports))
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(changed.wait(), 1.0)
        finally:
            reader.cancel()
            await asyncio.gather(reader, return_exceptions=True)
            call.cancel()


async def row_image_typo(root: Path, processes: Processes) -> Row:
    """Issue 15: a service whose image name has a typo, on three Pis whose agents fail every
    start with the pull error. Before the fix the coordinator made ~85 replicas a second."""
    coordinator = Coordinator.start(root, processes)
    token, ca_hash = new_token(coordinator)
    nodes = [await enroll(coordinator, f"pi{index}", token, ca_hash) for index in (1, 2, 3)]
    tried: set[str] = set()
    stop = asyncio.Event()
    pis = [asyncio.create_task(play_failing_pi(coordinator, node, tried, stop)) for node in nodes]
    try:
        if await wait_until(lambda: len(coordinator.coordctl("nodes")) == 3, 30) is None:
            raise BenchError("the three simulated Pis did not connect")
        spec = root / "typo.yaml"
        spec.write_text(f"kind: Service\nname: typo\nimage: {TYPO_IMAGE}\nreplicas: 2\n")
        applied = await asyncio.to_thread(coordctl_text, coordinator, "apply", "-f", str(spec))
        rollout = await asyncio.to_thread(coordctl_text, coordinator, "rollout", "typo", timeout=120)
        said = one_line(rollout.stdout.decode(errors="replace") + rollout.stderr.decode(errors="replace"))
        assert coordinator.process is not None
        cpu_before, attempts_before = cpu_seconds(coordinator.process), len(tried)
        ps_lines: list[str] = []
        started = time.monotonic()
        while time.monotonic() - started < TYPO_SECONDS:
            ps = await asyncio.to_thread(coordctl_text, coordinator, "ps", "typo")
            ps_lines += [
                line for line in ps.stdout.decode(errors="replace").splitlines() if "next try" in line
            ]
            await asyncio.sleep(5.0)
        cpu = cpu_seconds(coordinator.process) - cpu_before
        attempts = len(tried) - attempts_before
        status = {view["name"]: view["rollout"] for view in coordinator.coordctl("services")}.get("typo")
    finally:
        stop.set()
        await asyncio.gather(*pis, return_exceptions=True)
    per_minute = attempts * 60.0 / TYPO_SECONDS
    ok = (
        applied.returncode == 0
        and rollout.returncode == 1
        and "cannot pull" in said
        and per_minute <= 10
        and cpu <= 6.0
        and status == "failed"
        and bool(ps_lines)
    )
    backoff = one_line(ps_lines[-1]) if ps_lines else "no backoff line in ps"
    return Row(
        "image name typo (2 replicas on 3 Pis)",
        f"rollout exit {rollout.returncode}: {said[said.find('failed') :][:110]}; services: {status}; "
        f"ps: {backoff[-70:]}",
        f"{per_minute:.0f} attempts/min (2 slots), coordinator CPU {cpu:.2f} s in {TYPO_SECONDS:.0f} s",
        "no",
        ok,
    )


ROWS: dict[str, Callable[[Path, Processes], Awaitable[Row]]] = {
    "markup": row_markup,
    "huge-samples": row_huge_samples,
    "huge-hello": row_huge_hello,
    "long-name": row_long_name,
    "bad-tokens": row_bad_tokens,
    "raw-tcp": row_raw_tcp,
    "disk-full": row_disk_full,
    "cert-expiry": row_cert_expiry,
    "sigkill": row_sigkill,
    "enroll-storm": row_enroll_storm,
    "image-typo": row_image_typo,
    "one-certificate": row_one_certificate,
}


def run(names: list[str], with_lab: bool) -> list[Row]:
    rows = []
    for name in names:
        print(f"faults: {name} ...", file=sys.stderr, flush=True)
        with bench_workspace(f"faults-{name}") as (root, processes):
            try:
                row = asyncio.run(ROWS[name](root, processes))
            except (BenchError, OSError, subprocess.SubprocessError, grpc.RpcError) as error:
                row = Row(name, f"could not run: {error}"[:200], "-", "-", False)
        rows.append(row)
        print(f"faults: {name}: {'ok' if row.ok else 'MISBEHAVED'}", file=sys.stderr, flush=True)
    if with_lab:
        rows.append(row_firewall_lab())
    return rows


def one_line(text: str) -> str:
    return " ".join(text.split())


def verdict(ok: bool) -> str:
    return "ok" if ok else "MISBEHAVED"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--only", help=f"comma-separated rows: {', '.join(ROWS)}")
    parser.add_argument("--with-lab", action="store_true", help="also run the firewall lab test")
    parser.add_argument("--json", type=Path, help="write the rows here too")
    args = parser.parse_args(argv)
    names = args.only.split(",") if args.only else list(ROWS)
    unknown = [name for name in names if name not in ROWS]
    if unknown:
        parser.error(f"unknown rows: {', '.join(unknown)}")
    if os.geteuid() != 0:
        print("faults: run as root (admin socket, tmpfs mounts)", file=sys.stderr)
        return 2
    try:
        rows = run(names, args.with_lab)
    except KeyboardInterrupt:
        return 130
    print(
        table(
            ["fault", "what the user saw", "recovery", "data lost", "verdict"],
            [
                [one_line(r.fault), one_line(r.saw), one_line(r.recovery), r.data_lost, verdict(r.ok)]
                for r in rows
            ],
        )
    )
    for row in rows:
        if row.detail:
            print(f"  {row.fault}: {row.detail}")
    if args.json:
        args.json.write_text(json.dumps([asdict(row) for row in rows], indent=2))
    return 0 if all(row.ok for row in rows) else 1


if __name__ == "__main__":
    sys.exit(main())

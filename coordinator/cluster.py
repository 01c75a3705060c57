"""The coordinator's view of the cluster: durable records from the store plus what only
lives in memory (open sessions, last-seen times, recent metrics, counters).

Servicers and the Prometheus collector read and change the cluster only through this
class, so each concept has one owner.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import functools
import time
from collections.abc import Awaitable, Callable, Coroutine
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, ParamSpec, TypeVar

import structlog

from picoord.common.tokens import BootstrapToken
from picoord.coordinator.clock_offsets import ClockOffsets
from picoord.coordinator.placement.inputs import (
    MEMBERSHIP_KINDS,
    Enrolled,
    hardware_changes,
    names_by_fold,
    roles_from_actions,
    swarm_members,
)
from picoord.coordinator.status import STATUS_TO_WIRE, Status, StatusTimeouts, node_status
from picoord.coordinator.store import (
    AdminCertificateRecord,
    CertificateRecord,
    NodeRecord,
    StateUnavailable,
    Store,
    TokenRecord,
)
from picoord.coordinator.telemetry import MetricsHistory
from picoord.v1 import admin_pb2, agent_pb2, node_pb2

log = structlog.get_logger("picoord.coordinator.cluster")

P = ParamSpec("P")
R = TypeVar("R")

# Expired tokens are kept this long, so `coordctl token list` can still show why a join failed.
EXPIRED_TOKEN_RETENTION = 7 * 24 * 3600.0
# Messages queued for one node: a node that stops reading fills it, and its session ends
# (it connects again once it reads), instead of the coordinator holding its backlog.
OUTBOX_SIZE = 256


def whole(change: Callable[P, Awaitable[R]]) -> Callable[P, Coroutine[Any, Any, R]]:
    """Run a change to its end even when its caller is cancelled (a client that goes away
    mid-call): the store write in its thread completes anyway, so the in-memory view that
    follows it must be updated too, never left behind."""

    @functools.wraps(change)
    async def run(*args: P.args, **kwargs: P.kwargs) -> R:
        return await asyncio.shield(change(*args, **kwargs))

    return run


class NodeUnavailable(Exception):
    """The node has no open session, or lost it while the action ran."""


class Outbox(asyncio.Queue["agent_pb2.CoordinatorMessage | None"]):
    """What is queued for one node, at most `maxsize`. `put` never waits: a full outbox means
    the node stopped reading, so the message is dropped and `on_full` (ending the session)
    called; callers keep writing `await session.outbox.put(message)`. `wake` hands the
    session's writer a None, so the one `get` it waits on also learns of an end (the session
    closed, its reader done) without a task per session watching for it."""

    def __init__(self, maxsize: int = OUTBOX_SIZE, on_full: Callable[[], None] = lambda: None) -> None:
        super().__init__(maxsize)
        self.on_full = on_full

    async def put(self, item: agent_pb2.CoordinatorMessage | None) -> None:
        try:
            self.put_nowait(item)
        except asyncio.QueueFull:
            self.on_full()

    def wake(self) -> None:
        """A full outbox needs no wake: its writer is about to take the next message."""
        with contextlib.suppress(asyncio.QueueFull):
            self.put_nowait(None)


@dataclass
class LiveSession:
    """One agent's open stream: what to send it, and how to end it from elsewhere."""

    node: str
    serial: str
    address: str = ""  # the IP the session comes from: how other nodes can reach this one
    outbox: Outbox = field(default_factory=Outbox)
    closed: asyncio.Event = field(default_factory=asyncio.Event)
    close_reason: str = ""

    def __post_init__(self) -> None:
        self.outbox.on_full = lambda: self.close(
            f"{self.outbox.maxsize} messages wait for this node: it stopped reading (connect again)"
        )

    def close(self, reason: str) -> None:
        if not self.closed.is_set():
            self.close_reason = reason
        self.closed.set()
        self.outbox.wake()


EnrollmentOutcome = Literal["enrolled", "refused", "throttled"]


@dataclass
class Counters:
    sessions_opened: int = 0
    messages_received: int = 0
    malformed_messages: int = 0
    refused_messages: dict[tuple[str, str], int] = field(default_factory=dict)  # (kind, reason code)
    enrollments: int = 0
    enrollments_refused: int = 0
    store_write_failures: int = 0
    enrollments_throttled: int = 0  # refused unchecked: their source failed too often


@dataclass
class PendingHello:
    agent_version: str
    hardware: bytes
    seen: float


class Cluster:
    def __init__(
        self,
        store: Store,
        timeouts: StatusTimeouts,
        history: MetricsHistory,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._store = store
        self.timeouts = timeouts
        self.history = history
        self.clock = clock
        self.counters = Counters()
        # Counts changes of what a node's row shows, but time: its record (enrollment, labels,
        # acceptance, removal, hello), its session, its role. An admin snapshot of an older
        # generation is rebuilt before answering (admin_snapshot.py).
        self._generation = 0
        # Told of every new generation: the admin read replica's cell (admin_replica.py).
        self.publish_generation: Callable[[int], None] | None = None
        self.sessions: dict[str, LiveSession] = {}
        # False while the state disk refuses writes; one log line per change, not per failure.
        self.store_writable = True
        # Node records are read from the store once and kept in step with every change
        # made through this class: admin calls and scrapes never query it.
        self._records: dict[str, NodeRecord] = {node.name: node for node in store.list_nodes()}
        self._last_seen: dict[str, float] = {name: node.last_seen for name, node in self._records.items()}
        self._unflushed: dict[str, float] = {}
        self._unflushed_hellos: dict[str, PendingHello] = {}
        self._hardware: dict[str, node_pb2.Hardware] = {}
        self._recorded: dict[str, tuple[bytes | None, node_pb2.Hardware]] = {}
        # Each node's cluster role is the coordinator's record of the membership actions it ran.
        membership = [
            admin_pb2.ActionRecord.FromString(row) for row in store.actions_of_kinds(MEMBERSHIP_KINDS)
        ]
        self._roles = roles_from_actions(membership)
        self._membership = [record for record in membership if record.kind.startswith("swarm_")]
        self._swarm = swarm_members(self._membership)
        self._summaries: dict[str, tuple[NodeRecord, admin_pb2.NodeSummary]] = {}
        self._names_by_fold: dict[str, frozenset[str]] | None = None  # built again when names change
        # Every node's newest certificate, read again only after a certificate was written:
        # `coordctl nodes` shows each node's, and at 5,000 nodes the query took a fifth of
        # the GIL when made for every admin snapshot.
        self._certificate_writes = 0
        self._newest: tuple[int, dict[str, CertificateRecord]] | None = None
        self._pending_actions: dict[str, tuple[str, asyncio.Future[agent_pb2.ActionResult]]] = {}
        self.clocks = ClockOffsets()

    @property
    def store_dir(self) -> Path:
        """Where the state disk is, as operators are told when it refuses writes."""
        return self._store.path.parent

    # the store, off the event loop
    async def _read(self, work: Callable[P, R], *args: P.args, **kwargs: P.kwargs) -> R:
        return await asyncio.to_thread(work, *args, **kwargs)

    async def _write(self, work: Callable[P, R], *args: P.args, **kwargs: P.kwargs) -> R:
        """Run a store change in a thread (the store's lock keeps one writer) and follow
        whether the state disk takes writes: a metric always, a log line on each change."""
        try:
            result = await asyncio.to_thread(work, *args, **kwargs)
        except StateUnavailable as error:
            self.counters.store_write_failures += 1
            if self.store_writable:
                self.store_writable = False
                log.error("state store refuses writes: changes are refused until it heals", error=str(error))
            raise
        if not self.store_writable:
            self.store_writable = True
            log.info("state store takes writes again", state_dir=str(self.store_dir))
        return result

    async def write(self, work: Callable[P, R], *args: P.args, **kwargs: P.kwargs) -> R:
        """A change to the store's other tables (the workload records), followed like the
        cluster's own: a full state disk shows in `store_writable` and the failure counter."""
        return await self._write(work, *args, **kwargs)

    @property
    def generation(self) -> int:
        return self._generation

    @generation.setter
    def generation(self, value: int) -> None:
        self._generation = value
        if self.publish_generation is not None:
            self.publish_generation(value)

    # sessions
    @whole
    async def open_session(self, session: LiveSession, hello: agent_pb2.Hello) -> None:
        """Register a new session; an older one for the same node is told to close.

        The hello is kept in memory at once; its write to the store is retried with the
        last-seen flush when the state disk refuses it, so a full disk never stops sessions."""
        previous = self.sessions.get(session.node)
        if previous is not None:
            previous.close("replaced by a newer session from the same node")
        self.sessions[session.node] = session
        self.generation += 1
        now = self.clock()
        self._hardware[session.node] = hello.hardware
        self._last_seen[session.node] = now
        self.clocks.forget(session.node)  # a new session may follow a reboot or a clock set right
        self.counters.sessions_opened += 1
        pending = PendingHello(hello.agent_version, hello.hardware.SerializeToString(), now)
        record = self._records.get(session.node)
        if record is not None:
            self._records[session.node] = dataclasses.replace(
                record,
                agent_version=pending.agent_version,
                hardware=pending.hardware,
                last_seen=now,
                enrolled_hardware=record.enrolled_hardware or pending.hardware,  # the first hello's
            )
        try:
            await self._write(
                self._store.record_hello, session.node, pending.agent_version, pending.hardware, now
            )
        except StateUnavailable:
            self._unflushed_hellos[session.node] = pending
        else:
            self._unflushed_hellos.pop(session.node, None)  # an older refused hello is now stale

    def close_session(self, session: LiveSession) -> None:
        if self.sessions.get(session.node) is session:
            del self.sessions[session.node]
            self.generation += 1
            for node, future in self._pending_actions.values():
                if node == session.node and not future.done():
                    future.set_exception(
                        NodeUnavailable(f"{node} disconnected while the action ran: its outcome is unknown")
                    )

    async def authenticate(self, serial: str) -> CertificateRecord | None:
        """The certificate record a session presents, as the store knows it."""
        return await self._read(self._store.certificate, serial)

    # actions
    async def dispatch(
        self, node: str, request: agent_pb2.ActionRequest, timeout: float
    ) -> agent_pb2.ActionResult:
        """Send an action over the node's session and wait for its result."""
        session = self.sessions.get(node)
        if session is None:
            raise NodeUnavailable(f"{node} is not connected")
        future: asyncio.Future[agent_pb2.ActionResult] = asyncio.get_running_loop().create_future()
        self._pending_actions[request.action_id] = (node, future)
        try:
            await session.outbox.put(agent_pb2.CoordinatorMessage(action=request))
            return await asyncio.wait_for(future, timeout)
        finally:
            self._pending_actions.pop(request.action_id, None)

    def action_result(self, node: str, result: agent_pb2.ActionResult) -> bool:
        """Deliver a result to whoever waits for it; False when nobody does (late or foreign)."""
        pending = self._pending_actions.get(result.action_id)
        if pending is None or pending[0] != node or pending[1].done():
            return False
        pending[1].set_result(result)
        return True

    def heard_from(self, node: str) -> None:
        now = self.clock()
        self._last_seen[node] = now
        self._unflushed[node] = now
        self.counters.messages_received += 1

    def observe_clock(self, node: str, agent_time: float) -> None:
        """A checked message's send time by the node's clock, against its arrival by ours."""
        self.clocks.observe(node, agent_time, self.clock())

    def clock_offset(self, name: str) -> float | None:
        """Seconds the node's clock is ahead of the coordinator's (None: not measured lately)."""
        return self.clocks.offset(name, self.clock())

    def add_metrics(self, node: str, sample: node_pb2.MetricsSample) -> None:
        """Keep a checked metrics sample of the node (for `coordctl top` and /metrics)."""
        self.history.add(node, sample)

    def count_refused_message(self, kind: str, code: str) -> None:
        """A session message refused by its checks, counted by kind and reason code."""
        self.counters.malformed_messages += 1
        key = (kind, code)
        self.counters.refused_messages[key] = self.counters.refused_messages.get(key, 0) + 1

    def count_enrollment(self, outcome: EnrollmentOutcome) -> None:
        """An enrollment that succeeded, was refused, or was refused unchecked (throttled)."""
        if outcome == "enrolled":
            self.counters.enrollments += 1
        elif outcome == "refused":
            self.counters.enrollments_refused += 1
        else:
            self.counters.enrollments_throttled += 1

    @whole
    async def flush(self) -> None:
        """Persist last-seen times and hellos in one transaction, not one write per message,
        and drop long-expired tokens. What a refused write held is kept for the next flush."""
        seen, self._unflushed = self._unflushed, {}
        hellos, self._unflushed_hellos = self._unflushed_hellos, {}
        try:
            await self._write(
                self._store.record_last_seen,
                seen,
                {name: dataclasses.astuple(h) for name, h in hellos.items()},
            )
        except BaseException:
            # newer times and hellos that arrived meanwhile win over the ones given back
            self._unflushed = seen | self._unflushed
            self._unflushed_hellos = hellos | self._unflushed_hellos
            raise
        await self._write(self._store.delete_expired_tokens, self.clock() - EXPIRED_TOKEN_RETENTION)

    def node(self, name: str) -> NodeRecord | None:
        return self._records.get(name)

    def nodes(self) -> list[NodeRecord]:
        return [self._records[name] for name in sorted(self._records)]

    def hardware(self, record: NodeRecord) -> node_pb2.Hardware:
        cached = self._hardware.get(record.name)
        if cached is None:
            cached = node_pb2.Hardware()
            if record.hardware:
                cached.ParseFromString(record.hardware)
            self._hardware[record.name] = cached
        return cached

    def recorded_hardware(self, record: NodeRecord) -> node_pb2.Hardware:
        """The hardware placement counts: recorded at the first hello, or accepted since."""
        if record.enrolled_hardware is None:
            return self.hardware(record)
        cached = self._recorded.get(record.name)
        if cached is None or cached[0] is not record.enrolled_hardware:
            cached = (record.enrolled_hardware, node_pb2.Hardware.FromString(record.enrolled_hardware))
            self._recorded[record.name] = cached
        return cached[1]

    def enrolled(self, record: NodeRecord) -> Enrolled:
        """What placement holds the node's reports against (see placement.inputs.node_from)."""
        return Enrolled(
            self.recorded_hardware(record),
            pending_labels=record.pending_labels,
            node_names=self._node_names(),
        )

    def _node_names(self) -> dict[str, frozenset[str]]:
        if self._names_by_fold is None:
            self._names_by_fold = names_by_fold(self._records)
        return self._names_by_fold

    def held(self, record: NodeRecord) -> list[str]:
        """The hardware changes the node reported since enrollment, not yet accepted."""
        return hardware_changes(self.recorded_hardware(record), self.hardware(record))

    def role(self, name: str) -> str:
        """manager or worker: what the coordinator's membership actions made the node."""
        return self._roles.get(name, "worker")

    def swarm(self) -> dict[str, str]:
        """node -> manager | worker for the nodes in the Swarm (the membership actions run)."""
        return dict(self._swarm)

    def swarm_role(self, name: str) -> str:
        """manager, worker, or "" when the node is in no Swarm the coordinator made."""
        return self._swarm.get(name, "")

    def status(self, name: str) -> Status:
        return node_status(name in self.sessions, self._last_seen.get(name, 0.0), self.clock(), self.timeouts)

    def last_seen(self, name: str) -> float:
        """When the node's last message arrived (0.0: never)."""
        return self._last_seen.get(name, 0.0)

    def summary(self, record: NodeRecord, into: admin_pb2.NodeSummary | None = None) -> admin_pb2.NodeSummary:
        """What `coordctl nodes` shows of a node, written `into` a message when given (a
        response's own row). The parts that change only with the record are built once per
        record; status, last seen and connected are filled in per call."""
        static = self._summaries.get(record.name)
        if static is None or static[0] is not record:
            hardware = self.hardware(record)
            built = admin_pb2.NodeSummary(
                name=record.name,
                arch=hardware.arch,
                cpu_cores=hardware.cpu_cores,
                memory_total_bytes=hardware.memory_total_bytes,
                machine_model=hardware.machine_model,
                os_name=hardware.os_name,
                agent_version=record.agent_version,
                labels=record.labels,
                enrolled_at=record.enrolled_at,
                pending_labels={key: record.labels[key] for key in record.pending_labels},
                held=self.held(record),
            )
            static = self._summaries[record.name] = (record, built)
        summary = admin_pb2.NodeSummary() if into is None else into
        summary.CopyFrom(static[1])
        summary.status = STATUS_TO_WIRE[self.status(record.name)]
        summary.last_seen = self._last_seen.get(record.name, record.last_seen)
        summary.connected = record.name in self.sessions
        summary.role = self.role(record.name)
        offset = self.clock_offset(record.name)
        if offset is not None:
            summary.clock_offset_seconds = offset
            summary.clock_offset_measured = True
        return summary

    # changes made by the operator or by enrollment: the store first, then the view
    def _remember(self, name: str, record: NodeRecord | None) -> NodeRecord | None:
        self.generation += 1
        if (record is None) == (name in self._records):
            self._names_by_fold = None
        if record is None:
            self._records.pop(name, None)
            self._summaries.pop(name, None)
        else:
            self._records[name] = record
        return record

    @whole
    async def create_token(
        self, ttl: float, usage_limit: int, description: str, labels: dict[str, str] | None = None
    ) -> tuple[BootstrapToken, TokenRecord]:
        token = BootstrapToken.generate()
        now = self.clock()
        record = TokenRecord(
            token_id=token.token_id,
            secret_hash=token.secret_hash,
            created_at=now,
            expires_at=now + ttl,
            usage_limit=usage_limit,
            uses=0,
            description=description,
            labels=dict(labels or {}),
        )
        await self._write(self._store.add_token, record)
        return token, record

    async def list_tokens(self) -> list[TokenRecord]:
        return await self._read(self._store.list_tokens)

    async def token(self, token_id: str) -> TokenRecord | None:
        return await self._read(self._store.get_token, token_id)

    @whole
    async def enroll(
        self, token_id: str, node: str, labels: dict[str, str], certificate: CertificateRecord, now: float
    ) -> NodeRecord:
        """Use the token, create the node and record its certificate, all or nothing
        (EnrollmentConflict or StateUnavailable change nothing)."""

        def enroll_and_read() -> NodeRecord | None:
            self._store.enroll(token_id, node, labels, certificate, now)
            return self._store.get_node(node)

        record = self._remember(node, await self._write_certificates(enroll_and_read))
        assert record is not None
        return record

    @whole
    async def label_node(self, name: str, set_labels: dict[str, str], remove: list[str]) -> NodeRecord | None:
        """Relabel a node; None when it no longer exists."""

        def update_and_read() -> NodeRecord | None:
            return self._store.get_node(name) if self._store.update_labels(name, set_labels, remove) else None

        return self._remember(name, await self._write(update_and_read))

    @whole
    async def accept_node(self, name: str) -> NodeRecord | None:
        """Accept the node's join labels and its latest hardware; None when it no longer exists."""

        def accept_and_read() -> NodeRecord | None:
            return self._store.get_node(name) if self._store.accept_node(name) else None

        return self._remember(name, await self._write(accept_and_read))

    async def certificates_of(self, name: str) -> list[CertificateRecord]:
        """The node's certificates that are neither revoked nor expired, newest first."""
        return await self._read(self._store.active_certificates, name, self.clock())

    async def newest_certificates(self, name: str | None = None) -> dict[str, CertificateRecord]:
        """Each node's newest certificate, expired and revoked ones included (for status).
        All nodes' are kept from one read until the next certificate write."""
        if name is not None:
            return await self._read(self._store.newest_certificates, name)
        writes = self._certificate_writes
        if self._newest is None or self._newest[0] != writes:
            # Tagged with the count at the start: a write finishing meanwhile makes it stale.
            self._newest = (writes, await self._read(self._store.newest_certificates, None))
        return self._newest[1]

    @whole
    async def add_certificate(self, record: CertificateRecord) -> bool:
        """Record a renewed certificate; False when its node is no longer enrolled."""
        return await self._write_certificates(self._store.add_certificate, record)

    async def _write_certificates(self, work: Callable[P, R], *args: P.args, **kwargs: P.kwargs) -> R:
        """A store change that writes certificates: the kept newest ones are read again after
        it, whether it succeeded or not."""
        try:
            return await self._write(work, *args, **kwargs)
        finally:
            self._certificate_writes += 1

    @whole
    async def record_registry(self, name: str, addresses: list[str]) -> None:
        """A Registry document's HOST:PORT names: images pulled by them are pinned at rollout."""
        await self._write(self._store.record_registry, name, addresses)

    async def record_action(self, record: admin_pb2.ActionRecord) -> None:
        self._roles.update(roles_from_actions([record]))
        self.generation += 1
        if record.kind.startswith("swarm_"):
            self._membership.append(record)
            self._swarm = swarm_members(self._membership)
        await self._write(
            self._store.record_action,
            record.action_id,
            record.node,
            record.started_at,
            record.SerializeToString(),
            record.kind,
        )

    async def list_actions(self, node: str | None, limit: int) -> list[admin_pb2.ActionRecord]:
        rows = await self._read(self._store.list_actions, node, limit)
        return [admin_pb2.ActionRecord.FromString(row) for row in rows]

    @whole
    async def remove_node(self, name: str) -> tuple[list[str], bool]:
        serials = await self._write_certificates(self._store.remove_node, name, self.clock())
        self._remember(name, None)
        session = self.sessions.get(name)
        if session is not None:
            session.close("node removed: its certificate is revoked")
        self.history.forget(name)
        self._last_seen.pop(name, None)
        self.clocks.forget(name)
        self._unflushed.pop(name, None)
        self._unflushed_hellos.pop(name, None)
        self._hardware.pop(name, None)
        self._recorded.pop(name, None)
        self._roles.pop(name, None)
        self._membership = [record for record in self._membership if record.node != name]
        self._swarm = swarm_members(self._membership)
        return serials, session is not None

    # remote operators' certificates
    @whole
    async def add_admin_certificate(self, record: AdminCertificateRecord) -> None:
        await self._write(self._store.add_admin_certificate, record, self.clock())

    async def admin_certificate(self, serial: str) -> AdminCertificateRecord | None:
        """The admin certificate a call presents, as the store knows it (checked every call)."""
        return await self._read(self._store.admin_certificate, serial)

    async def admin_certificates(self) -> list[AdminCertificateRecord]:
        return await self._read(self._store.list_admin_certificates)

    @whole
    async def revoke_admin(self, name: str) -> list[str]:
        return await self._write(self._store.revoke_admin, name, self.clock())

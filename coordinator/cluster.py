"""The coordinator's view of the cluster: durable records from the store plus what only
lives in memory (open sessions, last-seen times, recent metrics, counters).

Servicers and the Prometheus collector read and change the cluster only through this
class, so each concept has one owner.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from picoord.coordinator.apply.runner import NodeUnavailable
from picoord.coordinator.status import Status, StatusTimeouts, node_status
from picoord.coordinator.store import NodeRecord, Store
from picoord.coordinator.telemetry import MetricsHistory
from picoord.v1 import admin_pb2, agent_pb2, node_pb2

STATUS_TO_WIRE = {
    Status.READY: admin_pb2.NODE_STATUS_READY,
    Status.NOT_READY: admin_pb2.NODE_STATUS_NOT_READY,
    Status.DOWN: admin_pb2.NODE_STATUS_DOWN,
}


@dataclass
class LiveSession:
    """One agent's open stream: what to send it, and how to end it from elsewhere."""

    node: str
    serial: str
    address: str = ""  # the IP the session comes from: how other nodes can reach this one
    outbox: asyncio.Queue[agent_pb2.CoordinatorMessage] = field(default_factory=asyncio.Queue)
    closed: asyncio.Event = field(default_factory=asyncio.Event)
    close_reason: str = ""

    def close(self, reason: str) -> None:
        self.close_reason = reason
        self.closed.set()


@dataclass
class Counters:
    sessions_opened: int = 0
    messages_received: int = 0
    malformed_messages: int = 0
    refused_messages: dict[tuple[str, str], int] = field(default_factory=dict)  # (kind, reason code)
    enrollments: int = 0
    enrollments_refused: int = 0


class Cluster:
    def __init__(
        self,
        store: Store,
        timeouts: StatusTimeouts,
        history: MetricsHistory,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.store = store
        self.timeouts = timeouts
        self.history = history
        self.clock = clock
        self.counters = Counters()
        self.sessions: dict[str, LiveSession] = {}
        # Node records are read from the store once and refreshed when a node changes
        # (enrolled, said hello, relabelled, removed): admin calls and scrapes never query it.
        self._records: dict[str, NodeRecord] = {node.name: node for node in store.list_nodes()}
        self._last_seen: dict[str, float] = {name: node.last_seen for name, node in self._records.items()}
        self._unflushed: dict[str, float] = {}
        self._hardware: dict[str, node_pb2.Hardware] = {}
        self._summaries: dict[str, tuple[NodeRecord, admin_pb2.NodeSummary]] = {}
        self._pending_actions: dict[str, tuple[str, asyncio.Future[agent_pb2.ActionResult]]] = {}
        self.apply_lock = asyncio.Lock()

    # sessions
    def open_session(self, session: LiveSession, hello: agent_pb2.Hello) -> None:
        """Register a new session; an older one for the same node is told to close."""
        previous = self.sessions.get(session.node)
        if previous is not None:
            previous.close("replaced by a newer session from the same node")
        self.sessions[session.node] = session
        now = self.clock()
        self.store.record_hello(session.node, hello.agent_version, hello.hardware.SerializeToString(), now)
        self._hardware[session.node] = hello.hardware
        self.refresh_node(session.node)
        self._last_seen[session.node] = now
        self.counters.sessions_opened += 1

    def close_session(self, session: LiveSession) -> None:
        if self.sessions.get(session.node) is session:
            del self.sessions[session.node]
            for node, future in self._pending_actions.values():
                if node == session.node and not future.done():
                    future.set_exception(
                        NodeUnavailable(f"{node} disconnected while the action ran: its outcome is unknown")
                    )

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

    def flush_last_seen(self) -> None:
        """Persist last-seen times in one transaction, not one write per message."""
        pending, self._unflushed = self._unflushed, {}
        self.store.record_last_seen(pending)

    # reading
    def refresh_node(self, name: str) -> NodeRecord | None:
        """Re-read one node after the store changed it; None when it no longer exists."""
        record = self.store.get_node(name)
        if record is None:
            self._records.pop(name, None)
        else:
            self._records[name] = record
        return record

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

    def status(self, name: str) -> Status:
        return node_status(name in self.sessions, self._last_seen.get(name, 0.0), self.clock(), self.timeouts)

    def summary(self, record: NodeRecord) -> admin_pb2.NodeSummary:
        """What `coordctl nodes` shows of a node. The parts that change only with the record
        are built once per record; status, last seen and connected are filled in per call."""
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
            )
            static = self._summaries[record.name] = (record, built)
        summary = admin_pb2.NodeSummary()
        summary.CopyFrom(static[1])
        summary.status = STATUS_TO_WIRE[self.status(record.name)]
        summary.last_seen = self._last_seen.get(record.name, record.last_seen)
        summary.connected = record.name in self.sessions
        return summary

    # changes made by the operator
    def remove_node(self, name: str) -> tuple[list[str], bool]:
        serials = self.store.remove_node(name, self.clock())
        self._records.pop(name, None)
        self._summaries.pop(name, None)
        session = self.sessions.get(name)
        if session is not None:
            session.close("node removed: its certificate is revoked")
        self.history.forget(name)
        self._last_seen.pop(name, None)
        self._unflushed.pop(name, None)
        self._hardware.pop(name, None)
        return serials, session is not None

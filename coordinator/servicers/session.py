"""The long-lived agent stream: authenticate by certificate, take hello, then metrics,
heartbeats and events up, and whatever the coordinator queues down."""

from __future__ import annotations

import asyncio
import contextlib
import sqlite3
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field

import grpc
import structlog
from google.protobuf.message import DecodeError

from picoord.common import VERSION
from picoord.common.durations import iso_utc
from picoord.common.logs import LogThrottle, clipped
from picoord.coordinator.ca import (
    ClusterCA,
    CsrRejected,
    certificate_pem,
    certificate_record,
)
from picoord.coordinator.cluster import Cluster, LiveSession
from picoord.coordinator.controller.controller import WorkloadController
from picoord.coordinator.inbound import MalformedMessage, check_followup, check_hello
from picoord.coordinator.rate_limit import FailureThrottle, ThrottlePolicy, retry_hint
from picoord.coordinator.servicers.enrollment import MAX_CSR_BYTES
from picoord.coordinator.servicers.peers import certified_peer
from picoord.coordinator.store import CertificateRecord, StateUnavailable
from picoord.v1 import agent_pb2, agent_pb2_grpc, node_pb2

log = structlog.get_logger("picoord.coordinator.session")

HELLO_TIMEOUT = 15.0
# A message the node does not take within this long means it stopped reading: the session
# ends (its agent connects again once it reads), rather than holding the coordinator's side.
SEND_TIMEOUT = 30.0
# Per-message log lines (events, unexpected action results, renewals): at most one a
# second per node and kind, with the count of those held back.
MESSAGE_LOG_EVERY_SECONDS = 1.0


@dataclass(frozen=True)
class SessionLimits:
    """One node's fair share of the session port, whatever its certificate lets it send.

    At most `streams_per_node` sessions at once (a restarted agent's new one while the old
    is still being noticed, never a port's worth); session opens and messages counted per
    node with the enrollment throttle's rule: past `max_failures` within `window` seconds,
    the node is refused for `ban` seconds. An agent sends a sample every few seconds and a
    few dozen messages during an apply, far below these."""

    streams_per_node: int = 2
    opens: ThrottlePolicy = field(
        default_factory=lambda: ThrottlePolicy(max_failures=60, window=60.0, ban=30.0)
    )
    messages: ThrottlePolicy = field(
        default_factory=lambda: ThrottlePolicy(max_failures=500, window=10.0, ban=10.0)
    )


class OverLimit(Exception):
    """The node went past its share (SessionLimits): its session ends, RESOURCE_EXHAUSTED."""


class _DecodedStream:
    """The stream's messages; bytes that are no AgentMessage end it as a malformed message.

    `drop()` closes gRPC's request iterator, which otherwise holds the last message it
    handed out for as long as gRPC keeps the finished call's state (with the frames of its
    abort): a refused message (4 MB, say) must not outlive its refusal.
    """

    def __init__(self, request_iterator: AsyncIterator[agent_pb2.AgentMessage]) -> None:
        self._incoming: AsyncIterator[agent_pb2.AgentMessage] | None = aiter(request_iterator)

    def __aiter__(self) -> _DecodedStream:
        return self

    async def __anext__(self) -> agent_pb2.AgentMessage:
        if self._incoming is None:
            raise StopAsyncIteration
        try:
            return await anext(self._incoming)
        except DecodeError:
            pass
        await self.drop()
        raise MalformedMessage("malformed_message", "the stream carried bytes that are not an AgentMessage")

    async def drop(self) -> None:
        """Close gRPC's request iterator (an async generator): it lets go of its last message."""
        incoming, self._incoming = self._incoming, None
        close = getattr(incoming, "aclose", None)
        if close is not None:
            with contextlib.suppress(Exception):
                await close()


def _decoded(request_iterator: AsyncIterator[agent_pb2.AgentMessage]) -> _DecodedStream:
    return _DecodedStream(request_iterator)


def peer_address(peer: str) -> str:
    """The IP in gRPC's peer string: "ipv4:10.0.0.5:53210" or "ipv6:[fe80::1]:53210"."""
    family, _, rest = peer.partition(":")
    if family not in ("ipv4", "ipv6"):
        return ""
    host, _, _port = rest.rpartition(":")
    return host.strip("[]")


def _bare(error: MalformedMessage) -> MalformedMessage:
    """The same refusal without the traceback of the check that raised it, whose frames hold
    the refused message: raised afresh, it keeps nothing of the message alive."""
    return MalformedMessage(error.code, str(error), error.kind)


class SessionServicer(agent_pb2_grpc.AgentSessionServicer):
    def __init__(
        self,
        cluster: Cluster,
        metrics_interval: float,
        heartbeat_interval: float,
        ca: ClusterCA | None = None,  # None: renewals are refused
        workloads: WorkloadController | None = None,
        limits: SessionLimits | None = None,  # None: no per-node share (in-process tests)
        monotonic: Callable[[], float] = time.monotonic,
    ) -> None:
        self.workloads = workloads
        self.limits = limits
        self.monotonic = monotonic
        self._streams: dict[str, int] = {}  # open Session calls per node, hello or not
        self._opens = FailureThrottle(limits.opens) if limits else None
        self._messages = FailureThrottle(limits.messages) if limits else None
        self.message_log = LogThrottle(every=MESSAGE_LOG_EVERY_SECONDS)
        self.cluster = cluster
        self.metrics_interval = metrics_interval
        self.heartbeat_interval = heartbeat_interval
        self.ca = ca
        self._last_renewal: dict[str, float] = {}
        self.refusal_log = LogThrottle()

    async def _authenticate(self, context: grpc.aio.ServicerContext) -> tuple[str, str]:
        peer = certified_peer(context)
        if peer is None:
            await context.abort(
                grpc.StatusCode.UNAUTHENTICATED,
                "a client certificate is required: enroll with `picoord-agent join` first",
            )
            raise AssertionError("unreachable")
        try:
            record = await self.cluster.authenticate(peer.serial)
        except StateUnavailable as error:
            await context.abort(grpc.StatusCode.UNAVAILABLE, str(error))
            raise AssertionError("unreachable") from error
        if record is None or record.node != peer.common_name:
            await context.abort(grpc.StatusCode.UNAUTHENTICATED, "certificate not issued to this node")
            raise AssertionError("unreachable")
        if record.revoked_at is not None:
            await context.abort(
                grpc.StatusCode.PERMISSION_DENIED,
                f"certificate of node {record.node!r} is revoked (node removed): join again with a new token",
            )
        return record.node, record.serial

    async def Session(
        self, request_iterator: AsyncIterator[agent_pb2.AgentMessage], context: grpc.aio.ServicerContext
    ) -> None:
        """Written with context.write (not yield) so a node that stops reading can be told
        apart from one that is merely quiet: a write it does not take ends the session."""
        node, serial = await self._authenticate(context)
        refusal = self._admit(node)
        if refusal:
            await self._over_limit(context, node, refusal)
        self._streams[node] = self._streams.get(node, 0) + 1
        try:
            await self._session(node, serial, request_iterator, context)
        finally:
            self._streams[node] -= 1
            if not self._streams[node]:
                del self._streams[node]

    def _admit(self, node: str) -> str:
        """Why the node may not open another session now ("" when it may): past its share of
        concurrent sessions, or of session opens (each counted, refused or not)."""
        if self.limits is None or self._opens is None:
            return ""
        now = self.monotonic()
        wait = self._opens.retry_after(node, now)
        if wait > 0:
            return f"too many sessions opened by node {node!r}; {retry_hint(wait)}"
        if self._opens.failed(node, now):
            policy = self.limits.opens
            return (
                f"node {node!r} opened {policy.max_failures} sessions in {policy.window:g}s; "
                f"{retry_hint(policy.ban)}"
            )
        if self._streams.get(node, 0) >= self.limits.streams_per_node:
            return f"node {node!r} already has {self.limits.streams_per_node} sessions open"
        return ""

    def _count_message(self, node: str) -> None:
        """Raise OverLimit when the node sends faster than its share."""
        if self.limits is None or self._messages is None:
            return
        now = self.monotonic()
        wait = self._messages.retry_after(node, now)
        if wait > 0 or self._messages.failed(node, now):
            policy = self.limits.messages
            raise OverLimit(
                f"node {node!r} sent more than {policy.max_failures} messages in {policy.window:g}s; "
                f"{retry_hint(wait or policy.ban)}"
            )

    async def _over_limit(self, context: grpc.aio.ServicerContext, node: str, why: str) -> None:
        """End the call: counted like a refusal (kind "session", code "over_limit"), logged
        at most once a minute per node."""
        counters = self.cluster.counters
        key = ("session", "over_limit")
        counters.refused_messages[key] = counters.refused_messages.get(key, 0) + 1
        admitted, held_back = self.refusal_log.admit(f"limit:{node}", time.monotonic())
        if admitted:
            log.warning("node over its share", node=node, reason=why, refusals_not_logged=held_back)
        await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, why)

    async def _send(
        self, context: grpc.aio.ServicerContext, session: LiveSession, message: agent_pb2.CoordinatorMessage
    ) -> None:
        """Write one message; a node that does not take it within SEND_TIMEOUT has its
        session closed (the caller's loop then ends the call)."""
        try:
            await asyncio.wait_for(context.write(message), SEND_TIMEOUT)
        except TimeoutError:
            session.close(
                f"the node took no message for {SEND_TIMEOUT:g}s: it stopped reading (connect again)"
            )

    async def _session(
        self,
        node: str,
        serial: str,
        request_iterator: AsyncIterator[agent_pb2.AgentMessage],
        context: grpc.aio.ServicerContext,
    ) -> None:
        messages = aiter(_decoded(request_iterator))
        try:
            hello = await self._hello(node, messages)
        except MalformedMessage as error:
            await self._reject(context, node, error)
            return
        except (TimeoutError, StopAsyncIteration):
            await context.abort(grpc.StatusCode.DEADLINE_EXCEEDED, "no hello received")
            return
        session = LiveSession(node=node, serial=serial, address=peer_address(context.peer()))
        await self.cluster.open_session(session, hello)
        if self.workloads is not None:
            self.workloads.on_session_open(node)
        log.info("session opened", node=node, agent_version=hello.agent_version, peer=context.peer())
        reader = asyncio.create_task(self._read(node, messages, session, hello.hardware))
        reader.add_done_callback(lambda _: session.outbox.wake())
        try:
            await self._send(
                context,
                session,
                agent_pb2.CoordinatorMessage(
                    welcome=agent_pb2.Welcome(
                        node_name=node,
                        metrics_interval_seconds=self.metrics_interval,
                        heartbeat_interval_seconds=self.heartbeat_interval,
                        coordinator_version=VERSION,
                    )
                ),
            )
            # One wait per session: the outbox's next message, or its wake (None) when the
            # session is closed or the reader ended.
            while True:
                outgoing = await session.outbox.get()
                if session.closed.is_set():
                    log.info("session closed by coordinator", node=node, reason=session.close_reason)
                    await context.abort(grpc.StatusCode.PERMISSION_DENIED, session.close_reason)
                    return
                if not reader.done():
                    if outgoing is not None:
                        await self._send(context, session, outgoing)
                    continue  # None: a wake that found the session going on
                error = reader.exception()
                if isinstance(error, MalformedMessage):
                    await self._reject(context, node, error)
                elif isinstance(error, OverLimit):
                    await self._over_limit(context, node, str(error))
                elif error is not None:
                    raise error
                return
        finally:
            reader.cancel()
            self.cluster.close_session(session)
            if self.workloads is not None and node not in self.cluster.sessions:
                self.workloads.on_session_closed(node)
                self.workloads.logs.node_gone(node)
            log.info("session ended", node=node)

    async def _read(
        self, node: str, messages: _DecodedStream, session: LiveSession, hardware: node_pb2.Hardware
    ) -> None:
        """Each message checked before it counts as a sign of life or touches any state;
        node-supplied text is logged only after the check, clipped and throttled."""
        async for message in messages:
            self._count_message(node)
            try:
                kind = check_followup(message, hardware)
            except MalformedMessage as error:
                refusal = _bare(error)
            else:
                refusal = None
            if refusal is not None:
                del message
                await messages.drop()
                raise refusal
            self.cluster.heard_from(node)
            if kind == "heartbeat":
                self.cluster.observe_clock(node, message.heartbeat.timestamp)
            elif kind == "metrics":
                self.cluster.observe_clock(node, message.metrics.timestamp)
                self.cluster.add_metrics(node, message.metrics)
            elif kind == "action_result" and not self.cluster.action_result(node, message.action_result):
                self._log_message(
                    "action result nobody waits for",
                    node,
                    warning=True,
                    action_id=clipped(message.action_result.action_id),
                )
            elif kind == "event":
                self._log_message(
                    "agent event",
                    node,
                    kind=clipped(message.event.kind),
                    message=clipped(message.event.message),
                )

            elif kind == "replicas" and self.workloads is not None:
                self.workloads.on_reports(node, message.replicas)
            elif kind == "log_chunk" and self.workloads is not None:
                self.workloads.logs.deliver(node, message.log_chunk)
            elif kind == "renew":
                await session.outbox.put(
                    agent_pb2.CoordinatorMessage(certificate=await self._renew(node, message.renew.csr_pem))
                )

    def _log_message(self, event: str, node: str, warning: bool = False, **fields: object) -> None:
        """A line about one message, at most one a second per node and event (a flood is
        one line with the count held back), so a node cannot fill the coordinator's log."""
        admitted, held_back = self.message_log.admit(f"{event}:{node}", time.monotonic())
        if admitted:
            (log.warning if warning else log.info)(event, node=node, not_logged=held_back, **fields)

    # ------------------------------------------------------------ certificate renewal

    async def _renew(self, node: str, csr_pem: bytes) -> agent_pb2.CertificateRenewal:
        """Sign a renewal for the session's certified node (never the name the CSR asks for)
        and record it; the old certificate stays valid until its own end."""
        if self.ca is None:
            return self._renewal_refused(node, "this coordinator does not renew certificates")
        if len(csr_pem) > MAX_CSR_BYTES:
            return self._renewal_refused(node, f"the CSR is larger than {MAX_CSR_BYTES} bytes")
        now = self.cluster.clock()
        spacing = min(60.0, self.ca.node_validity.total_seconds() / 10)
        if now - self._last_renewal.get(node, float("-inf")) < spacing:
            return self._renewal_refused(node, f"renewals are at least {spacing:g}s apart: try again later")
        self._last_renewal[node] = now
        try:
            # Signing leaves the event loop; so does the store write (in the cluster).
            pem, record = await asyncio.to_thread(self._issue_renewal, node, csr_pem, now)
            recorded = await self.cluster.add_certificate(record)
        except CsrRejected as error:
            return self._renewal_refused(node, str(error))
        except (StateUnavailable, sqlite3.Error, OSError) as error:
            log.error("cannot record a renewed certificate", node=node, error=str(error))
            return self._renewal_refused(node, "the coordinator cannot record certificates right now")
        if not recorded:
            return self._renewal_refused(node, "the node is no longer enrolled")
        self._log_message(
            "certificate renewed", node, serial=record.serial, not_after=iso_utc(record.not_after)
        )
        return agent_pb2.CertificateRenewal(certificate_pem=pem, ca_certificate_pem=self.ca.certificate_pem)

    def _issue_renewal(self, node: str, csr_pem: bytes, now: float) -> tuple[bytes, CertificateRecord]:
        assert self.ca is not None
        certificate = self.ca.sign_node_csr(csr_pem, node)
        record = certificate_record(certificate, node, now)
        return certificate_pem(certificate), record

    def _renewal_refused(self, node: str, why: str) -> agent_pb2.CertificateRenewal:
        self._log_message("certificate renewal refused", node, warning=True, reason=why)
        return agent_pb2.CertificateRenewal(error=why)

    async def _hello(self, node: str, messages: _DecodedStream) -> agent_pb2.Hello:
        """The checked hello; a refused one is not kept alive by the error (see `_bare`)."""
        first = await asyncio.wait_for(anext(messages), HELLO_TIMEOUT)
        try:
            return check_hello(first, node)
        except MalformedMessage as error:
            refusal = _bare(error)
        del first
        await messages.drop()
        raise refusal

    async def _reject(self, context: grpc.aio.ServicerContext, node: str, error: MalformedMessage) -> None:
        """Refuse the message, and with it the session: counted by kind and reason, logged at
        most once per node per minute (with how many were held back), the node left listed."""
        self.cluster.count_refused_message(error.kind, error.code)
        admitted, held_back = self.refusal_log.admit(node, time.monotonic())
        if admitted:
            log.warning(
                "agent message refused",
                node=node,
                kind=error.kind,
                code=error.code,
                error=clipped(str(error)),
                refusals_not_logged=held_back,
            )
        await context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"{error.code}: {clipped(str(error), 1024)}")

"""The long-lived agent stream: authenticate by certificate, take hello, then metrics,
heartbeats and events up, and whatever the coordinator queues down."""

from __future__ import annotations

import asyncio
import contextlib
import sqlite3
import time
from collections.abc import AsyncIterator

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
from picoord.coordinator.servicers.enrollment import MAX_CSR_BYTES
from picoord.coordinator.servicers.peers import certified_peer
from picoord.coordinator.store import CertificateRecord, StateUnavailable
from picoord.v1 import agent_pb2, agent_pb2_grpc

log = structlog.get_logger("picoord.coordinator.session")

HELLO_TIMEOUT = 15.0


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
    ) -> None:
        self.workloads = workloads
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
    ) -> AsyncIterator[agent_pb2.CoordinatorMessage]:
        node, serial = await self._authenticate(context)
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
        yield agent_pb2.CoordinatorMessage(
            welcome=agent_pb2.Welcome(
                node_name=node,
                metrics_interval_seconds=self.metrics_interval,
                heartbeat_interval_seconds=self.heartbeat_interval,
                coordinator_version=VERSION,
            )
        )
        reader = asyncio.create_task(self._read(node, messages, session))
        closed = asyncio.create_task(session.closed.wait())
        try:
            while True:
                outgoing = asyncio.create_task(session.outbox.get())
                done, _ = await asyncio.wait({outgoing, reader, closed}, return_when=asyncio.FIRST_COMPLETED)
                if outgoing in done:
                    yield outgoing.result()
                    continue
                outgoing.cancel()
                if closed in done:
                    log.info("session closed by coordinator", node=node, reason=session.close_reason)
                    await context.abort(grpc.StatusCode.PERMISSION_DENIED, session.close_reason)
                    return
                error = reader.exception()
                if isinstance(error, MalformedMessage):
                    await self._reject(context, node, error)
                elif error is not None:
                    raise error
                return
        finally:
            reader.cancel()
            closed.cancel()
            self.cluster.close_session(session)
            if self.workloads is not None and node not in self.cluster.sessions:
                self.workloads.on_session_closed(node)
            log.info("session ended", node=node)

    async def _read(self, node: str, messages: _DecodedStream, session: LiveSession) -> None:
        """Each message checked before it counts as a sign of life or touches any state;
        node-supplied text is logged only after the check, and clipped."""
        async for message in messages:
            try:
                kind = check_followup(message)
            except MalformedMessage as error:
                refusal = _bare(error)
            else:
                refusal = None
            if refusal is not None:
                del message
                await messages.drop()
                raise refusal
            self.cluster.heard_from(node)
            if kind == "metrics":
                self.cluster.add_metrics(node, message.metrics)
            elif kind == "action_result" and not self.cluster.action_result(node, message.action_result):
                log.warning(
                    "action result nobody waits for",
                    node=node,
                    action_id=clipped(message.action_result.action_id),
                )
            elif kind == "event":
                log.info(
                    "agent event",
                    node=node,
                    kind=clipped(message.event.kind),
                    message=clipped(message.event.message),
                )

            elif kind == "replicas" and self.workloads is not None:
                self.workloads.on_reports(node, message.replicas)
            elif kind == "renew":
                await session.outbox.put(
                    agent_pb2.CoordinatorMessage(certificate=await self._renew(node, message.renew.csr_pem))
                )

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
        log.info("certificate renewed", node=node, serial=record.serial, not_after=iso_utc(record.not_after))
        return agent_pb2.CertificateRenewal(certificate_pem=pem, ca_certificate_pem=self.ca.certificate_pem)

    def _issue_renewal(self, node: str, csr_pem: bytes, now: float) -> tuple[bytes, CertificateRecord]:
        assert self.ca is not None
        certificate = self.ca.sign_node_csr(csr_pem, node)
        record = certificate_record(certificate, node, now)
        return certificate_pem(certificate), record

    @staticmethod
    def _renewal_refused(node: str, why: str) -> agent_pb2.CertificateRenewal:
        log.warning("certificate renewal refused", node=node, reason=why)
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

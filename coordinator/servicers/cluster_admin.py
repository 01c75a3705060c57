"""The operator's API behind coordctl."""

from __future__ import annotations

import asyncio
import functools
from collections.abc import AsyncIterator, Callable, Mapping
from typing import Any

import grpc
import structlog

from picoord.common import defaults, limits
from picoord.common.joining import join_command
from picoord.common.names import InvalidName, validate_label_key, validate_labels, validate_node_name
from picoord.common.pki import certificate_not_after, certificate_not_before
from picoord.coordinator.admin_reads import NODES, READS, TOP, SnapshotRead, checked_selector
from picoord.coordinator.admin_snapshot import Answer, Built, Row, Snapshot, SnapshotCache, in_slices
from picoord.coordinator.apply.action_planner import PlanError
from picoord.coordinator.apply.service import ApplyBusy, ApplyService, registry_tls
from picoord.coordinator.ca import ClusterCA, certificate_serial, certificate_state
from picoord.coordinator.cluster import Cluster
from picoord.coordinator.controller.records import WorkloadRecords
from picoord.coordinator.servicers.faults import unavailable_on_store_fault
from picoord.coordinator.servicers.peers import operator_identity
from picoord.coordinator.status import STATUS_TO_WIRE
from picoord.coordinator.store import CertificateRecord, NodeRecord, TokenRecord
from picoord.coordinator.workloads.reader import WorkloadError
from picoord.coordinator.workloads.stacks import StackError
from picoord.v1 import admin_pb2, admin_pb2_grpc

log = structlog.get_logger("picoord.coordinator.admin")

MAX_TOKEN_TTL = 365 * 24 * 3600.0
DEFAULT_RECENT_METRICS = 10


def token_info(record: TokenRecord) -> admin_pb2.TokenInfo:
    return admin_pb2.TokenInfo(
        token_id=record.token_id,
        created_at=record.created_at,
        expires_at=record.expires_at,
        usage_limit=record.usage_limit,
        uses=record.uses,
        description=record.description,
        labels=record.labels,
        used_by=record.used_by,
    )


def with_certificate(
    summary: admin_pb2.NodeSummary, newest: CertificateRecord | None, now: float
) -> admin_pb2.NodeSummary:
    """The node's newest certificate and its state, for `coordctl nodes` and `node show`."""
    if newest is not None:
        summary.certificate_not_after = newest.not_after
        summary.certificate_state = certificate_state(newest.not_after, newest.revoked_at, now).wire
    return summary


class AdminServicer(admin_pb2_grpc.AdminServicer):
    def __init__(
        self,
        cluster: Cluster,
        ca: ClusterCA,
        join_address: str,
        enroll_port_hint: int | None,
        workloads: WorkloadRecords | None = None,
    ) -> None:
        self.cluster = cluster
        self.ca = ca
        self.join_address = join_address
        self.enroll_port_hint = enroll_port_hint
        self.applies = ApplyService(cluster, workloads, registry_tls(ca))
        self._node_rows: SnapshotCache[admin_pb2.NodeSummary] = SnapshotCache(self._node_snapshot)
        self._top_rows: SnapshotCache[admin_pb2.TopRow] = SnapshotCache(self._top_snapshot)
        self._snapshots: dict[SnapshotRead, SnapshotCache[Any]] = {
            NODES: self._node_rows,
            TOP: self._top_rows,
        }

    async def _node(self, name: str, context: grpc.aio.ServicerContext) -> NodeRecord:
        try:
            validate_node_name(name)
        except InvalidName as error:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(error))
        record = self.cluster.node(name)
        if record is None:
            await context.abort(grpc.StatusCode.NOT_FOUND, f"no node named {name!r}")
        assert record is not None
        return record

    @unavailable_on_store_fault
    async def CreateToken(
        self, request: admin_pb2.CreateTokenRequest, context: grpc.aio.ServicerContext
    ) -> admin_pb2.CreateTokenResponse:
        ttl = request.ttl_seconds or float(defaults.TOKEN_TTL_SECONDS)
        if not 0 < ttl <= MAX_TOKEN_TTL:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "ttl must be between 1 second and 365 days")
        if len(request.description) > limits.TOKEN_DESCRIPTION:
            await context.abort(
                grpc.StatusCode.INVALID_ARGUMENT,
                f"description is longer than {limits.TOKEN_DESCRIPTION} characters",
            )
        if len(request.labels) > limits.LABELS:
            await context.abort(
                grpc.StatusCode.INVALID_ARGUMENT, f"a token grants at most {limits.LABELS} labels"
            )
        try:
            labels = validate_labels(dict(request.labels))
        except InvalidName as error:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(error))
        token, record = await self.cluster.create_token(ttl, request.usage_limit, request.description, labels)
        log.info(
            "token created",
            token_id=token.token_id,
            ttl_seconds=ttl,
            usage_limit=request.usage_limit,
            labels=labels,
        )
        command = join_command(self.join_address, token, self.ca.cert_hash, self.enroll_port_hint)
        return admin_pb2.CreateTokenResponse(
            token=str(token), info=token_info(record), ca_cert_hash=self.ca.cert_hash, join_command=command
        )

    @unavailable_on_store_fault
    async def ListTokens(
        self, request: admin_pb2.ListTokensRequest, context: grpc.aio.ServicerContext
    ) -> admin_pb2.ListTokensResponse:
        return admin_pb2.ListTokensResponse(tokens=[token_info(r) for r in await self.cluster.list_tokens()])

    async def ListNodes(
        self, request: admin_pb2.ListNodesRequest, context: grpc.aio.ServicerContext
    ) -> admin_pb2.ListNodesResponse:
        selector = await self._selector(request.selector, context)
        snapshot = await self._node_rows.get(self._generation)
        return snapshot.answer(selector, request.limit, NODES.answer)

    def _generation(self) -> int:
        return self.cluster.generation

    async def _node_snapshot(self) -> Built[admin_pb2.NodeSummary]:
        """Every node's row, built into the unfiltered answer itself (no second copy)."""
        newest = await self.cluster.newest_certificates()
        records = self.cluster.nodes()
        now = self.cluster.clock()
        whole = admin_pb2.ListNodesResponse(matched=len(records))
        async for record in in_slices(records):
            summary = self.cluster.summary(record, into=whole.nodes.add())
            with_certificate(summary, newest.get(record.name), now)
        return Built(whole, whole.nodes, [record.labels for record in records])

    async def _top_snapshot(self) -> Built[admin_pb2.TopRow]:
        records = self.cluster.nodes()
        whole = admin_pb2.TopResponse(matched=len(records))
        async for record in in_slices(records):
            self.cluster.history.top(
                record.name,
                STATUS_TO_WIRE[self.cluster.status(record.name)],
                self.cluster.hardware(record).cpu_cores,
                into=whole.rows.add(),
            )
        return Built(whole, whole.rows, [record.labels for record in records])

    async def _selector(
        self, selector: Mapping[str, str], context: grpc.aio.ServicerContext
    ) -> dict[str, str]:
        """The request's label selector, checked as labels are (a clear error naming it)."""
        try:
            return checked_selector(selector)
        except InvalidName as error:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(error))
            raise AssertionError("unreachable") from error

    def answers_at_once(self) -> dict[str, Callable[[Any], Any | None]]:
        """The reads a thread may answer off the event loop (admin_threads.py), by method:
        each gives the answer from a snapshot already built, or None (a selector to refuse,
        no snapshot to take) and the call runs on the loop as any other."""
        return {
            "ListNodes": lambda request: self._at_once(self._node_rows, request, NODES.answer),
            "Top": lambda request: self._at_once(self._top_rows, request, TOP.answer),
        }

    def send_snapshots_to(self, ship: Callable[[SnapshotRead, Snapshot[Any]], None]) -> None:
        """Hand every snapshot built from now on to `ship` (the admin read replica)."""
        for read, cache in self._snapshots.items():
            cache.on_built = functools.partial(ship, read)

    def refresh(self, kind: bytes) -> None:
        """On the loop: one rebuild behind the callers of this read (its replica's copy aged)."""
        self._snapshots[READS[kind]].refresh_behind(self._generation)

    def _at_once(
        self, cache: SnapshotCache[Row], request: Any, make: Callable[[list[Row], int], Answer]
    ) -> Answer | None:
        try:
            selector = checked_selector(request.selector)
        except InvalidName:
            return None
        snapshot = cache.at_once(self._generation)
        return None if snapshot is None else snapshot.answer(selector, request.limit, make)

    @unavailable_on_store_fault
    async def GetNode(
        self, request: admin_pb2.GetNodeRequest, context: grpc.aio.ServicerContext
    ) -> admin_pb2.NodeDetail:
        record = await self._node(request.name, context)
        newest = (await self.cluster.newest_certificates(record.name)).get(record.name)
        detail = admin_pb2.NodeDetail(
            summary=with_certificate(self.cluster.summary(record), newest, self.cluster.clock()),
            hardware=self.cluster.hardware(record),
            recent_metrics=self.cluster.history.recent(
                record.name, request.recent_metrics or DEFAULT_RECENT_METRICS
            ),
        )
        if newest is not None:
            detail.certificate_serial = newest.serial
            detail.certificate_not_after = newest.not_after
        return detail

    @unavailable_on_store_fault
    async def LabelNode(
        self, request: admin_pb2.LabelNodeRequest, context: grpc.aio.ServicerContext
    ) -> admin_pb2.NodeSummary:
        record = await self._node(request.name, context)
        try:
            to_set = validate_labels(dict(request.set))
            for key in request.remove:
                validate_label_key(key)
        except InvalidName as error:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(error))
        updated = await self.cluster.label_node(record.name, to_set, list(request.remove))
        if updated is None:
            await context.abort(grpc.StatusCode.NOT_FOUND, f"node {record.name!r} was removed meanwhile")
        assert updated is not None
        log.info("node labelled", node=record.name, set=to_set, removed=list(request.remove))
        return self.cluster.summary(updated)

    @unavailable_on_store_fault
    async def AcceptNode(
        self, request: admin_pb2.AcceptNodeRequest, context: grpc.aio.ServicerContext
    ) -> admin_pb2.AcceptNodeResponse:
        """What the node claims becomes the coordinator's record: its join labels select it,
        and its latest hardware report is the one placement counts (the hold ends)."""
        record = await self._node(request.name, context)
        labels = {key: record.labels[key] for key in record.pending_labels}
        changes = self.cluster.held(record)
        updated = await self.cluster.accept_node(record.name)
        if updated is None:
            await context.abort(grpc.StatusCode.NOT_FOUND, f"node {record.name!r} was removed meanwhile")
        assert updated is not None
        log.info("node accepted", node=record.name, labels=labels, hardware=changes)
        return admin_pb2.AcceptNodeResponse(
            summary=self.cluster.summary(updated), accepted_labels=labels, accepted_hardware=changes
        )

    @unavailable_on_store_fault
    async def RemoveNode(
        self, request: admin_pb2.RemoveNodeRequest, context: grpc.aio.ServicerContext
    ) -> admin_pb2.RemoveNodeResponse:
        record = await self._node(request.name, context)
        serials, session_closed = await self.cluster.remove_node(record.name)
        log.info("node removed", node=record.name, revoked=serials, session_closed=session_closed)
        return admin_pb2.RemoveNodeResponse(
            name=record.name, revoked_serials=serials, session_closed=session_closed
        )

    async def Apply(
        self, request: admin_pb2.ApplyRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[admin_pb2.ApplyEvent]:
        try:
            started = await self.applies.start(
                request.documents,
                request.dry_run,
                operator_identity(context),  # the kernel's word, not the client's
                request.source[:256],
                request.stack,
                request.prune,
            )
        except (WorkloadError, PlanError, StackError) as error:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(error))
        except ApplyBusy as error:
            await context.abort(grpc.StatusCode.FAILED_PRECONDITION, str(error))
        async for event in started.stream():
            yield event

    @unavailable_on_store_fault
    async def ListActions(
        self, request: admin_pb2.ListActionsRequest, context: grpc.aio.ServicerContext
    ) -> admin_pb2.ListActionsResponse:
        if request.node:
            await self._node(request.node, context)
        records = await self.cluster.list_actions(request.node or None, min(request.limit or 50, 1000))
        return admin_pb2.ListActionsResponse(actions=records)

    async def Top(
        self, request: admin_pb2.TopRequest, context: grpc.aio.ServicerContext
    ) -> admin_pb2.TopResponse:
        selector = await self._selector(request.selector, context)
        snapshot = await self._top_rows.get(self._generation)
        return snapshot.answer(selector, request.limit, TOP.answer)

    async def CheckCertificateExpiration(
        self, request: admin_pb2.CheckCertificateExpirationRequest, context: grpc.aio.ServicerContext
    ) -> admin_pb2.CheckCertificateExpirationResponse:
        now = self.cluster.clock()
        ca, server = self.ca.certificate, self.ca.server
        assert server is not None
        listed = [
            admin_pb2.CertificateExpiration(
                name="ca",
                kind="ca",
                serial=certificate_serial(ca),
                not_before=certificate_not_before(ca).timestamp(),
                not_after=certificate_not_after(ca).timestamp(),
            ),
            admin_pb2.CertificateExpiration(
                name="server",
                kind="server",
                serial=server.serial,
                not_before=server.not_before,
                not_after=server.not_after,
            ),
        ]
        for name, registry in await asyncio.to_thread(self.ca.registry_certificates):
            listed.append(
                admin_pb2.CertificateExpiration(
                    name=f"registry/{name}",
                    kind="registry",
                    serial=registry.serial,
                    not_before=registry.not_before,
                    not_after=registry.not_after,
                )
            )
        for listing in listed:
            listing.state = certificate_state(listing.not_after, None, now).wire
        for node, record in (await self.cluster.newest_certificates()).items():
            if self.cluster.node(node) is None:  # removed nodes' revoked certificates
                continue
            state = certificate_state(record.not_after, record.revoked_at, now)
            listed.append(
                admin_pb2.CertificateExpiration(
                    name=f"node/{node}",
                    kind="node",
                    serial=record.serial,
                    not_before=record.issued_at,
                    not_after=record.not_after,
                    state=state.wire,
                    revoked_at=record.revoked_at or 0.0,
                )
            )
        return admin_pb2.CheckCertificateExpirationResponse(certificates=listed, now=now)

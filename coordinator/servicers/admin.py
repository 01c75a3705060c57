"""The operator's API behind coordctl."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import grpc
import structlog

from picoord.common import defaults, limits
from picoord.common.names import InvalidName, validate_label_key, validate_labels, validate_node_name
from picoord.common.tokens import BootstrapToken
from picoord.coordinator.apply.planner import NodeView, PlanError, plan
from picoord.coordinator.apply.runner import ApplyRun
from picoord.coordinator.apply.spec import SpecError, parse_spec
from picoord.coordinator.ca import ClusterCA
from picoord.coordinator.cluster import STATUS_TO_WIRE, Cluster
from picoord.coordinator.store import NodeRecord, TokenRecord
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
    )


class AdminServicer(admin_pb2_grpc.AdminServicer):
    def __init__(
        self, cluster: Cluster, ca: ClusterCA, join_address: str, enroll_port_hint: int | None
    ) -> None:
        self.cluster = cluster
        self.ca = ca
        self.join_address = join_address
        self.enroll_port_hint = enroll_port_hint
        self._applies: set[asyncio.Task[None]] = set()

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
        token = BootstrapToken.generate()
        now = self.cluster.clock()
        record = TokenRecord(
            token_id=token.token_id,
            secret_hash=token.secret_hash,
            created_at=now,
            expires_at=now + ttl,
            usage_limit=request.usage_limit,
            uses=0,
            description=request.description,
        )
        self.cluster.store.add_token(record)
        log.info("token created", token_id=token.token_id, ttl_seconds=ttl, usage_limit=request.usage_limit)
        command = f"picoord-agent join {self.join_address} --token {token} --ca-cert-hash {self.ca.cert_hash}"
        if self.enroll_port_hint is not None:
            command += f" --enroll-port {self.enroll_port_hint}"
        return admin_pb2.CreateTokenResponse(
            token=str(token), info=token_info(record), ca_cert_hash=self.ca.cert_hash, join_command=command
        )

    async def ListTokens(
        self, request: admin_pb2.ListTokensRequest, context: grpc.aio.ServicerContext
    ) -> admin_pb2.ListTokensResponse:
        return admin_pb2.ListTokensResponse(tokens=[token_info(r) for r in self.cluster.store.list_tokens()])

    async def ListNodes(
        self, request: admin_pb2.ListNodesRequest, context: grpc.aio.ServicerContext
    ) -> admin_pb2.ListNodesResponse:
        return admin_pb2.ListNodesResponse(
            nodes=[self.cluster.summary(record) for record in self.cluster.nodes()]
        )

    async def GetNode(
        self, request: admin_pb2.GetNodeRequest, context: grpc.aio.ServicerContext
    ) -> admin_pb2.NodeDetail:
        record = await self._node(request.name, context)
        certificates = self.cluster.store.active_certificates(record.name, self.cluster.clock())
        detail = admin_pb2.NodeDetail(
            summary=self.cluster.summary(record),
            hardware=self.cluster.hardware(record),
            recent_metrics=self.cluster.history.recent(
                record.name, request.recent_metrics or DEFAULT_RECENT_METRICS
            ),
        )
        if certificates:
            detail.certificate_serial = certificates[0].serial
            detail.certificate_not_after = certificates[0].not_after
        return detail

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
        self.cluster.store.update_labels(record.name, to_set, list(request.remove))
        log.info("node labelled", node=record.name, set=to_set, removed=list(request.remove))
        updated = self.cluster.refresh_node(record.name)
        assert updated is not None
        return self.cluster.summary(updated)

    async def RemoveNode(
        self, request: admin_pb2.RemoveNodeRequest, context: grpc.aio.ServicerContext
    ) -> admin_pb2.RemoveNodeResponse:
        record = await self._node(request.name, context)
        serials, session_closed = self.cluster.remove_node(record.name)
        log.info("node removed", node=record.name, revoked=serials, session_closed=session_closed)
        return admin_pb2.RemoveNodeResponse(
            name=record.name, revoked_serials=serials, session_closed=session_closed
        )

    async def Apply(
        self, request: admin_pb2.ApplyRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[admin_pb2.ApplyEvent]:
        try:
            steps = plan(parse_spec(request.documents), self._inventory())
        except (SpecError, PlanError) as error:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(error))
        if self.cluster.apply_lock.locked():
            await context.abort(
                grpc.StatusCode.FAILED_PRECONDITION, "another apply is running; try again when it ends"
            )
        events: asyncio.Queue[admin_pb2.ApplyEvent | None] = asyncio.Queue()
        run = ApplyRun(
            dispatch=self.cluster.dispatch,
            emit=events.put,
            record=lambda record: self.cluster.store.record_action(
                record.action_id, record.node, record.started_at, record.SerializeToString()
            ),
            dry_run=request.dry_run,
            requested_by=request.requested_by[:128] or context.peer(),
            clock=self.cluster.clock,
        )
        log.info(
            "apply", apply_id=run.apply_id, steps=len(steps), dry_run=request.dry_run, by=run.requested_by
        )
        for step in steps:
            yield admin_pb2.ApplyEvent(
                planned=admin_pb2.PlannedStep(
                    step=step.id, node=step.node, kind=step.kind, requires=step.requires
                )
            )

        async def carry_out() -> None:
            async with self.cluster.apply_lock:
                try:
                    summary = await run.run(steps)
                    await events.put(admin_pb2.ApplyEvent(summary=summary))
                finally:
                    await events.put(None)

        # The apply runs to its end even if coordctl goes away: actions already sent must be
        # followed and recorded.
        task = asyncio.create_task(carry_out())
        self._applies.add(task)
        task.add_done_callback(self._applies.discard)
        while (event := await events.get()) is not None:
            yield event
        await task

    def _inventory(self) -> list[NodeView]:
        views = []
        for record in self.cluster.nodes():
            session = self.cluster.sessions.get(record.name)
            views.append(
                NodeView(
                    name=record.name,
                    labels=record.labels,
                    arch=self.cluster.hardware(record).arch,
                    address=session.address if session else "",
                )
            )
        return views

    async def ListActions(
        self, request: admin_pb2.ListActionsRequest, context: grpc.aio.ServicerContext
    ) -> admin_pb2.ListActionsResponse:
        if request.node:
            await self._node(request.node, context)
        records = self.cluster.store.list_actions(request.node or None, min(request.limit or 50, 1000))
        return admin_pb2.ListActionsResponse(actions=[admin_pb2.ActionRecord.FromString(r) for r in records])

    async def Top(
        self, request: admin_pb2.TopRequest, context: grpc.aio.ServicerContext
    ) -> admin_pb2.TopResponse:
        rows = [
            self.cluster.history.top(
                record.name,
                STATUS_TO_WIRE[self.cluster.status(record.name)],
                self.cluster.hardware(record).cpu_cores,
            )
            for record in self.cluster.nodes()
        ]
        return admin_pb2.TopResponse(rows=rows)

"""Enrollment: a bootstrap token and a CSR in, a client certificate for the node out."""

from __future__ import annotations

from typing import NoReturn

import grpc
import structlog

from picoord.common.defaults import COORDINATOR_SERVER_NAME
from picoord.common.names import InvalidName, validate_labels, validate_node_name
from picoord.common.pki import certificate_not_after
from picoord.common.tokens import BootstrapToken, InvalidToken
from picoord.coordinator.ca import ClusterCA, CsrRejected, certificate_pem
from picoord.coordinator.cluster import Cluster
from picoord.coordinator.servicers.faults import unavailable_on_store_fault
from picoord.coordinator.servicers.peers import certificate_serial
from picoord.coordinator.store import CertificateRecord, EnrollmentConflict
from picoord.coordinator.tokens import TokenRefused, check_token
from picoord.v1 import agent_pb2, agent_pb2_grpc

log = structlog.get_logger("picoord.coordinator.enrollment")

MAX_CSR_BYTES = 16 * 1024


class EnrollmentServicer(agent_pb2_grpc.EnrollmentServicer):
    def __init__(self, cluster: Cluster, ca: ClusterCA) -> None:
        self.cluster = cluster
        self.ca = ca

    async def _refuse(
        self, context: grpc.aio.ServicerContext, code: grpc.StatusCode, why: str, node: str
    ) -> NoReturn:
        self.cluster.counters.enrollments_refused += 1
        log.warning("enrollment refused", node=node, reason=why, peer=context.peer())
        await context.abort(code, why)
        raise AssertionError("context.abort always raises")

    @unavailable_on_store_fault
    async def Enroll(
        self, request: agent_pb2.EnrollRequest, context: grpc.aio.ServicerContext
    ) -> agent_pb2.EnrollResponse:
        node = request.node_name
        try:
            token = BootstrapToken.parse(request.token)
            validate_node_name(node)
            labels = validate_labels(dict(request.labels))
        except (InvalidToken, InvalidName) as error:
            await self._refuse(context, grpc.StatusCode.INVALID_ARGUMENT, str(error), node)
        if node == COORDINATOR_SERVER_NAME:
            await self._refuse(
                context, grpc.StatusCode.INVALID_ARGUMENT, f"{node!r} is reserved for the coordinator", node
            )
        if len(request.csr_pem) > MAX_CSR_BYTES:
            await self._refuse(context, grpc.StatusCode.INVALID_ARGUMENT, "the CSR is too large", node)
        now = self.cluster.clock()
        try:
            check_token(token, await self.cluster.token(token.token_id), now)
        except TokenRefused as error:
            await self._refuse(context, grpc.StatusCode.UNAUTHENTICATED, str(error), node)
        try:
            certificate = self.ca.sign_node_csr(request.csr_pem, node)
        except CsrRejected as error:
            await self._refuse(context, grpc.StatusCode.INVALID_ARGUMENT, str(error), node)
        record = CertificateRecord(
            serial=certificate_serial(certificate),
            node=node,
            issued_at=now,
            not_after=certificate_not_after(certificate).timestamp(),
            revoked_at=None,
        )
        try:
            await self.cluster.enroll(token.token_id, node, labels, record, now)
        except EnrollmentConflict as error:
            await self._refuse(context, grpc.StatusCode.ALREADY_EXISTS, str(error), node)
        self.cluster.counters.enrollments += 1
        log.info("node enrolled", node=node, token_id=token.token_id, serial=record.serial)
        return agent_pb2.EnrollResponse(
            node_name=node,
            certificate_pem=certificate_pem(certificate),
            ca_certificate_pem=self.ca.certificate_pem,
        )

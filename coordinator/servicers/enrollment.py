"""Enrollment: a bootstrap token and a CSR in, a client certificate for the node out."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import NoReturn

import grpc
import structlog

from picoord.common import limits
from picoord.common.defaults import COORDINATOR_SERVER_NAME
from picoord.common.logs import LogThrottle, clipped
from picoord.common.names import InvalidName, validate_labels, validate_node_name
from picoord.common.tokens import BootstrapToken, InvalidToken
from picoord.coordinator.ca import ClusterCA, CsrRejected, certificate_pem, certificate_record
from picoord.coordinator.cluster import Cluster
from picoord.coordinator.rate_limit import FailureThrottle, retry_hint, source_of_peer
from picoord.coordinator.servicers.faults import unavailable_on_store_fault
from picoord.coordinator.store import EnrollmentConflict
from picoord.coordinator.tokens import TokenRefused, check_token
from picoord.v1 import agent_pb2, agent_pb2_grpc

log = structlog.get_logger("picoord.coordinator.enrollment")

MAX_CSR_BYTES = limits.CSR_BYTES
MAX_TOKEN_CHARS = limits.BOOTSTRAP_TOKEN
MAX_NODE_NAME_CHARS = limits.NODE_NAME
MAX_LABELS = limits.LABELS
MAX_LABEL_KEY_CHARS = limits.LABEL_KEY
MAX_LABEL_VALUE_CHARS = limits.LABEL_VALUE
LOG_VALUE_CHARS = 64  # the most of any client-sent value a log line carries
LOG_REFUSALS_EVERY_SECONDS = 10.0  # per source address: a storm is one line with a count


def oversized_field(request: agent_pb2.EnrollRequest) -> str | None:
    """What is too large in an enrollment request, checked before anything else reads it.

    Names the field, never quotes it: a refusal must not echo a megabyte back or into the log."""
    sizes = (
        ("token", len(request.token), MAX_TOKEN_CHARS, "characters"),
        ("node_name", len(request.node_name), MAX_NODE_NAME_CHARS, "characters"),
        ("labels", len(request.labels), MAX_LABELS, "entries"),
        ("csr_pem", len(request.csr_pem), MAX_CSR_BYTES, "bytes"),
    )
    for name, size, limit, unit in sizes:
        if size > limit:
            return f"{name} is too large ({size} {unit}, at most {limit})"
    for key, value in request.labels.items():
        if len(key) > MAX_LABEL_KEY_CHARS:
            return f"a label key is too long ({len(key)} characters, at most {MAX_LABEL_KEY_CHARS})"
        if len(value) > MAX_LABEL_VALUE_CHARS:
            return (
                f"the value of label {clipped(key, LOG_VALUE_CHARS)!r} is too long "
                f"({len(value)} characters, at most {MAX_LABEL_VALUE_CHARS})"
            )
    return None


class EnrollmentServicer(agent_pb2_grpc.EnrollmentServicer):
    def __init__(
        self,
        cluster: Cluster,
        ca: ClusterCA,
        throttle: FailureThrottle | None = None,
        monotonic: Callable[[], float] = time.monotonic,
    ) -> None:
        self.cluster = cluster
        self.ca = ca
        self.throttle = throttle if throttle is not None else FailureThrottle()  # empty is falsy
        self.monotonic = monotonic
        self._log_throttle = LogThrottle(every=LOG_REFUSALS_EVERY_SECONDS)

    def _log_refusal(self, event: str, source: str, **fields: object) -> None:
        """One line per source every LOG_REFUSALS_EVERY_SECONDS; the lines held back are counted."""
        admitted, held = self._log_throttle.admit(source, self.monotonic())
        if admitted:
            log.warning(event, source=source, held_back=held, **fields)

    async def _refuse(
        self, context: grpc.aio.ServicerContext, code: grpc.StatusCode, why: str, node: str, source: str
    ) -> NoReturn:
        self.cluster.count_enrollment("refused")
        if self.throttle.failed(source, self.monotonic()):
            policy = self.throttle.policy
            log.warning(
                "enrollment source throttled",
                source=source,
                failures=policy.max_failures,
                window_seconds=policy.window,
                ban_seconds=policy.ban,
            )
        self._log_refusal(
            "enrollment refused",
            source,
            node=clipped(node, LOG_VALUE_CHARS),
            reason=clipped(why, 4 * LOG_VALUE_CHARS),
        )
        await context.abort(code, why)
        raise AssertionError("context.abort always raises")

    async def _refuse_throttled(
        self, context: grpc.aio.ServicerContext, source: str, wait: float
    ) -> NoReturn:
        self.cluster.count_enrollment("throttled")
        self._log_refusal("enrollment throttled", source, retry_after_seconds=round(wait))
        await context.abort(
            grpc.StatusCode.RESOURCE_EXHAUSTED,
            f"too many failed enrollments from {source}; {retry_hint(wait)}",
        )
        raise AssertionError("context.abort always raises")

    @unavailable_on_store_fault
    async def Enroll(
        self, request: agent_pb2.EnrollRequest, context: grpc.aio.ServicerContext
    ) -> agent_pb2.EnrollResponse:
        source = source_of_peer(context.peer())
        wait = self.throttle.retry_after(source, self.monotonic())
        if wait > 0:  # refused before the token is looked at: guessing gains nothing here
            await self._refuse_throttled(context, source, wait)
        node = request.node_name
        too_large = oversized_field(request)
        if too_large:
            await self._refuse(context, grpc.StatusCode.INVALID_ARGUMENT, too_large, node, source)
        try:
            token = BootstrapToken.parse(request.token)
            validate_node_name(node)
            labels = validate_labels(dict(request.labels))
        except (InvalidToken, InvalidName) as error:
            await self._refuse(context, grpc.StatusCode.INVALID_ARGUMENT, str(error), node, source)
        if node == COORDINATOR_SERVER_NAME:
            await self._refuse(
                context,
                grpc.StatusCode.INVALID_ARGUMENT,
                f"{node!r} is reserved for the coordinator",
                node,
                source,
            )
        now = self.cluster.clock()
        try:
            check_token(token, await self.cluster.token(token.token_id), now)
        except TokenRefused as error:
            await self._refuse(context, grpc.StatusCode.UNAUTHENTICATED, str(error), node, source)
        try:  # ECDSA signing takes milliseconds: off the loop every session shares
            certificate = await asyncio.to_thread(self.ca.sign_node_csr, request.csr_pem, node)
        except CsrRejected as error:
            await self._refuse(context, grpc.StatusCode.INVALID_ARGUMENT, str(error), node, source)
        record = certificate_record(certificate, node, now)
        try:
            await self.cluster.enroll(token.token_id, node, labels, record, now)
        except EnrollmentConflict as error:
            await self._refuse(context, grpc.StatusCode.ALREADY_EXISTS, str(error), node, source)
        self.throttle.succeeded(source)
        self.cluster.count_enrollment("enrolled")
        log.info("node enrolled", node=node, token_id=token.token_id, serial=record.serial, source=source)
        return agent_pb2.EnrollResponse(
            node_name=node,
            certificate_pem=certificate_pem(certificate),
            ca_certificate_pem=self.ca.certificate_pem,
        )

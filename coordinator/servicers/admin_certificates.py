"""Remote operators' certificates: issued on the coordinator's host, listed, revoked.

An admin certificate names `admin:NAME` in the admins group and is recorded in its own
table, apart from node certificates: the admin listener's guard looks every call's serial
up there (see peers.admin_refusal), so a revocation takes effect at the next call.
"""

from __future__ import annotations

import asyncio
import datetime as dt

import grpc
import structlog

from picoord.common.defaults import COORDINATOR_SERVER_NAME
from picoord.common.durations import iso_utc
from picoord.common.names import InvalidName, validate_node_name
from picoord.common.pki import certificate_not_after
from picoord.coordinator.ca import (
    ClusterCA,
    certificate_pem,
    certificate_serial,
    certificate_state,
    new_private_key,
    private_key_pem,
)
from picoord.coordinator.cluster import Cluster
from picoord.coordinator.servicers.faults import unavailable_on_store_fault
from picoord.coordinator.servicers.peers import operator_identity
from picoord.coordinator.store import AdminCertificateRecord, AdminNameTaken
from picoord.v1 import admin_pb2, admin_pb2_grpc

log = structlog.get_logger("picoord.coordinator.admins")

DEFAULT_ADMIN_VALIDITY = 90 * 86400.0
MIN_ADMIN_VALIDITY = 5.0  # short lives are for tests of expiry
MAX_ADMIN_VALIDITY = 3650 * 86400.0
# Issuing mints a new way in: only a root process on the coordinator's host may do it.
LOCAL_ONLY_METHODS = frozenset({"IssueAdmin"})
LISTENER_OFF = (
    "the admin listener is off, so a bundle would have no address to dial: set admin_listen "
    '(e.g. "0.0.0.0:7445") in /etc/picoord/coordinator.toml or pass --admin-listen, restart the '
    "coordinator, then issue again"
)


def validity_refusal(seconds: float) -> str | None:
    """Why an admin certificate life is refused, or None (0 means the default)."""
    if seconds == 0 or MIN_ADMIN_VALIDITY <= seconds <= MAX_ADMIN_VALIDITY:
        return None
    return "validity must be between 5s and 3650d"


def admin_certificate_wire(record: AdminCertificateRecord, now: float) -> admin_pb2.AdminCertificate:
    return admin_pb2.AdminCertificate(
        name=record.name,
        serial=record.serial,
        issued_at=record.issued_at,
        not_after=record.not_after,
        revoked_at=record.revoked_at or 0.0,
        state=certificate_state(record.not_after, record.revoked_at, now).wire,
        issued_by=record.issued_by,
    )


class AdminCertificatesServicer(admin_pb2_grpc.AdminCertificatesServicer):
    def __init__(self, cluster: Cluster, ca: ClusterCA, admin_address: str) -> None:
        self.cluster = cluster
        self.ca = ca
        self.admin_address = admin_address  # HOST:PORT remote admins dial; empty: listener off

    async def _name(self, name: str, context: grpc.aio.ServicerContext) -> str:
        try:
            return validate_node_name(name)
        except InvalidName as error:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"admin name: {error}")
            raise AssertionError("unreachable") from error

    @unavailable_on_store_fault
    async def IssueAdmin(
        self, request: admin_pb2.IssueAdminRequest, context: grpc.aio.ServicerContext
    ) -> admin_pb2.IssueAdminResponse:
        name = await self._name(request.name, context)
        refusal = validity_refusal(request.validity_seconds)
        if refusal is not None:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, refusal)
        if not self.admin_address:
            await context.abort(grpc.StatusCode.FAILED_PRECONDITION, LISTENER_OFF)
        validity = dt.timedelta(seconds=request.validity_seconds or DEFAULT_ADMIN_VALIDITY)
        key = new_private_key()
        certificate = await asyncio.to_thread(self.ca.sign_admin_key, key.public_key(), name, validity)
        record = AdminCertificateRecord(
            serial=certificate_serial(certificate),
            name=name,
            issued_at=self.cluster.clock(),
            not_after=certificate_not_after(certificate).timestamp(),
            revoked_at=None,
            issued_by=operator_identity(context),
        )
        try:
            await self.cluster.add_admin_certificate(record)
        except AdminNameTaken as error:
            await context.abort(
                grpc.StatusCode.ALREADY_EXISTS,
                f"{error}: revoke it first (coordctl admin revoke {name}) or choose another name",
            )
        log.info(
            "admin certificate issued",
            admin=name,
            serial=record.serial,
            not_after=iso_utc(record.not_after),
            by=record.issued_by,
        )
        return admin_pb2.IssueAdminResponse(
            name=name,
            serial=record.serial,
            certificate_pem=certificate_pem(certificate),
            key_pem=private_key_pem(key),
            ca_certificate_pem=self.ca.certificate_pem,
            address=self.admin_address,
            server_name=COORDINATOR_SERVER_NAME,
            not_after=record.not_after,
        )

    @unavailable_on_store_fault
    async def ListAdmins(
        self, request: admin_pb2.ListAdminsRequest, context: grpc.aio.ServicerContext
    ) -> admin_pb2.ListAdminsResponse:
        now = self.cluster.clock()
        records = await self.cluster.admin_certificates()
        return admin_pb2.ListAdminsResponse(
            admins=[admin_certificate_wire(record, now) for record in records], now=now
        )

    @unavailable_on_store_fault
    async def RevokeAdmin(
        self, request: admin_pb2.RevokeAdminRequest, context: grpc.aio.ServicerContext
    ) -> admin_pb2.RevokeAdminResponse:
        name = await self._name(request.name, context)
        known = {record.name for record in await self.cluster.admin_certificates()}
        if name not in known:
            await context.abort(
                grpc.StatusCode.NOT_FOUND, f"no admin named {name!r} (see coordctl admin list)"
            )
        serials = await self.cluster.revoke_admin(name)
        log.info("admin certificate revoked", admin=name, serials=serials, by=operator_identity(context))
        return admin_pb2.RevokeAdminResponse(name=name, revoked_serials=serials)

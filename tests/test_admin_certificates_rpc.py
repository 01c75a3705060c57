"""The AdminCertificates API without coordctl in front: a real gRPC server behind the admin
socket's relay, the real servicer, cluster and SQLite store. Bad input is refused, names
the field, and records nothing."""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest
from cryptography import x509

from picoord.common.addresses import grpc_unix_address
from picoord.coordinator.ca import ADMIN_ORGANIZATION, ClusterCA
from picoord.coordinator.cluster import Cluster
from picoord.coordinator.main import start_admin_server
from picoord.coordinator.servicers.admin_certificates import LOCAL_ONLY_METHODS, AdminCertificatesServicer
from picoord.coordinator.servicers.cluster_admin import AdminServicer
from picoord.coordinator.servicers.peers import AdminGate, restrict_to_operators
from picoord.coordinator.status import StatusTimeouts
from picoord.coordinator.store import Store
from picoord.coordinator.telemetry import MetricsHistory
from picoord.v1 import admin_pb2, admin_pb2_grpc


@dataclass
class Served:
    cluster: Cluster
    stub: admin_pb2_grpc.AdminCertificatesStub


async def _serve(tmp_path: Path, admin_address: str) -> AsyncIterator[Served]:
    store = Store(tmp_path / "state.db")
    cluster = Cluster(store, StatusTimeouts(), MetricsHistory(4))
    ca = ClusterCA.load_or_create(tmp_path, ["localhost"])
    gate = AdminGate(cluster.admin_certificate, cluster.clock)
    admin = restrict_to_operators(
        AdminServicer(cluster, ca, "localhost:7443", None),
        admin_pb2.DESCRIPTOR.services_by_name["Admin"],
        gate,
    )
    identities = restrict_to_operators(
        AdminCertificatesServicer(cluster, ca, admin_address),
        admin_pb2.DESCRIPTOR.services_by_name["AdminCertificates"],
        gate,
        LOCAL_ONLY_METHODS,
    )
    socket = tmp_path / "admin.sock"
    server, relay = await start_admin_server(admin, socket, identities=identities)
    channel = grpc.aio.insecure_channel(grpc_unix_address(socket))
    try:
        yield Served(cluster, admin_pb2_grpc.AdminCertificatesStub(channel))
    finally:
        await channel.close()
        await relay.close()
        await server.stop(grace=None)
        store.close()


@pytest.fixture
async def served(tmp_path: Path) -> AsyncIterator[Served]:
    async for value in _serve(tmp_path, "desktop:7445"):
        yield value


async def test_issue_list_revoke(served: Served) -> None:
    reply = await served.stub.IssueAdmin(
        admin_pb2.IssueAdminRequest(name="macbook", validity_seconds=3600), timeout=10
    )
    certificate = x509.load_pem_x509_certificate(reply.certificate_pem)
    subject = {attribute.oid._name: attribute.value for attribute in certificate.subject}
    assert subject == {"organizationName": ADMIN_ORGANIZATION, "commonName": "admin:macbook"}
    assert (reply.address, reply.server_name) == ("desktop:7445", "picoord-coordinator")
    assert 3500 < reply.not_after - served.cluster.clock() <= 3600
    assert reply.key_pem.startswith(b"-----BEGIN PRIVATE KEY-----")

    listed = await served.stub.ListAdmins(admin_pb2.ListAdminsRequest(), timeout=10)
    [admin] = listed.admins
    assert (admin.name, admin.serial, admin.state) == (
        "macbook",
        reply.serial,
        admin_pb2.CERTIFICATE_STATE_VALID,
    )
    assert admin.issued_by.startswith("root (uid 0")
    assert served.cluster.node("macbook") is None  # an admin is no node

    revoked = await served.stub.RevokeAdmin(admin_pb2.RevokeAdminRequest(name="macbook"), timeout=10)
    assert list(revoked.revoked_serials) == [reply.serial]
    listed = await served.stub.ListAdmins(admin_pb2.ListAdminsRequest(), timeout=10)
    assert listed.admins[0].state == admin_pb2.CERTIFICATE_STATE_REVOKED


@pytest.mark.parametrize(
    ("request_message", "code", "named"),
    [
        (admin_pb2.IssueAdminRequest(name="Mac Book"), grpc.StatusCode.INVALID_ARGUMENT, "admin name"),
        (admin_pb2.IssueAdminRequest(name=""), grpc.StatusCode.INVALID_ARGUMENT, "admin name"),
        (
            admin_pb2.IssueAdminRequest(name="mac", validity_seconds=1),
            grpc.StatusCode.INVALID_ARGUMENT,
            "validity must be between",
        ),
        (
            admin_pb2.IssueAdminRequest(name="mac", validity_seconds=4000 * 86400),
            grpc.StatusCode.INVALID_ARGUMENT,
            "validity must be between",
        ),
    ],
)
async def test_bad_issue_requests_are_refused_and_record_nothing(
    served: Served, request_message: admin_pb2.IssueAdminRequest, code: grpc.StatusCode, named: str
) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await served.stub.IssueAdmin(request_message, timeout=10)
    assert refused.value.code() == code and named in refused.value.details()
    assert list((await served.stub.ListAdmins(admin_pb2.ListAdminsRequest(), timeout=10)).admins) == []


async def test_a_name_in_use_is_not_issued_twice(served: Served) -> None:
    first = await served.stub.IssueAdmin(admin_pb2.IssueAdminRequest(name="macbook"), timeout=10)
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await served.stub.IssueAdmin(admin_pb2.IssueAdminRequest(name="macbook"), timeout=10)
    assert refused.value.code() == grpc.StatusCode.ALREADY_EXISTS
    assert (
        first.serial in refused.value.details() and "coordctl admin revoke macbook" in refused.value.details()
    )
    assert len((await served.stub.ListAdmins(admin_pb2.ListAdminsRequest(), timeout=10)).admins) == 1


async def test_revoking_an_unknown_admin_is_not_found(served: Served) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await served.stub.RevokeAdmin(admin_pb2.RevokeAdminRequest(name="nobody"), timeout=10)
    assert refused.value.code() == grpc.StatusCode.NOT_FOUND and "nobody" in refused.value.details()


async def test_issue_needs_the_admin_listener(tmp_path: Path) -> None:
    async for served in _serve(tmp_path, ""):
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await served.stub.IssueAdmin(admin_pb2.IssueAdminRequest(name="macbook"), timeout=10)
        assert refused.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        assert "admin_listen" in refused.value.details()
        assert list((await served.stub.ListAdmins(admin_pb2.ListAdminsRequest(), timeout=10)).admins) == []

"""Who is on the other end of a call: a node (by its client certificate), or an operator."""

from __future__ import annotations

from dataclasses import dataclass

import grpc
from cryptography import x509
from cryptography.x509.oid import NameOID

from picoord.coordinator.ca import ADMIN_ORGANIZATION


@dataclass(frozen=True)
class CertifiedPeer:
    common_name: str
    serial: str
    organizations: tuple[str, ...]


def certificate_serial(certificate: x509.Certificate) -> str:
    return format(certificate.serial_number, "x")


def certified_peer(context: grpc.aio.ServicerContext) -> CertifiedPeer | None:
    """The verified client certificate of this call, or None when the call presented none.

    gRPC only puts a certificate here after verifying it against the cluster CA.
    """
    pem = context.auth_context().get("x509_pem_cert")
    if not pem:
        return None
    certificate = x509.load_pem_x509_certificate(pem[0])
    names = certificate.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    organizations = certificate.subject.get_attributes_for_oid(NameOID.ORGANIZATION_NAME)
    return CertifiedPeer(
        common_name=str(names[0].value) if names else "",
        serial=certificate_serial(certificate),
        organizations=tuple(str(attribute.value) for attribute in organizations),
    )


def is_operator(context: grpc.aio.ServicerContext) -> bool:
    """The admin API is for the root-only unix socket, or a certificate of the admins group."""
    if context.peer().startswith("unix:"):
        return True
    peer = certified_peer(context)
    return peer is not None and ADMIN_ORGANIZATION in peer.organizations

"""Who is on the other end of a call: a node (by its client certificate), or an operator."""

from __future__ import annotations

import functools
import inspect
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any, TypeVar

import grpc
from cryptography import x509
from cryptography.x509.oid import NameOID
from google.protobuf.descriptor import ServiceDescriptor

from picoord.coordinator.ca import ADMIN_ORGANIZATION, certificate_serial

T = TypeVar("T")


@dataclass(frozen=True)
class CertifiedPeer:
    common_name: str
    serial: str
    organizations: tuple[str, ...]


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


OPERATORS_ONLY = "the admin API is only for operators: use coordctl on the coordinator's host (as root)"


def restrict_to_operators(servicer: T, service: ServiceDescriptor) -> T:
    """Guard every RPC of `service` on `servicer`, so none can be forgotten.

    The admin service shares the gRPC server with the agent ports (the design's one
    server), so without this an enrolled node, or anyone on the enrollment port, could
    create tokens or remove nodes."""
    for method in service.methods:
        handler = getattr(servicer, method.name)
        setattr(servicer, method.name, _guarded(handler))
    return servicer


def _guarded(handler: Callable[..., Any]) -> Callable[..., Any]:
    if inspect.isasyncgenfunction(handler):

        @functools.wraps(handler)
        async def stream(request: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
            if not is_operator(context):
                await context.abort(grpc.StatusCode.PERMISSION_DENIED, OPERATORS_ONLY)
            async for item in handler(request, context):
                yield item

        return stream

    @functools.wraps(handler)
    async def unary(request: Any, context: grpc.aio.ServicerContext) -> Any:
        if not is_operator(context):
            await context.abort(grpc.StatusCode.PERMISSION_DENIED, OPERATORS_ONLY)
        return await handler(request, context)

    return unary

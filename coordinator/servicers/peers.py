"""Who is on the other end of a call: a node (by its client certificate), or an operator."""

from __future__ import annotations

import functools
import inspect
import pwd
import urllib.parse
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import grpc
from cryptography import x509
from cryptography.x509.oid import NameOID
from google.protobuf.descriptor import ServiceDescriptor

from picoord.common.logs import clipped
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


UNSET_LOGINUID = 4294967295  # (uid_t)-1: the process was not started from a login session


@dataclass(frozen=True)
class LocalOperator:
    """A process on the coordinator's host, as the kernel named it (SO_PEERCRED) when it
    connected to the admin socket: not what the client says about itself."""

    uid: int
    pid: int
    user: str
    login: str | None = None  # who logged in, behind sudo or su (/proc/PID/loginuid)

    def describe(self) -> str:
        login = f", login {self.login}" if self.login else ""
        return f"{self.user} (uid {self.uid}, pid {self.pid}{login})"


def user_name(uid: int) -> str:
    try:
        return pwd.getpwuid(uid).pw_name
    except KeyError:
        return str(uid)


def login_of(loginuid_text: str) -> str | None:
    """The login user from /proc/PID/loginuid's text; None when unset or unreadable."""
    try:
        uid = int(loginuid_text.strip())
    except ValueError:
        return None
    return None if uid in (UNSET_LOGINUID, -1) else user_name(uid)


def local_operator(pid: int, uid: int, proc: Path = Path("/proc")) -> LocalOperator:
    """Name the process behind a socket peer's credentials (blocking: NSS, /proc)."""
    try:
        loginuid = (proc / str(pid) / "loginuid").read_text()
    except OSError:
        loginuid = ""
    return LocalOperator(uid=uid, pid=pid, user=user_name(uid), login=login_of(loginuid))


class LocalOperators:
    """Connections the admin relay accepted, by the peer name gRPC gives their relayed
    connection (`unix:<private dir>/c<n>`), registered before the relay connects.

    A call whose peer is not registered came to the private socket some other way and is
    no operator's."""

    def __init__(self) -> None:
        self._by_peer: dict[str, LocalOperator] = {}

    def __len__(self) -> int:
        return len(self._by_peer)

    def register(self, peer: str, operator: LocalOperator) -> None:
        self._by_peer[peer] = operator

    def forget(self, peer: str) -> None:
        self._by_peer.pop(peer, None)

    def lookup(self, peer: str) -> LocalOperator | None:
        # Newer gRPC percent-encodes the path in peer names (a space is %20), older gRPC
        # does not: both spellings name the same socket in the relay's root-only directory.
        return self._by_peer.get(peer) or self._by_peer.get(urllib.parse.unquote(peer))


# One per process, like the admin socket it describes: the relay fills it, the admin
# servicer's guard and operator_identity read it.
LOCAL_OPERATORS = LocalOperators()


def is_operator(context: grpc.aio.ServicerContext) -> bool:
    """The admin API is for processes on the root-only admin socket (as the relay saw
    them), or for a certificate of the admins group."""
    if LOCAL_OPERATORS.lookup(context.peer()) is not None:
        return True
    peer = certified_peer(context)
    return peer is not None and ADMIN_ORGANIZATION in peer.organizations


def operator_identity(context: grpc.aio.ServicerContext) -> str:
    """Who is calling, from what the kernel or the TLS handshake proved: for history
    records such as `requested_by`, e.g. "root (uid 0, pid 1234, login alice)"."""
    local = LOCAL_OPERATORS.lookup(context.peer())
    if local is not None:
        return local.describe()
    peer = certified_peer(context)
    if peer is not None:
        return f"{clipped(peer.common_name, 64)} (certificate {peer.serial})"
    return f"unverified peer {clipped(context.peer(), 64)}"


OPERATORS_ONLY = "the admin API is only for operators: use coordctl on the coordinator's host (as root)"


def restrict_to_operators(servicer: T, service: ServiceDescriptor) -> T:
    """Guard every RPC of `service` on `servicer`, so none can be forgotten.

    The admin service is also served on the agent ports (for admins-group certificates),
    and its private socket could be reached without the relay, so without this an
    enrolled node, or anyone on the enrollment port, could create tokens or remove nodes."""
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

"""Who is on the other end of a call: a node (by its client certificate), or an operator."""

from __future__ import annotations

import functools
import inspect
import pwd
import urllib.parse
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import grpc
from cryptography import x509
from cryptography.x509.oid import NameOID
from google.protobuf.descriptor import ServiceDescriptor

from picoord.common.logs import clipped
from picoord.coordinator.ca import ADMIN_ORGANIZATION, ADMIN_PREFIX, certificate_serial
from picoord.coordinator.store import AdminCertificateRecord, StateUnavailable

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
    no operator's. The relay writes it on the event loop and the admin server's threads
    read it: each method is one dict operation, which the GIL makes atomic."""

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


def is_local_operator(context: grpc.ServicerContext | grpc.aio.ServicerContext) -> bool:
    """The caller came through the root-only admin socket (the relay named it)."""
    return LOCAL_OPERATORS.lookup(context.peer()) is not None


def is_operator(context: grpc.aio.ServicerContext) -> bool:
    """The admin API is for processes on the root-only admin socket (as the relay saw
    them), or for a certificate of the admins group (checked further by `admin_refusal`)."""
    if is_local_operator(context):
        return True
    peer = certified_peer(context)
    return peer is not None and ADMIN_ORGANIZATION in peer.organizations


def peer_address(peer: str) -> str:
    """HOST:PORT from gRPC's peer name (ipv4:10.0.0.5:51234, ipv6:[::1]:51234)."""
    kind, _, address = peer.partition(":")
    return urllib.parse.unquote(address) if kind in ("ipv4", "ipv6") and address else peer


def operator_identity(context: grpc.aio.ServicerContext) -> str:
    """Who is calling, from what the kernel or the TLS handshake proved: for history
    records such as `requested_by`, e.g. "root (uid 0, pid 1234, login alice)" or
    "admin:macbook (cert 1f2e..., from 192.168.1.20:51234)"."""
    local = LOCAL_OPERATORS.lookup(context.peer())
    if local is not None:
        return local.describe()
    peer = certified_peer(context)
    if peer is not None:
        address = clipped(peer_address(context.peer()), 64)
        return f"{clipped(peer.common_name, 64)} (cert {peer.serial}, from {address})"
    return f"unverified peer {clipped(context.peer(), 64)}"


OPERATORS_ONLY = "the admin API is only for operators: use coordctl on the coordinator's host (as root)"
LOCAL_ONLY = (
    "this call is only for the coordinator's host: run coordctl there, as root, over its admin socket"
)
NOT_AN_ADMIN = (
    "the admin API is only for operators: certificate {serial} is not an admin certificate "
    "(node certificates never open it); "
    "issue one with `coordctl admin issue NAME` on the coordinator's host"
)
UNKNOWN_ADMIN = (
    "certificate {serial} ({name}) is not on record as an admin certificate of this coordinator: "
    "issue one with `coordctl admin issue NAME` on the coordinator's host"
)
REVOKED_ADMIN = (
    "the admin certificate of {name} (serial {serial}) is revoked: ask for a new one "
    "(`coordctl admin issue {name}` on the coordinator's host), then `coordctl context add` it"
)
EXPIRED_ADMIN = (
    "the admin certificate of {name} (serial {serial}) expired: ask for a new one "
    "(`coordctl admin issue {name}` on the coordinator's host), then `coordctl context add` it"
)


def admin_refusal(peer: CertifiedPeer, record: AdminCertificateRecord | None, now: float) -> str | None:
    """Why a call made with this verified certificate is refused, or None to let it through.

    The TLS handshake proved the certificate is the CA's; the store says whether it is an
    admin certificate still in force (revocation takes effect at the next call)."""
    if ADMIN_ORGANIZATION not in peer.organizations or not peer.common_name.startswith(ADMIN_PREFIX):
        return NOT_AN_ADMIN.format(serial=peer.serial)
    if record is None or f"{ADMIN_PREFIX}{record.name}" != peer.common_name:
        return UNKNOWN_ADMIN.format(serial=peer.serial, name=clipped(peer.common_name, 64))
    if record.revoked_at is not None:
        return REVOKED_ADMIN.format(name=record.name, serial=record.serial)
    if now >= record.not_after:
        return EXPIRED_ADMIN.format(name=record.name, serial=record.serial)
    return None


@dataclass(frozen=True)
class AdminGate:
    """How the guard checks admin certificates against the store, at every call."""

    lookup: Callable[[str], Awaitable[AdminCertificateRecord | None]]
    clock: Callable[[], float]


async def call_refusal(
    context: grpc.aio.ServicerContext, gate: AdminGate | None, local_only: bool
) -> tuple[grpc.StatusCode, str] | None:
    """Why this call may not run, or None. Local operators pass; a certificate passes only
    with a gate that finds it an admin certificate in force, and never for local-only calls."""
    if is_local_operator(context):
        return None
    peer = certified_peer(context)
    if peer is None or gate is None:
        return grpc.StatusCode.PERMISSION_DENIED, OPERATORS_ONLY
    if local_only:
        return grpc.StatusCode.PERMISSION_DENIED, LOCAL_ONLY
    try:
        record = await gate.lookup(peer.serial)
    except StateUnavailable as error:
        return grpc.StatusCode.UNAVAILABLE, str(error)
    refusal = admin_refusal(peer, record, gate.clock())
    return None if refusal is None else (grpc.StatusCode.PERMISSION_DENIED, refusal)


def restrict_to_operators(
    servicer: T,
    service: ServiceDescriptor,
    gate: AdminGate | None = None,
    local_only: frozenset[str] = frozenset(),
) -> T:
    """Guard every RPC of `service` on `servicer`, so none can be forgotten.

    Its private socket could be reached without the relay, and the admin listener takes
    any certificate of the cluster CA (nodes' too), so without this an enrolled node could
    create tokens or remove nodes. Without a gate, no certificate passes; methods named in
    `local_only` are for the admin socket alone."""
    for method in service.methods:
        handler = getattr(servicer, method.name)
        setattr(servicer, method.name, _guarded(handler, gate, method.name in local_only))
    return servicer


def _guarded(handler: Callable[..., Any], gate: AdminGate | None, local_only: bool) -> Callable[..., Any]:
    if inspect.isasyncgenfunction(handler):

        @functools.wraps(handler)
        async def stream(request: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
            refusal = await call_refusal(context, gate, local_only)
            if refusal is not None:
                await context.abort(*refusal)
            async for item in handler(request, context):
                yield item

        return stream

    @functools.wraps(handler)
    async def unary(request: Any, context: grpc.aio.ServicerContext) -> Any:
        refusal = await call_refusal(context, gate, local_only)
        if refusal is not None:
            await context.abort(*refusal)
        return await handler(request, context)

    return unary

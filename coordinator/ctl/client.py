"""The admin connection: coordctl talks to the coordinator over its root-only unix socket
(on the coordinator's host), or over the remote admin listener with a context's admin
certificate (mutual TLS, from another machine).

Which one: `--context NAME` for one call; else `--admin-socket` or $COORDCTL_ADMIN_SOCKET;
else the current context (`coordctl context use`); else the default admin socket.
"""

from __future__ import annotations

import os
import socket
import ssl
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc

from picoord.common import defaults, limits
from picoord.common.addresses import InvalidAddress, grpc_unix_address, split_host_port
from picoord.coordinator.admin_reads import replica_alive, replica_socket
from picoord.coordinator.ctl.contexts import Bundle, ContextStore, foreign_server_message
from picoord.v1 import admin_pb2_grpc

CALL_TIMEOUT = 10.0
# The read replica answered neither yes nor no: gone (UNAVAILABLE), or not a replica at all.
REPLICA_ABSENT = (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.UNIMPLEMENTED)
PROBE_TIMEOUT = 5.0


class AdminUnavailable(RuntimeError):
    pass


class ConnectionChoiceError(ValueError):
    """Flags that ask for two connections at once, or the wrong one for a verb."""


def admin_socket_path(flag: str | None) -> Path:
    return Path(flag or os.environ.get(defaults.ADMIN_SOCKET_ENV) or defaults.ADMIN_SOCKET)


@dataclass(frozen=True)
class Connection:
    """Where a call goes: the admin socket at `socket_path`, or the context named `context`."""

    socket_path: Path | None = None
    context: str | None = None


def choose_connection(
    socket_flag: str | None,
    environ: Mapping[str, str],
    context_flag: str | None,
    current_context: str | None,
    socket_only: bool = False,
) -> Connection:
    """--context wins (for one call), then --admin-socket or $COORDCTL_ADMIN_SOCKET, then the
    current context, then the default socket. `socket_only` verbs (admin issue) never use
    a context: they run on the coordinator's host."""
    socket_env = environ.get(defaults.ADMIN_SOCKET_ENV)
    if context_flag and socket_flag:
        raise ConnectionChoiceError("give --context or --admin-socket, not both")
    if context_flag:
        if socket_only:
            raise ConnectionChoiceError(
                "this command runs on the coordinator's host, over its admin socket: drop --context"
            )
        return Connection(context=context_flag)
    if socket_flag or socket_env or socket_only or not current_context:
        return Connection(socket_path=Path(socket_flag or socket_env or defaults.ADMIN_SOCKET))
    return Connection(context=current_context)


class AdminClient(admin_pb2_grpc.AdminStub):
    """The Admin stub, with the admin certificates service on the same channel. Given the
    read replica's channel, `ListNodes` and `Top` ask it first (admin_replica.py)."""

    def __init__(self, channel: grpc.Channel, replica: grpc.Channel | None = None) -> None:
        super().__init__(channel)
        self.certificates = admin_pb2_grpc.AdminCertificatesStub(channel)
        if replica is not None:
            reads = admin_pb2_grpc.AdminStub(replica)
            self.ListNodes = _replica_first(reads.ListNodes, self.ListNodes)
            self.Top = _replica_first(reads.Top, self.Top)


def _replica_first(replica: Callable[..., Any], admin: Callable[..., Any]) -> Callable[..., Any]:
    """A read from the replica, or from the admin socket when the replica is not there (not
    started, or restarting): the answer is the same, only slower under load."""

    def call(request: Any, **kwargs: Any) -> Any:
        try:
            return replica(request, **kwargs)
        except grpc.RpcError as error:
            if error.code() not in REPLICA_ABSENT:  # type: ignore[attr-defined]
                raise
            return admin(request, **kwargs)

    return call


def replica_channel(socket_path: Path) -> grpc.Channel | None:
    """A channel to the read replica beside the admin socket, or None when there is none
    or it shows no sign of life (stopped, say: its calls would wait out the deadline)."""
    replica = replica_socket(socket_path)
    if not replica_alive(replica) or not os.access(replica, os.R_OK | os.W_OK):
        return None
    return grpc.insecure_channel(grpc_unix_address(replica))


def socket_channel(socket_path: Path) -> grpc.Channel:
    """A channel to the admin socket, refusing early (with the fix) when it is missing or not ours."""
    if not socket_path.exists():
        raise AdminUnavailable(
            f"no coordinator admin socket at {socket_path}: is picoord-coordinator running? "
            f"(set --admin-socket or {defaults.ADMIN_SOCKET_ENV}, or use a context: coordctl context --help)"
        )
    if not os.access(socket_path, os.R_OK | os.W_OK):
        raise AdminUnavailable(f"permission denied on {socket_path}: coordctl must run as root")
    return grpc.insecure_channel(grpc_unix_address(socket_path))


def tls_channel(bundle: Bundle) -> grpc.Channel:
    """Mutual TLS to the remote admin listener, checking the coordinator by the bundle's CA
    and its fixed server name (home labs move between addresses)."""
    credentials = grpc.ssl_channel_credentials(
        root_certificates=bundle.ca_certificate_pem,
        private_key=bundle.key_pem,
        certificate_chain=bundle.certificate_pem,
    )
    return grpc.secure_channel(
        bundle.address,
        credentials,
        options=[
            ("grpc.ssl_target_name_override", bundle.server_name),
            ("grpc.max_receive_message_length", limits.GRPC_RECEIVE_BYTES),
        ],
    )


def open_channel(connection: Connection, contexts: ContextStore) -> grpc.Channel:
    if connection.context is not None:
        return tls_channel(contexts.load(connection.context))
    assert connection.socket_path is not None
    return socket_channel(connection.socket_path)


def server_certificate(address: str, server_name: str, timeout: float = PROBE_TIMEOUT) -> bytes:
    """The certificate the coordinator at `address` presents, unverified: only to tell an
    operator whose coordinator it is when the TLS handshake failed. TLS 1.3 sends it before
    the server asks for ours, so no client certificate is needed."""
    host, port = split_host_port(address, "address")
    probe = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    probe.check_hostname = False
    probe.verify_mode = ssl.CERT_NONE
    probe.set_alpn_protocols(["h2"])
    with (
        socket.create_connection((host, port), timeout=timeout) as raw,
        probe.wrap_socket(raw, server_hostname=server_name) as tls,
    ):
        certificate = tls.getpeercert(binary_form=True)
    if not certificate:
        raise ssl.SSLError("the server presented no certificate")
    return certificate


def unreachable_message(context: str, bundle: Bundle, details: str) -> str:
    """Why a context's coordinator did not answer, as far as a probe can tell."""
    try:
        presented = server_certificate(bundle.address, bundle.server_name)
    except (OSError, InvalidAddress) as error:
        return (
            f"context {context!r}: cannot reach the coordinator at {bundle.address} ({error}): is it running "
            f"with admin_listen set, and is the port open to this machine?"
        )
    foreign = foreign_server_message(context, bundle, presented)
    if foreign is not None:
        return foreign
    return f"context {context!r}: the coordinator at {bundle.address} did not answer: {details}"

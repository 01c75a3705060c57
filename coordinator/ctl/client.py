"""The admin connection: coordctl talks to the coordinator over its root-only unix socket."""

from __future__ import annotations

import os
from pathlib import Path

import grpc

from picoord.common import defaults
from picoord.common.addresses import grpc_unix_address
from picoord.v1 import admin_pb2_grpc, services_pb2_grpc

CALL_TIMEOUT = 10.0


class AdminUnavailable(RuntimeError):
    pass


def admin_socket_path(flag: str | None) -> Path:
    return Path(flag or os.environ.get(defaults.ADMIN_SOCKET_ENV) or defaults.ADMIN_SOCKET)


def _channel(socket_path: Path) -> grpc.Channel:
    if not socket_path.exists():
        raise AdminUnavailable(
            f"no coordinator admin socket at {socket_path}: is picoord-coordinator running? "
            f"(set --admin-socket or {defaults.ADMIN_SOCKET_ENV})"
        )
    if not os.access(socket_path, os.R_OK | os.W_OK):
        raise AdminUnavailable(f"permission denied on {socket_path}: coordctl must run as root")
    return grpc.insecure_channel(grpc_unix_address(socket_path))


def connect(socket_path: Path) -> admin_pb2_grpc.AdminStub:
    return admin_pb2_grpc.AdminStub(_channel(socket_path))


def connect_workloads(socket_path: Path) -> services_pb2_grpc.WorkloadsStub:
    return services_pb2_grpc.WorkloadsStub(_channel(socket_path))

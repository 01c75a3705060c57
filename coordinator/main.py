"""`picoord-coordinator`: the daemon the systemd unit starts on the desktop."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import gc
import os
import signal
import socket
import sys
from pathlib import Path

import grpc
import structlog

from picoord.common import VERSION, defaults
from picoord.common.addresses import join_host_port, split_host_port
from picoord.common.logs import configure_logging
from picoord.common.sd_notify import notify, watchdog_period
from picoord.coordinator.ca import ClusterCA
from picoord.coordinator.cluster import Cluster
from picoord.coordinator.config import ConfigError, CoordinatorConfig
from picoord.coordinator.prometheus import serve_metrics
from picoord.coordinator.servicers.admin import AdminServicer
from picoord.coordinator.servicers.enrollment import EnrollmentServicer
from picoord.coordinator.servicers.peers import restrict_to_operators
from picoord.coordinator.servicers.session import SessionServicer
from picoord.coordinator.status import StatusTimeouts
from picoord.coordinator.store import StateUnavailable, Store
from picoord.coordinator.telemetry import MetricsHistory
from picoord.v1 import admin_pb2, admin_pb2_grpc, agent_pb2_grpc

log = structlog.get_logger("picoord.coordinator")

FLUSH_INTERVAL = 5.0
GRPC_OPTIONS = [
    # Without this, a second coordinator on the same port starts "fine" and the kernel
    # splits connections between two CAs; fail at start-up instead.
    ("grpc.so_reuseport", 0),
    ("grpc.max_receive_message_length", 4 * 1024 * 1024),
    ("grpc.keepalive_time_ms", 30_000),
    ("grpc.http2.min_ping_interval_without_data_ms", 10_000),
    ("grpc.keepalive_permit_without_calls", 1),
]


def parse_args(argv: list[str] | None) -> tuple[CoordinatorConfig, argparse.Namespace]:
    parser = argparse.ArgumentParser(prog="picoord-coordinator", description=__doc__)
    parser.add_argument("--config", type=Path, help=f"settings file (default {defaults.COORDINATOR_CONFIG})")
    parser.add_argument("--listen", help="agent sessions, mutual TLS (default 0.0.0.0:7443)")
    parser.add_argument("--enroll-listen", help="enrollment, server TLS (default: the --listen port + 1)")
    parser.add_argument("--admin-socket", help=f"coordctl's unix socket (default {defaults.ADMIN_SOCKET})")
    parser.add_argument("--metrics-listen", help="Prometheus /metrics (default 0.0.0.0:9469)")
    parser.add_argument(
        "--state-dir", help=f"CA, keys and database (default {defaults.COORDINATOR_STATE_DIR})"
    )
    parser.add_argument("--advertise-address", help="host agents dial, as printed in join commands")
    parser.add_argument("--heartbeat-timeout", type=float, help="seconds of silence before NotReady (20)")
    parser.add_argument("--down-timeout", type=float, help="seconds of silence before Down (60)")
    parser.add_argument(
        "--heartbeat-interval", type=float, help="seconds between heartbeats (timeout/4, <= 5)"
    )
    parser.add_argument(
        "--metrics-interval", type=float, help="seconds between agent samples (5, at least 1)"
    )
    parser.add_argument("--log-level", choices=["debug", "info", "warning", "error"])
    parser.add_argument("--version", action="version", version=f"picoord-coordinator {VERSION}")
    args = parser.parse_args(argv)
    config = CoordinatorConfig.load(
        args.config or defaults.COORDINATOR_CONFIG, required=args.config is not None
    )
    for name in (
        "listen",
        "enroll_listen",
        "admin_socket",
        "metrics_listen",
        "state_dir",
        "advertise_address",
        "heartbeat_timeout",
        "heartbeat_interval",
        "down_timeout",
        "metrics_interval",
        "log_level",
    ):
        value = getattr(args, name)
        if value is not None:
            setattr(config, name, value)
    config.validate()
    return config, args


def advertised_host(listen_host: str) -> str:
    """What join commands name when --advertise-address is not given: the listen address
    if it is a specific one, else this machine's hostname."""
    return socket.gethostname() if listen_host in ("0.0.0.0", "::", "") else listen_host


def _bind_admin_socket(server: grpc.aio.Server, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    with contextlib.suppress(FileNotFoundError):
        path.unlink()
    previous = os.umask(0o177)  # the socket is born 0600: only root may administer
    try:
        server.add_insecure_port(f"unix:{path}")
    finally:
        os.umask(previous)


async def flush_once(cluster: Cluster) -> None:
    """One flush that never ends the coordinator: a refused write is kept for the next
    flush (the cluster logs the store's change of state), anything else is logged."""
    try:
        await cluster.flush()
    except StateUnavailable:
        pass
    except Exception:
        log.exception("flushing last-seen times failed; retrying at the next flush")


async def serve(config: CoordinatorConfig) -> None:
    state_dir = Path(config.state_dir)
    state_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    listen_host, listen_port = split_host_port(config.listen, "listen")
    advertise_host = config.advertise_address or advertised_host(listen_host)
    ca = ClusterCA.load_or_create(state_dir, [advertise_host])
    store = Store(state_dir / "state.db")
    cluster = Cluster(
        store,
        StatusTimeouts(config.heartbeat_timeout, config.down_timeout),
        MetricsHistory(config.metrics_history),
    )
    enroll_address = config.enroll_address()
    _, enroll_port = split_host_port(enroll_address, "enroll_listen")

    server = grpc.aio.server(options=GRPC_OPTIONS, maximum_concurrent_rpcs=None)
    agent_pb2_grpc.add_EnrollmentServicer_to_server(EnrollmentServicer(cluster, ca), server)
    agent_pb2_grpc.add_AgentSessionServicer_to_server(
        SessionServicer(cluster, config.metrics_interval, config.heartbeat_interval), server
    )
    admin_pb2_grpc.add_AdminServicer_to_server(
        restrict_to_operators(
            AdminServicer(
                cluster,
                ca,
                join_address=join_host_port(advertise_host, listen_port),
                enroll_port_hint=None if enroll_port == listen_port + 1 else enroll_port,
            ),
            admin_pb2.DESCRIPTOR.services_by_name["Admin"],
        ),
        server,
    )
    key_and_chain = [(ca.server_key_pem, ca.server_chain_pem)]
    mutual = grpc.ssl_server_credentials(
        key_and_chain, root_certificates=ca.certificate_pem, require_client_auth=True
    )
    server_only = grpc.ssl_server_credentials(key_and_chain)
    bound_listen = server.add_secure_port(config.listen, mutual)
    bound_enroll = server.add_secure_port(enroll_address, server_only)
    if not bound_listen or not bound_enroll:
        raise OSError(f"cannot listen on {config.listen} and {enroll_address}")
    admin_socket = Path(config.admin_socket)
    _bind_admin_socket(server, admin_socket)
    await server.start()
    # Everything loaded so far lives as long as the process: keep it out of the garbage
    # collector's full scans, which otherwise pause the event loop for every session.
    gc.freeze()
    try:
        os.chmod(admin_socket, 0o600)
        metrics_host, metrics_port = split_host_port(config.metrics_listen, "metrics_listen")
        serve_metrics(cluster, metrics_host, metrics_port)
        log.info(
            "coordinator started",
            version=VERSION,
            listen=config.listen,
            enroll=enroll_address,
            admin_socket=str(admin_socket),
            metrics=config.metrics_listen,
            state_dir=str(state_dir),
            ca_cert_hash=ca.cert_hash,
        )
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(signum, stop.set)
        notify("READY=1")  # systemd (Type=notify): serving now
        # Pinged from this loop, after each flush: a hung store or loop stops the pings.
        watchdog = watchdog_period(os.environ, os.getpid())
        while not stop.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), min(FLUSH_INTERVAL, watchdog or FLUSH_INTERVAL))
            await flush_once(cluster)
            if watchdog:
                notify("WATCHDOG=1")
    finally:
        notify("STOPPING=1")
        log.info("coordinator stopping")
        await server.stop(grace=2)
        await flush_once(cluster)
        store.close()
        with contextlib.suppress(FileNotFoundError):
            admin_socket.unlink()


def main(argv: list[str] | None = None) -> None:
    try:
        config, _ = parse_args(argv)
    except ConfigError as error:
        print(f"picoord-coordinator: {error}", file=sys.stderr)
        raise SystemExit(2) from None
    configure_logging(config.log_level, config.log_json)
    try:
        asyncio.run(serve(config))
    except (OSError, StateUnavailable) as error:
        log.error("coordinator failed to start", error=str(error))
        raise SystemExit(1) from None

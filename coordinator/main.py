"""`picoord-coordinator`: the daemon the systemd unit starts on the desktop; with `backup FILE`
or `restore FILE` first, the state's backup and restore (coordinator/backup.py)."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import copy
import datetime as dt
import gc
import os
import resource
import signal
import sys
import time
from pathlib import Path

import grpc
import structlog

from picoord.common import VERSION, defaults, limits
from picoord.common.addresses import join_host_port, split_host_port
from picoord.common.durations import iso_utc, parse_duration
from picoord.common.files import UnsafeStateDir, check_state_dir
from picoord.common.logs import configure_logging
from picoord.common.sd_notify import notify, watchdog_period
from picoord.coordinator import backup
from picoord.coordinator.admin_reads import replica_socket
from picoord.coordinator.admin_relay import SUN_PATH_MAX, AdminRelay
from picoord.coordinator.admin_replica import AdminReplica
from picoord.coordinator.admin_threads import ThreadedServer, ThreadedServicer
from picoord.coordinator.advertise import advertise
from picoord.coordinator.ca import CAUnavailable, ClusterCA, new_cluster_hint
from picoord.coordinator.cluster import Cluster
from picoord.coordinator.config import ConfigError, CoordinatorConfig, load_settings
from picoord.coordinator.controller.controller import WorkloadController
from picoord.coordinator.controller.records import WorkloadRecords
from picoord.coordinator.prometheus import RENDER_INTERVAL, serve_metrics
from picoord.coordinator.rate_limit import FailureThrottle, ThrottlePolicy
from picoord.coordinator.registry_client import ImagePinner
from picoord.coordinator.servicers.admin_certificates import LOCAL_ONLY_METHODS, AdminCertificatesServicer
from picoord.coordinator.servicers.cluster_admin import AdminServicer
from picoord.coordinator.servicers.enrollment import EnrollmentServicer
from picoord.coordinator.servicers.peers import LOCAL_OPERATORS, AdminGate, restrict_to_operators
from picoord.coordinator.servicers.session import SessionLimits, SessionServicer
from picoord.coordinator.servicers.workloads import WorkloadsServicer
from picoord.coordinator.status import StatusTimeouts
from picoord.coordinator.store import StateUnavailable, Store
from picoord.coordinator.telemetry import MetricsHistory
from picoord.v1 import admin_pb2, admin_pb2_grpc, agent_pb2_grpc, services_pb2, services_pb2_grpc

log = structlog.get_logger("picoord.coordinator")

FLUSH_INTERVAL = 5.0
AGENT_CONNECTION_IDLE = 15.0  # seconds an agent-port connection may carry no call
GRPC_OPTIONS = [
    # Without this, a second coordinator on the same port starts "fine" and the kernel
    # splits connections between two CAs; fail at start-up instead.
    ("grpc.so_reuseport", 0),
    ("grpc.max_receive_message_length", limits.GRPC_RECEIVE_BYTES),
    ("grpc.keepalive_time_ms", 30_000),
    ("grpc.http2.min_ping_interval_without_data_ms", 10_000),
    ("grpc.keepalive_permit_without_calls", 1),
]
# Descriptors the agent ports may never take: the admin socket and its relay, the store,
# /metrics and gRPC's own. With them kept free, `coordctl` answers whatever floods the ports.
FD_RESERVE = 512
AGENT_PORTS = 2  # sessions and enrollment, each with its own connection quota
# The remote admin listener serves a few operators: its connections come out of FD_RESERVE,
# so a flood there never takes the agent ports' quota (nor the admin socket's share).
ADMIN_LISTENER_CONNECTIONS = 64
MIN_CONNECTIONS_PER_PORT = 16


def parse_args(argv: list[str] | None) -> tuple[CoordinatorConfig, argparse.Namespace]:
    parser = argparse.ArgumentParser(
        prog="picoord-coordinator",
        description=__doc__,
        epilog="picoord-coordinator backup FILE | restore FILE: the state's backup and restore "
        "(picoord-coordinator backup --help)",
    )
    parser.add_argument("--config", type=Path, help=f"settings file (default {defaults.COORDINATOR_CONFIG})")
    parser.add_argument("--listen", help="agent sessions, mutual TLS (default 0.0.0.0:7443)")
    parser.add_argument("--enroll-listen", help="enrollment, server TLS (default: the --listen port + 1)")
    parser.add_argument("--admin-socket", help=f"coordctl's unix socket (default {defaults.ADMIN_SOCKET})")
    parser.add_argument(
        "--admin-listen",
        help="remote admin, mutual TLS with admin certificates (default off), e.g. 0.0.0.0:7445",
    )
    parser.add_argument("--metrics-listen", help="Prometheus /metrics (default 0.0.0.0:9469)")
    parser.add_argument(
        "--state-dir", help=f"CA, keys and database (default {defaults.COORDINATOR_STATE_DIR})"
    )
    parser.add_argument(
        "--advertise-address",
        help="host name or IP the Pis dial, as printed in join commands (default: a specific --listen "
        "address, else this host's address on its default-route interface)",
    )
    parser.add_argument(
        "--heartbeat-timeout",
        type=float,
        help="seconds within which a cut link or a frozen agent shows NotReady (3)",
    )
    parser.add_argument("--down-timeout", type=float, help="seconds of silence before Down (60)")
    parser.add_argument(
        "--disconnect-grace", type=float, help="seconds a node may be away before its replicas move (5)"
    )
    parser.add_argument(
        "--heartbeat-interval",
        type=float,
        help="an agent sends a message at least this often, samples included (the metrics interval)",
    )
    parser.add_argument(
        "--metrics-interval", type=float, help="seconds between agent samples (5, at least 1)"
    )
    _add_certificate_arguments(parser)
    parser.add_argument("--log-level", choices=["debug", "info", "warning", "error"])
    parser.add_argument("--version", action="version", version=f"picoord-coordinator {VERSION}")
    args = parser.parse_args(argv)
    names = (
        "listen",
        "enroll_listen",
        "admin_socket",
        "admin_listen",
        "metrics_listen",
        "state_dir",
        "advertise_address",
        "heartbeat_timeout",
        "heartbeat_interval",
        "down_timeout",
        "disconnect_grace",
        "metrics_interval",
        "log_level",
        "node_cert_validity",
        "server_cert_validity",
    )
    config = load_settings(args.config, {name: getattr(args, name) for name in names})
    return config, args


def raise_open_files_limit() -> int:
    """Lift the soft open-files limit to the hard one (1,024 by default outside systemd)
    and return the soft limit in force: every connection, handshaking or not, holds one."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = hard if hard != resource.RLIM_INFINITY else max(soft, 1 << 20)
    if soft != resource.RLIM_INFINITY and soft < target:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
            soft = target
        except (ValueError, OSError) as error:
            log.warning("cannot raise the open-files limit", soft=soft, hard=hard, error=str(error))
    return soft


def connections_per_port(open_files: int, configured: int = 0) -> int:
    """How many connections each agent port accepts: as configured, else what the
    open-files limit leaves after FD_RESERVE, shared by the ports."""
    if configured:
        return configured
    return max(MIN_CONNECTIONS_PER_PORT, (open_files - FD_RESERVE) // AGENT_PORTS)


def render_interval(metrics_interval: float) -> float:
    """Seconds between renders of /metrics' node section: the agents' sample interval, as the
    node figures change no faster (py-spy at 1,000 agents: rendering every second held the
    GIL a fifth of the time, more than the session path)."""
    return max(RENDER_INTERVAL, metrics_interval)


# Young objects a collection waits for (Python's default is 700). Measured with 5,000
# sessions: about 50,000 allocations a second (1,000 samples), so the default ran 70 young
# collections a second, and the older generations, holding every session's tasks and
# state, came due often enough for pauses of 0.2-0.6 s (timed with gc.callbacks). Admin
# stalls remained after this change: it is not their whole cause (bench/README.md).
GC_YOUNG_THRESHOLD = 20_000
GC_OLDER_THRESHOLD = 20


def tune_garbage_collector() -> None:
    """Once serving: everything loaded so far (modules, the store's node records) lives as
    long as the process and is frozen out of every collection, and collections run less
    often (GC_YOUNG_THRESHOLD). Memory is freed by reference counting as before; only
    cycles wait longer."""
    gc.collect()
    gc.freeze()
    gc.set_threshold(GC_YOUNG_THRESHOLD, GC_OLDER_THRESHOLD, GC_OLDER_THRESHOLD)


def session_keepalive(heartbeat_timeout: float) -> list[tuple[str, int]]:
    """Liveness below Python: gRPC's core pings every agent connection each third of
    `heartbeat_timeout` and closes it when a ping goes unanswered for the other two thirds,
    so a cut link, a frozen agent or a frozen Pi ends its session (NotReady) within the
    timeout, never sooner than two thirds of it (a short blip stays short), and no
    heartbeat message reaches the event loop. The pings go whether or not data flows
    (the agents send a sample only every few seconds, a frozen one nothing)."""
    interval_ms = max(100, round(heartbeat_timeout * 1000 / 3))
    answer_ms = max(100, round(heartbeat_timeout * 1000) - interval_ms)
    return [
        ("grpc.keepalive_time_ms", interval_ms),
        ("grpc.keepalive_timeout_ms", answer_ms),
        # Newer cores (checked with 1.85) time a keepalive ping's answer with this one (60 s
        # by default); 1.51 uses keepalive_timeout_ms.
        ("grpc.http2.ping_timeout_ms", answer_ms),
        ("grpc.keepalive_permit_without_calls", 1),
        ("grpc.http2.max_pings_without_data", 0),
        # A frozen agent sends nothing: without this, a ping after a quiet spell waits for
        # the core's minimum gap between pings without data (5 minutes in older cores).
        ("grpc.http2.min_time_between_pings_ms", interval_ms),
    ]


def agent_server_options(config: CoordinatorConfig, open_files: int) -> list[tuple[str, int]]:
    """GRPC_OPTIONS plus the front door's limits. A connection that has not finished its
    TLS handshake within handshake_timeout is dropped (gRPC's default waits 120 s).
    grpc.max_allowed_incoming_connections is honoured from gRPC 1.6x (checked with 1.85);
    older cores (Debian 12's 1.51) ignore it and rely on the raised limit and the timeout."""
    keepalive = session_keepalive(config.heartbeat_timeout)
    keys = {key for key, _ in keepalive}
    return [
        *((key, value) for key, value in GRPC_OPTIONS if key not in keys),
        *keepalive,
        ("grpc.server_handshake_timeout_ms", round(config.handshake_timeout * 1000)),
        ("grpc.max_allowed_incoming_connections", connections_per_port(open_files, config.max_connections)),
        # A connection carrying no call is closed: one a node's refused extra session left
        # behind (SessionLimits) holds no slot another node needs.
        ("grpc.max_connection_idle_ms", round(AGENT_CONNECTION_IDLE * 1000)),
    ]


def add_operator_services(
    server: grpc.aio.Server | grpc.Server,
    admin: AdminServicer,
    workloads: WorkloadsServicer | None,
    identities: AdminCertificatesServicer | None,
) -> None:
    """The operator's APIs, the same on the admin socket and on the remote admin listener."""
    admin_pb2_grpc.add_AdminServicer_to_server(admin, server)
    if workloads is not None:
        services_pb2_grpc.add_WorkloadsServicer_to_server(workloads, server)
    if identities is not None:
        admin_pb2_grpc.add_AdminCertificatesServicer_to_server(identities, server)


async def start_admin_server(
    admin: AdminServicer,
    admin_socket: Path,
    workloads: WorkloadsServicer | None = None,
    identities: AdminCertificatesServicer | None = None,
) -> tuple[ThreadedServer, AdminRelay]:
    """The admin API (and the workload API) on a gRPC server of its own, reached only
    through the relay on the admin socket, which names each caller from its socket
    credentials. Its threads take the calls and run them on this loop, or answer `nodes`
    and `top` from a snapshot themselves (admin_threads.py)."""
    relay = AdminRelay(admin_socket, LOCAL_OPERATORS)
    loop = asyncio.get_running_loop()
    threaded = ThreadedServer(GRPC_OPTIONS)
    add_operator_services(
        threaded.server,
        ThreadedServicer(admin, loop, admin.answers_at_once()),  # type: ignore[arg-type]
        None if workloads is None else ThreadedServicer(workloads, loop),  # type: ignore[arg-type]
        None if identities is None else ThreadedServicer(identities, loop),  # type: ignore[arg-type]
    )
    if not threaded.server.add_insecure_port(relay.internal_address):
        raise OSError(f"cannot listen on {relay.internal_address}")
    threaded.start()
    await relay.start()
    return threaded, relay


async def start_admin_replica(
    admin: AdminServicer, cluster: Cluster, relay: AdminRelay
) -> AdminReplica | None:
    """The admin read replica (admin_replica.py): `nodes` and `top` answered by a process of
    its own from the snapshots built here. None (and coordctl asks the admin socket) when
    its socket's path is too long for a unix socket."""
    socket_path = replica_socket(relay.admin_socket)
    if len(str(socket_path).encode()) > SUN_PATH_MAX:
        log.warning("admin read replica not started: its socket path is too long", socket=str(socket_path))
        return None
    replica = AdminReplica(relay.admin_socket, relay.directory, admin.refresh)
    admin.send_snapshots_to(replica.ship)
    await replica.start()
    replica.cell.write(cluster.generation)
    cluster.publish_generation = replica.generation_changed
    return replica


def admin_dial_address(admin_listen: str, advertise_host: str) -> str:
    """What admin bundles name to dial: a specific listen host as is, else the host agents
    are told (coordinator/advertise.py); empty when the listener is off."""
    if not admin_listen:
        return ""
    host, port = split_host_port(admin_listen, "admin_listen")
    if host in ("0.0.0.0", "::", ""):
        host = advertise_host
    return join_host_port(host, port)


def admin_listener_options(config: CoordinatorConfig) -> list[tuple[str, int]]:
    """The agent ports' front door (handshake timeout, a connection cap), sized for operators."""
    cap = min(config.max_connections or ADMIN_LISTENER_CONNECTIONS, ADMIN_LISTENER_CONNECTIONS)
    keepalive = session_keepalive(config.heartbeat_timeout)
    keys = {key for key, _ in keepalive}
    return [
        *((key, value) for key, value in GRPC_OPTIONS if key not in keys),
        *keepalive,
        ("grpc.server_handshake_timeout_ms", round(config.handshake_timeout * 1000)),
        ("grpc.max_allowed_incoming_connections", cap),
    ]


async def start_admin_listener(
    config: CoordinatorConfig,
    ca: ClusterCA,
    admin: AdminServicer,
    workloads: WorkloadsServicer,
    identities: AdminCertificatesServicer,
) -> grpc.aio.Server | None:
    """Remote admin: the operator's APIs (never the agent services) on a TCP port with
    mutual TLS, with the agent ports' handshake timeout and a connection cap. The handshake
    takes any certificate of the cluster CA; the services' guard then admits only admin
    certificates on record and in force (peers.admin_refusal), at every call."""
    if not config.admin_listen:
        return None
    credentials, _ = rotating_server_credentials(ca)  # its own: gRPC's fetcher is one server's
    server = grpc.aio.server(options=admin_listener_options(config), maximum_concurrent_rpcs=None)
    add_operator_services(server, admin, workloads, identities)
    if not server.add_secure_port(config.admin_listen, credentials):
        raise OSError(f"cannot listen on {config.admin_listen} (admin_listen)")
    await server.start()
    return server


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
    check_state_dir(state_dir)  # keys in a directory others can write: refuse, naming the fix
    state_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    listen_host, listen_port = split_host_port(config.listen, "listen")
    advertised, warnings = await asyncio.to_thread(advertise, config.advertise_address, listen_host)
    advertise_host = advertised.host
    log.info("join commands name this address", address=advertise_host, chosen_from=advertised.source)
    for warning in warnings:
        log.warning("the Pis may not reach the advertised address", detail=warning)
    ca = load_cluster_ca(config, state_dir, advertise_host)
    store = Store(state_dir / "state.db")
    cluster = Cluster(
        store,
        StatusTimeouts(config.working_timeout, config.down_timeout),
        MetricsHistory(config.metrics_history),
    )
    records = WorkloadRecords(store)
    pinner = ImagePinner(store.cluster_registries, ca.certificate_pem.decode())
    controller = WorkloadController(
        cluster, records, grace=config.disconnect_grace, pin_image=pinner.digest_for
    )
    enroll_address = config.enroll_address()
    _, enroll_port = split_host_port(enroll_address, "enroll_listen")

    open_files = raise_open_files_limit()
    server = grpc.aio.server(options=agent_server_options(config, open_files), maximum_concurrent_rpcs=None)
    throttle = FailureThrottle(
        ThrottlePolicy(config.enroll_max_failures, config.enroll_failure_window, config.enroll_ban)
    )
    agent_pb2_grpc.add_EnrollmentServicer_to_server(EnrollmentServicer(cluster, ca, throttle), server)
    agent_pb2_grpc.add_AgentSessionServicer_to_server(
        SessionServicer(
            cluster, config.metrics_interval, config.heartbeat_interval, ca, controller, SessionLimits()
        ),
        server,
    )
    admin_service = admin_pb2.DESCRIPTOR.services_by_name["Admin"]
    workloads_service = services_pb2.DESCRIPTOR.services_by_name["Workloads"]
    raw_admin = AdminServicer(
        cluster,
        ca,
        join_address=join_host_port(advertise_host, listen_port),
        enroll_port_hint=None if enroll_port == listen_port + 1 else enroll_port,
        workloads=records,
    )
    raw_workloads = WorkloadsServicer(controller)
    # On the agent ports the operator's APIs refuse every certificate (no gate): admin
    # certificates are for the admin listener alone. Shallow copies share all state.
    admin_pb2_grpc.add_AdminServicer_to_server(
        restrict_to_operators(copy.copy(raw_admin), admin_service), server
    )
    services_pb2_grpc.add_WorkloadsServicer_to_server(
        restrict_to_operators(copy.copy(raw_workloads), workloads_service), server
    )
    gate = AdminGate(cluster.admin_certificate, cluster.clock)
    admin = restrict_to_operators(raw_admin, admin_service, gate)
    workloads = restrict_to_operators(raw_workloads, workloads_service, gate)
    identities = restrict_to_operators(
        AdminCertificatesServicer(cluster, ca, admin_dial_address(config.admin_listen, advertise_host)),
        admin_pb2.DESCRIPTOR.services_by_name["AdminCertificates"],
        gate,
        LOCAL_ONLY_METHODS,
    )
    mutual, server_only = rotating_server_credentials(ca)
    bound_listen = server.add_secure_port(config.listen, mutual)
    bound_enroll = server.add_secure_port(enroll_address, server_only)
    if not bound_listen or not bound_enroll:
        raise OSError(f"cannot listen on {config.listen} and {enroll_address}")
    admin_socket = Path(config.admin_socket)
    await server.start()
    admin_server, relay = await start_admin_server(admin, admin_socket, workloads, identities)
    replica = await start_admin_replica(raw_admin, cluster, relay)
    remote_admin = await start_admin_listener(config, ca, admin, workloads, identities)
    rotation = asyncio.create_task(rotate_server_certificate(ca))
    tune_garbage_collector()
    stop = asyncio.Event()
    reconciling = asyncio.create_task(controller.run(stop))
    try:
        metrics_host, metrics_port = split_host_port(config.metrics_listen, "metrics_listen")
        serve_metrics(
            cluster,
            metrics_host,
            metrics_port,
            interval=render_interval(config.metrics_interval),
            workloads=controller.metrics_snapshot,
        )
        log.info(
            "coordinator started",
            version=VERSION,
            listen=config.listen,
            enroll=enroll_address,
            admin_socket=str(admin_socket),
            admin_listen=config.admin_listen or "off",
            metrics=config.metrics_listen,
            state_dir=str(state_dir),
            ca_cert_hash=ca.cert_hash,
            open_files=open_files,
        )
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
        # How long each step of the stop took, logged at the end: a restart under every
        # Pi's session is only as quick as this.
        stopping = last = time.monotonic()
        took: dict[str, float] = {}

        def done(step: str) -> None:
            nonlocal last
            now = time.monotonic()
            took[step], last = round(now - last, 3), now

        stop.set()
        with contextlib.suppress(Exception):
            await asyncio.wait_for(reconciling, 5)
        done("controller")
        if replica is not None:
            await replica.stop()
        await relay.close()
        done("replica")
        await admin_server.stop(grace=1)
        if remote_admin is not None:
            await remote_admin.stop(grace=1)
        done("admin")
        rotation.cancel()
        await server.stop(grace=2)
        done("sessions")
        await flush_once(cluster)
        store.close()
        done("store")
        log.info("coordinator stopped", seconds=round(time.monotonic() - stopping, 3), **took)


# ---------------------------------------------------------------- certificate rotation


def _add_certificate_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--node-cert-validity",
        type=parse_duration,
        help="life of node certificates, e.g. 90s, 2m, 24h (default 365d; renewed at ~2/3)",
    )
    parser.add_argument(
        "--server-cert-validity",
        type=parse_duration,
        help="life of the coordinator's TLS certificate (default 365d; renewed at ~2/3, no restart)",
    )


def load_cluster_ca(config: CoordinatorConfig, state_dir: Path, advertise_host: str) -> ClusterCA:
    """The cluster CA, created on the first start only: with the CA gone but the cluster's
    database still there, a new CA would silently lock out every enrolled node."""
    database = state_dir / "state.db"
    if database.exists() and not (state_dir / "ca.key").exists() and not (state_dir / "ca.crt").exists():
        raise CAUnavailable(
            f"the cluster CA ({state_dir}/ca.key and ca.crt) is missing while the cluster's database "
            f"{database} is there: restore both from your backup of {state_dir}; "
            + new_cluster_hint(state_dir)
        )
    return ClusterCA.load_or_create(
        state_dir,
        [advertise_host],
        node_validity=dt.timedelta(seconds=config.node_cert_validity),
        server_validity=dt.timedelta(seconds=config.server_cert_validity),
    )


def rotating_server_credentials(ca: ClusterCA) -> tuple[grpc.ServerCredentials, grpc.ServerCredentials]:
    """TLS credentials for the agent port (mutual) and the enrollment port (server only)
    that follow the CA's current server certificate: gRPC asks the fetcher before every
    handshake, and it answers with a new configuration only when the certificate rotated."""

    def configuration() -> grpc.ServerCertificateConfiguration:
        identity = ca.server  # one immutable object: never a key of one rotation with another's chain
        assert identity is not None
        chain = identity.certificate_pem + ca.certificate_pem
        return grpc.ssl_server_certificate_configuration(
            [(identity.key_pem, chain)], root_certificates=ca.certificate_pem
        )

    def credentials(require_client_auth: bool) -> grpc.ServerCredentials:
        served = [ca.server_generation]

        def fetch() -> grpc.ServerCertificateConfiguration | None:
            # Runs on gRPC's handshake threads: read two attributes, never block.
            if ca.server_generation == served[0]:
                return None
            served[0] = ca.server_generation
            return configuration()

        return grpc.dynamic_ssl_server_credentials(configuration(), fetch, require_client_auth)

    return credentials(True), credentials(False)


async def rotate_server_certificate(ca: ClusterCA) -> None:
    """Renew the server certificate at two thirds of its life, checking a few times per life."""
    while True:
        assert ca.server is not None
        await asyncio.sleep(min(3600.0, max(1.0, (ca.server.not_after - ca.server.not_before) / 30)))
        try:
            if await asyncio.to_thread(ca.renew_server_if_due):
                assert ca.server is not None
                log.info(
                    "server certificate renewed",
                    serial=ca.server.serial,
                    not_after=iso_utc(ca.server.not_after),
                )
        except OSError as error:  # a full or read-only state disk: keep serving the old one
            log.error("cannot renew the server certificate; retrying", error=str(error))


def main(argv: list[str] | None = None) -> None:
    arguments = sys.argv[1:] if argv is None else argv
    if arguments and arguments[0] in backup.COMMANDS:  # picoord-coordinator backup|restore FILE
        raise SystemExit(backup.run(arguments))
    try:
        config, _ = parse_args(arguments)
    except ConfigError as error:
        # Only the operator can fix it: the unit does not restart on EXIT_CONFIG.
        print(f"picoord-coordinator: {error}", file=sys.stderr)
        raise SystemExit(defaults.EXIT_CONFIG) from None
    configure_logging(config.log_level, config.log_json)
    try:
        asyncio.run(serve(config))
    except (UnsafeStateDir, CAUnavailable) as error:
        log.error("coordinator cannot start", error=str(error))
        raise SystemExit(defaults.EXIT_CONFIG) from None
    except (OSError, StateUnavailable) as error:
        log.error("coordinator failed to start", error=str(error))
        raise SystemExit(1) from None

"""`picoord-agent run`: keep one mutual-TLS session to the coordinator open, forever.

The agent dials out, says hello with its hardware report, then streams metric samples
(which double as heartbeats). When the coordinator is away the agent keeps retrying
with exponential backoff and jitter, so a restarted coordinator is not flooded by every
Pi at once, and never exits on its own: the node's workloads do not depend on it.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import random
import threading
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import grpc
import structlog
from tenacity import AsyncRetrying, RetryCallState, retry_if_exception_type, stop_never

from picoord.agent.channel import channel_options
from picoord.agent.clock import RETRIES_BY_ITSELF, clock_message, presented_window
from picoord.agent.hardware import collect_hardware
from picoord.agent.metrics import MetricsSampler
from picoord.agent.state import ASSIGNMENT_FILE, AgentFiles, BadCredentials, Enrollment, NodeCredentials
from picoord.common import PROTOCOL_VERSION, VERSION, defaults
from picoord.common.addresses import split_host_port
from picoord.common.durations import iso_utc
from picoord.common.pki import jittered_fraction, rotation_deadline
from picoord.common.sd_notify import notify
from picoord.v1 import agent_pb2, agent_pb2_grpc, workloads_pb2

if TYPE_CHECKING:
    from picoord.agent.log_stream import LogStreams
    from picoord.agent.runtime.supervisor import Supervisor

log = structlog.get_logger("picoord.agent")

WELCOME_TIMEOUT = 20.0
CLOCK_PROBE_TIMEOUT = 5.0
HEALTHY_SESSION = 60.0  # a session that lasted this long resets the backoff
MAX_INTERVAL = 3600.0


class SessionLost(Exception):
    """The session ended; the reason is in the message."""


class HealthySessionEnded(Exception):
    """A long, healthy session ended: reconnect starting from the shortest backoff."""


class CertificateUnusable(SessionLost):
    """This node's certificate has ended or cannot be read: dialing would only fail."""


class CertificateEnded(CertificateUnusable):
    """This node's certificate has ended by this node's clock."""


RENEWAL_REPLY_TIMEOUT = 30.0
REJOIN_FIX = (
    "Fix: on the coordinator run `coordctl token create`, then run the `picoord-agent join ...` "
    "command it prints here, with --force"
)


def reconnect_delay(
    attempt: int, initial: float, maximum: float, draw: Callable[[], float] = random.random
) -> float:
    """The wait after failed dial `attempt` (1, 2, ...): between half the exponential
    ceiling (initial doubling up to maximum) and the whole of it, drawn afresh each time.

    Every agent of a cluster loses its session at the same moment when the coordinator
    restarts. With the ceiling plus up to a second of jitter they dialed again in waves a
    second wide (at 1, 3, 7, 15 s...): thousands of TLS handshakes at once, the
    coordinator idle in between, and the handshakes it could not finish in time made to
    wait longer. Drawn over the upper half, the waves spread over seconds; over the whole
    range ("full jitter") they spread further, but some agents then dial often enough to
    reach long ceilings early and come back last, long after a short restart."""
    # The exponent stops growing once the ceiling is reached: a coordinator away for a day
    # means thousands of attempts, and 2.0 ** 1024 overflows a float.
    doublings = min(attempt - 1, max(0, math.ceil(math.log2(maximum / initial))))
    ceiling = min(maximum, initial * 2.0**doublings)
    return ceiling / 2 + draw() * ceiling / 2


def renewal_retry_delay(remaining: float) -> float:
    """After a failed renewal: often enough to renew before the end, rarely enough not to
    flood a coordinator or a log (a tenth of what is left, between 5 s and an hour)."""
    return min(3600.0, max(5.0, remaining / 10))


@dataclass
class RunSettings:
    metrics_interval: float | None = None  # None: what the coordinator's welcome says
    backoff_initial: float = 1.0
    backoff_max: float = 30.0
    docker_socket: str = defaults.DOCKER_SOCKET
    allow_mount_paths: tuple[str, ...] = ()  # agent.toml: system paths mounts may use here


class AgentRunner:
    def __init__(self, files: AgentFiles, settings: RunSettings) -> None:
        self.files = files
        self.settings = settings
        self.enrollment: Enrollment = files.load()
        self.sampler = MetricsSampler()
        self.connected = asyncio.Event()
        self._action_lock = asyncio.Lock()
        self._renewal_reply: asyncio.Future[agent_pb2.CertificateRenewal] | None = None
        self._actions: set[asyncio.Task[None]] = set()
        # Workloads: the supervisor thread keeps the node's replicas running whether or not a
        # session is open; its reports go up the current session, if there is one.
        # It and the runtime modules load only on a node that runs (or ran) workloads.
        self.supervisor: Supervisor | None = None
        self._session_outbox: tuple[asyncio.AbstractEventLoop, asyncio.Queue] | None = None
        self._stop_supervisor = threading.Event()
        self._logs: LogStreams | None = None  # `coordctl logs`: loaded on the first request

    def _credentials(self) -> grpc.ChannelCredentials:
        # Read at every attempt, so a renewal or a re-join while running takes effect on reconnect.
        current = self._usable_credentials()
        return grpc.ssl_channel_credentials(
            root_certificates=self.files.ca.read_bytes(),
            private_key=current.key_pem,
            certificate_chain=current.certificate_pem,
        )

    async def run_forever(self) -> None:
        if (self.files.state_dir / ASSIGNMENT_FILE).exists():
            self._start_supervisor()
        try:
            await self._reconnect_forever()
        finally:
            self._stop_supervisor.set()
            if self.supervisor is not None:
                self.supervisor.close()  # its keepalived: the thread may not get to it before exit

    def _start_supervisor(self) -> Supervisor:
        if self.supervisor is None:
            from picoord.agent.runtime.supervisor import Supervisor

            supervisor = Supervisor(self.files.state_dir, self.settings.docker_socket, self._report_replicas)
            threading.Thread(
                target=supervisor.run, args=(self._stop_supervisor,), name="supervisor", daemon=True
            ).start()
            supervisor.resend()  # the open session, if any, hears what runs
            self.supervisor = supervisor
        return self.supervisor

    def _report_replicas(self, reports: workloads_pb2.ReplicaReports) -> None:
        """Called from the supervisor thread: queue the report on the open session, if any."""
        current = self._session_outbox
        if current is None:
            return  # no session: the supervisor resends everything on the next one
        loop, outbox = current
        message = agent_pb2.AgentMessage(replicas=reports)
        with contextlib.suppress(RuntimeError):  # the loop is closing
            loop.call_soon_threadsafe(_offer, outbox, message)

    async def _reconnect_forever(self) -> None:
        while True:
            retrying = AsyncRetrying(
                retry=retry_if_exception_type(SessionLost),
                wait=self._reconnect_wait,
                stop=stop_never,
                before_sleep=self._before_sleep,
                reraise=True,
            )
            try:
                async for attempt in retrying:
                    with attempt:
                        await self._session_once()
            except HealthySessionEnded as ended:
                log.warning("session ended, reconnecting", reason=str(ended))

    def _reconnect_wait(self, state: RetryCallState) -> float:
        return reconnect_delay(state.attempt_number, self.settings.backoff_initial, self.settings.backoff_max)

    @staticmethod
    def _before_sleep(state: object) -> None:
        outcome = state.outcome  # type: ignore[attr-defined]
        reason = " ".join(str(outcome.exception()).split())[:300] if outcome else ""
        notify(f"STATUS=coordinator unreachable, retrying: {reason}")  # `systemctl status` shows it
        log.warning(
            "coordinator unreachable, retrying",
            attempt=state.attempt_number,  # type: ignore[attr-defined]
            wait_seconds=round(state.next_action.sleep, 1),  # type: ignore[attr-defined]
            reason=reason,
        )

    async def _session_once(self) -> None:
        started = time.monotonic()
        try:
            await self._stream()
            reason = "the coordinator closed the session"
        except CertificateUnusable as error:
            # A node certificate that looks ended may be a clock far ahead: then say so.
            reason = (await self._clock_reason() if isinstance(error, CertificateEnded) else None) or str(
                error
            )
            log.error(reason)
        except grpc.aio.AioRpcError as error:
            # Both gRPC 1.51 (Debian, system OpenSSL: "certificate verify failed" only) and newer
            # ones say "handshake failed"; a refused or unanswered dial is not worth a probe.
            handshake = (
                error.code() == grpc.StatusCode.UNAVAILABLE and "handshake" in (error.details() or "").lower()
            )
            reason = (await self._clock_reason() if handshake else None) or _explain(error)
            self._report_revocation(error)
        except (OSError, ValueError, RuntimeError) as error:
            # Unreadable key files, a bad message, a bug: log it with its traceback and try
            # again rather than leave the node unmanaged until someone restarts the agent.
            log.exception("session failed unexpectedly")
            reason = f"{type(error).__name__}: {error}"
        finally:
            self.connected.clear()
        if time.monotonic() - started >= HEALTHY_SESSION:
            raise HealthySessionEnded(reason)
        raise SessionLost(reason)

    async def _stream(self) -> None:
        hello = agent_pb2.AgentMessage(
            hello=agent_pb2.Hello(
                node_name=self.enrollment.node_name,
                agent_version=VERSION,
                # /proc, /sys and a docker call: off the loop, or sessions and actions stall
                hardware=await asyncio.to_thread(collect_hardware, docker_socket=self.settings.docker_socket),
                protocol_version=PROTOCOL_VERSION,
            )
        )
        outbox: asyncio.Queue[agent_pb2.AgentMessage] = asyncio.Queue(maxsize=256)
        await outbox.put(hello)

        async def outgoing() -> AsyncIterator[agent_pb2.AgentMessage]:
            while True:
                yield await outbox.get()

        async with grpc.aio.secure_channel(
            self.enrollment.coordinator, self._credentials(), options=channel_options()
        ) as channel:
            call = agent_pb2_grpc.AgentSessionStub(channel).Session(outgoing())
            first = await asyncio.wait_for(call.read(), WELCOME_TIMEOUT)
            if first is grpc.aio.EOF or first.WhichOneof("body") != "welcome":
                raise SessionLost("the coordinator did not welcome this agent")
            interval = self._interval(first.welcome)
            self._session_outbox = (asyncio.get_running_loop(), outbox)
            if self.supervisor is not None:
                self.supervisor.resend()
            self.connected.set()
            notify(f"STATUS=connected to {self.enrollment.coordinator}")
            log.info(
                "session established", coordinator=self.enrollment.coordinator, metrics_interval=interval
            )
            sender = asyncio.create_task(
                self._send_samples(outbox, interval, first.welcome.heartbeat_interval_seconds)
            )
            renewer = asyncio.create_task(self._renew_when_due(outbox))
            try:
                while (message := await call.read()) is not grpc.aio.EOF:
                    await self._handle(message, outbox)
            finally:
                self._session_outbox = None
                if self._logs is not None:
                    self._logs.stop_all()  # their chunks would go to a closed session
                renewer.cancel()
                sender.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await sender

    async def _clock_reason(self) -> str | None:
        """Whether this node's clock is why it cannot connect: the coordinator's certificates
        are read (not trusted) and their window compared with the clock."""
        host, port = split_host_port(self.enrollment.coordinator, "coordinator")
        window = await asyncio.to_thread(presented_window, host, port, CLOCK_PROBE_TIMEOUT)
        if window is None:
            return None
        return clock_message(time.time(), *window, RETRIES_BY_ITSELF)

    def _interval(self, welcome: agent_pb2.Welcome) -> float:
        if self.settings.metrics_interval is not None:
            return self.settings.metrics_interval
        offered = welcome.metrics_interval_seconds
        if defaults.MIN_METRICS_INTERVAL_SECONDS <= offered <= MAX_INTERVAL:
            return offered
        log.warning("ignoring the coordinator's metrics interval", offered=offered)
        return defaults.METRICS_INTERVAL_SECONDS

    async def _send_samples(
        self, outbox: asyncio.Queue[agent_pb2.AgentMessage], interval: float, heartbeat_interval: float
    ) -> None:
        """Samples every `interval`; a heartbeat in between when samples are rarer than heartbeats."""
        tick = min(interval, heartbeat_interval) if heartbeat_interval > 0 else interval
        next_tick = next_sample = time.monotonic()
        while True:
            now = time.monotonic()
            if now >= next_sample:
                message = agent_pb2.AgentMessage(metrics=await asyncio.to_thread(self.sampler.sample))
                next_sample += interval
            else:
                message = agent_pb2.AgentMessage(heartbeat=agent_pb2.Heartbeat(timestamp=time.time()))
            if outbox.full():  # the coordinator is not reading; drop rather than grow
                log.warning("outgoing queue full, dropping a message")
            else:
                outbox.put_nowait(message)
            next_tick += tick
            await asyncio.sleep(max(0.0, min(next_tick, next_sample) - time.monotonic()))

    async def _handle(self, message: agent_pb2.CoordinatorMessage, outbox: asyncio.Queue) -> None:
        kind = message.WhichOneof("body")
        if kind == "action":
            task = asyncio.create_task(self._run_action(message.action, outbox))
            self._actions.add(task)
            task.add_done_callback(self._actions.discard)
        elif kind == "assignment":
            self._assign(message.assignment)
        elif kind == "certificate":
            self._renewal_answered(message.certificate)
        elif kind == "logs":
            if self._logs is None:
                from picoord.agent.log_stream import LogStreams

                self._logs = LogStreams(self.settings.docker_socket)
            self._logs.handle(message.logs, asyncio.get_running_loop(), outbox)
        elif kind == "error":
            log.error("coordinator reported an error", code=message.error.code, message=message.error.message)
        else:
            log.warning("ignoring an unexpected message from the coordinator", kind=kind)

    def _assign(self, assignment: workloads_pb2.NodeAssignment) -> None:
        """A new assignment replaces the old one only if all of it is acceptable."""
        if (
            self.supervisor is None
            and not assignment.replicas
            and not assignment.networks
            and not assignment.HasField("service_ports")
        ):
            return  # nothing to run, keep or answer, nothing ran: the runtime stays unloaded
        from picoord.common.checks.workloads import NodeMounts, check_assignment
        from picoord.common.validation import FieldError

        mounts = NodeMounts(self.settings.allow_mount_paths, (str(self.files.state_dir),))
        try:
            check_assignment(assignment, mounts)
        except FieldError as error:
            log.error("refusing an assignment from the coordinator", error=str(error)[:300])
            return
        log.info(
            "assignment received",
            generation=assignment.generation,
            replicas=len(assignment.replicas),
            networks=len(assignment.networks),
        )
        self._start_supervisor().assign(assignment)

    async def _run_action(self, request: agent_pb2.ActionRequest, outbox: asyncio.Queue) -> None:
        """One action at a time, in a thread, so samples and heartbeats keep flowing."""
        from picoord.agent.actions.registry import NodeSettings, execute  # loaded on first action

        host, port = split_host_port(self.enrollment.coordinator, "coordinator")
        node = NodeSettings(
            coordinator_host=host,
            coordinator_port=port,
            docker_socket=self.settings.docker_socket,
            state_dir=self.files.state_dir,
            allow_mount_paths=self.settings.allow_mount_paths,
        )
        async with self._action_lock:
            result = await asyncio.to_thread(execute, request, node)
        await outbox.put(agent_pb2.AgentMessage(action_result=result))

    # ------------------------------------------------------------ certificate rotation

    def _usable_credentials(self) -> NodeCredentials:
        """The current key and certificate, refused with the reason and the fix when they
        cannot work: an ended certificate would only fail the TLS handshake ("Socket closed")."""
        try:
            current = self.files.credentials()
        except (BadCredentials, OSError) as error:
            raise CertificateUnusable(
                f"this node's credentials are unusable: {error}. {REJOIN_FIX}"
            ) from None
        if time.time() >= current.not_after:
            raise CertificateEnded(
                f"this node's certificate expired at {iso_utc(current.not_after)}; it can no longer "
                f"connect to {self.enrollment.coordinator}. {REJOIN_FIX}"
            )
        return current

    def _report_revocation(self, error: grpc.aio.AioRpcError) -> None:
        if error.code() == grpc.StatusCode.PERMISSION_DENIED and "revoked" in (error.details() or ""):
            log.error(
                f"this node's certificate was revoked by the coordinator (the node was removed); it can "
                f"no longer connect to {self.enrollment.coordinator}. {REJOIN_FIX}",
                coordinator_said=error.details(),
            )

    async def _renew_when_due(self, outbox: asyncio.Queue[agent_pb2.AgentMessage]) -> None:
        """Renew the certificate with a new key at about two thirds of its life, over this
        session; the new pair is used from the next connection. Failures keep the old pair
        and are retried later."""
        fraction = jittered_fraction(random.random())
        while True:
            try:
                current = self.files.credentials()
            except (BadCredentials, OSError) as error:  # the next dial reports it with the fix
                log.error("cannot read this node's certificate to renew it", error=str(error))
                await asyncio.sleep(60.0)
                continue
            delay = rotation_deadline(current.not_before, current.not_after, fraction) - time.time()
            if delay > 0:
                await asyncio.sleep(delay)
                continue
            try:
                renewed = await self._renew_once(outbox, current)
            except (OSError, ValueError, RuntimeError):  # a bug or an odd file: retry, never die silently
                log.exception("certificate renewal failed unexpectedly")
                renewed = False
            if not renewed:
                await asyncio.sleep(renewal_retry_delay(current.not_after - time.time()))

    async def _renew_once(
        self, outbox: asyncio.Queue[agent_pb2.AgentMessage], current: NodeCredentials
    ) -> bool:
        from picoord.agent.enroll import new_key_and_csr  # cryptography: loaded when renewing only

        key_pem, csr_pem = await asyncio.to_thread(new_key_and_csr, self.enrollment.node_name)
        self._renewal_reply = asyncio.get_running_loop().create_future()
        log.info("renewing this node's certificate", current_not_after=iso_utc(current.not_after))
        try:
            await outbox.put(agent_pb2.AgentMessage(renew=agent_pb2.RenewCertificate(csr_pem=csr_pem)))
            reply = await asyncio.wait_for(self._renewal_reply, RENEWAL_REPLY_TIMEOUT)
        except TimeoutError:
            log.warning("the coordinator did not answer the certificate renewal; retrying later")
            return False
        finally:
            self._renewal_reply = None
        if reply.error:
            log.error("the coordinator refused to renew this node's certificate", reason=reply.error)
            return False
        if reply.ca_certificate_pem.strip() != self.files.ca.read_bytes().strip():
            log.error("the renewed certificate comes with another CA; keeping the current one")
            return False
        try:
            renewed = await asyncio.to_thread(self.files.save_credentials, key_pem, reply.certificate_pem)
        except (OSError, BadCredentials) as error:
            log.error(
                "cannot store the renewed certificate: keeping the current key and certificate, "
                "retrying later",
                state_dir=str(self.files.state_dir),
                error=str(error),
                current_not_after=iso_utc(current.not_after),
            )
            return False
        log.info("certificate renewed; used from the next connection", not_after=iso_utc(renewed.not_after))
        return True

    def _renewal_answered(self, reply: agent_pb2.CertificateRenewal) -> None:
        if self._renewal_reply is None or self._renewal_reply.done():
            log.warning("ignoring a certificate renewal nobody asked for")
            return
        self._renewal_reply.set_result(reply)


def _offer(outbox: asyncio.Queue, message: agent_pb2.AgentMessage) -> None:
    if not outbox.full():  # the coordinator is not reading: the next report carries it all
        outbox.put_nowait(message)


def _explain(error: grpc.aio.AioRpcError) -> str:
    code = error.code()
    if code in (grpc.StatusCode.PERMISSION_DENIED, grpc.StatusCode.UNAUTHENTICATED):
        return f"refused by the coordinator: {error.details()}"
    return f"{code.name.lower()}: {error.details()}"

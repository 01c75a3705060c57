"""Keep this node's replicas as the coordinator last assigned them, with or without it.

The coordinator sends a whole NodeAssignment; the supervisor stores it (so a restarted
agent still knows what to run while the coordinator is away), then converges: containers
of picoord's that the assignment does not name are stopped first (on a 1 GB Pi memory is
freed before it is used again), missing ones are pulled and started. Crashed containers
are restarted by dockerd itself, by their restart policy, which also works while the
agent is down. Health probes run here and every change is reported upward.

`plan_node` is the decision, pure and table-tested; `Supervisor` is the loop around it.
The engine is set up only once the node has something to run: a Pi without workloads
(or without dockerd) never talks to dockerd.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import structlog

from picoord.agent.networking.service_ports import ServicePortsApplier
from picoord.agent.networking.virtual_addresses import (
    RELEASE_DRAIN,
    Keepalived,
    hand_overs,
    held_addresses,
)
from picoord.agent.runtime.health import Health, observe
from picoord.agent.runtime.model import (
    ContainerSpec,
    HealthCheck,
    NetworkJoin,
    Port,
    ReplicaState,
    VolumeMount,
)
from picoord.agent.state import ASSIGNMENT_FILE
from picoord.common.checks.workloads import check_assignment
from picoord.common.files import write_atomically
from picoord.common.images import pinned_reference
from picoord.common.vocabulary import ReplicaHealth
from picoord.common.vocabulary import ReplicaState as Reported  # model.ReplicaState is a container
from picoord.v1 import workloads_pb2

log = structlog.get_logger("picoord.agent.runtime")

TICK = 1.0
REPORT_EVERY = 10.0  # a report at least this often while anything runs, as a liveness signal


def spec_from_wire(spec: workloads_pb2.ReplicaSpec) -> ContainerSpec:
    """A checked ReplicaSpec as the runtime's plain data."""
    probe = spec.health
    return ContainerSpec(
        service=spec.service,
        revision=spec.revision,
        replica=spec.replica,
        image=pinned_reference(spec.image, spec.image_digest),  # the bytes the rollout chose
        command=tuple(spec.command),
        args=tuple(spec.args),
        env=dict(spec.env),
        ports=tuple(
            Port(p.target, p.published, p.protocol or "tcp", p.endpoint, p.bind_address) for p in spec.ports
        ),
        volumes=tuple(VolumeMount(v.source, v.target, v.read_only, v.tmpfs) for v in spec.volumes),
        memory_limit=spec.memory_limit_bytes,
        memory_reservation=spec.memory_reservation_bytes,
        cpu_limit_millis=spec.cpu_limit_millis,
        gpus=spec.gpus,
        restart=spec.restart or "on-failure",
        restart_max_attempts=spec.restart_max_attempts,
        hosts=dict(spec.hosts),
        health=HealthCheck(
            kind=probe.kind or "none",
            port=probe.port,
            path=probe.path or "/",
            argv=tuple(probe.argv),
            interval=probe.interval_seconds or 5.0,
            timeout=probe.timeout_seconds or 2.0,
            retries=probe.retries or 3,
            start_period=probe.start_period_seconds,
        ),
        stop_grace=spec.stop_grace_seconds or 10.0,
        networks=tuple(NetworkJoin(item.name, tuple(item.aliases)) for item in spec.networks),
    )


RETRY_FIRST = 2.0
RETRY_MAX = 60.0


def retry_delay(previous: float) -> float:
    """Seconds before a failed start (a pull from a registry that is down, an image that
    does not exist) is tried again: doubling from 2 s up to a minute."""
    return min(RETRY_MAX, previous * 2 if previous else RETRY_FIRST)


@dataclass(frozen=True)
class NodePlan:
    stop: tuple[ReplicaState, ...]
    start: tuple[ContainerSpec, ...]


def plan_node(desired: Sequence[ContainerSpec], actual: Sequence[ReplicaState]) -> NodePlan:
    """What to stop and start so the node runs exactly `desired`.

    A replica is identified by (replica slot, revision): a new revision of a slot is a new
    container, and the old one goes. An exited container of a desired replica is left to
    dockerd's restart policy (stopping and recreating it would reset its restart count and
    hide a crash loop); only a replica with no container at all is started."""
    wanted = {(spec.replica, spec.revision) for spec in desired}
    present = {(state.replica, state.revision) for state in actual}
    stop = tuple(state for state in actual if (state.replica, state.revision) not in wanted)
    start = tuple(spec for spec in desired if (spec.replica, spec.revision) not in present)
    return NodePlan(stop, start)


@dataclass(frozen=True)
class VolumePlan:
    remove: tuple[str, ...]  # asked for, on the node, and no container uses it
    gone: tuple[str, ...]  # asked for and not on the node: reported, so the coordinator forgets it


def plan_volumes(asked: Sequence[str], present: set[str], unused: set[str]) -> VolumePlan:
    """Which of the named volumes the coordinator asked to remove (coordctl rm --volumes) go
    now: only one no container uses (a volume another container still mounts waits, and
    dockerd would refuse it anyway); one already absent is reported gone."""
    wanted = set(asked)
    return VolumePlan(tuple(sorted(wanted & present & unused)), tuple(sorted(wanted - present)))


@dataclass(frozen=True)
class NetworkPlan:
    create: tuple[tuple[str, bool], ...]  # (name, encrypted) wanted and missing
    remove: tuple[str, ...]  # picoord's, no longer wanted (dockerd refuses while in use)
    mismatched: tuple[str, ...]  # present with the other `encrypted`: Docker cannot change it


def plan_networks(wanted: Mapping[str, bool], present: Mapping[str, bool]) -> NetworkPlan:
    """What a Swarm manager does so picoord's overlay networks are those wanted."""
    return NetworkPlan(
        create=tuple((name, on) for name, on in sorted(wanted.items()) if name not in present),
        remove=tuple(sorted(set(present) - set(wanted))),
        mismatched=tuple(
            sorted(name for name, on in wanted.items() if name in present and present[name] != on)
        ),
    )


def exit_code_to_report(state: ReplicaState, remembered: int) -> int:
    """dockerd's exit code of the container; once its restart policy has started it again
    (which clears dockerd's), the code of the run that ended, as remembered."""
    return state.exit_code or (remembered if state.restarts else 0)


@dataclass
class Tracked:
    """What the supervisor remembers of one desired replica between ticks."""

    health: Health = field(default_factory=Health)
    first_running: float | None = None  # monotonic, when first seen running
    next_probe: float = 0.0
    state: Reported = Reported.PENDING
    message: str = ""
    since: float = field(default_factory=time.time)
    retry_at: float = 0.0  # monotonic: when a failed start may be tried again
    retry_delay: float = 0.0
    restarts: int = 0  # dockerd's restart count when last seen
    exit_code: int = 0  # of the last run that ended, kept after a restart clears dockerd's


class Supervisor:
    def __init__(
        self,
        state_dir: Path,
        docker_socket: str,
        report: Callable[[workloads_pb2.ReplicaReports], None],
        engine_factory: Callable[[str], object] | None = None,
        ports_applier: ServicePortsApplier | None = None,
    ) -> None:
        self.path = state_dir / ASSIGNMENT_FILE
        self.docker_socket = docker_socket
        self.report = report
        self._engine_factory = engine_factory
        self._engine: object | None = None
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._assignment = self._load()
        self._tracked: dict[tuple[str, int], Tracked] = {}
        self._last_sent: bytes = b""
        self._last_sent_at = 0.0
        self._volumes_gone: tuple[str, ...] = ()
        self._networks_present: tuple[str, ...] = ()
        self._keeps_networks = bool(self._assignment.networks)  # told networks once: a manager
        self._network_failures: dict[str, str] = {}  # name -> the last error logged for it
        self.keepalived = Keepalived(state_dir / "keepalived")
        self._address_error = ""
        self._announced: list[workloads_pb2.VirtualAddress] = []  # what keepalived was given last
        self._retained: dict[str, tuple[workloads_pb2.VirtualAddress, float]] = {}  # held until
        self._draining: dict[str, float] = {}  # service -> when its replicas may stop (monotonic)
        self.service_ports = ports_applier or ServicePortsApplier()
        self._addresses: dict[tuple[str, str], str] = {}  # (container, started at) -> its address

    # the assignment
    def _load(self) -> workloads_pb2.NodeAssignment:
        assignment = workloads_pb2.NodeAssignment()
        try:
            assignment.ParseFromString(self.path.read_bytes())
            check_assignment(assignment)
        except FileNotFoundError:
            pass
        except Exception as error:  # a damaged file: run nothing rather than something wrong
            log.error("ignoring the stored assignment", path=str(self.path), error=str(error)[:200])
            assignment = workloads_pb2.NodeAssignment()
        return assignment

    def assign(self, assignment: workloads_pb2.NodeAssignment) -> None:
        """Take a new assignment (already checked by the caller); older generations are ignored."""
        with self._lock:
            if assignment.generation and assignment.generation < self._assignment.generation:
                return
            self._assignment = assignment
        if not assignment.replicas and not assignment.networks and not self.path.exists():
            self._wake.set()
            return  # a node that never ran workloads keeps no file (and never opens the engine)
        try:
            write_atomically(self.path, assignment.SerializeToString(), 0o600)
        except OSError as error:  # a full state disk: keep running it from memory
            log.error("cannot store the assignment; keeping it in memory", error=str(error))
        self._wake.set()

    def resend(self) -> None:
        """Report again at the next tick (a new session: the coordinator must hear it all)."""
        self._last_sent = b""
        self._wake.set()

    @property
    def generation(self) -> int:
        return self._assignment.generation

    def virtual_addresses(self) -> list[workloads_pb2.VirtualAddress]:
        with self._lock:
            return list(self._assignment.virtual_addresses)

    def desired(self) -> list[ContainerSpec]:
        with self._lock:
            return [spec_from_wire(spec) for spec in self._assignment.replicas]

    # the loop
    def run(self, stop: threading.Event) -> None:
        """The supervisor thread: converge, probe, report, until `stop` is set."""
        try:
            while not stop.is_set():
                try:
                    self.tick()
                except Exception:
                    log.exception("supervisor tick failed; retrying")
                self._wake.wait(TICK)
                self._wake.clear()
        finally:
            self.close()

    def close(self) -> None:
        """The agent exits: its keepalived goes with it (the addresses move to the peers)."""
        self.keepalived.close()

    def _virtual_addresses(self) -> None:
        """keepalived as assigned, but an address this node held is let go only after its
        hand-over delay, and its services' replicas stop a moment after that."""
        assigned = self.virtual_addresses()
        now = time.monotonic()
        held_now = held_addresses(self._announced)
        for item, until in hand_overs(self._announced, assigned, held_now, now):
            if item.address not in self._retained:
                self._retained[item.address] = (item, until)
                for service in item.services:
                    self._draining[service] = max(self._draining.get(service, 0.0), until + RELEASE_DRAIN)
        addresses = {item.address for item in assigned}
        router_ids = {item.router_id for item in assigned}
        self._retained = {
            address: (item, until)
            for address, (item, until) in self._retained.items()
            if until > now and address not in addresses and item.router_id not in router_ids
        }
        self._draining = {service: until for service, until in self._draining.items() if until > now}
        current = [*assigned, *(item for item, _ in self._retained.values())]
        self._announced = current
        try:
            self.keepalived.converge(current)
            self._address_error = ""
        except Exception as error:  # replicas go on; tried again next tick, said once per cause
            if str(error) != self._address_error:
                log.error("virtual addresses not applied", error=str(error)[:300])
            self._address_error = str(error)

    def _engine_or_none(self, desired: list[ContainerSpec]) -> object | None:
        if self._engine is None and (desired or self._assignment.networks or self.path.exists()):
            if self._engine_factory is None:
                from picoord.agent.runtime.engine import Engine  # only when needed

                self._engine_factory = Engine
            self._engine = self._engine_factory(self.docker_socket)
        return self._engine

    def tick(self) -> None:
        with self._lock:
            assignment = self._assignment
        desired = [spec_from_wire(spec) for spec in assignment.replicas]
        ports = assignment.service_ports if assignment.HasField("service_ports") else None
        engine = self._engine_or_none(desired)
        if engine is None:
            self._virtual_addresses()
            self.service_ports.apply(ports, {})
            if ports is not None:
                self._send(desired, [], assignment.generation)
            return
        actual = engine.replicas()  # type: ignore[attr-defined]
        plan = plan_node(desired, actual)
        self._virtual_addresses()
        for state in plan.stop:
            if state.service in self._draining:  # its address is moving away: a moment more
                continue
            log.info("stopping replica", replica=state.replica, revision=state.revision)
            engine.stop(state.container_id, grace=self._grace(state))  # type: ignore[attr-defined]
        for spec in plan.start:
            if spec.service in self._draining:  # its old replica still serves (and holds the port)
                continue
            self._start(engine, spec)
        if plan.stop or plan.start:
            actual = engine.replicas()  # type: ignore[attr-defined]
        self.service_ports.apply(ports, self._local_addresses(engine, ports, actual, desired))
        self._remove_volumes(engine)
        self._keep_networks(engine)
        self._probe(engine, desired, actual)
        self._send(desired, actual, assignment.generation)

    def _local_addresses(
        self,
        engine: object,
        ports: workloads_pb2.ServicePorts | None,
        actual: list[ReplicaState],
        desired: list[ContainerSpec],
    ) -> dict[str, str]:
        """replica -> container address of this node's replicas behind a published port
        (asked of dockerd once per container): the one the node reaches, on docker_gwbridge
        for a replica on overlay networks."""
        if ports is None:
            return {}
        local = {e.replica for port in ports.ports for e in port.endpoints if e.address == ports.node_address}
        on_overlay = {spec.replica for spec in desired if spec.networks}
        found = {}
        for state in actual:
            if state.replica not in local or state.state != "running":
                continue
            key = (state.container_id, state.started_at)  # a restarted container may get another address
            address = self._addresses.get(key)
            if not address:
                overlay = state.replica in on_overlay
                address = engine.address(state.container_id, overlay=overlay)  # type: ignore[attr-defined]
                if address:
                    self._addresses[key] = address
            if address:
                found[state.replica] = address
        live = {(state.container_id, state.started_at) for state in actual}
        for container in [c for c in self._addresses if c not in live]:
            del self._addresses[container]
        return found

    def _remove_volumes(self, engine: object) -> None:
        """Remove the named volumes asked for that no container uses (after this tick's stops)."""
        from picoord.agent.runtime.engine import RuntimeFailure

        with self._lock:
            asked = list(self._assignment.remove_volumes)
        if not asked:
            self._volumes_gone = ()
            return
        present, unused = engine.volumes()  # type: ignore[attr-defined]
        plan = plan_volumes(asked, present, unused)
        for name in plan.remove:
            try:
                engine.remove_volume(name)  # type: ignore[attr-defined]
                log.info("removed volume", volume=name)
                present.discard(name)
            except RuntimeFailure as error:
                log.warning("volume not removed", volume=name, error=str(error)[:300])
        self._volumes_gone = plan_volumes(asked, present, set()).gone

    def _keep_networks(self, engine: object) -> None:
        """On the Swarm manager (a node told networks): create the wanted overlay networks,
        remove picoord's others (dockerd refuses one still in use: tried again next tick),
        and report those present. A node never told any leaves networks alone."""
        from picoord.agent.runtime.engine import RuntimeFailure

        with self._lock:
            wanted = {network.name: network.encrypted for network in self._assignment.networks}
        self._keeps_networks = self._keeps_networks or bool(wanted)
        if not self._keeps_networks:
            return
        try:
            present = engine.overlay_networks()  # type: ignore[attr-defined]
        except RuntimeFailure as error:
            log.warning("cannot list networks", error=str(error)[:300])
            return
        plan = plan_networks(wanted, present)
        for name, encrypted in plan.create:
            try:
                engine.create_network(name, encrypted)  # type: ignore[attr-defined]
                log.info("created overlay network", network=name, encrypted=encrypted)
                present[name] = encrypted
            except RuntimeFailure as error:
                self._failed_once(name, "overlay network not created", str(error))
        for name in plan.remove:
            try:
                engine.remove_network(name)  # type: ignore[attr-defined]
                log.info("removed overlay network", network=name)
                present.pop(name, None)
            except RuntimeFailure as error:
                self._failed_once(name, "overlay network kept", str(error))
        for name in plan.mismatched:
            self._failed_once(name, "overlay network's encryption differs; remove the stack to change it", "")
        self._networks_present = tuple(sorted(present))

    def _failed_once(self, name: str, what: str, error: str) -> None:
        """Log a network's failure when it differs from the last one logged for it."""
        if self._network_failures.get(name) != what + error:
            self._network_failures[name] = what + error
            log.warning(what, network=name, error=error[:300])

    def _grace(self, state: ReplicaState) -> float:
        """The grace the container was created with (a replica being stopped has usually left
        the assignment already), else its spec's if still assigned, else Docker's 10 s."""
        if state.stop_grace is not None:
            return state.stop_grace
        for spec in self.desired():
            if spec.replica == state.replica:
                return spec.stop_grace
        return 10.0

    def _track(self, spec: ContainerSpec) -> Tracked:
        return self._tracked.setdefault((spec.replica, spec.revision), Tracked())

    def _set(self, tracked: Tracked, state: Reported, message: str = "") -> None:
        if (tracked.state, tracked.message) != (state, message):
            tracked.state, tracked.message, tracked.since = state, message, time.time()

    def _start(self, engine: object, spec: ContainerSpec) -> None:
        from picoord.agent.runtime.engine import RuntimeFailure

        tracked = self._track(spec)
        now = time.monotonic()
        if now < tracked.retry_at:
            return  # a registry that is down is not asked again every second
        self._set(tracked, Reported.PULLING)
        try:
            engine.pull(spec.image)  # type: ignore[attr-defined]
            engine.run(spec)  # type: ignore[attr-defined]
            log.info("started replica", replica=spec.replica, revision=spec.revision, image=spec.image)
            tracked.retry_delay = 0.0
        except RuntimeFailure as error:
            self._set(tracked, Reported.FAILED, str(error)[:1000])
            tracked.retry_delay = retry_delay(tracked.retry_delay)
            tracked.retry_at = now + tracked.retry_delay
            log.warning(
                "replica failed to start",
                replica=spec.replica,
                error=str(error)[:300],
                retry_in_seconds=tracked.retry_delay,
            )

    def _probe(self, engine: object, desired: list[ContainerSpec], actual: list[ReplicaState]) -> None:
        by_key = {(state.replica, state.revision): state for state in actual}
        now = time.monotonic()
        for spec in desired:
            tracked = self._track(spec)
            state = by_key.get((spec.replica, spec.revision))
            if state is None:
                continue
            if state.exit_code:
                tracked.exit_code = state.exit_code
            elif state.restarts > tracked.restarts:  # restarted between two looks: ask the events
                last = engine.last_exit_code(state.container_id)  # type: ignore[attr-defined]
                tracked.exit_code = last or tracked.exit_code
            tracked.restarts = state.restarts
            reported = Reported.from_word(state.state)  # Docker's words are the vocabulary's
            if reported is not Reported.RUNNING:
                self._set(tracked, reported, f"exit code {state.exit_code}" if state.exit_code else "")
                tracked.first_running = None
                tracked.health = Health()
                continue
            output = tracked.health.last_output if spec.health.kind != "none" else ""
            self._set(tracked, Reported.RUNNING, output)
            if tracked.first_running is None:
                tracked.first_running = now
            if spec.health.kind == "none" or now < tracked.next_probe:
                continue
            succeeded, output = engine.probe(state.container_id, spec)  # type: ignore[attr-defined]
            before = tracked.health.status
            tracked.health = observe(
                tracked.health,
                succeeded,
                output[:256],
                now - tracked.first_running,
                spec.health.start_period,
                spec.health.retries,
            )
            tracked.next_probe = now + spec.health.interval
            if tracked.health.status != before:
                tracked.since = time.time()
                log.info(
                    "replica health", replica=spec.replica, health=tracked.health.status, output=output[:120]
                )
        live = {(spec.replica, spec.revision) for spec in desired}
        for key in [key for key in self._tracked if key not in live]:
            del self._tracked[key]

    def reports(
        self, desired: list[ContainerSpec], actual: list[ReplicaState], generation: int | None = None
    ) -> workloads_pb2.ReplicaReports:
        """`generation`: the assignment this tick applied (replicas and published ports): the
        coordinator's acknowledgement that this node no longer sends traffic to a replica
        that left them."""
        by_key = {(state.replica, state.revision): state for state in actual}
        applied = self.generation if generation is None else generation
        reports = workloads_pb2.ReplicaReports(
            generation=applied,
            volumes_removed=self._volumes_gone,
            networks_present=self._networks_present,
            virtual_addresses_held=held_addresses(self.virtual_addresses()),
        )
        for spec in desired:
            tracked = self._track(spec)
            state = by_key.get((spec.replica, spec.revision))
            health = ReplicaHealth.NONE if spec.health.kind == "none" else tracked.health.status
            reports.replicas.add(
                service=spec.service,
                revision=spec.revision,
                replica=spec.replica,
                container_id=state.container_id[:64] if state else "",
                state=tracked.state.wire,
                state_word=tracked.state,
                health=health.wire,
                since=tracked.since,
                restarts=state.restarts if state else 0,
                exit_code=exit_code_to_report(state, tracked.exit_code) if state else 0,
                message=tracked.message[:1000],
            )
        return reports

    def _send(
        self, desired: list[ContainerSpec], actual: list[ReplicaState], generation: int | None = None
    ) -> None:
        reports = self.reports(desired, actual, generation)
        data = reports.SerializeToString(deterministic=True)
        now = time.monotonic()
        if data != self._last_sent or (desired and now - self._last_sent_at >= REPORT_EVERY):
            self._last_sent, self._last_sent_at = data, now
            self.report(reports)

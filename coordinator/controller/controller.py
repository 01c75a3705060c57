"""The workload controller: the imperative shell around the pure tick (decide.py).

SwarmKit's manager split, as plain pieces: each tick the shell gathers what is true now
(`_facts`: replica records, the agents' latest reports, node status and metrics, backoffs),
`decide` says what to do (reconciler, rollout step, dependency waits, start backoffs,
placement), the applier writes those decisions in one store transaction through
`Cluster.write` (so a full state disk shows in `store_writable`), the dispatcher sends each
node its whole assignment when it changed, and a `Snapshot` is published for every read
view (`coordctl services`/`ps`, rollout progress, /metrics).

No fixed tick: the loop wakes when something changes (a report, a session opening or
closing, an operator's change, an apply) or at the earliest `wake_at` the decisions ask
for (a grace period ending, a silent node turning lost, a rollout's deadline or delay, a
backoff ending). CEILING bounds the sleep anyway, for changes nothing announces (a node's
labels, its load when a replica waits for room).

Because every decision is recomputed from stored and reported facts, a restarted
coordinator resumes where it was, and because a replica is recorded before it is sent and
counted until its node confirms it is gone, no step exceeds the rollout's bounds.
Operator changes (rollout, undo, pause, resume, drain) go through the same lock as the
tick, so they are never interleaved with a half-made decision.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import time
from collections import defaultdict
from collections.abc import AsyncIterator, Callable, Mapping
from dataclasses import dataclass

import structlog

from picoord.common.images import ManifestError
from picoord.common.limits import DISCONNECT_GRACE
from picoord.common.vocabulary import RolloutStatus
from picoord.coordinator.cluster import Cluster
from picoord.coordinator.controller import views
from picoord.coordinator.controller.assignments import Assigned, node_assignments, volume_requests
from picoord.coordinator.controller.backoff import Backoff
from picoord.coordinator.controller.decide import (
    Decisions,
    Facts,
    Leaving,
    Removal,
    decide,
    global_targets,
    leaving,
    refusal,
    removal,
    scale_refusal,
    scaled,
)
from picoord.coordinator.controller.dispatcher import Dispatcher
from picoord.coordinator.controller.observed import Seen, observe, replica_view, reports_by_replica
from picoord.coordinator.controller.records import (
    ReplicaRecord,
    ServiceRecord,
    TickWrites,
    WorkloadRecords,
    stored,
)
from picoord.coordinator.controller.views import ServiceFigures, Snapshot
from picoord.coordinator.logs import LogHub
from picoord.coordinator.networking.endpoints import Member, service_endpoints, service_ports_message
from picoord.coordinator.networking.nodes import node_networks
from picoord.coordinator.networking.virtual_ips import plan_announcements
from picoord.coordinator.placement.inputs import node_from
from picoord.coordinator.placement.scheduler import Node
from picoord.coordinator.rate_limit import duty_pause
from picoord.coordinator.reconcile.reconciler import NodeStatus
from picoord.coordinator.rollout import history as revisions
from picoord.coordinator.rollout import planner
from picoord.coordinator.rollout.replicas import HEALTH_STARTING, RUNNING, STARTING, UNKNOWN, Replica
from picoord.coordinator.status import Status
from picoord.coordinator.workloads import networks
from picoord.coordinator.workloads.spec import ServiceSpec, secret_stamp, secret_users, secrets_set_since
from picoord.v1 import services_pb2, workloads_pb2

__all__ = ["ServiceFigures", "WorkloadController", "WorkloadRefused", "located"]

log = structlog.get_logger("picoord.coordinator.workloads")

# The longest the loop sleeps with nothing announced: what it may miss is not time-critical
# (a label change, a node's load freeing room); failover and backoffs come with a wake_at.
CEILING = 30.0
# While something waits for room, or a connected node is silent (it may speak again with no
# new session), look this often: cheap, and only while that lasts.
RETRY = 1.0
# The least a woken loop waits, so a wake_at of now never spins it.
MIN_SLEEP = 0.05
# At most this share of the event loop goes to ticks (rate_limit.duty_pause): a tick walks
# every node (about 40 ms at 5,000), and every session open wakes the loop, so a reconnect
# storm would otherwise tick back to back and starve the sessions themselves. With a few
# dozen nodes a tick takes about a millisecond and the rest is as short.
TICK_DUTY = 0.3
# How long a read view waits for the tick an announced change started, before it shows
# the last snapshot anyway.
FRESH_WAIT = 2.0


def located(spec: ServiceSpec, source: str) -> ServiceSpec:
    """The spec with where it was written put back: the store keeps what runs, not where it
    was written, and a refusal at rollout time must still name the document and field
    (`mcp.yaml: service/mcp.secrets[0]: ...`), as one at apply time does."""
    if spec.origin:
        return spec
    where = f"service/{spec.name}"
    return dataclasses.replace(spec, origin=f"{source}: {where}" if source else where)


class WorkloadRefused(Exception):
    """An operator request that cannot be done; `code` is the gRPC status name."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code


@dataclass(frozen=True)
class _Read:
    """One tick's reads of the workload tables, done in one thread hop."""

    services: dict[str, ServiceRecord]
    records: list[ReplicaRecord]
    drained: set[str]
    specs: dict[tuple[str, int], ServiceSpec]
    backoffs: dict[tuple[str, str], Backoff]


class WorkloadController:
    def __init__(
        self,
        cluster: Cluster,
        records: WorkloadRecords,
        grace: float = DISCONNECT_GRACE,
        clock: Callable[[], float] = time.time,
        pin_image: Callable[[str], str] | None = None,
    ) -> None:
        self.cluster = cluster
        self.records = records
        self.grace = grace
        self.clock = clock
        # image -> the digest to run ("" to run by tag); blocking (an HTTP call), so it
        # runs in a thread. None: nothing is pinned (tests without a registry).
        self.pin_image = pin_image
        self.dispatcher = Dispatcher()
        self.logs = LogHub(cluster)  # `coordctl logs`: the streams from the nodes' sessions
        self.ticks = 0  # how many ticks ran: what the controller bench counts
        self._disconnected_since: dict[str, float] = {}
        self._connected_since: dict[str, float] = {}
        self._started_at = clock()  # a node not heard from since this start is lost after the grace
        self._seen: dict[str, Seen] = {}
        self._node_cache: dict[str, tuple[tuple[object, ...], Node]] = {}
        self._wake = asyncio.Event()
        self._lock = asyncio.Lock()
        self._listeners: dict[str, set[asyncio.Queue[services_pb2.RolloutEvent]]] = defaultdict(set)
        self._last_info: dict[str, bytes] = {}
        self._unplaced: dict[str, str] = {}
        self._waiting: dict[str, str] = {}
        self._problems: dict[str, list[str]] = {}
        self._port_problems: set[str] = set()
        self._in_rotation: set[str] = set()  # replicas behind a published port, as last sent
        self._leaving: dict[str, Leaving] = {}  # stopped replicas still running, out of the rotation
        self._released: set[str] = set()  # stopped replicas that may go (left the rotation, or never in it)
        self._leave_wake: float | None = None
        self._snapshot = Snapshot()
        self._wanted = 0  # changes announced
        self._published_for = 0  # the announced changes the published snapshot has seen
        self._published = asyncio.Event()
        self._running = False
        self._next_at: float | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        records.watch(self._changed_elsewhere)

    # --- inputs from the agent sessions -------------------------------------------------------------
    def on_reports(self, node: str, reports: workloads_pb2.ReplicaReports) -> None:
        if self.dispatcher.reported(node, reports):
            self.wake()

    def on_session_open(self, node: str) -> None:
        self._disconnected_since.pop(node, None)
        self._connected_since[node] = self.clock()
        self.dispatcher.session_opened(node)
        self.wake()

    def on_session_closed(self, node: str) -> None:
        self._connected_since.pop(node, None)
        self._disconnected_since[node] = self.clock()
        self.wake()

    # --- the loop -----------------------------------------------------------------------------------
    async def run(self, stop: asyncio.Event) -> None:
        self._running = True
        self._loop = asyncio.get_running_loop()
        # The wait between ticks can be CEILING long: a stop wakes it, or every coordinator
        # shutdown (and so every restart under a cluster's sessions) would wait it out.
        waking_on_stop = asyncio.create_task(self._wake_on(stop))
        try:
            while not stop.is_set():
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._wake.wait(), self._sleep())
                self._wake.clear()
                started = time.perf_counter()
                try:
                    async with self._lock:
                        await self.tick()
                except Exception:
                    log.exception("workload tick failed; retrying")
                    self._next_at = self.clock() + RETRY
                await asyncio.sleep(duty_pause(time.perf_counter() - started, TICK_DUTY))
        finally:
            self._running = False
            waking_on_stop.cancel()

    async def _wake_on(self, stop: asyncio.Event) -> None:
        await stop.wait()
        self._wake.set()

    def _sleep(self) -> float:
        if self._next_at is None:
            return CEILING
        return min(CEILING, max(MIN_SLEEP, self._next_at - self.clock()))

    def wake(self) -> None:
        self._wanted += 1
        self._wake.set()

    def _changed_elsewhere(self) -> None:
        """An operator's change written to the records (from any thread)."""
        loop = self._loop
        if loop is None or loop.is_closed():
            return
        with contextlib.suppress(RuntimeError):
            loop.call_soon_threadsafe(self.wake)

    async def _read(self) -> _Read:
        def read() -> _Read:
            return _Read(
                {record.name: record for record in self.records.services()},
                self.records.replicas(),
                self.records.drained(),
                self.records.revision_specs(),
                {b.key: b for b in self.records.backoffs()},
            )

        return await asyncio.to_thread(read)

    def _nodes(self, drained: set[str]) -> dict[str, Node]:
        """Every node of the inventory as the scheduler sees it (the one place node facts are
        built). A node whose inputs are the same objects as last tick keeps its Node: with a
        thousand nodes, only those with a new sample or status are built again."""
        nodes = {}
        swarm = self.cluster.swarm()
        for record in self.cluster.nodes():
            hardware = self.cluster.hardware(record)
            sample = self.cluster.history.latest(record.name)
            ready = self.cluster.status(record.name) is Status.READY
            role = self.cluster.role(record.name)
            inputs = (record, hardware, sample, ready, record.name in drained, role, record.name in swarm)
            cached = self._node_cache.get(record.name)
            if cached is not None and all(a is b or a == b for a, b in zip(cached[0], inputs, strict=True)):
                nodes[record.name] = cached[1]
                continue
            node = node_from(
                record.name,
                hardware,
                sample,
                record.labels,
                ready=ready,
                draining=record.name in drained,
                role=role,
                enrolled=self.cluster.enrolled(record),
                swarm=record.name in swarm,
            )
            self._node_cache[record.name] = (inputs, node)
            nodes[record.name] = node
        for gone in self._node_cache.keys() - nodes.keys():
            del self._node_cache[gone]
        return nodes

    def _node_status(self, node: Node, now: float) -> NodeStatus:
        connected = node.name in self.cluster.sessions
        if connected and not node.ready:
            # A session still open that carries nothing (an agent whose loop hangs while its
            # gRPC core answers pings) is lost from when the node stopped being Ready. A cut
            # link or a frozen Pi ends the session itself (keepalive, heartbeat_timeout).
            lost_at = self.cluster.last_seen(node.name) + self.cluster.timeouts.not_ready_after
            return NodeStatus(node.name, False, lost_at, node.draining, node.facts)
        if connected:
            since = self._connected_since.setdefault(node.name, now)
        else:
            since = self._disconnected_since.setdefault(node.name, self._started_at)
        return NodeStatus(node.name, connected, since, node.draining, node.facts)

    def _replicas(self, records: list[ReplicaRecord], now: float) -> dict[str, Replica]:
        """The records with the agents' latest reports merged in; the controller's own clock
        dates each state and health change (Seen)."""
        by_key = reports_by_replica(self.dispatcher.reports())
        replicas = {}
        for record in records:
            report = by_key.get((record.node, record.id, record.revision))
            seen = None
            if report is not None:
                view = replica_view(record, report, None)
                seen = self._seen[record.id] = observe(
                    self._seen.get(record.id), view.state, view.health, now
                )
            replicas[record.id] = replica_view(record, report, seen)
        return replicas

    async def _facts(self) -> tuple[Facts, _Read]:
        read = await self._read()
        now = self.clock()
        nodes = self._nodes(read.drained)
        statuses = tuple(self._node_status(node, now) for node in nodes.values())
        silent_at = {
            name: self.cluster.last_seen(name) + self.cluster.timeouts.not_ready_after
            for name in self.cluster.sessions
            if name in nodes and nodes[name].ready
        }
        facts = Facts(
            now=now,
            services=read.services,
            replicas=self._replicas(read.records, now),
            nodes=nodes,
            statuses=statuses,
            specs=read.specs,
            backoffs=read.backoffs,
            gone=self.dispatcher.confirmed_gone(read.records),
            silent_at=silent_at,
            unplaced=dict(self._unplaced),
            waiting=dict(self._waiting),
            grace=self.grace,
        )
        return facts, read

    async def tick(self) -> None:
        wanted = self._wanted
        self.ticks += 1
        facts, read = await self._facts()
        decisions = decide(facts)
        made = await self._apply(decisions, facts.now)
        records = _after(read.records, decisions, made)
        replicas = {r.id: facts.replicas.get(r.id) or replica_view(r, None, None) for r in records}
        replicas = {rid: dataclasses.replace(r, stopping=True) if r.id in dict(decisions.stops) else r
                    for rid, r in replicas.items()}  # fmt: skip
        await self._dispatch(facts, records, replicas, read)
        self._next_at = min(
            (at for at in (self._next_wake(decisions, facts), self._leave_wake) if at is not None),
            default=None,
        )
        services = dict(read.services)
        for rollout in decisions.rollouts:
            services[rollout.service] = dataclasses.replace(services[rollout.service], rollout=rollout)
        backoffs = {k: b for k, b in read.backoffs.items() if k not in set(decisions.cleared)}
        backoffs.update({b.key: b for b in decisions.backoffs})
        self._publish(
            Snapshot(
                at=facts.now,
                services=services,
                records=tuple(records),
                replicas=replicas,
                reports=reports_by_replica(self.dispatcher.reports()),
                specs=read.specs,
                backoffs=backoffs,
                unplaced=dict(self._unplaced),
                ready=frozenset(name for name, node in facts.nodes.items() if node.ready),
            ),
            wanted,
        )

    def _next_wake(self, decisions: Decisions, facts: Facts) -> float | None:
        soon = [decisions.wake_at] if decisions.wake_at is not None else []
        connected_silent = any(
            name in self.cluster.sessions and not node.ready for name, node in facts.nodes.items()
        )
        if decisions.unplaced or connected_silent or decisions.forget:
            soon.append(facts.now + RETRY)
        return min(soon, default=None)

    # --- the applier ----------------------------------------------------------------------------------
    async def _apply(self, decisions: Decisions, now: float) -> list[ReplicaRecord]:
        """Write the tick's decisions in one transaction, then tell the operator."""
        writes = TickWrites(
            forget=decisions.forget,
            replaced=decisions.replaced,
            reclaimed=decisions.reclaimed,
            stops=decisions.stops,
            rollouts=decisions.rollouts,
            starts=tuple(start.new for start in decisions.starts),
            backoffs=decisions.backoffs,
            cleared=decisions.cleared,
        )
        made = [] if writes.empty else await self.cluster.write(self.records.write_tick, writes, now)
        self._unplaced = dict(decisions.unplaced)
        self._waiting = dict(decisions.waiting)
        self.dispatcher.forgotten(decisions.forget)
        for replica in decisions.forget:
            self._seen.pop(replica, None)
        for service, text in decisions.notes:
            self._note(service, text)
        for record in made:
            self._note(record.service, f"starting {record.id} on {record.node} (revision {record.revision})")
        return made

    # --- the dispatcher's input -----------------------------------------------------------------------
    async def _dispatch(
        self,
        facts: Facts,
        records: list[ReplicaRecord],
        replicas: dict[str, Replica],
        read: _Read,
    ) -> None:
        secrets = await asyncio.to_thread(self.records.secret_values)
        addresses = {node: session.address for node, session in self.cluster.sessions.items()}
        healthy = {rid: replica.available(True) for rid, replica in replicas.items()}
        current = {name: service.spec for name, service in read.services.items()}
        manager = networks.swarm_manager(self.cluster.swarm())
        manager_report = self.dispatcher.reports().get(manager)
        held = self._leave_before_stop(facts, records)
        live = [record for record in records if not record.stopping or record.id in held]
        by_node, problems = node_assignments(
            [Assigned(r.id, r.service, r.revision, r.node) for r in live],
            read.specs,
            current,
            healthy,
            secrets,
            addresses,
            manager_report.networks_present if manager_report is not None else (),
        )
        in_use = [read.specs[key] for key in {(r.service, r.revision) for r in records} if key in read.specs]
        wanted = networks.wanted_networks([*current.values(), *in_use])
        keep = (
            {manager: [workloads_pb2.OverlayNetwork(name=name, encrypted=on) for name, on in wanted.items()]}
            if manager
            else {}
        )
        for problem in problems:
            service = problem.split(".", 1)[0]
            if problem not in self._problems.get(service, []):
                self._note(service, problem)
        self._problems = defaultdict(list)
        for problem in problems:
            self._problems[problem.split(".", 1)[0]].append(problem)
        ports = self._service_ports(records, replicas, read, current, addresses)
        await self.dispatcher.send(
            by_node,
            self.cluster.sessions,
            records,
            facts.now,
            await self._volume_requests(by_node),
            networks=keep,
            virtual=self._virtual_addresses(current, replicas),
            service_ports=ports,
        )
        for replica, state in self._leaving.items():
            if state.owed is None:
                owed = {node: self.dispatcher.sent_generation(node) for node in self._ready(facts)}
                self._leaving[replica] = Leaving(state.since, owed)

    def _ready(self, facts: Facts) -> set[str]:
        return {name for name, node in facts.nodes.items() if node.ready and name in self.cluster.sessions}

    def _leave_before_stop(self, facts: Facts, records: list[ReplicaRecord]) -> frozenset[str]:
        """The stopping replicas that keep running, out of the published ports' rotation,
        until every Ready node has applied an assignment without them (decide.leaving)."""
        stopping = {record.id for record in records if record.stopping}
        for replica in stopping - self._leaving.keys() - self._released:
            if replica in self._in_rotation:
                self._leaving[replica] = Leaving(facts.now)
            else:
                self._released.add(replica)
        acked = {node: report.generation for node, report in self.dispatcher.reports().items()}
        held, self._leave_wake = leaving(self._leaving, acked, self._ready(facts), facts.now)
        for replica in [r for r in self._leaving if r not in held]:
            del self._leaving[replica]
            self._released.add(replica)
        self._released &= stopping
        return held

    def _service_ports(
        self,
        records: list[ReplicaRecord],
        replicas: Mapping[str, Replica],
        read: _Read,
        current: Mapping[str, ServiceSpec],
        addresses: Mapping[str, str],
    ) -> dict[str, workloads_pb2.ServicePorts]:
        """node -> the published ports it answers, each with the replicas in its rotation
        (none at all while no service publishes a port)."""
        members = []
        for record in records:
            replica, spec = replicas.get(record.id), read.specs.get((record.service, record.revision))
            if replica is None or spec is None:
                continue
            serving = replica.available(spec.health is not None) and not record.stopping
            members.append(Member(record.id, record.service, record.revision, record.node, serving))
        ports, problems = service_endpoints(members, read.specs, current, addresses)
        for problem in set(problems) - self._port_problems:
            self._note(problem.split(":", 1)[0], problem)
        self._port_problems = set(problems)
        self._in_rotation = {endpoint.replica for port in ports for endpoint in port.endpoints}
        if not ports:
            return {}
        return {node: service_ports_message(ports, address, addresses) for node, address in addresses.items()}

    def _virtual_addresses(
        self, current: Mapping[str, ServiceSpec], replicas: Mapping[str, Replica]
    ) -> dict[str, list[workloads_pb2.VirtualAddress]]:
        """node -> the VRRP instances it runs (virtual_ips.plan_announcements, pure)."""
        vips: dict[str, list[str]] = {}
        for name, spec in current.items():
            if spec.address:
                vips.setdefault(spec.address, []).append(name)
        if not vips:
            return {}
        healthy = [
            (replica.service, replica.node)
            for replica in replicas.values()
            if replica.service in current and replica.available(current[replica.service].health is not None)
        ]
        held = {
            node: list(report.virtual_addresses_held) for node, report in self.dispatcher.reports().items()
        }
        warming = [  # running, no health result yet: in the election below the healthy ones
            (replica.service, replica.node)
            for replica in replicas.values()
            if replica.service in current
            and not replica.stopping
            and replica.state in (STARTING, RUNNING)
            and replica.health in (UNKNOWN, HEALTH_STARTING)
            and current[replica.service].health is not None
        ]
        plan = plan_announcements(vips, node_networks(self.cluster), healthy, held, warming)
        return {
            node: [
                workloads_pb2.VirtualAddress(
                    address=item.address,
                    prefix_length=item.prefix_length,
                    router_id=item.router_id,
                    priority=item.priority,
                    source=item.source,
                    peers=list(item.peers),
                    services=list(item.services),
                )
                for item in items
            ]
            for node, items in plan.items()
        }

    async def _volume_requests(
        self, by_node: Mapping[str, list[workloads_pb2.ReplicaSpec]]
    ) -> dict[str, list[str]]:
        """node -> the named volumes to ask it to remove; those it reported gone are forgotten."""
        asks: dict[str, list[str]] = {}
        reports = self.dispatcher.reports()
        for node, pending in (await asyncio.to_thread(self.records.volume_removals)).items():
            report = reports.get(node)
            gone = list(report.volumes_removed) if report is not None else []
            asks[node], done = volume_requests(pending, by_node.get(node, []), gone)
            if done:
                await self.cluster.write(self.records.volumes_removed, node, done)
        return asks

    # --- what operators see -------------------------------------------------------------------------
    def _note(self, service: str, text: str) -> None:
        log.info("workload", service=service, change=text)
        for queue in self._listeners.get(service, ()):
            queue.put_nowait(services_pb2.RolloutEvent(note=text))

    def _publish(self, snapshot: Snapshot, wanted: int) -> None:
        progress = views.infos(snapshot)
        snapshot = dataclasses.replace(snapshot, figures=views.figures(snapshot, progress))
        self._snapshot = snapshot
        for name, info in progress.items():
            data = info.SerializeToString(deterministic=True)
            if self._last_info.get(name) == data:
                continue
            self._last_info[name] = data
            for queue in self._listeners.get(name, ()):
                queue.put_nowait(services_pb2.RolloutEvent(progress=info))
        self._published_for = max(self._published_for, wanted)
        self._published.set()
        self._published = asyncio.Event()

    async def _fresh(self) -> Snapshot:
        """The snapshot, after the tick that follows the last announced change when the loop
        runs (an apply then `coordctl services` shows the service)."""
        deadline = time.monotonic() + FRESH_WAIT
        while self._running and self._published_for < self._wanted:
            left = deadline - time.monotonic()
            if left <= 0:
                break
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._published.wait(), left)
        return self._snapshot

    def info(self, service: ServiceRecord, replicas: list[Replica]) -> services_pb2.RolloutInfo:
        return views.rollout_info(service, replicas, self._unplaced)

    def metrics_snapshot(self) -> tuple[ServiceFigures, ...]:
        """The services' figures as of the last tick: cheap and safe from any thread (the
        /metrics scrape), since each tick replaces the whole snapshot."""
        return self._snapshot.figures

    async def follow(
        self, name: str, until_finished: bool = True
    ) -> AsyncIterator[services_pb2.RolloutEvent]:
        """The service's rollout events: its state now, then every change until it finishes."""
        queue: asyncio.Queue[services_pb2.RolloutEvent] = asyncio.Queue()
        self._listeners[name].add(queue)
        try:
            snapshot = await self._fresh()
            service = snapshot.services.get(name)
            if service is None:
                service = await asyncio.to_thread(self.records.service, name)
            if service is None:
                raise WorkloadRefused(
                    "NOT_FOUND", f"no service {name!r}: apply its spec first (coordctl apply -f)"
                )
            info = self.info(service, list(snapshot.replicas.values()))
            yield services_pb2.RolloutEvent(progress=info)
            if not until_finished or views.finished(info):
                return
            while True:
                event = await queue.get()
                yield event
                if event.WhichOneof("event") == "progress" and views.finished(event.progress):
                    return
        finally:
            self._listeners[name].discard(queue)

    # --- operator changes -------------------------------------------------------------------------------
    async def _operator_facts(self) -> Facts:
        """What an operator's change checks against: the stored records, no reports (it
        decides no replica's fate, only whether a rollout may begin)."""
        read = await self._read()
        return Facts(
            now=self.clock(),
            services=read.services,
            replicas={r.id: replica_view(r, None, None) for r in read.records},
            nodes=self._nodes(read.drained),
            statuses=(),
            specs=read.specs,
        )

    async def start_rollout(self, name: str, image: str = "", cause: str = "") -> list[str]:
        """Make the applied spec (with `image`, if given) the target of a new rollout;
        return what was started, as lines for the operator."""
        digests = await self._resolve_ahead(name, image)  # outside the lock: the ticks go on
        async with self._lock:
            facts = await self._operator_facts()
            service = facts.services.get(name)
            if service is None:
                raise WorkloadRefused(
                    "NOT_FOUND",
                    f"no service {name!r} and no stack of that name: apply its spec first "
                    "(coordctl apply -f FILE [--stack NAME])",
                )
            spec = service.spec
            if image:
                spec = dataclasses.replace(spec, image=image)
            await self._preflight(located(spec, service.source), facts)
            # A first deployment brings what it depends on along (they are placed first).
            first = [
                facts.services[dependency]
                for dependency in spec.depends_on
                if dependency in facts.services and facts.services[dependency].rollout is None
            ]
            for dependency in first:
                await self._preflight(located(dependency.spec, dependency.source), facts)
            # Every tag resolved before anything is recorded: a registry that does not answer
            # refuses the whole rollout, and nothing changes.
            spec = await self._pinned(spec, digests)
            pinned_first = [await self._pinned(dependency.spec, digests) for dependency in first]
            lines = []
            for dependency, dependency_spec in zip(first, pinned_first, strict=True):
                lines.append(
                    await self._record_and_begin(dependency, dependency_spec, f"dependency of {name}", facts)
                )
                lines.append(f"{name} depends on {dependency.name}: it is placed first")
            lines.append(await self._record_and_begin(service, spec, cause or "rollout", facts))
            return lines

    async def _digest(self, service: str, image: str) -> str:
        assert self.pin_image is not None
        try:
            return await asyncio.to_thread(self.pin_image, image)
        except ManifestError as error:
            raise WorkloadRefused(
                "FAILED_PRECONDITION", f"{service}: cannot pin {error}; nothing was changed"
            ) from None

    async def _resolve_ahead(self, name: str, image: str) -> dict[str, str]:
        """The digests of the service's image and its dependencies' (image -> digest), asked
        before the controller's lock is taken: a slow registry must not hold up the ticks."""
        if self.pin_image is None:
            return {}
        digests: dict[str, str] = {}
        service = await asyncio.to_thread(self.records.service, name)
        if service is None:
            return digests
        wanted = [(name, image or service.spec.image)]
        for dependency in service.spec.depends_on:
            record = await asyncio.to_thread(self.records.service, dependency)
            if record is not None and record.rollout is None:
                wanted.append((dependency, record.spec.image))
        for owner, each in wanted:
            if each not in digests:
                digests[each] = await self._digest(owner, each)
        return digests

    async def _pinned(self, spec: ServiceSpec, digests: dict[str, str]) -> ServiceSpec:
        """`spec` with the digest its image's tag names now, when it comes from a cluster
        registry (common/images.py); WorkloadRefused when that registry cannot say."""
        if self.pin_image is None:
            return spec
        digest = digests[spec.image] if spec.image in digests else await self._digest(spec.name, spec.image)
        return dataclasses.replace(spec, image_digest=digest)

    async def _record_and_begin(
        self, service: ServiceRecord, spec: ServiceSpec, cause: str, facts: Facts
    ) -> str:
        history = await asyncio.to_thread(self.records.history, service.name)
        stamp = secret_stamp(spec, await self._secrets_updated())
        updated, revision, _new = revisions.record(history, stored(spec, stamp), facts.now, cause)
        return await self._begin(service, spec, revision.number, updated, facts)

    async def undo(self, name: str, to_revision: int | None) -> list[str]:
        async with self._lock:
            facts = await self._operator_facts()
            service = facts.services.get(name)
            if service is None:
                raise WorkloadRefused("NOT_FOUND", f"no service {name!r}")
            history = await asyncio.to_thread(self.records.history, name)
            try:
                running = service.rollout.target if service.rollout else None
                updated, revision = revisions.undo(history, facts.now, to_revision, running=running)
            except revisions.RevisionError as error:
                raise WorkloadRefused("FAILED_PRECONDITION", str(error)) from None
            spec = revision.spec.spec
            await self._preflight(located(spec, service.source), facts)
            return [await self._begin(service, spec, revision.number, updated, facts)]

    async def _preflight(self, spec: ServiceSpec, facts: Facts) -> None:
        """Everything that can be refused before anything starts (decide.refusal)."""
        known = [(name, key) for name, key, _, _ in await asyncio.to_thread(self.records.secret_names)]
        why = refusal(spec, facts, known)
        if why is not None:
            raise WorkloadRefused("FAILED_PRECONDITION", why)

    async def _begin(
        self,
        service: ServiceRecord,
        spec: ServiceSpec,
        revision: int,
        history: list[revisions.Revision],
        facts: Facts,
    ) -> str:
        previous = service.rollout.target if service.rollout else None
        rollout = planner.begin(
            service.name,
            revision,
            previous if previous != revision else None,
            spec.replicas,
            spec.update,
            facts.now,
            has_health_check=spec.health is not None,
            global_nodes=global_targets(spec, facts),
        )
        await self.cluster.write(self.records.begin_rollout, service.name, history, rollout)
        self._last_info.pop(service.name, None)
        self._waiting.pop(service.name, None)
        pinned = f" at {spec.image_digest}" if spec.image_digest else ""
        line = f"rolling out revision {revision} of {service.name} ({spec.image}{pinned})"
        self._note(service.name, line)
        self.wake()
        return line

    async def pause(self, name: str, resume: bool = False) -> services_pb2.RolloutInfo:
        async with self._lock:
            service = await asyncio.to_thread(self.records.service, name)
            if service is None or service.rollout is None:
                raise WorkloadRefused("NOT_FOUND", f"{name!r} has no rollout")
            rollout = planner.resume(service.rollout) if resume else planner.pause(service.rollout)
            await self.cluster.write(self.records.save_rollout, name, rollout)
            self.wake()
            replicas = list(self._snapshot.replicas.values())
            return self.info(dataclasses.replace(service, rollout=rollout), replicas)

    async def scale(self, name: str, count: int) -> services_pb2.ServiceInfo:
        """Hold the service to `count` replicas (decide.scale_refusal); the service as the
        next tick sees it, with why replicas cannot be placed, if so."""
        async with self._lock:
            service = await asyncio.to_thread(self.records.service, name)
            if service is None:
                raise WorkloadRefused("NOT_FOUND", f"no service {name!r}")
            why = scale_refusal(service, count)
            if why is not None:
                raise WorkloadRefused("FAILED_PRECONDITION", why)
            assert service.rollout is not None
            await self.cluster.write(self.records.save_rollout, name, scaled(service.rollout, count))
            self._note(name, f"scaled to {count} replicas")
            self.wake()
        return next(info for info in await self.services_view() if info.name == name)

    async def remove(self, kind: str, name: str, dry_run: bool, volumes: bool = False) -> Removal:
        """Remove a service or a stack (decide.removal), with `volumes` its named volumes too;
        with `dry_run`, only say what would go."""
        async with self._lock:
            facts = await self._operator_facts()
            try:
                away = {node.name for node in facts.nodes.values() if not node.ready}
                gone = removal(
                    kind, name, facts.services, facts.replicas.values(), away, facts.specs, volumes
                )
            except LookupError as error:
                raise WorkloadRefused("NOT_FOUND", str(error.args[0])) from None
            except ValueError as error:
                raise WorkloadRefused("INVALID_ARGUMENT", str(error)) from None
            if not dry_run:
                await self.cluster.write(
                    self.records.remove, list(gone.services), facts.now, gone.volumes_removed
                )
                for service in gone.services:
                    self._note(service, f"{service} removed: stopping its replicas")
                self.wake()
            return gone

    async def services_view(self) -> list[services_pb2.ServiceInfo]:
        """The services; one whose secret got a new value since its revision shows staged."""
        listed = views.services_view(await self._fresh())
        updated = await self._secrets_updated()
        for info in listed:
            if info.staged or not info.revision:
                continue
            history = await asyncio.to_thread(self.records.history, info.name)
            current = next((r for r in history if r.number == info.revision), None)
            if current is not None and secrets_set_since(current.spec.spec, updated, current.created_at):
                info.staged = True
        return listed

    async def _secrets_updated(self) -> dict[tuple[str, str], float]:
        return {(name, key): at for name, key, _, at in await asyncio.to_thread(self.records.secret_names)}

    async def secret_users(self) -> dict[str, list[str]]:
        """Secret name -> the services that read it: in their applied spec or in the revision
        their replicas run."""
        read = await self._read()
        specs = [service.spec for service in read.services.values()]
        specs += [
            read.specs[(name, service.rollout.target)]
            for name, service in read.services.items()
            if service.rollout is not None and (name, service.rollout.target) in read.specs
        ]
        return secret_users(specs)

    async def remove_secret(self, name: str, force: bool) -> tuple[int, list[str]]:
        """Remove every key of the secret: refused while a service reads it, unless `force`
        (then their replicas stop: an assignment cannot be built without it). Returns how
        many keys went and the services that read it."""
        async with self._lock:
            users = (await self.secret_users()).get(name, [])
            keys = [
                key
                for secret, key, _, _ in await asyncio.to_thread(self.records.secret_names)
                if secret == name
            ]
            if not keys:
                raise WorkloadRefused("NOT_FOUND", f"no secret {name!r}")
            if users and not force:
                raise WorkloadRefused(
                    "FAILED_PRECONDITION",
                    f"secret {name!r} is used by {', '.join(users)}: remove it from their specs and apply, "
                    "or use --force (their replicas would stop: they cannot be built without it)",
                )
            removed = await self.cluster.write(self.records.delete_secret, name)
            return int(removed), users

    async def replicas_view(self, name: str) -> list[services_pb2.ReplicaInfo]:
        snapshot = await self._fresh()
        if name not in snapshot.services:
            raise WorkloadRefused("NOT_FOUND", f"no service {name!r}")
        return views.replicas_view(snapshot, name, self.clock())

    async def history_view(self, name: str) -> list[services_pb2.RevisionInfo]:
        service = await asyncio.to_thread(self.records.service, name)
        if service is None:
            raise WorkloadRefused("NOT_FOUND", f"no service {name!r}")
        history = await asyncio.to_thread(self.records.history, name)
        target = service.rollout.target if service.rollout else 0
        return [
            services_pb2.RevisionInfo(
                revision=revision.number,
                created_at=revision.created_at,
                image=revision.spec.spec.image,
                cause=revision.cause,
                key=revision.spec.key,
                current=revision.number == target,
            )
            for revision in history
        ]

    async def put_secret(self, name: str, key: str, value: bytes, now: float) -> None:
        await asyncio.to_thread(self.records.put_secret, name, key, value, now)
        self.wake()  # a replica waiting for this secret can now be built

    async def secret_names(self) -> list[tuple[str, str, int, float]]:
        return await asyncio.to_thread(self.records.secret_names)

    async def drain_progress(
        self, node: str, timeout: float = 600.0
    ) -> AsyncIterator[services_pb2.RolloutEvent]:
        """Notes while the node's replicas move away; ends when none is left there."""
        deadline = self.clock() + timeout
        left = -1
        while self.clock() < deadline:
            records = await asyncio.to_thread(self.records.replicas)
            here = [r for r in records if r.node == node]
            if len(here) != left:
                left = len(here)
                names = ", ".join(sorted(r.id for r in here))
                yield services_pb2.RolloutEvent(
                    note=f"{left} replica(s) left on {node}" + (f": {names}" if left else "")
                )
            if not here:
                return
            await asyncio.sleep(1.0)
        info = services_pb2.RolloutInfo(
            status=RolloutStatus.FAILED.wire, message=f"replicas still on {node} after {timeout:.0f} s"
        )
        yield services_pb2.RolloutEvent(progress=info)

    async def drain(self, node: str, undo: bool) -> None:
        async with self._lock:
            if self.cluster.node(node) is None:
                raise WorkloadRefused("NOT_FOUND", f"no node named {node!r}")
            await asyncio.to_thread(self.records.set_drained, node, not undo, self.clock())
            self.wake()


def _after(
    records: list[ReplicaRecord], decisions: Decisions, made: list[ReplicaRecord]
) -> list[ReplicaRecord]:
    """The replica records as the tick's transaction left them, without reading them again."""
    stops = dict(decisions.stops)
    replaced = set(decisions.replaced)
    reclaimed = set(decisions.reclaimed)
    forgotten = set(decisions.forget)
    after = []
    for record in records:
        if record.id in forgotten:
            continue
        if record.id in stops:
            record = dataclasses.replace(record, stopping=True, stop_reason=stops[record.id])
        if record.id in replaced or record.id in reclaimed:
            record = dataclasses.replace(record, replaced=record.id in replaced)
        after.append(record)
    return after + made

"""The workload controller: the imperative shell around placement, the rollout planner
and the reconciler.

Every tick it reads what is true now (replica records, the agents' latest reports, node
status and metrics), asks the pure core what to do (planner.step for a service that is
rolling, reconcile for the rest), writes the decisions to the store (new replica records,
stops), and sends each node the whole set of replicas it must run when that set changed.
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
from collections.abc import AsyncIterator, Callable, Iterable, Sequence
from dataclasses import dataclass

import structlog

from picoord.common.validation import FieldError
from picoord.coordinator.cluster import Cluster
from picoord.coordinator.controller.assignments import Placed as Assigned
from picoord.coordinator.controller.assignments import node_assignments
from picoord.coordinator.controller.observed import (
    Seen,
    observe,
    replica_view,
    reports_by_replica,
)
from picoord.coordinator.controller.records import ReplicaRecord, ServiceRecord, WorkloadRecords, stored
from picoord.coordinator.placement.constraints import first_unmet
from picoord.coordinator.placement.inputs import node_from
from picoord.coordinator.placement.scheduler import Node, Placed, check_spread, place
from picoord.coordinator.reconcile.reconciler import DesiredService, NodeStatus, reconcile, visible_replicas
from picoord.coordinator.rollout import history as revisions
from picoord.coordinator.rollout import planner
from picoord.coordinator.rollout.replicas import Replica
from picoord.coordinator.status import Status
from picoord.coordinator.workloads.spec import GLOBAL, ServiceSpec, check_secrets, placement_request
from picoord.v1 import agent_pb2, services_pb2, workloads_pb2

log = structlog.get_logger("picoord.coordinator.workloads")

TICK = 1.0
DISCONNECT_GRACE = 5.0


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


@dataclass
class Facts:
    """Everything one tick reads, gathered once."""

    now: float
    services: dict[str, ServiceRecord]
    records: list[ReplicaRecord]
    nodes: dict[str, Node]
    replicas: dict[str, Replica]  # by id


# Every value RolloutInfo.status takes, so /metrics can export one series per value.
ROLLOUT_STATUSES = (
    "not rolled out",
    "progressing",
    "rolling back",
    "paused",
    "complete",
    "rolled back",
    "failed",
)


@dataclass(frozen=True)
class ServiceFigures:
    """What /metrics says of one service, as of the last tick (see metrics_snapshot)."""

    service: str
    desired: int
    running: int
    healthy: int
    revision: int
    rollout_status: str


def service_figures(info: services_pb2.RolloutInfo, service: ServiceRecord, running: int) -> ServiceFigures:
    """The figures `coordctl services` shows: desired from the rollout once there is one."""
    return ServiceFigures(
        service=service.name,
        desired=info.desired if service.rollout else service.spec.replicas,
        running=running,
        healthy=info.available,
        revision=service.rollout.target if service.rollout else 0,
        rollout_status=info.status,
    )


class WorkloadController:
    def __init__(
        self,
        cluster: Cluster,
        records: WorkloadRecords,
        grace: float = DISCONNECT_GRACE,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.cluster = cluster
        self.records = records
        self.grace = grace
        self.clock = clock
        self._reports: dict[str, workloads_pb2.ReplicaReports] = {}
        self._disconnected_since: dict[str, float] = {}
        self._connected_since: dict[str, float] = {}
        self._started_at = clock()  # a node not heard from since this start is lost after the grace
        self._seen: dict[str, Seen] = {}
        self._sent: dict[str, bytes] = {}
        self._removed_at: dict[str, int] = {}  # replica id -> generation of the assignment without it
        self._generation = 0
        self._wake = asyncio.Event()
        self._lock = asyncio.Lock()
        self._listeners: dict[str, set[asyncio.Queue[services_pb2.RolloutEvent]]] = defaultdict(set)
        self._last_info: dict[str, bytes] = {}
        self._unplaced: dict[str, str] = {}
        self._waiting: dict[str, str] = {}
        self._problems: dict[str, list[str]] = {}
        self._figures: tuple[ServiceFigures, ...] = ()

    # --- inputs from the agent sessions -------------------------------------------------------------
    def on_reports(self, node: str, reports: workloads_pb2.ReplicaReports) -> None:
        self._reports[node] = reports
        self._wake.set()

    def on_session_open(self, node: str) -> None:
        self._disconnected_since.pop(node, None)
        self._connected_since[node] = self.clock()
        self._sent.pop(node, None)  # a new session gets the whole assignment again
        self._wake.set()

    def on_session_closed(self, node: str) -> None:
        self._connected_since.pop(node, None)
        self._disconnected_since[node] = self.clock()
        self._wake.set()

    # --- the loop -----------------------------------------------------------------------------------
    async def run(self, stop: asyncio.Event) -> None:
        while not stop.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), TICK)
            self._wake.clear()
            try:
                async with self._lock:
                    await self.tick()
            except Exception:
                log.exception("workload tick failed; retrying")

    def wake(self) -> None:
        self._wake.set()

    async def _facts(self) -> Facts:
        services = {record.name: record for record in await asyncio.to_thread(self.records.services)}
        records = await asyncio.to_thread(self.records.replicas)
        drained = await asyncio.to_thread(self.records.drained)
        now = self.clock()
        nodes = {}
        for record in self.cluster.nodes():
            nodes[record.name] = node_from(
                record.name,
                self.cluster.hardware(record),
                self.cluster.history.latest(record.name),
                record.labels,
                ready=self.cluster.status(record.name) is Status.READY,
                draining=record.name in drained,
                role=self.cluster.role(record.name),
                enrolled=self.cluster.enrolled(record),
            )
        by_key = reports_by_replica(self._reports)
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
        return Facts(now, services, records, nodes, replicas)

    async def tick(self) -> None:
        facts = await self._facts()
        await self._decide(facts)
        facts = await self._facts()
        if await self._forget_gone(facts):
            self._wake.set()  # a confirmed stop frees room: decide again now, not a tick later
        await self._send_assignments(facts)
        self._publish(facts)

    # --- decisions ----------------------------------------------------------------------------------
    async def _decide(self, facts: Facts) -> None:
        """The reconciler for every rolled-out service (failover, stale replicas, drains,
        counts), then the planner for those that are rolling."""
        statuses = [self._node_status(node, facts.now) for node in facts.nodes.values()]
        rolled = {name: service for name, service in facts.services.items() if service.rollout is not None}
        desired = [self._desired(service) for service in rolled.values()]
        plan = reconcile(desired, list(facts.replicas.values()), statuses, facts.now, self.grace)
        if plan.replaces:
            await asyncio.to_thread(self.records.set_replaced, [r.replica for r in plan.replaces], True)
        if plan.reclaims:
            await asyncio.to_thread(self.records.set_replaced, [r.replica for r in plan.reclaims], False)
        for change in (*plan.replaces, *plan.reclaims):
            facts.replicas[change.replica] = dataclasses.replace(
                facts.replicas[change.replica], replaced=change in plan.replaces
            )
            self._note(change.service, f"{change.replica} on {change.node}: {change.reason}")
        await self._stop(plan.stops, facts)
        for name, service in rolled.items():
            starts = [
                (start.revision, start.node, start.reason) for start in plan.starts if start.service == name
            ]
            await self._start(service, starts, facts)
        for name, service in rolled.items():
            rollout = service.rollout
            assert rollout is not None
            if rollout.finished:
                continue
            waiting_for = self._dependencies_not_serving(service, facts)
            if rollout.previous is None and waiting_for:
                # depends_on orders first placement: nothing of it starts before they serve.
                self._wait_note(name, f"waiting for {', '.join(waiting_for)} to have a healthy replica")
                continue
            mine = [r for r in facts.replicas.values() if r.service == name]
            step = planner.step(rollout, visible_replicas(mine, statuses, facts.now, self.grace), facts.now)
            if step.rollout != rollout:
                await asyncio.to_thread(self.records.save_rollout, name, step.rollout)
                facts.services[name] = dataclasses.replace(service, rollout=step.rollout)
            for event in step.events:
                self._note(name, event)
            await self._stop(step.stops, facts)
            await self._start(
                service, [(start.revision, start.node, start.reason) for start in step.starts], facts
            )

    def _dependencies_not_serving(self, service: ServiceRecord, facts: Facts) -> list[str]:
        """The services it depends on that have no available replica yet."""
        missing = []
        for dependency in service.spec.depends_on:
            other = facts.services.get(dependency)
            checked = other.rollout.has_health_check if other and other.rollout else True
            if not any(r.service == dependency and r.available(checked) for r in facts.replicas.values()):
                missing.append(dependency)
        return missing

    def _wait_note(self, service: str, text: str) -> None:
        """A waiting reason, told once per change rather than every tick."""
        if self._waiting.get(service) != text:
            self._waiting[service] = text
            self._note(service, text)

    def _desired(self, service: ServiceRecord) -> DesiredService:
        rollout = service.rollout
        assert rollout is not None
        spec = service.spec
        return DesiredService(
            request=placement_request(spec, rollout.desired_count),
            revision=rollout.target,
            policy=spec.update,
            rolling=not rollout.finished,
            has_health_check=rollout.has_health_check,
        )

    def _node_status(self, node: Node, now: float) -> NodeStatus:
        connected = node.name in self.cluster.sessions
        if connected and not node.ready:
            # A session nothing comes through (a cut link, a frozen Pi) is lost from when the
            # node stopped being Ready (silent past the heartbeat timeout), not from when TCP
            # keepalive ends the stream, tens of seconds later.
            lost_at = self.cluster.last_seen(node.name) + self.cluster.timeouts.not_ready_after
            return NodeStatus(node.name, False, lost_at, node.draining, node.facts)
        if connected:
            since = self._connected_since.setdefault(node.name, now)
        else:
            since = self._disconnected_since.setdefault(node.name, self._started_at)
        return NodeStatus(node.name, connected, since, node.draining, node.facts)

    async def _stop(self, stops: Sequence[object], facts: Facts) -> None:
        marks = [(stop.replica, stop.reason) for stop in stops]  # type: ignore[attr-defined]
        marks = [(replica, reason) for replica, reason in marks if not facts.replicas[replica].stopping]
        if not marks:
            return
        await asyncio.to_thread(self.records.mark_stopping, marks)
        for replica, reason in marks:
            view = facts.replicas[replica]
            facts.replicas[replica] = dataclasses.replace(view, stopping=True)
            self._note(view.service, f"stopping {replica} on {view.node}: {reason}")

    async def _start(
        self, service: ServiceRecord, starts: list[tuple[int, str | None]], facts: Facts
    ) -> None:
        if not starts:
            return
        placed = await self._placed(facts)
        by_revision: dict[int, list[str | None]] = defaultdict(list)
        for revision, node, _reason in starts:
            by_revision[revision].append(node)
        for revision, nodes in by_revision.items():
            spec = await asyncio.to_thread(self.records.revision_spec, service.name, revision)
            if spec is None:
                self._note(service.name, f"revision {revision} of {service.name} is not stored: not started")
                continue
            chosen = [node for node in nodes if node is not None]
            wanted = sum(node is None for node in nodes)
            if wanted:
                placement = place(list(facts.nodes.values()), placed, placement_request(spec, wanted))
                chosen.extend(placement.assignments)
                for warning in placement.warnings:
                    self._note(service.name, warning)
                if placement.unplaced:
                    reason = (
                        f"{placement.unplaced} replica(s) of {service.name} not placed: {placement.reason}"
                    )
                    if self._unplaced.get(service.name) != reason:
                        self._note(service.name, reason)
                    self._unplaced[service.name] = reason
                else:
                    self._unplaced.pop(service.name, None)
            if not chosen:
                continue
            made = await asyncio.to_thread(
                self.records.add_replicas, service.name, revision, chosen, facts.now
            )
            for record in made:
                facts.records.append(record)
                facts.replicas[record.id] = replica_view(record, None, None)
                placed.append(self._placed_one(spec, record.node))
                self._note(service.name, f"starting {record.id} on {record.node} (revision {revision})")

    def _placed_one(self, spec: ServiceSpec, node: str) -> Placed:
        return Placed(
            spec.name,
            node,
            spec.resources.memory_request,
            spec.resources.cpu_request,
            spec.resources.gpu_count,
        )

    async def _placed(self, facts: Facts, exclude: str = "") -> list[Placed]:
        """What every replica record holds on its node (requests of its revision)."""
        placed = []
        for record in facts.records:
            if record.service == exclude:
                continue
            spec = await asyncio.to_thread(self.records.revision_spec, record.service, record.revision)
            if spec is not None:
                placed.append(self._placed_one(spec, record.node))
        return placed

    async def _forget_gone(self, facts: Facts) -> bool:
        """Forget stopped replicas once their node confirms they are gone (or the node is)."""
        gone = []
        for record in facts.records:
            if not record.stopping:
                continue
            if record.node not in facts.nodes:
                gone.append(record.id)
                continue
            report = self._reports.get(record.node)
            removed_at = self._removed_at.get(record.id)
            if report is None or removed_at is None or report.generation < removed_at:
                continue
            if not any(item.replica == record.id for item in report.replicas):
                gone.append(record.id)
        if gone:
            await asyncio.to_thread(self.records.forget_replicas, gone)
            for replica in gone:
                self._removed_at.pop(replica, None)
                self._seen.pop(replica, None)
        return bool(gone)

    # --- assignments ------------------------------------------------------------------------------------
    async def _send_assignments(self, facts: Facts) -> None:
        live = [record for record in facts.records if not record.stopping]
        specs = {}
        for record in live:
            key = (record.service, record.revision)
            if key not in specs:
                specs[key] = await asyncio.to_thread(self.records.revision_spec, *key)
        secrets = await asyncio.to_thread(self.records.secret_values)
        addresses = {node: session.address for node, session in self.cluster.sessions.items()}
        healthy = {rid: replica.available(True) for rid, replica in facts.replicas.items()}
        current = {name: service.spec for name, service in facts.services.items()}
        by_node, problems = node_assignments(
            [Assigned(r.id, r.service, r.revision, r.node) for r in live],
            {key: spec for key, spec in specs.items() if spec is not None},
            current,
            healthy,
            secrets,
            addresses,
        )
        for problem in problems:
            service = problem.split(".", 1)[0]
            if problem not in self._problems.get(service, []):
                self._note(service, problem)
        self._problems = defaultdict(list)
        for problem in problems:
            self._problems[problem.split(".", 1)[0]].append(problem)
        for node, session in list(self.cluster.sessions.items()):
            replicas = by_node.get(node, [])
            data = b"".join(spec.SerializeToString(deterministic=True) for spec in replicas)
            if self._sent.get(node) == data:
                continue
            self._generation = max(self._generation + 1, int(facts.now * 1000))
            assignment = workloads_pb2.NodeAssignment(generation=self._generation, replicas=replicas)
            await session.outbox.put(agent_pb2.CoordinatorMessage(assignment=assignment))
            self._sent[node] = data
            named = {spec.replica for spec in replicas}
            for record in facts.records:
                if record.node == node and record.id not in named and record.id not in self._removed_at:
                    self._removed_at[record.id] = self._generation

    # --- what operators see -------------------------------------------------------------------------
    def _note(self, service: str, text: str) -> None:
        log.info("workload", service=service, change=text)
        for queue in self._listeners.get(service, ()):
            queue.put_nowait(services_pb2.RolloutEvent(note=text))

    def info(self, service: ServiceRecord, replicas: Sequence[Replica]) -> services_pb2.RolloutInfo:
        rollout = service.rollout
        if rollout is None:
            return services_pb2.RolloutInfo(service=service.name, status="not rolled out")
        mine = [r for r in replicas if r.service == service.name and r.active and not r.stopping]
        health_checked = rollout.has_health_check
        return services_pb2.RolloutInfo(
            service=service.name,
            revision=rollout.target,
            previous=(rollout.revision if rollout.rolling_back else rollout.previous) or 0,
            status=rollout.state,
            rolling_back=rollout.rolling_back,
            message=rollout.message or self._unplaced.get(service.name, ""),
            failures=[str(failure) for failure in rollout.failures],
            started_at=rollout.started_at,
            desired=rollout.desired_count,
            updated=sum(r.revision == rollout.target for r in mine),
            healthy=sum(r.revision == rollout.target and r.available(health_checked) for r in mine),
            available=sum(r.available(health_checked) for r in mine),
        )

    def metrics_snapshot(self) -> tuple[ServiceFigures, ...]:
        """The services' figures as of the last tick: cheap and safe from any thread (the
        /metrics scrape), since each tick replaces the whole tuple."""
        return self._figures

    def _publish(self, facts: Facts) -> None:
        figures = []
        for name, service in facts.services.items():
            info = self.info(service, list(facts.replicas.values()))
            figures.append(service_figures(info, service, _running(facts.replicas.values(), name)))
            data = info.SerializeToString(deterministic=True)
            if self._last_info.get(name) == data:
                continue
            self._last_info[name] = data
            for queue in self._listeners.get(name, ()):
                queue.put_nowait(services_pb2.RolloutEvent(progress=info))
        self._figures = tuple(figures)

    async def follow(
        self, name: str, until_finished: bool = True
    ) -> AsyncIterator[services_pb2.RolloutEvent]:
        """The service's rollout events: its state now, then every change until it finishes."""
        queue: asyncio.Queue[services_pb2.RolloutEvent] = asyncio.Queue()
        self._listeners[name].add(queue)
        try:
            facts = await self._facts()
            service = facts.services.get(name)
            if service is None:
                raise WorkloadRefused(
                    "NOT_FOUND", f"no service {name!r}: apply its spec first (coordctl apply -f)"
                )
            info = self.info(service, list(facts.replicas.values()))
            yield services_pb2.RolloutEvent(progress=info)
            if not until_finished or _finished(info):
                return
            while True:
                event = await queue.get()
                yield event
                if event.WhichOneof("event") == "progress" and _finished(event.progress):
                    return
        finally:
            self._listeners[name].discard(queue)

    # --- operator changes -------------------------------------------------------------------------------
    async def start_rollout(self, name: str, image: str = "", cause: str = "") -> list[str]:
        """Make the applied spec (with `image`, if given) the target of a new rollout;
        return what was started, as lines for the operator."""
        async with self._lock:
            facts = await self._facts()
            service = facts.services.get(name)
            if service is None:
                raise WorkloadRefused(
                    "NOT_FOUND", f"no service {name!r}: apply its spec first (coordctl apply -f)"
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
            lines = []
            for dependency in first:
                lines.append(
                    await self._record_and_begin(dependency, dependency.spec, f"dependency of {name}", facts)
                )
                lines.append(f"{name} depends on {dependency.name}: it is placed first")
            lines.append(await self._record_and_begin(service, spec, cause or "rollout", facts))
            return lines

    async def _record_and_begin(
        self, service: ServiceRecord, spec: ServiceSpec, cause: str, facts: Facts
    ) -> str:
        history = await asyncio.to_thread(self.records.history, service.name)
        updated, revision, _new = revisions.record(history, stored(spec), facts.now, cause)
        return await self._begin(service, spec, revision.number, updated, facts)

    async def undo(self, name: str, to_revision: int | None) -> list[str]:
        async with self._lock:
            facts = await self._facts()
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
        """Everything that can be refused before anything starts: a missing secret, a spread
        the matching nodes cannot hold, replicas that fit nowhere (in Kubernetes' words)."""
        known = {(name, key) for name, key, _, _ in await asyncio.to_thread(self.records.secret_names)}
        usable = [node for node in facts.nodes.values() if node.ready and not node.draining]
        matching = [node for node in usable if first_unmet(spec.placement.constraints, node.facts) is None]
        try:
            check_secrets(spec, known)
            for dependency in spec.depends_on:
                if dependency not in facts.services:
                    raise FieldError(
                        f"{spec.origin or spec.name}.depends_on",
                        f"{spec.name} depends on {dependency!r}, which is not applied: apply its spec too",
                    )
            if spec.mode != GLOBAL:
                check_spread(
                    f"{spec.origin}.placement",
                    spec.replicas,
                    spec.placement.spread,
                    len(matching),
                )
        except FieldError as error:
            raise WorkloadRefused("FAILED_PRECONDITION", str(error)) from None
        # Its own replicas make way for the new ones; everything else keeps its place.
        others = await self._placed(facts, exclude=spec.name)
        placement = place(list(facts.nodes.values()), others, placement_request(spec, spec.replicas))
        if spec.mode == GLOBAL and not placement.assignments:
            raise WorkloadRefused(
                "FAILED_PRECONDITION", f"{spec.origin}: {placement.reason or 'no node matches'}"
            )
        if spec.mode != GLOBAL and placement.unplaced:
            raise WorkloadRefused(
                "FAILED_PRECONDITION",
                f"{spec.origin}: {placement.unplaced} of {spec.replicas} replicas cannot be placed: "
                f"{placement.reason}",
            )

    async def _begin(
        self,
        service: ServiceRecord,
        spec: ServiceSpec,
        revision: int,
        history: list[revisions.Revision],
        facts: Facts,
    ) -> str:
        previous = service.rollout.target if service.rollout else None
        global_nodes = None
        if spec.mode == GLOBAL:
            placement = place([n for n in facts.nodes.values() if n.ready], [], placement_request(spec, 0))
            global_nodes = placement.assignments
        rollout = planner.begin(
            service.name,
            revision,
            previous if previous != revision else None,
            spec.replicas,
            spec.update,
            facts.now,
            has_health_check=spec.health is not None,
            global_nodes=global_nodes,
        )
        await asyncio.to_thread(self.records.replace_history, service.name, history)
        await asyncio.to_thread(self.records.save_rollout, service.name, rollout)
        self._last_info.pop(service.name, None)
        self._waiting.pop(service.name, None)
        line = f"rolling out revision {revision} of {service.name} ({spec.image})"
        self._note(service.name, line)
        self._wake.set()
        return line

    async def pause(self, name: str, resume: bool = False) -> services_pb2.RolloutInfo:
        async with self._lock:
            facts = await self._facts()
            service = facts.services.get(name)
            if service is None or service.rollout is None:
                raise WorkloadRefused("NOT_FOUND", f"{name!r} has no rollout")
            rollout = planner.resume(service.rollout) if resume else planner.pause(service.rollout)
            await asyncio.to_thread(self.records.save_rollout, name, rollout)
            self._wake.set()
            return self.info(dataclasses.replace(service, rollout=rollout), list(facts.replicas.values()))

    async def services_view(self) -> list[services_pb2.ServiceInfo]:
        facts = await self._facts()
        views = []
        for name, service in facts.services.items():
            info = self.info(service, list(facts.replicas.values()))
            running = _running(facts.replicas.values(), name)
            current = service.rollout.target if service.rollout else 0
            spec = (await asyncio.to_thread(self.records.revision_spec, name, current)) if current else None
            views.append(
                services_pb2.ServiceInfo(
                    name=name,
                    mode=service.spec.mode,
                    desired=info.desired if service.rollout else service.spec.replicas,
                    running=running,
                    healthy=info.available,
                    revision=current,
                    image=(spec or service.spec).image,
                    rollout_status=info.status,
                    staged=spec is None
                    or stored(spec) != stored(service.spec)
                    or spec.replicas != service.spec.replicas,
                    ports=[f"{p.published or '-'}:{p.target}/{p.protocol}" for p in service.spec.ports],
                    unplaced=self._unplaced.get(name, ""),
                )
            )
        return views

    async def replicas_view(self, name: str) -> list[services_pb2.ReplicaInfo]:
        facts = await self._facts()
        if name not in facts.services:
            raise WorkloadRefused("NOT_FOUND", f"no service {name!r}")
        by_key = reports_by_replica(self._reports)
        views = []
        for record in facts.records:
            if record.service != name:
                continue
            replica = facts.replicas[record.id]
            report = by_key.get((record.node, record.id, record.revision))
            spec = await asyncio.to_thread(self.records.revision_spec, name, record.revision)
            views.append(
                services_pb2.ReplicaInfo(
                    replica=record.id,
                    service=name,
                    revision=record.revision,
                    node=record.node,
                    state=(report.state if report else "pending")
                    # Ready, not merely holding a session: a cut link keeps its session open
                    # until TCP keepalive gives up, long after the node went silent.
                    + ("" if self.cluster.status(record.node) is Status.READY else " (node unreachable)"),
                    health=report.health if report else workloads_pb2.REPLICA_HEALTH_UNSPECIFIED,
                    since=replica.since,
                    restarts=replica.restarts,
                    message=(report.message if report else "") or record.stop_reason,
                    image=spec.image if spec else "",
                    # replaced: written off on a lost node, stopped when the node returns
                    desired="stopping" if record.stopping else "replaced" if record.replaced else "running",
                )
            )
        return views

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
        self._wake.set()  # a replica waiting for this secret can now be built

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
            status="failed", message=f"replicas still on {node} after {timeout:.0f} s"
        )
        yield services_pb2.RolloutEvent(progress=info)

    async def drain(self, node: str, undo: bool) -> None:
        async with self._lock:
            if self.cluster.node(node) is None:
                raise WorkloadRefused("NOT_FOUND", f"no node named {node!r}")
            await asyncio.to_thread(self.records.set_drained, node, not undo, self.clock())
            self._wake.set()


def _running(replicas: Iterable[Replica], service: str) -> int:
    """Replicas of the service running and not being stopped, as `coordctl services` counts them."""
    return sum(r.service == service and r.state == "running" and not r.stopping for r in replicas)


def _finished(info: services_pb2.RolloutInfo) -> bool:
    return info.status in ("complete", "failed", "rolled back", "paused", "not rolled out")

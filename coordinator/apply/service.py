"""Applies as the admin API offers them: read and plan a spec, then run the plan to its end,
one apply at a time.

The servicer only translates requests and events; the rules live here: the spec is parsed
off the event loop, a second apply is refused atomically, and a run goes on even when
coordctl goes away, because actions already sent must be followed and recorded.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Collection
from dataclasses import dataclass

import structlog

from picoord.common.validation import FieldError
from picoord.coordinator.apply.action_planner import IssueRegistryTls, NodeView, RegistryTls, Step, plan
from picoord.coordinator.apply.runner import ApplyRun
from picoord.coordinator.ca import ClusterCA
from picoord.coordinator.cluster import Cluster
from picoord.coordinator.controller.records import WorkloadRecords
from picoord.coordinator.networking import virtual_ips
from picoord.coordinator.networking.nodes import node_networks
from picoord.coordinator.placement.constraints import NodeFacts
from picoord.coordinator.placement.inputs import accepted_labels, node_from
from picoord.coordinator.workloads import networks, stacks
from picoord.coordinator.workloads.reader import WorkloadError, read_workloads
from picoord.coordinator.workloads.spec import ServiceSpec
from picoord.coordinator.workloads.stacks import StackError
from picoord.v1 import admin_pb2

log = structlog.get_logger("picoord.coordinator.apply")


class ApplyBusy(Exception):
    """Another apply is running: two at once could send conflicting actions to a node."""


@dataclass
class StartedApply:
    run: ApplyRun
    steps: list[Step]
    events: asyncio.Queue[admin_pb2.ApplyEvent | None]
    task: asyncio.Task[None]
    preface: list[admin_pb2.ApplyEvent]  # warnings and staged services, before the plan

    async def stream(self) -> AsyncIterator[admin_pb2.ApplyEvent]:
        """Warnings and services, the plan, then each event as it happens, then the summary."""
        for event in self.preface:
            yield event
        for step in self.steps:
            yield admin_pb2.ApplyEvent(
                planned=admin_pb2.PlannedStep(
                    step=step.id, node=step.node, kind=step.kind, requires=step.requires
                )
            )
        while (event := await self.events.get()) is not None:
            yield event
        await self.task


def registry_tls(ca: ClusterCA) -> IssueRegistryTls:
    """The planner's way to a Registry's certificate: the CA's, kept in its state dir."""

    def issue(name: str, hosts: list[str]) -> RegistryTls:
        identity = ca.registry_identity(name, hosts)
        return RegistryTls(
            identity.certificate_pem.decode(), identity.key_pem.decode(), ca.certificate_pem.decode()
        )

    return issue


def registries(steps: list[Step]) -> dict[str, list[str]]:
    """Registry name -> the HOST:PORT names it is pulled by, from the planned trust steps."""
    found: dict[str, list[str]] = {}
    for step in steps:
        if step.kind == "registry_trust":
            found[step.document.partition("/")[2]] = list(step.action.registry_trust.addresses)
    return found


class ApplyService:
    def __init__(
        self,
        cluster: Cluster,
        workloads: WorkloadRecords | None = None,
        issue_tls: IssueRegistryTls | None = None,
    ) -> None:
        self.cluster = cluster
        self.workloads = workloads
        self.issue_tls = issue_tls
        self.running: ApplyRun | None = None
        self._tasks: set[asyncio.Task[None]] = set()

    def inventory(self, vips: Collection[str] = ()) -> list[NodeView]:
        """The nodes as the planner sees them: labels, arch, where each session comes from,
        its Swarm role and whether VRRP passes to it for one of the stored services' virtual
        addresses `vips` (the firewall check keeps Swarm's ports and VRRP open between them)."""
        vrrp = virtual_ips.vrrp_nodes(vips, node_networks(self.cluster))
        views = []
        for record in self.cluster.nodes():
            session = self.cluster.sessions.get(record.name)
            views.append(
                NodeView(
                    name=record.name,
                    labels=accepted_labels(record.labels, record.pending_labels),
                    arch=self.cluster.recorded_hardware(record).arch,
                    address=session.address if session else "",
                    swarm_role=self.cluster.swarm_role(record.name),
                    virtual_addresses=record.name in vrrp,
                )
            )
        return views

    def node_facts(self) -> list[NodeFacts]:
        """Every node as placement constraints see it (where a stack's services could go)."""
        facts = []
        for record in self.cluster.nodes():
            node = node_from(
                record.name,
                self.cluster.hardware(record),
                None,
                record.labels,
                ready=True,
                role=self.cluster.role(record.name),
                enrolled=self.cluster.enrolled(record),
            )
            facts.append(node.facts)
        return facts

    async def start(
        self,
        documents: str,
        dry_run: bool,
        requested_by: str,
        source: str = "",
        stack: str = "",
        prune: bool = False,
    ) -> StartedApply:
        """Plan and start an apply. WorkloadError or PlanError for a bad spec, ApplyBusy
        while another runs; either way nothing is recorded or sent.

        Services in the file are recorded as their desired spec, all at once, before the
        node actions run; `coordctl rollout NAME` rolls them out. With `stack` (or a
        Kubernetes metadata.namespace) they are recorded as that stack (stacks.py)."""
        workloads = await asyncio.to_thread(read_workloads, documents, source)
        stack = stacks.stack_name(stack) if stack else workloads.namespace
        if prune and not stack:
            raise StackError("--prune removes what a stack's file no longer names: give --stack")
        # plan() issues a Registry's certificate (files in the state dir): off the event loop
        stored = await asyncio.to_thread(self.workloads.services) if self.workloads is not None else []
        vips = {record.spec.address for record in stored} | {spec.address for spec in workloads.services}
        inventory = self.inventory(vips - {""})
        steps = await asyncio.to_thread(plan, list(workloads.cluster), inventory, self.issue_tls)
        if workloads.services and self.workloads is None:
            raise WorkloadError("services need the coordinator's workload store, which is not set up")
        # No await from this check to the claim below: of two applies, exactly one runs.
        if self.running is not None:
            raise ApplyBusy(f"another apply ({self.running.apply_id}) is running; try again when it ends")
        events: asyncio.Queue[admin_pb2.ApplyEvent | None] = asyncio.Queue()
        run = ApplyRun(
            dispatch=self.cluster.dispatch,
            emit=events.put,
            record=self.cluster.record_action,
            dry_run=dry_run,
            requested_by=requested_by,
            clock=self.cluster.clock,
        )
        self.running = run
        try:
            preface = [admin_pb2.ApplyEvent(warning=line) for line in workloads.warning_lines()]
            specs = networks.stack_networks(workloads.services, stack, workloads.network_mode)
            preface += await self._stage(specs, dry_run, source, stack, prune, workloads.keeps_address)
            if not dry_run:
                for name, addresses in registries(steps).items():
                    await self.cluster.record_registry(name, addresses)
        except BaseException:
            self.running = None
            raise
        log.info("apply", apply_id=run.apply_id, steps=len(steps), dry_run=dry_run, by=requested_by)
        task = asyncio.create_task(self._carry_out(run, steps, events))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return StartedApply(run, steps, events, task, preface)

    async def _stage(
        self,
        specs: list[ServiceSpec],
        dry_run: bool,
        source: str,
        stack: str = "",
        prune: bool = False,
        keeps_address: bool = False,
    ) -> list[admin_pb2.ApplyEvent]:
        if not specs and not stack:
            return []
        assert self.workloads is not None
        existing = {
            record.name: stacks.Applied(record.stack, record.spec)
            for record in await asyncio.to_thread(self.workloads.services)
        }
        try:
            specs = virtual_ips.stack_addresses(
                specs, existing, stack, keeps_address, node_networks(self.cluster)
            )
        except FieldError as error:
            raise WorkloadError(f"{source}: {error}" if source else str(error)) from None
        changes = stacks.plan_stack(existing, specs, stack, prune)
        # the file's own errors first; then whether its nodes can carry its networks
        refusal = networks.overlay_refusal(specs, stack, self.node_facts(), self.cluster.swarm())
        if refusal:
            raise StackError(refusal)
        pruned = [change.name for change in changes if change.change == stacks.PRUNED]
        if not dry_run and (specs or pruned):
            # one transaction; the reconciler stops the pruned services' replicas (as coordctl rm)
            await asyncio.to_thread(self.workloads.apply, specs, self.cluster.clock(), source, stack, pruned)
        by_name = {spec.name: spec for spec in specs}
        events = []
        for change in changes:
            spec = by_name.get(change.name) or existing[change.name].spec
            events.append(
                admin_pb2.ApplyEvent(
                    service=admin_pb2.ServiceStaged(
                        name=spec.name,
                        changed=change.change in (stacks.ADDED, stacks.CHANGED),
                        image=spec.image,
                        mode=spec.mode,
                        replicas=spec.replicas,
                        stack=stack,
                        change=change.change,
                    )
                )
            )
        return events

    async def _carry_out(
        self, run: ApplyRun, steps: list[Step], events: asyncio.Queue[admin_pb2.ApplyEvent | None]
    ) -> None:
        try:
            summary = await run.run(steps)
            await events.put(admin_pb2.ApplyEvent(summary=summary))
        finally:
            self.running = None
            await events.put(None)

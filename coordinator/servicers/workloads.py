"""The operator's workload API: translates requests to the controller and its answers back.

Everything a request names is validated here, at the edge, before the controller sees it.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator

import grpc
import structlog

from picoord.common import limits
from picoord.common.names import InvalidName, validate_node_name
from picoord.common.validation import FieldError, image_reference
from picoord.coordinator.controller.controller import WorkloadController, WorkloadRefused
from picoord.coordinator.logs import log_targets, relay
from picoord.coordinator.servicers.faults import unavailable_on_store_fault
from picoord.coordinator.workloads.spec import service_name
from picoord.coordinator.workloads.stacks import services_of
from picoord.v1 import services_pb2, services_pb2_grpc

log = structlog.get_logger("picoord.coordinator.workloads")

DRAIN_POLL = 1.0
LOGS_WAIT = 60.0  # without follow: how long the nodes have to send what they have


class WorkloadsServicer(services_pb2_grpc.WorkloadsServicer):
    def __init__(self, controller: WorkloadController) -> None:
        self.controller = controller

    async def _name(self, name: str, context: grpc.aio.ServicerContext) -> str:
        try:
            return service_name("name", name)
        except FieldError as error:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(error))
            raise AssertionError("unreachable") from None

    async def _refused(self, context: grpc.aio.ServicerContext, error: WorkloadRefused) -> None:
        await context.abort(getattr(grpc.StatusCode, error.code), str(error))

    async def _follow(
        self, name: str, context: grpc.aio.ServicerContext, until_finished: bool = True
    ) -> AsyncIterator[services_pb2.RolloutEvent]:
        try:
            async for event in self.controller.follow(name, until_finished):
                yield event
        except WorkloadRefused as error:
            await self._refused(context, error)

    @unavailable_on_store_fault
    async def Rollout(
        self, request: services_pb2.RolloutRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[services_pb2.RolloutEvent]:
        name = await self._name(request.name, context)
        if request.image:
            try:
                image_reference("image", request.image)
            except FieldError as error:
                await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(error))
        cause = f"rollout --image {request.image}" if request.image else "rollout"
        try:
            lines = await self.controller.start_rollout(name, request.image, cause)
        except WorkloadRefused as error:
            await self._refused(context, error)
            return
        log.info("rollout started", service=name, image=request.image or None)
        for line in lines:
            yield services_pb2.RolloutEvent(note=line)
        async for event in self._follow(name, context, until_finished=not request.detach):
            yield event

    async def RolloutStatus(
        self, request: services_pb2.ServiceRef, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[services_pb2.RolloutEvent]:
        name = await self._name(request.name, context)
        async for event in self._follow(name, context, until_finished=request.follow):
            yield event

    @unavailable_on_store_fault
    async def RolloutUndo(
        self, request: services_pb2.UndoRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[services_pb2.RolloutEvent]:
        name = await self._name(request.name, context)
        try:
            lines = await self.controller.undo(name, request.to_revision or None)
        except WorkloadRefused as error:
            await self._refused(context, error)
            return
        for line in lines:
            yield services_pb2.RolloutEvent(note=line)
        async for event in self._follow(name, context, until_finished=not request.detach):
            yield event

    @unavailable_on_store_fault
    async def RolloutHistory(
        self, request: services_pb2.ServiceRef, context: grpc.aio.ServicerContext
    ) -> services_pb2.RolloutHistoryResponse:
        name = await self._name(request.name, context)
        try:
            return services_pb2.RolloutHistoryResponse(revisions=await self.controller.history_view(name))
        except WorkloadRefused as error:
            await self._refused(context, error)
            raise AssertionError("unreachable") from None

    async def _pause(self, request: services_pb2.ServiceRef, context: grpc.aio.ServicerContext, resume: bool):
        name = await self._name(request.name, context)
        try:
            return await self.controller.pause(name, resume)
        except WorkloadRefused as error:
            await self._refused(context, error)
            raise AssertionError("unreachable") from None

    @unavailable_on_store_fault
    async def RolloutPause(
        self, request: services_pb2.ServiceRef, context: grpc.aio.ServicerContext
    ) -> services_pb2.RolloutInfo:
        return await self._pause(request, context, resume=False)

    @unavailable_on_store_fault
    async def RolloutResume(
        self, request: services_pb2.ServiceRef, context: grpc.aio.ServicerContext
    ) -> services_pb2.RolloutInfo:
        return await self._pause(request, context, resume=True)

    @unavailable_on_store_fault
    async def ListServices(
        self, request: services_pb2.ListServicesRequest, context: grpc.aio.ServicerContext
    ) -> services_pb2.ListServicesResponse:
        return services_pb2.ListServicesResponse(services=await self.controller.services_view())

    @unavailable_on_store_fault
    async def Scale(
        self, request: services_pb2.ScaleRequest, context: grpc.aio.ServicerContext
    ) -> services_pb2.ServiceInfo:
        name = await self._name(request.name, context)
        try:
            info = await self.controller.scale(name, request.replicas)
        except WorkloadRefused as error:
            await self._refused(context, error)
            raise AssertionError("unreachable") from None
        log.info("service scaled", service=name, replicas=request.replicas)
        return info

    @unavailable_on_store_fault
    async def Remove(
        self, request: services_pb2.RemoveRequest, context: grpc.aio.ServicerContext
    ) -> services_pb2.RemoveResponse:
        name = await self._name(request.name, context)
        try:
            gone = await self.controller.remove(request.kind, name, request.dry_run, request.volumes)
        except WorkloadRefused as error:
            await self._refused(context, error)
            raise AssertionError("unreachable") from None
        if not request.dry_run:
            log.info(f"{request.kind} removed", name=name, services=list(gone.services))
        return services_pb2.RemoveResponse(
            services=gone.services,
            replicas=[f"{replica}@{node}" for replica, node in gone.replicas],
            volumes_kept=gone.volumes_kept,
            away=gone.away,
            volumes_removed=[f"{volume}@{node}" for node, volume in gone.volumes_removed],
        )

    @unavailable_on_store_fault
    async def ListReplicas(
        self, request: services_pb2.ServiceRef, context: grpc.aio.ServicerContext
    ) -> services_pb2.ListReplicasResponse:
        name = await self._name(request.name, context)
        try:
            return services_pb2.ListReplicasResponse(replicas=await self.controller.replicas_view(name))
        except WorkloadRefused as error:
            await self._refused(context, error)
            raise AssertionError("unreachable") from None

    @unavailable_on_store_fault
    async def CreateSecret(
        self, request: services_pb2.CreateSecretRequest, context: grpc.aio.ServicerContext
    ) -> services_pb2.SecretInfo:
        try:
            service_name("name", request.name)
            service_name("key", request.key)
        except FieldError as error:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(error))
        if len(request.value) > limits.SECRET_BYTES:
            await context.abort(
                grpc.StatusCode.INVALID_ARGUMENT, f"a secret value is at most {limits.SECRET_BYTES} bytes"
            )
        try:
            request.value.decode("utf-8")
        except UnicodeDecodeError:
            await context.abort(
                grpc.StatusCode.INVALID_ARGUMENT,
                "a secret value must be UTF-8 text (it becomes an env value)",
            )
        now = time.time()
        await self.controller.put_secret(request.name, request.key, request.value, now)
        log.info(
            "secret stored", name=request.name, key=request.key, size=len(request.value)
        )  # never the value
        return services_pb2.SecretInfo(
            name=request.name, key=request.key, updated_at=now, size=len(request.value)
        )

    @unavailable_on_store_fault
    async def ListSecrets(
        self, request: services_pb2.ListSecretsRequest, context: grpc.aio.ServicerContext
    ) -> services_pb2.ListSecretsResponse:
        rows = await self.controller.secret_names()
        users = await self.controller.secret_users()
        return services_pb2.ListSecretsResponse(
            secrets=[
                services_pb2.SecretInfo(name=n, key=k, size=size, updated_at=at, used_by=users.get(n, []))
                for n, k, size, at in rows
            ]
        )

    @unavailable_on_store_fault
    async def RemoveSecret(
        self, request: services_pb2.RemoveSecretRequest, context: grpc.aio.ServicerContext
    ) -> services_pb2.RemoveSecretResponse:
        try:
            service_name("name", request.name)
        except FieldError as error:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(error))
        try:
            keys, users = await self.controller.remove_secret(request.name, request.force)
        except WorkloadRefused as error:
            await self._refused(context, error)
            raise AssertionError("unreachable") from None
        log.info("secret removed", name=request.name, keys=keys, forced_past=users)
        return services_pb2.RemoveSecretResponse(name=request.name, keys=keys, used_by=users)

    @unavailable_on_store_fault
    async def Logs(
        self, request: services_pb2.LogsRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[services_pb2.LogsEvent]:
        name = await self._name(request.service, context)
        if not 0 <= request.since_seconds < 100 * 365 * 86400:  # NaN fails too
            await context.abort(
                grpc.StatusCode.INVALID_ARGUMENT, "since_seconds: a duration from 0 to 100 years"
            )
        try:  # a service, or every service of a stack (the service's own name wins)
            replicas = [
                replica
                for service in services_of(await self.controller.services_view(), name)
                for replica in await self.controller.replicas_view(service)
            ]
        except WorkloadRefused as error:
            await self._refused(context, error)
            raise AssertionError("unreachable") from None
        hub = self.controller.logs
        targets, notes = log_targets(replicas, set(hub.cluster.sessions))
        if not replicas:
            notes.append(f"-- {name} has no replicas: roll it out first (coordctl rollout {name}) --")
        for note in notes:
            yield services_pb2.LogsEvent(note=note)
        since = time.time() - request.since_seconds if request.since_seconds else 0.0
        streams = []
        try:
            for replica, node in targets:
                stream = await hub.open(node, replica, request.follow, request.tail, since)
                if stream is None:
                    yield services_pb2.LogsEvent(note=f"-- {replica} on {node}: the node is away --")
                else:
                    streams.append(stream)
            async for event in relay(streams, request.follow, time.monotonic() + LOGS_WAIT):
                yield event
        finally:
            for stream in streams:
                await hub.close(stream)

    @unavailable_on_store_fault
    async def DrainNode(
        self, request: services_pb2.DrainRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[services_pb2.RolloutEvent]:
        try:
            node = validate_node_name(request.node)
        except InvalidName as error:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(error))
            raise AssertionError("unreachable") from None
        try:
            await self.controller.drain(node, request.undo)
        except WorkloadRefused as error:
            await self._refused(context, error)
        if request.undo:
            yield services_pb2.RolloutEvent(note=f"node/{node} takes replicas again")
            return
        yield services_pb2.RolloutEvent(
            note=f"node/{node} drained: no new replicas go there; moving its replicas"
        )
        async for event in self.controller.drain_progress(node):
            yield event

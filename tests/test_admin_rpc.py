"""The admin API end to end, without coordctl in front: a real gRPC server on a unix socket,
the real servicer, cluster and SQLite store. coordctl validates specs itself, so these are
the checks a client that skips it meets."""

from __future__ import annotations

import asyncio
import os
import signal
import threading
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import grpc
import pytest

from picoord.common.addresses import grpc_unix_address
from picoord.coordinator.admin_reads import REPLICA_SILENT_AFTER, replica_alive
from picoord.coordinator.admin_relay import AdminRelay
from picoord.coordinator.admin_replica import FOLLOW_SECONDS
from picoord.coordinator.ca import ClusterCA
from picoord.coordinator.cluster import Cluster, LiveSession
from picoord.coordinator.ctl.client import AdminClient, replica_channel
from picoord.coordinator.main import start_admin_replica, start_admin_server
from picoord.coordinator.servicers.cluster_admin import AdminServicer
from picoord.coordinator.servicers.peers import restrict_to_operators
from picoord.coordinator.status import StatusTimeouts
from picoord.coordinator.store import CertificateRecord, Store
from picoord.coordinator.telemetry import MetricsHistory
from picoord.v1 import admin_pb2, admin_pb2_grpc, agent_pb2, node_pb2

T = TypeVar("T")
MOUNT = "kind: Mount\nname: scratch\ntype: tmpfs\ntarget: /mnt/scratch\nnodes: [pi1]\n"


@dataclass
class Coordinator:
    cluster: Cluster
    admin: admin_pb2_grpc.AdminStub
    session: LiveSession
    socket: Path
    relay: AdminRelay
    servicer: AdminServicer


@pytest.fixture
async def coordinator(tmp_path: Path) -> AsyncIterator[Coordinator]:
    """pi1 enrolled and connected (the test plays its agent through the session's outbox)."""
    store = Store(tmp_path / "state.db")
    cluster = Cluster(store, StatusTimeouts(), MetricsHistory(4))
    _, token = await cluster.create_token(3600.0, 0, "")
    certificate = CertificateRecord("c1", "pi1", 1.0, 4_000_000_000.0, None)
    await cluster.enroll(token.token_id, "pi1", {}, certificate, cluster.clock())
    session = LiveSession(node="pi1", serial="c1", address="10.0.0.11")
    await cluster.open_session(session, agent_pb2.Hello(agent_version="0", hardware=node_pb2.Hardware()))
    servicer = AdminServicer(
        cluster, ClusterCA.load_or_create(tmp_path, ["localhost"]), "localhost:7443", None
    )
    socket = tmp_path / "admin.sock"
    # As the coordinator serves it: through the relay that names callers by credentials.
    server, relay = await start_admin_server(
        restrict_to_operators(servicer, admin_pb2.DESCRIPTOR.services_by_name["Admin"]), socket
    )
    channel = grpc.aio.insecure_channel(grpc_unix_address(socket))
    try:
        yield Coordinator(cluster, admin_pb2_grpc.AdminStub(channel), session, socket, relay, servicer)
    finally:
        await channel.close()
        await relay.close()
        await server.stop(grace=None)
        store.close()


async def apply_events(admin: admin_pb2_grpc.AdminStub, documents: str) -> list[admin_pb2.ApplyEvent]:
    return [event async for event in admin.Apply(admin_pb2.ApplyRequest(documents=documents), timeout=20)]


@pytest.mark.parametrize(
    ("documents", "named"),
    [
        (
            MOUNT.replace("/mnt/scratch", "relative"),
            "Mount/scratch.target: 'relative' is not an absolute path",
        ),
        (MOUNT + "bogus: 1\n", "Mount/scratch.bogus: unknown field"),
        (MOUNT + "---\nkind: Mount\nname: b\ntype: tmpfs\ntarget: /mnt/b\nnodes: []\n", "Mount/b.nodes"),
        ("kind: Nonsense\nname: x\n", "kind"),
        (MOUNT.replace("[pi1]", "[pi9]"), "pi9"),  # valid, but no such node: the planner refuses
    ],
)
async def test_a_bad_document_sent_straight_to_the_rpc_is_refused_naming_it(
    coordinator: Coordinator, documents: str, named: str
) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await apply_events(coordinator.admin, documents)
    assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert named in refused.value.details()
    # nothing recorded, nothing sent
    assert (await coordinator.admin.ListActions(admin_pb2.ListActionsRequest())).actions == []
    assert coordinator.session.outbox.empty()


async def answer_actions(cluster: Cluster, session: LiveSession, delay: float) -> int:
    """Play pi1's agent: answer each action after `delay` s; return how many came."""
    answered = 0
    while True:
        try:
            message = await asyncio.wait_for(session.outbox.get(), 3.0)
        except TimeoutError:
            return answered
        await asyncio.sleep(delay)
        result = agent_pb2.ActionResult(
            action_id=message.action.action_id, outcome=agent_pb2.ACTION_OUTCOME_SUCCEEDED, message="ok"
        )
        assert cluster.action_result("pi1", result)
        answered += 1


async def test_of_two_applies_sent_at_once_exactly_one_runs(coordinator: Coordinator) -> None:
    """Both pass validation at the same moment; the claim is atomic, so one is refused and
    the other runs to its end with its action recorded."""
    agent = asyncio.create_task(answer_actions(coordinator.cluster, coordinator.session, 0.5))
    results = await asyncio.gather(
        apply_events(coordinator.admin, MOUNT),
        apply_events(coordinator.admin, MOUNT),
        return_exceptions=True,
    )
    refused = [r for r in results if isinstance(r, grpc.aio.AioRpcError)]
    ran = [r for r in results if isinstance(r, list)]
    assert len(refused) == 1 and len(ran) == 1, results
    assert refused[0].code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "another apply" in refused[0].details()
    assert ran[0][-1].summary.converged and ran[0][-1].summary.changed == 1
    assert await agent == 1  # one action reached the node, not two
    actions = (await coordinator.admin.ListActions(admin_pb2.ListActionsRequest())).actions
    assert [a.outcome for a in actions] == [agent_pb2.ACTION_OUTCOME_SUCCEEDED]
    # and once it ended, the next apply runs
    agent = asyncio.create_task(answer_actions(coordinator.cluster, coordinator.session, 0.0))
    assert (await apply_events(coordinator.admin, MOUNT))[-1].summary.converged
    assert await agent == 1


async def test_a_registry_document_sends_its_key_once_records_its_names_and_lists_its_certificate(
    coordinator: Coordinator, tmp_path: Path
) -> None:
    """The shell around the planner: the CA issues the certificate, the key reaches only the
    server's action (never a record), the names are kept for pinning, and the certificate
    shows in check-expiration."""
    sent: list[agent_pb2.ActionRequest] = []

    async def agent() -> None:
        while True:
            try:
                message = await asyncio.wait_for(coordinator.session.outbox.get(), 3.0)
            except TimeoutError:
                return
            sent.append(message.action)
            result = agent_pb2.ActionResult(
                action_id=message.action.action_id, outcome=agent_pb2.ACTION_OUTCOME_SUCCEEDED, message="ok"
            )
            assert coordinator.cluster.action_result("pi1", result)

    playing = asyncio.create_task(agent())
    events = await apply_events(
        coordinator.admin, "kind: Registry\nname: cluster\nserver: pi1\nnodes: [pi1]\n"
    )
    await playing
    assert events[-1].summary.converged and events[-1].summary.changed == 2
    serve, trust = (request.action for request in sent)
    key = serve.registry_server.key_pem
    assert (
        key.startswith("-----BEGIN") and serve.registry_server.certificate_pem.count("BEGIN CERTIFICATE") == 2
    )
    assert list(trust.registry_trust.addresses) == ["10.0.0.11:5000", "pi1:5000"]
    assert (tmp_path / "registry" / "cluster.key").read_text() == key  # the coordinator's copy, 0600
    assert (tmp_path / "registry" / "cluster.key").stat().st_mode & 0o777 == 0o600
    stored = coordinator.cluster._store.query("SELECT record FROM actions")
    assert stored and all(key.encode() not in row[0] for row in stored)
    assert coordinator.cluster._store.cluster_registries() == ["10.0.0.11:5000", "pi1:5000"]
    listed = await coordinator.admin.CheckCertificateExpiration(admin_pb2.CheckCertificateExpirationRequest())
    (registry,) = [c for c in listed.certificates if c.kind == "registry"]
    assert registry.name == "registry/cluster" and registry.not_after > listed.now


async def test_nodes_and_top_by_selector_and_limit_from_the_snapshot(coordinator: Coordinator) -> None:
    """A selector and a limit cut the snapshot; a relabel shows at once (a change rebuilds it);
    a bad selector is refused naming it."""
    admin, cluster = coordinator.admin, coordinator.cluster
    for index in (2, 3):
        _, token = await cluster.create_token(3600.0, 0, "")
        record = CertificateRecord(f"c{index}", f"pi{index}", 1.0, 4_000_000_000.0, None)
        await cluster.enroll(token.token_id, f"pi{index}", {"zone": "desk"}, record, cluster.clock())
    everything = await admin.ListNodes(admin_pb2.ListNodesRequest())
    assert [node.name for node in everything.nodes] == ["pi1", "pi2", "pi3"] and everything.matched == 3
    desk = await admin.ListNodes(admin_pb2.ListNodesRequest(selector={"zone": "desk"}, limit=1))
    assert ([node.name for node in desk.nodes], desk.matched) == (["pi2"], 2)
    top = await admin.Top(admin_pb2.TopRequest(selector={"zone": "desk"}))
    assert ([row.name for row in top.rows], top.matched) == (["pi2", "pi3"], 2)
    await admin.LabelNode(admin_pb2.LabelNodeRequest(name="pi1", set={"zone": "desk"}))
    desk = await admin.ListNodes(admin_pb2.ListNodesRequest(selector={"zone": "desk"}))
    assert [node.name for node in desk.nodes] == ["pi1", "pi2", "pi3"]
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await admin.ListNodes(admin_pb2.ListNodesRequest(selector={"zone": "not a value!"}))
    assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "selector" in (refused.value.details() or "")


async def test_nodes_and_top_are_answered_while_the_event_loop_is_held(coordinator: Coordinator) -> None:
    """The admin server's threads answer `nodes` and `top` from a built snapshot without a
    turn of the loop (at 5,000 sessions its turns are long); a call that needs the loop
    (a change to show first, a write) waits for it, and still gets its answer."""
    admin = coordinator.admin
    await admin.ListNodes(admin_pb2.ListNodesRequest())
    await admin.Top(admin_pb2.TopRequest())  # both snapshots built
    address = grpc_unix_address(coordinator.socket)

    connected, go = threading.Event(), threading.Event()

    def call_from_a_thread() -> tuple[list[str], list[str], float]:
        with grpc.insecure_channel(address) as channel:
            stub = admin_pb2_grpc.AdminStub(channel)
            stub.ListNodes(admin_pb2.ListNodesRequest(), timeout=5)  # the relay (on the loop) connects it
            connected.set()
            go.wait(5)
            nodes = stub.ListNodes(admin_pb2.ListNodesRequest(), timeout=5)
            top = stub.Top(admin_pb2.TopRequest(limit=1), timeout=5)
            return [n.name for n in nodes.nodes], [r.name for r in top.rows], time.monotonic()

    answered = asyncio.get_running_loop().run_in_executor(None, call_from_a_thread)
    assert await asyncio.to_thread(connected.wait, 5)
    go.set()
    time.sleep(1.0)  # the loop is held: nothing else on it runs meanwhile
    released = time.monotonic()
    nodes, top, at = await answered
    assert (nodes, top) == (["pi1"], ["pi1"])
    assert at < released  # answered in the admin server's threads
    # A change must show at once: that call waits for a build on the loop, and gets it.
    await admin.LabelNode(admin_pb2.LabelNodeRequest(name="pi1", set={"zone": "desk"}))
    relabeled = await admin.ListNodes(admin_pb2.ListNodesRequest(selector={"zone": "desk"}))
    assert [node.name for node in relabeled.nodes] == ["pi1"]


async def while_the_loop_is_held(call: Callable[[], T]) -> tuple[T, bool]:
    """`call` run in a thread while this event loop is held for a second: what it returned,
    and whether it returned before the loop was let go."""
    answered = asyncio.get_running_loop().run_in_executor(None, lambda: (call(), time.monotonic()))
    time.sleep(1.0)  # nothing on this loop runs meanwhile
    released = time.monotonic()
    result, at = await answered
    return result, at < released


async def test_the_read_replica_answers_while_the_coordinator_is_held_and_shows_a_change_at_once(
    coordinator: Coordinator,
) -> None:
    """The read replica (a process of its own) answers `nodes` and `top` from the snapshots
    the coordinator sends it, with the coordinator's loop held; a change shows at once (it
    forwards, through the generation cell); a bad selector gets the coordinator's error;
    stopped, coordctl skips it at once; killed, coordctl's client still answers from the
    admin socket and the replica is back."""
    cluster, admin = coordinator.cluster, coordinator.admin
    replica = await start_admin_replica(coordinator.servicer, cluster, coordinator.relay)
    assert replica is not None
    try:
        await admin.ListNodes(admin_pb2.ListNodesRequest())
        await admin.Top(admin_pb2.TopRequest())  # both built, and sent to the replica
        reads = admin_pb2_grpc.AdminStub(grpc.insecure_channel(grpc_unix_address(replica.socket)))
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:  # wait for the replica's listener and first frames
            try:
                reads.ListNodes(admin_pb2.ListNodesRequest(), timeout=1)
                break
            except grpc.RpcError:
                await asyncio.sleep(0.1)
        to_the_replica = replica_channel(coordinator.socket)
        assert to_the_replica is not None  # coordctl's client below asks the replica first
        client = AdminClient(grpc.insecure_channel(grpc_unix_address(coordinator.socket)), to_the_replica)

        def from_the_replica() -> tuple[list[str], list[str]]:
            nodes = reads.ListNodes(admin_pb2.ListNodesRequest(), timeout=5)
            top = reads.Top(admin_pb2.TopRequest(limit=1), timeout=5)
            return [n.name for n in nodes.nodes], [r.name for r in top.rows]

        # the coordinator's admin threads would wait for the loop: the replica does not
        assert await while_the_loop_is_held(from_the_replica) == ((["pi1"], ["pi1"]), True)

        await admin.LabelNode(admin_pb2.LabelNodeRequest(name="pi1", set={"zone": "desk"}))
        relabeled = await asyncio.to_thread(
            reads.ListNodes, admin_pb2.ListNodesRequest(selector={"zone": "desk"}), timeout=5
        )
        assert [node.name for node in relabeled.nodes] == ["pi1"]
        with pytest.raises(grpc.RpcError) as refused:
            await asyncio.to_thread(
                reads.ListNodes, admin_pb2.ListNodesRequest(selector={"zone": "not a value!"}), timeout=5
            )
        assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT  # type: ignore[attr-defined]
        assert "selector" in refused.value.details()  # type: ignore[attr-defined]

        # A change is followed by a rebuild nobody asked for: the replica answers it alone again.
        await admin.LabelNode(admin_pb2.LabelNodeRequest(name="pi1", set={"zone": "shelf"}))
        await asyncio.sleep(FOLLOW_SECONDS + 1.0)

        def shelf_from_the_replica() -> list[str]:
            reply = reads.ListNodes(admin_pb2.ListNodesRequest(selector={"zone": "shelf"}), timeout=5)
            return [node.name for node in reply.nodes]

        # answered before the loop was let go: the replica had the change's snapshot, nothing forwarded
        assert await while_the_loop_is_held(shelf_from_the_replica) == (["pi1"], True)

        # Stopped, it shows no sign of life: coordctl asks the admin socket at once instead
        # of waiting out its deadline on a socket the kernel still queues connections for.
        first = replica.pid
        assert first is not None
        assert replica_alive(replica.socket)
        os.kill(first, signal.SIGSTOP)
        try:
            deadline = time.monotonic() + REPLICA_SILENT_AFTER + 3
            while replica_alive(replica.socket) and time.monotonic() < deadline:
                await asyncio.sleep(0.1)
            assert replica_channel(coordinator.socket) is None
            started = time.monotonic()
            stuck_client = AdminClient(
                grpc.insecure_channel(grpc_unix_address(coordinator.socket)),
                replica_channel(coordinator.socket),
            )
            listed = await asyncio.to_thread(stuck_client.ListNodes, admin_pb2.ListNodesRequest(), timeout=5)
            assert [node.name for node in listed.nodes] == ["pi1"]
            assert time.monotonic() - started < 2.0
        finally:
            os.kill(first, signal.SIGCONT)
        deadline = time.monotonic() + 5
        while not replica_alive(replica.socket) and time.monotonic() < deadline:
            await asyncio.sleep(0.1)
        assert replica_channel(coordinator.socket) is not None  # beating again

        os.kill(first, signal.SIGKILL)
        listed = await asyncio.to_thread(client.ListNodes, admin_pb2.ListNodesRequest(), timeout=5)
        assert [node.name for node in listed.nodes] == ["pi1"]  # from the admin socket meanwhile
        deadline = time.monotonic() + 10
        while replica.pid in (None, first) and time.monotonic() < deadline:
            await asyncio.sleep(0.1)
        assert replica.pid not in (None, first)
        assert replica.starts == 2
    finally:
        await replica.stop()
    assert not replica.socket.exists()

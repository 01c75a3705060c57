"""The dispatcher: an unchanged report (an agent's liveness repeat) wakes nothing, and a
stopped replica counts as gone only once its node reported an assignment without it."""

from __future__ import annotations

from picoord.common.vocabulary import ReplicaState
from picoord.coordinator.cluster import LiveSession
from picoord.coordinator.controller.dispatcher import Dispatcher
from picoord.coordinator.controller.records import ReplicaRecord
from picoord.v1 import workloads_pb2


def report(generation: int, *replicas: str) -> workloads_pb2.ReplicaReports:
    reports = workloads_pb2.ReplicaReports(generation=generation)
    for replica in replicas:
        reports.replicas.add(service="web", revision=1, replica=replica, state=ReplicaState.RUNNING.wire)
    return reports


def test_only_a_report_that_says_something_new_counts() -> None:
    dispatcher = Dispatcher()
    assert dispatcher.reported("pi1", report(5, "web.1"))
    assert not dispatcher.reported("pi1", report(5, "web.1"))
    assert dispatcher.reported("pi1", report(6, "web.1"))
    assert dispatcher.reported("pi2", report(6, "web.1"))


async def test_a_stop_is_confirmed_by_a_report_at_or_after_the_assignment_without_it() -> None:
    dispatcher = Dispatcher()
    session = LiveSession(node="pi1", serial="c1")
    running = ReplicaRecord("web.1", "web", 1, "pi1", 0.0)
    stopping = ReplicaRecord("web.1", "web", 1, "pi1", 0.0, stopping=True)
    assert (
        await dispatcher.send(
            {"pi1": [workloads_pb2.ReplicaSpec(replica="web.1")]}, {"pi1": session}, [running], 1.0
        )
        == 1
    )
    assert (
        await dispatcher.send(
            {"pi1": [workloads_pb2.ReplicaSpec(replica="web.1")]}, {"pi1": session}, [running], 2.0
        )
        == 0
    )
    assert await dispatcher.send({}, {"pi1": session}, [stopping], 3.0) == 1
    without = session.outbox.get_nowait(), session.outbox.get_nowait()
    generation = without[1].assignment.generation
    dispatcher.reported("pi1", report(generation - 1))  # an older assignment applied: not yet
    assert dispatcher.confirmed_gone([stopping]) == frozenset()
    dispatcher.reported("pi1", report(generation, "web.1"))  # still running it
    assert dispatcher.confirmed_gone([stopping]) == frozenset()
    dispatcher.reported("pi1", report(generation))
    assert dispatcher.confirmed_gone([stopping]) == {"web.1"}


async def test_volumes_to_remove_ride_with_the_assignment_and_a_change_of_them_is_sent() -> None:
    dispatcher = Dispatcher()
    session = LiveSession(node="pi1", serial="c1")
    assert await dispatcher.send({}, {"pi1": session}, [], 1.0, {"pi1": ["pg"]}) == 1
    assert list(session.outbox.get_nowait().assignment.remove_volumes) == ["pg"]
    assert await dispatcher.send({}, {"pi1": session}, [], 2.0, {"pi1": ["pg"]}) == 0  # unchanged
    assert await dispatcher.send({}, {"pi1": session}, [], 3.0, {}) == 1  # done: asked no more
    assert list(session.outbox.get_nowait().assignment.remove_volumes) == []


async def test_a_replica_left_out_while_it_waits_is_not_gone_once_it_is_sent() -> None:
    """A replica that waited (its overlay network not yet there) and was then sent counts as
    removed only from the assignment that leaves it out after that."""
    dispatcher = Dispatcher()
    session = LiveSession(node="pi1", serial="c1")
    running = ReplicaRecord("web.1", "web", 1, "pi1", 0.0)
    stopping = ReplicaRecord("web.1", "web", 1, "pi1", 0.0, stopping=True)
    await dispatcher.send({}, {"pi1": session}, [running], 1.0)  # waits: left out
    waited = session.outbox.get_nowait().assignment.generation
    await dispatcher.send(
        {"pi1": [workloads_pb2.ReplicaSpec(replica="web.1")]}, {"pi1": session}, [running], 2.0
    )
    await dispatcher.send({}, {"pi1": session}, [stopping], 3.0)
    dispatcher.reported("pi1", report(waited))  # the agent had not yet applied the one that sent it
    assert dispatcher.confirmed_gone([stopping]) == frozenset()


async def test_virtual_addresses_ride_with_the_assignment_and_a_change_of_them_is_sent() -> None:
    dispatcher = Dispatcher()
    session = LiveSession(node="pi1", serial="c1")
    replicas = {"pi1": [workloads_pb2.ReplicaSpec(replica="web.1")]}
    vip = workloads_pb2.VirtualAddress(address="10.0.0.200", router_id=201, priority=100)
    assert await dispatcher.send(replicas, {"pi1": session}, [], 1.0, virtual={"pi1": [vip]}) == 1
    assert [a.address for a in session.outbox.get_nowait().assignment.virtual_addresses] == ["10.0.0.200"]
    assert await dispatcher.send(replicas, {"pi1": session}, [], 2.0, virtual={"pi1": [vip]}) == 0
    holder = workloads_pb2.VirtualAddress(address="10.0.0.200", router_id=201, priority=200)
    assert await dispatcher.send(replicas, {"pi1": session}, [], 3.0, virtual={"pi1": [holder]}) == 1
    assert session.outbox.get_nowait().assignment.virtual_addresses[0].priority == 200
    assert await dispatcher.send(replicas, {"pi1": session}, [], 4.0, virtual={}) == 1  # given up
    assert not session.outbox.get_nowait().assignment.virtual_addresses

"""The applier: one tick's decisions are one store transaction, written through the same
failure tracking as every other store write (a full state disk shows in `store_writable`
and the write-failure counter, nothing of the tick is half written), and a restarted
controller keeps a slot's backoff (it is stored)."""

from __future__ import annotations

from pathlib import Path

import pytest

from picoord.common.vocabulary import ReplicaState
from picoord.coordinator.controller.controller import WorkloadController
from picoord.coordinator.controller.records import TickWrites
from picoord.coordinator.store import FULL, StateUnavailable
from picoord.v1 import workloads_pb2
from tests.unit.controller.test_controller import Rig, rig  # noqa: F401 - the fixture


async def test_a_full_disk_during_a_tick_shows_in_store_writable_and_writes_nothing(
    rig: Rig,  # noqa: F811
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    rig.records.put_secret("mcp-secrets", "database-url", b"x", rig.clock.now)
    await rig.controller.start_rollout("mcp")
    cluster = rig.controller.cluster

    def full(writes: TickWrites, now: float) -> list[object]:
        raise StateUnavailable(FULL, Path("/var/lib/picoord"))

    monkeypatch.setattr(rig.records, "write_tick", full)
    with pytest.raises(StateUnavailable):
        await rig.controller.tick()
    assert not cluster.store_writable and cluster.counters.store_write_failures == 1
    assert rig.records.replicas() == []  # nothing of the tick was written
    monkeypatch.undo()
    await rig.controller.tick()
    assert cluster.store_writable and rig.records.replicas() != []


async def test_a_slot_backoff_survives_a_controller_restart(rig: Rig) -> None:  # noqa: F811
    rig.records.put_secret("mcp-secrets", "database-url", b"x", rig.clock.now)
    await rig.controller.start_rollout("mcp")
    await rig.settle(8)
    [victim] = [r for r in rig.records.replicas("mcp")][:1]
    reports = workloads_pb2.ReplicaReports(generation=1 << 62)
    for spec in rig.running[victim.node].values():
        crashed = spec.replica == victim.id
        reports.replicas.add(
            service=spec.service, revision=spec.revision, replica=spec.replica,
            state=(ReplicaState.EXITED if crashed else ReplicaState.RUNNING).wire,
            message="exit code 1" if crashed else "ok",
            health=workloads_pb2.REPLICA_HEALTH_HEALTHY,
        )  # fmt: skip
    rig.controller.on_reports(victim.node, reports)
    await rig.controller.tick()
    [held] = rig.records.backoffs()
    assert (held.service, held.slot, held.failures) == ("mcp", victim.slot, 1)
    rig.controller = WorkloadController(rig.controller.cluster, rig.records, clock=rig.clock)
    for node in rig.sessions:
        rig.controller.on_session_open(node)
    for _ in range(3):  # the restarted controller learns that the crashed one is gone
        await rig.controller.tick()
        rig.assignments()
        rig.report()
        rig.clock.now += 2.0
        assert not any(r.slot == victim.slot and not r.stopping for r in rig.records.replicas("mcp"))
    rig.clock.now += 4.0
    await rig.controller.tick()
    assert [r.id for r in rig.records.replicas("mcp") if r.slot == victim.slot] != [victim.id]  # gone
    assert [r.slot for r in rig.records.replicas("mcp") if r.slot == victim.slot] == [victim.slot]

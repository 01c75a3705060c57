"""The cluster keeps the store and its in-memory view in step, also when a caller gives up."""

import asyncio
from pathlib import Path

from picoord.coordinator.cluster import OUTBOX_SIZE, Cluster, LiveSession, Outbox
from picoord.coordinator.status import StatusTimeouts
from picoord.coordinator.store import CertificateRecord, Store
from picoord.coordinator.telemetry import MetricsHistory
from picoord.v1 import admin_pb2, agent_pb2, node_pb2


async def enrolled(tmp_path: Path) -> tuple[Store, Cluster]:
    store = Store(tmp_path / "state.db")
    cluster = Cluster(store, StatusTimeouts(), MetricsHistory(4))
    _, token = await cluster.create_token(60.0, 0, "")
    certificate = CertificateRecord("c1", "pi1", 1.0, 4_000_000_000.0, None)
    await cluster.enroll(token.token_id, "pi1", {"role": "a"}, certificate, cluster.clock())
    return store, cluster


async def test_a_change_whose_caller_is_cancelled_still_reaches_store_and_view(tmp_path: Path) -> None:
    store, cluster = await enrolled(tmp_path)
    session = LiveSession(node="pi1", serial="c1")
    await cluster.open_session(session, agent_pb2.Hello(agent_version="0.1.0"))
    caller = asyncio.create_task(cluster.remove_node("pi1"))
    await asyncio.sleep(0)  # the write is under way in its thread
    caller.cancel()
    for _ in range(100):
        if cluster.node("pi1") is None:
            break
        await asyncio.sleep(0.01)
    assert cluster.node("pi1") is None and store.get_node("pi1") is None
    assert session.closed.is_set()
    store.close()


async def test_changes_show_in_the_view_without_rereading(tmp_path: Path) -> None:
    store, cluster = await enrolled(tmp_path)
    assert cluster.node("pi1").labels == {"role": "a"}
    await cluster.label_node("pi1", {"zone": "b"}, ["role"])
    assert cluster.node("pi1").labels == {"zone": "b"} == store.get_node("pi1").labels
    await cluster.open_session(LiveSession(node="pi1", serial="c1"), agent_pb2.Hello(agent_version="0.2.0"))
    assert cluster.node("pi1").agent_version == "0.2.0" == store.get_node("pi1").agent_version
    assert await cluster.label_node("gone", {"a": "b"}, []) is None
    assert [c.serial for c in await cluster.certificates_of("pi1")] == ["c1"]
    store.close()


async def test_last_seen_is_flushed_once_and_expired_tokens_go(tmp_path: Path) -> None:
    store, cluster = await enrolled(tmp_path)
    now = [cluster.clock()]
    heard = now[0]
    cluster.clock = lambda: now[0]
    cluster.heard_from("pi1")
    now[0] += 8 * 24 * 3600  # the token (1 minute) expired over a week ago
    await cluster.flush()
    assert store.get_node("pi1").last_seen == heard
    assert await cluster.list_tokens() == []
    store.close()


def test_counts_change_only_through_the_cluster(tmp_path: Path) -> None:
    """What the servicers count goes through Cluster methods, each to its own counter."""
    store = Store(tmp_path / "state.db")
    cluster = Cluster(store, StatusTimeouts(), MetricsHistory(4))
    for outcome in ("enrolled", "refused", "refused", "throttled", "throttled", "throttled"):
        cluster.count_enrollment(outcome)
    cluster.count_refused_message("metrics", "message_too_large")
    cluster.count_refused_message("metrics", "message_too_large")
    cluster.count_refused_message("hello", "bad_name")
    counters = cluster.counters
    assert (counters.enrollments, counters.enrollments_refused, counters.enrollments_throttled) == (1, 2, 3)
    assert counters.malformed_messages == 3
    assert counters.refused_messages == {("metrics", "message_too_large"): 2, ("hello", "bad_name"): 1}
    sample = node_pb2.MetricsSample(timestamp=5.0)
    cluster.add_metrics("pi1", sample)
    assert cluster.history.latest("pi1") == sample


async def test_a_full_outbox_ends_the_session_and_never_blocks_the_sender(tmp_path: Path) -> None:
    """The dispatcher writes `await session.outbox.put(...)`: a node that stops reading must
    neither hold it nor grow the coordinator's memory; its session is ended instead."""
    store, _ = await enrolled(tmp_path)
    session = LiveSession(node="pi1", serial="c1", outbox=Outbox(maxsize=2))
    message = agent_pb2.CoordinatorMessage()
    await asyncio.wait_for(session.outbox.put(message), 1)
    await asyncio.wait_for(session.outbox.put(message), 1)
    assert not session.closed.is_set()
    await asyncio.wait_for(session.outbox.put(message), 1)  # full: returns at once
    assert session.closed.is_set() and "stopped reading" in session.close_reason
    assert session.outbox.qsize() == 2
    assert LiveSession(node="pi1", serial="c1").outbox.maxsize == OUTBOX_SIZE
    store.close()


async def test_roles_and_held_hardware_in_the_view(tmp_path: Path) -> None:
    store, cluster = await enrolled(tmp_path)
    pi = node_pb2.Hardware(arch="aarch64", cpu_cores=4, memory_total_bytes=1 << 30)
    await cluster.open_session(LiveSession(node="pi1", serial="c1"), agent_pb2.Hello(hardware=pi))
    record = cluster.node("pi1")
    assert (cluster.held(record), cluster.summary(record).role) == ([], "worker")
    assert dict(cluster.summary(record).pending_labels) == {"role": "a"}  # asked at join
    bigger = node_pb2.Hardware(arch="aarch64", cpu_cores=4, memory_total_bytes=64 << 30)
    await cluster.open_session(LiveSession(node="pi1", serial="c1"), agent_pb2.Hello(hardware=bigger))
    record = cluster.node("pi1")
    assert cluster.held(record) == ["memory 1.0 GiB -> 64.0 GiB"]
    assert list(cluster.summary(record).held) == ["memory 1.0 GiB -> 64.0 GiB"]
    assert cluster.recorded_hardware(record).memory_total_bytes == 1 << 30
    await cluster.record_action(
        admin_pb2.ActionRecord(
            action_id="a1", node="pi1", kind="swarm_init", outcome=agent_pb2.ACTION_OUTCOME_SUCCEEDED
        )
    )
    accepted = await cluster.accept_node("pi1")
    assert cluster.held(accepted) == [] and cluster.summary(accepted).role == "manager"
    assert dict(cluster.summary(accepted).pending_labels) == {}
    # what the coordinator records survives its restart
    again = Cluster(store, StatusTimeouts(), MetricsHistory(4))
    assert again.role("pi1") == "manager" and again.recorded_hardware(again.node("pi1")) == bigger
    store.close()

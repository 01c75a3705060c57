"""Fuzzed and oversized messages through the real session servicer: an in-process gRPC
server with the coordinator's own mTLS set-up, a Cluster on a real Store (tmp SQLite), and
a real client. A refused message ends the session with INVALID_ARGUMENT and a clear
reason, is counted per kind and reason, and leaves the store and the metrics history
exactly as they were; nothing a client sends makes the servicer fail otherwise.
"""

from __future__ import annotations

import asyncio
import gc
import sqlite3
import threading
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from prometheus_client import CollectorRegistry, generate_latest

from picoord.agent.channel import channel_options
from picoord.agent.enroll import new_key_and_csr
from picoord.coordinator.ca import ClusterCA, certificate_pem
from picoord.coordinator.cluster import Cluster
from picoord.coordinator.main import GRPC_OPTIONS
from picoord.coordinator.prometheus import CoordinatorCollector
from picoord.coordinator.servicers.peers import certificate_serial
from picoord.coordinator.servicers.session import SessionServicer
from picoord.coordinator.status import StatusTimeouts
from picoord.coordinator.store import CertificateRecord, Store, TokenRecord
from picoord.coordinator.telemetry import MetricsHistory
from picoord.v1 import agent_pb2, agent_pb2_grpc, node_pb2
from tests.unit.test_fuzz_inbound import SEEDS, mutated_bytes

NOW = 1_800_000_000.0  # a fixed clock: a repeated hello writes the very same row
CALL_TIMEOUT = 10.0
REFUSAL_CODES = (
    "message_too_large",
    "malformed_message",
    "hello_expected",
    "name_mismatch",
    "duplicate_hello",
)
TRIED: Counter[str] = Counter()


@dataclass
class Coordinator:
    cluster: Cluster
    state_db: Path
    address: str
    credentials: grpc.ChannelCredentials
    loop: asyncio.AbstractEventLoop
    channel: grpc.Channel | None = None
    last_details: str = ""

    def send(self, payloads: list[bytes]) -> grpc.StatusCode:
        """One Session stream carrying `payloads` as they are; the status it ended with."""
        if self.channel is None:
            self.channel = grpc.secure_channel(self.address, self.credentials, options=channel_options())
        call = self.channel.stream_stream(
            "/picoord.v1.AgentSession/Session", request_serializer=None, response_deserializer=None
        )(iter(payloads), timeout=CALL_TIMEOUT)
        try:
            list(call)
        except grpc.RpcError as error:
            self.last_details = error.details()
            return error.code()
        self.last_details = ""
        return grpc.StatusCode.OK

    def state(self) -> tuple[list[str], list[bytes], int]:
        """Every row of the store, and the node's metric history, to compare before/after."""
        with sqlite3.connect(self.state_db) as db:
            rows = list(db.iterdump())
        history = self.cluster.history
        return rows, [sample.SerializeToString() for sample in history.recent("pi1")], history.bytes_kept()

    def settle(self) -> None:
        """Wait until the servicer has left every session (its `finally` runs after the status)."""
        deadline = time.monotonic() + 5
        while self.cluster.sessions and time.monotonic() < deadline:
            time.sleep(0.001)


@pytest.fixture(scope="module")
def coordinator(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Coordinator]:
    state = tmp_path_factory.mktemp("coordinator")
    ca = ClusterCA.load_or_create(state)
    store = Store(state / "state.db")
    key_pem, csr_pem = new_key_and_csr("pi1")
    certificate = ca.sign_node_csr(csr_pem, "pi1")
    store.add_token(TokenRecord("abcdef", "hash", NOW - 10, NOW + 3600, 0, 0, ""))
    store.enroll(
        "abcdef",
        "pi1",
        {"role": "storage"},
        CertificateRecord(certificate_serial(certificate), "pi1", NOW - 10, NOW + 86400, None),
        NOW - 10,
    )
    cluster = Cluster(store, StatusTimeouts(30.0, 60.0), MetricsHistory(), clock=lambda: NOW)  # reads pi1

    loop = asyncio.new_event_loop()
    started = threading.Event()
    stop: dict[str, asyncio.Event] = {}
    bound: dict[str, int] = {}

    async def serve() -> None:
        server = grpc.aio.server(options=GRPC_OPTIONS)
        agent_pb2_grpc.add_AgentSessionServicer_to_server(SessionServicer(cluster, 5.0, 5.0), server)
        mutual = grpc.ssl_server_credentials(
            [(ca.server_key_pem, ca.server_chain_pem)],
            root_certificates=ca.certificate_pem,
            require_client_auth=True,
        )
        bound["port"] = server.add_secure_port("127.0.0.1:0", mutual)
        await server.start()
        stop["event"] = asyncio.Event()
        started.set()
        await stop["event"].wait()
        await server.stop(grace=1)

    thread = threading.Thread(target=loop.run_until_complete, args=(serve(),), daemon=True)
    thread.start()
    assert started.wait(10), "the in-process coordinator did not start"
    credentials = grpc.ssl_channel_credentials(
        root_certificates=ca.certificate_pem,
        private_key=key_pem,
        certificate_chain=certificate_pem(certificate),
    )
    try:
        coordinator = Coordinator(
            cluster, state / "state.db", f"127.0.0.1:{bound['port']}", credentials, loop
        )
        yield coordinator
    finally:
        if coordinator.channel is not None:
            coordinator.channel.close()
        loop.call_soon_threadsafe(stop["event"].set)
        thread.join(10)
        loop.close()
        store.close()
        print(f"\nsession fuzzing: {sum(TRIED.values())} streams ({dict(TRIED)})")


HELLO = SEEDS[0].SerializeToString()


def fuzzed_payloads() -> st.SearchStrategy[bytes]:
    seeds = [seed.SerializeToString() for seed in SEEDS]
    return st.one_of(st.binary(max_size=512), mutated_bytes(), st.sampled_from(seeds))


@settings(
    max_examples=150,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)
@given(payload=fuzzed_payloads(), first=st.booleans())
def test_fuzzed_streams_are_refused_cleanly_and_change_nothing(
    coordinator: Coordinator, payload: bytes, first: bool
) -> None:
    coordinator.send([HELLO])  # put the store back to the seed hello, whatever ran before
    coordinator.settle()
    before = coordinator.state()
    refused_before = sum(coordinator.cluster.counters.refused_messages.values())
    code = coordinator.send([payload] if first else [HELLO, payload])
    coordinator.settle()
    TRIED[code.name] += 1
    # RESOURCE_EXHAUSTED: over gRPC's own receive limit, refused before the servicer sees it.
    assert code in (
        grpc.StatusCode.OK,
        grpc.StatusCode.INVALID_ARGUMENT,
        grpc.StatusCode.RESOURCE_EXHAUSTED,
    ), coordinator.last_details
    if code == grpc.StatusCode.INVALID_ARGUMENT:
        assert coordinator.last_details.split(":")[0] in REFUSAL_CODES
        assert sum(coordinator.cluster.counters.refused_messages.values()) == refused_before + 1
    if code != grpc.StatusCode.OK:
        assert coordinator.state() == before
    assert coordinator.cluster.node("pi1") is not None


def test_a_four_megabyte_sample_is_refused_counted_and_changes_nothing(coordinator: Coordinator) -> None:
    fat = node_pb2.MetricsSample(
        timestamp=NOW, cpu_percent=5.0, filesystems=[node_pb2.FilesystemUsage(device="x" * 15_000)] * 256
    )
    coordinator.send([HELLO])
    coordinator.settle()
    before = coordinator.state()
    counted = coordinator.cluster.counters.refused_messages.get(("metrics", "message_too_large"), 0)
    code = coordinator.send([HELLO, agent_pb2.AgentMessage(metrics=fat).SerializeToString()])
    coordinator.settle()
    assert code == grpc.StatusCode.INVALID_ARGUMENT
    assert coordinator.last_details == (
        f"message_too_large: metrics sample is {fat.ByteSize()} bytes, the limit is 65536"
    )
    assert coordinator.state() == before
    assert coordinator.cluster.counters.refused_messages[("metrics", "message_too_large")] == counted + 1
    assert [node.name for node in coordinator.cluster.nodes()] == ["pi1"]

    registry = CollectorRegistry(auto_describe=False)
    registry.register(CoordinatorCollector(coordinator.cluster))
    exposition = generate_latest(registry).decode()
    series = 'picoord_coordinator_refused_messages_total{kind="metrics",reason="message_too_large"}'
    assert f"{series} {counted + 1}.0" in exposition


def test_a_good_sample_after_hello_is_kept(coordinator: Coordinator) -> None:
    """Positive control: the comparison above would see a change if one happened."""
    sample = node_pb2.MetricsSample()
    sample.CopyFrom(SEEDS[1].metrics)
    sample.timestamp, sample.cpu_percent = NOW + 12345.0, 77.7  # unlike anything the fuzzing sent
    before = coordinator.state()
    assert coordinator.send([HELLO, agent_pb2.AgentMessage(metrics=sample).SerializeToString()]) == (
        grpc.StatusCode.OK
    )
    coordinator.settle()
    assert coordinator.state() != before
    assert coordinator.cluster.history.recent("pi1")[-1] == sample


def test_refused_messages_do_not_outlive_their_refusal(coordinator: Coordinator) -> None:
    """gRPC keeps a finished call's state (and through it the request iterator, which holds
    the last message) for a while: ten refused 4 MB samples must leave none of them alive."""
    fat = node_pb2.MetricsSample(
        timestamp=NOW, cpu_percent=5.0, filesystems=[node_pb2.FilesystemUsage(device="y" * 15_000)] * 256
    )
    payloads = [HELLO, agent_pb2.AgentMessage(metrics=fat).SerializeToString()]
    del fat
    for _ in range(10):
        assert coordinator.send(payloads) == grpc.StatusCode.INVALID_ARGUMENT
    coordinator.settle()
    gc.collect()
    alive = [
        item
        for item in gc.get_objects()
        if isinstance(item, agent_pb2.AgentMessage) and item.ByteSize() > 1_000_000
    ]
    assert alive == []

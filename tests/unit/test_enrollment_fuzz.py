"""Random and oversized enrollment requests against the real servicer over real gRPC:
every one is refused with a clear status, none crashes it, none changes the store."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from picoord.common.tokens import BootstrapToken
from picoord.coordinator.ca import ClusterCA
from picoord.coordinator.cluster import Cluster
from picoord.coordinator.rate_limit import FailureThrottle, ThrottlePolicy
from picoord.coordinator.servicers.enrollment import EnrollmentServicer
from picoord.coordinator.status import StatusTimeouts
from picoord.coordinator.store import Store, TokenRecord
from picoord.coordinator.telemetry import MetricsHistory
from picoord.v1 import agent_pb2, agent_pb2_grpc

TOKEN = BootstrapToken("abcdef", "0123456789abcdef")
REFUSALS = {grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.UNAUTHENTICATED}


class Coordinator:
    """The enrollment servicer on an insecure loopback port, its loop in a thread."""

    def __init__(self, state: Path) -> None:
        self.store = Store(state / "state.db")
        self.store.add_token(
            TokenRecord(
                token_id=TOKEN.token_id,
                secret_hash=TOKEN.secret_hash,
                description="",
                created_at=0.0,
                expires_at=4e9,
                usage_limit=0,
                uses=0,
            )
        )
        cluster = Cluster(self.store, StatusTimeouts(), MetricsHistory(10))
        # never throttled here: the fuzz is about the checks behind the throttle
        throttle = FailureThrottle(ThrottlePolicy(max_failures=10**9))
        self.servicer = EnrollmentServicer(cluster, ClusterCA.load_or_create(state), throttle)
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.port = asyncio.run_coroutine_threadsafe(self._start(), self.loop).result(30)

    async def _start(self) -> int:
        self.server = grpc.aio.server()
        agent_pb2_grpc.add_EnrollmentServicer_to_server(self.servicer, self.server)
        port = self.server.add_insecure_port("127.0.0.1:0")
        await self.server.start()
        return port

    def state(self) -> tuple[list[str], list[int]]:
        return [node.name for node in self.store.list_nodes()], [t.uses for t in self.store.list_tokens()]

    def close(self) -> None:
        asyncio.run_coroutine_threadsafe(self.server.stop(0), self.loop).result(30)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)
        self.store.close()


@pytest.fixture(scope="module")
def coordinator(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Coordinator]:
    running = Coordinator(tmp_path_factory.mktemp("enroll-fuzz"))
    try:
        yield running
    finally:
        running.close()


def texts(max_size: int) -> st.SearchStrategy[str]:
    return st.one_of(
        st.text(max_size=max_size),
        st.text(alphabet="abcdefghijklmnopqrstuvwxyz0123456789-.", max_size=max_size),
        st.integers(0, 70_000).map(lambda size: "x" * size),  # oversized, cheaply
    )


requests = st.builds(
    agent_pb2.EnrollRequest,
    token=st.one_of(texts(80), st.just(str(TOKEN)), st.just(f"{TOKEN.token_id}.{'z' * 16}")),
    node_name=st.one_of(texts(100), st.sampled_from(["pi1", "picoord-coordinator", "Pi_3"])),
    labels=st.dictionaries(texts(400), texts(100), max_size=70),
    csr_pem=st.one_of(st.binary(max_size=64), st.integers(0, 40_000).map(lambda size: b"-" * size)),
)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(request=requests)
def test_random_enrollments_are_refused_and_change_nothing(
    coordinator: Coordinator, request: agent_pb2.EnrollRequest
) -> None:
    before = coordinator.state()
    with (
        grpc.insecure_channel(f"127.0.0.1:{coordinator.port}") as channel,
        pytest.raises(grpc.RpcError) as refused,
    ):
        agent_pb2_grpc.EnrollmentStub(channel).Enroll(request, timeout=30)
    assert refused.value.code() in REFUSALS, refused.value
    assert 0 < len(refused.value.details()) < 600  # says why, never echoes a megabyte back
    assert coordinator.state() == before


@settings(max_examples=300, deadline=None)
@given(
    events=st.lists(
        st.tuples(st.floats(0, 100), st.sampled_from("abcdefgh"), st.sampled_from(["fail", "ok", "check"])),
        max_size=200,
    )
)
def test_throttle_invariants(events: list[tuple[float, str, str]]) -> None:
    policy = ThrottlePolicy(max_failures=3, window=30.0, ban=20.0, max_sources=5)
    throttle = FailureThrottle(policy)
    now = 0.0
    failures: dict[str, int] = {}
    for step, source, what in events:
        now += step
        wait = throttle.retry_after(source, now)
        assert 0 <= wait <= policy.ban
        if wait:
            assert failures.get(source, 0) >= policy.max_failures  # only sources that failed enough
        if what == "fail":
            throttle.failed(source, now)
            failures[source] = failures.get(source, 0) + 1
        elif what == "ok":
            throttle.succeeded(source)
        assert len(throttle) <= policy.max_sources

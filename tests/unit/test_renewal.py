"""The coordinator's side of a renewal, with a real CA and a real store: a certificate for
the session's node only, recorded beside the old one; refusals answer and change nothing."""

from __future__ import annotations

import asyncio
import datetime as dt
from collections.abc import Iterator
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.x509.oid import NameOID
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from picoord.agent.enroll import new_key_and_csr
from picoord.coordinator.ca import ClusterCA
from picoord.coordinator.cluster import Cluster
from picoord.coordinator.servicers.enrollment import MAX_CSR_BYTES
from picoord.coordinator.servicers.session import SessionServicer
from picoord.coordinator.status import StatusTimeouts
from picoord.coordinator.store import CertificateRecord, Store, TokenRecord
from picoord.coordinator.telemetry import MetricsHistory


@pytest.fixture
def store(tmp_path: Path) -> Iterator[Store]:
    """The cluster's store, read directly to check what a renewal wrote."""
    store = Store(tmp_path / "state.db")
    yield store
    store.close()


@pytest.fixture
def cluster(store: Store) -> Iterator[Cluster]:
    store.add_token(TokenRecord("abcdef", "hash", 0.0, 9e9, 0, 0, ""))
    store.enroll("abcdef", "pi1", {}, CertificateRecord("a1", "pi1", 1.0, 9e9, None), now=1.0)
    yield Cluster(store, StatusTimeouts(), MetricsHistory(10), clock=lambda: 1000.0)


@pytest.fixture(scope="module")
def ca(tmp_path_factory: pytest.TempPathFactory) -> ClusterCA:
    return ClusterCA.load_or_create(tmp_path_factory.mktemp("ca"), node_validity=dt.timedelta(minutes=10))


def servicer(cluster: Cluster, ca: ClusterCA | None) -> SessionServicer:
    return SessionServicer(cluster, metrics_interval=5.0, heartbeat_interval=2.0, ca=ca)


async def test_a_renewal_is_for_the_sessions_node_and_is_recorded(
    cluster: Cluster, store: Store, ca: ClusterCA
) -> None:
    _, csr_pem = new_key_and_csr("pi2")  # asks for another node's name
    reply = await servicer(cluster, ca)._renew("pi1", csr_pem)
    assert reply.error == "" and reply.ca_certificate_pem == ca.certificate_pem
    issued = x509.load_pem_x509_certificate(reply.certificate_pem)
    assert issued.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == "pi1"
    serial = format(issued.serial_number, "x")
    assert [c.serial for c in store.active_certificates("pi1", now=2.0)] == [serial, "a1"]
    assert store.newest_certificates("pi1")["pi1"].serial == serial


@pytest.mark.parametrize(
    ("node", "csr", "with_ca", "refusal"),
    [
        ("pi1", b"x" * (MAX_CSR_BYTES + 1), True, "larger than"),
        ("pi1", b"not a csr", True, "not a PEM certificate request"),
        ("gone", None, True, "no longer enrolled"),
        ("pi1", None, False, "does not renew"),
    ],
    ids=["oversized", "garbage", "removed-node", "no-ca"],
)
async def test_refused_renewals_change_nothing(
    cluster: Cluster, store: Store, ca: ClusterCA, node: str, csr: bytes | None, with_ca: bool, refusal: str
) -> None:
    reply = await servicer(cluster, ca if with_ca else None)._renew(node, csr or new_key_and_csr(node)[1])
    assert refusal in reply.error and reply.certificate_pem == b""
    assert list(store.newest_certificates()) == ["pi1"]
    assert [c.serial for c in store.active_certificates("pi1", now=2.0)] == ["a1"]


async def test_renewals_are_spaced(cluster: Cluster, store: Store, ca: ClusterCA) -> None:
    session = servicer(cluster, ca)
    assert (await session._renew("pi1", new_key_and_csr("pi1")[1])).certificate_pem
    again = await session._renew("pi1", new_key_and_csr("pi1")[1])
    assert "at least 60s apart" in again.error
    assert len(store.active_certificates("pi1", now=2.0)) == 2


VALID_CSR = new_key_and_csr("pi1")[1]


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.data())
def test_damaged_csrs_are_refused_and_change_nothing(
    cluster: Cluster, store: Store, ca: ClusterCA, data: st.DataObject
) -> None:
    csr = bytearray(VALID_CSR)
    if data.draw(st.booleans()):
        for _ in range(data.draw(st.integers(1, 4))):
            csr[data.draw(st.integers(0, len(csr) - 1))] = data.draw(st.integers(0, 255))
    else:
        csr = bytearray(data.draw(st.binary(max_size=2048)))
    before = store.newest_certificates()
    count = len(store.active_certificates("pi1", now=2.0))
    session = servicer(cluster, ca)
    reply = asyncio.run(session._renew("pi1", bytes(csr)))
    if reply.error:
        assert reply.certificate_pem == b""
        assert store.newest_certificates() == before
        assert len(store.active_certificates("pi1", now=2.0)) == count
    else:  # a flip the PEM decoder ignores (e.g. in the armour): still for pi1 only
        issued = x509.load_pem_x509_certificate(reply.certificate_pem)
        assert issued.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == "pi1"

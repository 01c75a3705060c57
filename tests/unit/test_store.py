"""The SQLite store: enrollment is one transaction, removal revokes, nothing is half-written."""

import sqlite3
from pathlib import Path

import pytest

from picoord.coordinator.store import CertificateRecord, EnrollmentConflict, Store, TokenRecord


@pytest.fixture
def store(tmp_path: Path) -> Store:
    opened = Store(tmp_path / "state.db")
    yield opened
    opened.close()


def token(token_id: str = "abcdef", usage_limit: int = 0, expires_at: float = 1000.0) -> TokenRecord:
    return TokenRecord(token_id, "hash", 0.0, expires_at, usage_limit, 0, "")


def cert(serial: str, node: str) -> CertificateRecord:
    return CertificateRecord(serial, node, 10.0, 5000.0, None)


def test_database_is_wal_and_private(store: Store, tmp_path: Path) -> None:
    mode = sqlite3.connect(tmp_path / "state.db").execute("PRAGMA journal_mode").fetchone()[0]
    assert mode == "wal"
    assert (tmp_path / "state.db").stat().st_mode & 0o777 == 0o600


def test_enroll_creates_node_labels_and_certificate(store: Store) -> None:
    store.add_token(token())
    store.enroll("abcdef", "pi1", {"role": "storage"}, cert("a1", "pi1"), now=10.0)
    node = store.get_node("pi1")
    assert node is not None and node.labels == {"role": "storage"} and node.enrolled_at == 10.0
    assert [c.serial for c in store.active_certificates("pi1", now=11.0)] == ["a1"]
    assert store.get_token("abcdef").uses == 1


def test_use_limit_is_enforced_inside_the_transaction(store: Store) -> None:
    store.add_token(token(usage_limit=1))
    store.enroll("abcdef", "pi1", {}, cert("a1", "pi1"), now=10.0)
    with pytest.raises(EnrollmentConflict, match="used up"):
        store.enroll("abcdef", "pi2", {}, cert("a2", "pi2"), now=10.0)
    assert store.get_node("pi2") is None and store.certificate("a2") is None
    assert store.get_token("abcdef").uses == 1


def test_expired_token_cannot_enroll(store: Store) -> None:
    store.add_token(token(expires_at=5.0))
    with pytest.raises(EnrollmentConflict):
        store.enroll("abcdef", "pi1", {}, cert("a1", "pi1"), now=10.0)
    assert store.list_nodes() == []


def test_a_name_with_a_live_certificate_cannot_be_taken(store: Store) -> None:
    store.add_token(token())
    store.enroll("abcdef", "pi1", {"role": "a"}, cert("a1", "pi1"), now=10.0)
    with pytest.raises(EnrollmentConflict, match="already enrolled"):
        store.enroll("abcdef", "pi1", {"role": "b"}, cert("a2", "pi1"), now=11.0)
    # the failed attempt changed nothing: labels, certificates and token uses are as before
    assert store.get_node("pi1").labels == {"role": "a"}
    assert store.certificate("a2") is None
    assert store.get_token("abcdef").uses == 1


def test_remove_revokes_and_allows_re_enrollment(store: Store) -> None:
    store.add_token(token())
    store.enroll("abcdef", "pi1", {"role": "a"}, cert("a1", "pi1"), now=10.0)
    assert store.remove_node("pi1", now=20.0) == ["a1"]
    assert store.get_node("pi1") is None
    assert store.certificate("a1").revoked_at == 20.0
    assert store.active_certificates("pi1", now=21.0) == []
    store.enroll("abcdef", "pi1", {}, cert("a2", "pi1"), now=30.0)
    assert store.get_node("pi1").labels == {}  # labels went with the removed node


def test_labels_and_last_seen(store: Store) -> None:
    store.add_token(token())
    store.enroll("abcdef", "pi1", {"a": "1", "b": "2"}, cert("a1", "pi1"), now=10.0)
    store.update_labels("pi1", {"b": "3", "c": "4"}, ["a"])
    assert store.get_node("pi1").labels == {"b": "3", "c": "4"}
    store.record_last_seen({"pi1": 50.0})
    store.record_last_seen({"pi1": 40.0})  # an older flush never moves last_seen back
    assert store.get_node("pi1").last_seen == 50.0


def test_state_survives_reopening(tmp_path: Path) -> None:
    first = Store(tmp_path / "state.db")
    first.add_token(token())
    first.enroll("abcdef", "pi1", {"role": "a"}, cert("a1", "pi1"), now=10.0)
    first.close()
    second = Store(tmp_path / "state.db")
    try:
        assert second.get_node("pi1").labels == {"role": "a"}
        assert second.integrity_ok()
    finally:
        second.close()


def test_a_renewed_certificate_is_recorded_only_for_an_enrolled_node(store: Store) -> None:
    store.add_token(token())
    store.enroll("abcdef", "pi1", {}, cert("a1", "pi1"), now=10.0)
    assert store.add_certificate(CertificateRecord("a2", "pi1", 20.0, 6000.0, None))
    assert not store.add_certificate(CertificateRecord("b1", "gone", 20.0, 6000.0, None))
    assert store.certificate("b1") is None
    # the old certificate stays valid until its own end
    assert [c.serial for c in store.active_certificates("pi1", now=30.0)] == ["a2", "a1"]


def test_newest_certificates_include_expired_and_revoked_ones(store: Store) -> None:
    store.add_token(token())
    store.enroll("abcdef", "pi1", {}, CertificateRecord("a1", "pi1", 10.0, 50.0, None), now=10.0)
    store.enroll("abcdef", "pi2", {}, CertificateRecord("b1", "pi2", 10.0, 5000.0, None), now=10.0)
    store.add_certificate(CertificateRecord("b2", "pi2", 20.0, 6000.0, None))
    newest = store.newest_certificates()
    assert {node: record.serial for node, record in newest.items()} == {"pi1": "a1", "pi2": "b2"}
    assert store.newest_certificates("pi1") == {"pi1": newest["pi1"]}
    store.remove_node("pi2", now=30.0)
    assert store.newest_certificates("pi2")["pi2"].revoked_at == 30.0

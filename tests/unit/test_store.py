"""The SQLite store: enrollment is one transaction, removal revokes, nothing is half-written."""

import errno
import sqlite3
from pathlib import Path

import pytest

from picoord.coordinator.store import (
    FULL,
    IO_ERROR,
    READ_ONLY,
    CertificateRecord,
    EnrollmentConflict,
    Store,
    TokenRecord,
    disk_fault,
    mount_is_read_only,
)


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


def test_expired_tokens_are_deleted_and_live_ones_kept(store: Store) -> None:
    store.add_token(token("old001", expires_at=100.0))
    store.add_token(token("edge01", expires_at=200.0))
    store.add_token(token("live01", expires_at=300.0))
    assert store.delete_expired_tokens(now=200.0) == 2  # expiring exactly now counts as expired
    assert [t.token_id for t in store.list_tokens()] == ["live01"]
    assert store.delete_expired_tokens(now=200.0) == 0


def test_hellos_held_back_are_written_with_the_last_seen_times(store: Store) -> None:
    store.add_token(token())
    store.enroll("abcdef", "pi1", {}, cert("a1", "pi1"), now=10.0)
    store.enroll("abcdef", "pi2", {}, cert("a2", "pi2"), now=10.0)
    store.record_last_seen({"pi2": 30.0}, {"pi1": ("0.2.0", b"hw", 20.0)})
    pi1, pi2 = store.get_node("pi1"), store.get_node("pi2")
    assert (pi1.agent_version, pi1.hardware, pi1.last_seen) == ("0.2.0", b"hw", 20.0)
    assert pi2.last_seen == 30.0


def test_a_failing_transaction_leaves_nothing_behind(store: Store) -> None:
    store.add_token(token())
    with pytest.raises(sqlite3.IntegrityError), store.transaction() as db:
        db.execute("UPDATE tokens SET uses = 5")
        db.execute("INSERT INTO tokens(token_id) VALUES ('x')")  # NOT NULL columns missing
    assert store.get_token("abcdef").uses == 0
    store.add_token(token("second"))  # and the connection is usable again
    assert len(store.list_tokens()) == 2


def _sqlite_error(kind: type[sqlite3.Error], message: str, code: int | None) -> sqlite3.Error:
    error = kind(message)
    if code is not None:
        error.sqlite_errorcode = code
    return error


@pytest.mark.parametrize(
    ("error", "read_only_mount", "fault"),
    [
        (
            _sqlite_error(sqlite3.OperationalError, "database or disk is full", sqlite3.SQLITE_FULL),
            False,
            FULL,
        ),
        (_sqlite_error(sqlite3.OperationalError, "database or disk is full", None), False, FULL),
        (
            _sqlite_error(sqlite3.OperationalError, "attempt to write a readonly database", 8),
            False,
            READ_ONLY,
        ),
        (_sqlite_error(sqlite3.OperationalError, "disk I/O error", 778), False, IO_ERROR),  # IOERR_WRITE
        (_sqlite_error(sqlite3.OperationalError, "disk I/O error", 778), True, READ_ONLY),
        (
            _sqlite_error(sqlite3.DatabaseError, "database or disk is full", sqlite3.SQLITE_FULL),
            True,
            READ_ONLY,
        ),
        (OSError(errno.ENOSPC, "No space left on device"), False, FULL),
        (OSError(errno.EDQUOT, "Disk quota exceeded"), False, FULL),
        (OSError(errno.EROFS, "Read-only file system"), False, READ_ONLY),
        (OSError(errno.EIO, "Input/output error"), False, IO_ERROR),
        # other problems are bugs or conflicts, not a disk that refuses writes
        (_sqlite_error(sqlite3.IntegrityError, "UNIQUE constraint failed", 2067), False, None),
        (_sqlite_error(sqlite3.OperationalError, "no such table: x", 1), True, None),
        (OSError(errno.EACCES, "Permission denied"), False, None),
        (ValueError("not a disk error"), False, None),
    ],
)
def test_disk_faults_are_told_apart_from_other_errors(
    error: BaseException, read_only_mount: bool, fault: str | None
) -> None:
    assert disk_fault(error, read_only_mount) == fault


@pytest.mark.parametrize(
    ("error", "read_only_mount", "fault"),
    [
        (_sqlite_error(sqlite3.OperationalError, "disk I/O error", 4618), False, FULL),  # IOERR_SHMSIZE
        (_sqlite_error(sqlite3.OperationalError, "disk I/O error", 778), True, READ_ONLY),
        (_sqlite_error(sqlite3.IntegrityError, "UNIQUE constraint failed", 2067), False, None),
    ],
)
def test_an_io_error_on_a_disk_with_no_space_left_is_a_full_disk(
    error: BaseException, read_only_mount: bool, fault: str | None
) -> None:
    assert disk_fault(error, read_only_mount, no_space_left=True) == fault


@pytest.mark.parametrize(
    ("options", "read_only"),
    [
        ("rw,relatime", False),
        ("ro,relatime", True),
        ("rw,relatime,errors=remount-ro", False),  # a policy, not the state
        ("rw,relatime,errors=remount-ro,emergency_ro", True),
        ("", False),
    ],
)
def test_read_only_mount_options(options: str, read_only: bool) -> None:
    assert mount_is_read_only(options) is read_only


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


# --- node restriction: join labels wait, tokens grant, the first hello's hardware is recorded ---


def test_join_labels_are_held_and_token_labels_granted(store: Store) -> None:
    store.add_token(TokenRecord("abcdef", "hash", 0.0, 1000.0, 0, 0, "", labels={"zone": "shelf-a"}))
    store.enroll("abcdef", "pi1", {"role": "manager", "zone": "shelf-a"}, cert("a1", "pi1"), now=10.0)
    node = store.get_node("pi1")
    assert node.labels == {"role": "manager", "zone": "shelf-a"}  # shown, as asked
    assert node.pending_labels == {"role"}  # the token granted zone; role waits
    assert store.list_nodes()[0].pending_labels == {"role"}
    assert store.accept_node("pi1") and store.get_node("pi1").pending_labels == frozenset()
    assert not store.accept_node("nobody")


def test_an_operator_label_is_accepted_at_once(store: Store) -> None:
    store.add_token(token())
    store.enroll("abcdef", "pi1", {"role": "manager", "disk": "ssd"}, cert("a1", "pi1"), now=10.0)
    store.update_labels("pi1", {"disk": "ssd"}, ["role"])
    node = store.get_node("pi1")
    assert (node.labels, node.pending_labels) == ({"disk": "ssd"}, frozenset())


def test_token_list_shows_which_nodes_used_each_token(store: Store) -> None:
    store.add_token(TokenRecord("abcdef", "hash", 0.0, 1000.0, 3, 0, "rack", labels={"zone": "a"}))
    store.add_token(token("ghijkl"))
    store.enroll("abcdef", "pi1", {}, cert("a1", "pi1"), now=10.0)
    store.enroll("abcdef", "pi2", {}, cert("a2", "pi2"), now=11.0)
    first, second = store.list_tokens()
    assert (first.uses, first.used_by, first.labels) == (2, ("pi1", "pi2"), {"zone": "a"})
    assert (second.uses, second.used_by) == (0, ())
    assert store.get_token("abcdef").used_by == ("pi1", "pi2")
    store.delete_expired_tokens(now=2000.0)
    assert store.list_tokens() == []


def test_the_first_hello_is_the_recorded_hardware_until_accepted(store: Store) -> None:
    store.add_token(token())
    store.enroll("abcdef", "pi1", {}, cert("a1", "pi1"), now=10.0)
    store.record_hello("pi1", "1.0", b"first", 11.0)
    store.record_hello("pi1", "1.0", b"second", 12.0)
    node = store.get_node("pi1")
    assert (node.hardware, node.enrolled_hardware) == (b"second", b"first")
    store.record_last_seen({}, {"pi1": ("1.0", b"third", 13.0)})
    assert store.get_node("pi1").enrolled_hardware == b"first"
    store.accept_node("pi1")
    assert store.get_node("pi1").enrolled_hardware == b"third"


def test_an_older_database_gains_the_new_columns(tmp_path: Path) -> None:
    path = tmp_path / "old.db"
    old = sqlite3.connect(path)
    old.executescript(
        "CREATE TABLE nodes (name TEXT PRIMARY KEY, enrolled_at REAL NOT NULL, last_seen REAL NOT NULL "
        "DEFAULT 0, agent_version TEXT NOT NULL DEFAULT '', hardware BLOB);"
        "CREATE TABLE labels (node TEXT NOT NULL, key TEXT NOT NULL, value TEXT NOT NULL, "
        "PRIMARY KEY (node, key));"
        "CREATE TABLE tokens (token_id TEXT PRIMARY KEY, secret_hash TEXT NOT NULL, "
        "created_at REAL NOT NULL, expires_at REAL NOT NULL, usage_limit INTEGER NOT NULL DEFAULT 0, "
        "uses INTEGER NOT NULL DEFAULT 0, description TEXT NOT NULL DEFAULT '');"
        "INSERT INTO nodes VALUES ('pi1', 1.0, 2.0, '0.9', x'0a03706931');"
        "INSERT INTO labels VALUES ('pi1', 'role', 'storage');"
        "INSERT INTO tokens VALUES ('abcdef', 'hash', 0, 1000, 0, 1, '');"
    )
    old.close()
    upgraded = Store(path)
    node = upgraded.get_node("pi1")
    # labels set before the upgrade were accepted there; the hardware is recorded at the next hello
    assert (node.labels, node.pending_labels, node.enrolled_hardware) == (
        {"role": "storage"},
        frozenset(),
        None,
    )
    assert upgraded.get_token("abcdef").labels == {}
    upgraded.close()


def test_membership_actions_are_read_by_kind(store: Store) -> None:
    store.record_action("a1", "pi1", 1.0, b"init", "swarm_init")
    store.record_action("a2", "pi1", 2.0, b"mount", "mount")
    store.record_action("a3", "pi2", 3.0, b"older row", "")  # written before the kind column
    assert store.actions_of_kinds({"swarm_init", "swarm_join"}) == [b"init", b"older row"]

"""Durable coordinator state in SQLite (WAL): nodes, labels, tokens, certificates.

A thin shell: plain rows in, plain dataclasses out, no policy. Every multi-row change
is one transaction, so a crash or a kill never leaves half of it behind. Fast-changing
facts (last seen, metrics) live in memory and are flushed here in batches.
"""

from __future__ import annotations

import errno
import json
import os
import sqlite3
import threading
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from pathlib import Path

SCHEMA_VERSION = 1
REGISTRY_KEY = "registry:"  # meta rows: a Registry document's names, as JSON

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS nodes (
    name TEXT PRIMARY KEY,
    enrolled_at REAL NOT NULL,
    last_seen REAL NOT NULL DEFAULT 0,
    agent_version TEXT NOT NULL DEFAULT '',
    hardware BLOB
);
CREATE TABLE IF NOT EXISTS labels (
    node TEXT NOT NULL REFERENCES nodes(name) ON DELETE CASCADE,
    key TEXT NOT NULL,
    value TEXT NOT NULL,
    PRIMARY KEY (node, key)
);
CREATE TABLE IF NOT EXISTS tokens (
    token_id TEXT PRIMARY KEY,
    secret_hash TEXT NOT NULL,
    created_at REAL NOT NULL,
    expires_at REAL NOT NULL,
    usage_limit INTEGER NOT NULL DEFAULT 0,
    uses INTEGER NOT NULL DEFAULT 0,
    description TEXT NOT NULL DEFAULT ''
);
CREATE TABLE IF NOT EXISTS certificates (
    serial TEXT PRIMARY KEY,
    node TEXT NOT NULL,
    issued_at REAL NOT NULL,
    not_after REAL NOT NULL,
    revoked_at REAL
);
CREATE INDEX IF NOT EXISTS certificates_by_node ON certificates(node);
CREATE TABLE IF NOT EXISTS actions (
    action_id TEXT PRIMARY KEY,
    record BLOB NOT NULL,
    node TEXT NOT NULL,
    started_at REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS actions_by_node ON actions(node, started_at);
CREATE TABLE IF NOT EXISTS admin_certificates (
    serial TEXT PRIMARY KEY,
    name TEXT NOT NULL,
    issued_at REAL NOT NULL,
    not_after REAL NOT NULL,
    revoked_at REAL,
    issued_by TEXT NOT NULL DEFAULT ''
);
CREATE INDEX IF NOT EXISTS admin_certificates_by_name ON admin_certificates(name);
CREATE TABLE IF NOT EXISTS token_uses (
    token_id TEXT NOT NULL,
    node TEXT NOT NULL,
    used_at REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS token_uses_by_token ON token_uses(token_id, used_at);
"""

# Columns added after the first release: (table, column, declaration), added to an older
# database at open. `enrolled_hardware` is the hardware placement counts (the first hello's,
# or one an operator accepted); `hardware` stays the latest report. A label with `accepted`
# 0 is one the node asked for at join: shown, but no placement fact until accepted (labels
# of an older database were all accepted there, so they stay so).
_ADDED_COLUMNS = (
    ("nodes", "enrolled_hardware", "BLOB"),
    ("labels", "accepted", "INTEGER NOT NULL DEFAULT 1"),
    ("actions", "kind", "TEXT"),  # NULL in rows written before it: read those in full
    ("tokens", "labels", "TEXT NOT NULL DEFAULT '{}'"),
)

_UPSERT_LABEL = (
    "INSERT INTO labels(node, key, value, accepted) VALUES (?, ?, ?, ?) "
    "ON CONFLICT(node, key) DO UPDATE SET value = excluded.value, accepted = excluded.accepted"
)


class EnrollmentConflict(Exception):
    """The enrollment lost to the store's current state (token used up, name taken)."""


class StateUnavailable(Exception):
    """The state disk refuses writes (full, read-only, failing): nothing was changed.

    Callers report it and go on; the next write tries again, so it heals by itself."""

    def __init__(self, fault: str, state_dir: Path) -> None:
        super().__init__(f"state disk {fault} at {state_dir}")
        self.fault = fault
        self.state_dir = state_dir


FULL, READ_ONLY, IO_ERROR = "full", "read-only", "failing (I/O error)"
_SQLITE_FAULTS = {  # primary result codes (the low byte of an extended code)
    sqlite3.SQLITE_FULL: FULL,
    sqlite3.SQLITE_READONLY: READ_ONLY,
    sqlite3.SQLITE_IOERR: IO_ERROR,
    sqlite3.SQLITE_CANTOPEN: IO_ERROR,
}
_SQLITE_MESSAGES = {
    "database or disk is full": FULL,
    "attempt to write a readonly database": READ_ONLY,
    "disk i/o error": IO_ERROR,
}
_ERRNO_FAULTS = {errno.ENOSPC: FULL, errno.EDQUOT: FULL, errno.EROFS: READ_ONLY, errno.EIO: IO_ERROR}


def disk_fault(
    error: BaseException, read_only_mount: bool = False, no_space_left: bool = False
) -> str | None:
    """Which disk fault an error from SQLite or the OS means, or None when it means another
    problem (a bug, a constraint). SQLite reports some faults as plain I/O errors (e.g. no
    room for its shared-memory file): the mount's state then names the fault."""
    fault: str | None = None
    if isinstance(error, sqlite3.Error):
        code = getattr(error, "sqlite_errorcode", None)
        fault = _SQLITE_FAULTS.get(code & 0xFF) if code is not None else None
        fault = fault or next((f for text, f in _SQLITE_MESSAGES.items() if text in str(error).lower()), None)
    elif isinstance(error, OSError):
        fault = _ERRNO_FAULTS.get(error.errno or 0)
    if fault in (IO_ERROR, FULL) and read_only_mount:
        return READ_ONLY
    if fault == IO_ERROR and no_space_left:
        return FULL
    return fault


@dataclass(frozen=True)
class TokenRecord:
    token_id: str
    secret_hash: str
    created_at: float
    expires_at: float
    usage_limit: int
    uses: int
    description: str
    labels: dict[str, str] = field(default_factory=dict)  # granted to the nodes that join with it
    used_by: tuple[str, ...] = ()  # the nodes that enrolled with it, oldest first


@dataclass(frozen=True)
class CertificateRecord:
    serial: str
    node: str
    issued_at: float
    not_after: float
    revoked_at: float | None


@dataclass(frozen=True)
class AdminCertificateRecord:
    """A remote operator's certificate (admin:NAME), kept apart from node certificates."""

    serial: str
    name: str
    issued_at: float
    not_after: float
    revoked_at: float | None
    issued_by: str = ""


class AdminNameTaken(Exception):
    """An admin of that name still holds a usable certificate."""


@dataclass(frozen=True)
class NodeRecord:
    name: str
    enrolled_at: float
    last_seen: float
    agent_version: str
    hardware: bytes | None  # serialized picoord.v1.Hardware, as the latest hello reported it
    labels: dict[str, str] = field(default_factory=dict)  # all of them, pending ones included
    enrolled_hardware: bytes | None = None  # what placement counts: the first hello's, or accepted
    pending_labels: frozenset[str] = frozenset()  # keys the node asked for at join, not yet accepted


def no_space_left(path: Path) -> bool:
    try:
        return os.statvfs(path).f_bavail == 0
    except OSError:
        return False


def mount_is_read_only(options: str) -> bool:
    """From a mount's options in /proc/self/mounts: `ro`, or ext4's `emergency_ro` after
    errors=remount-ro (which statvfs does not report)."""
    return bool({"ro", "emergency_ro"} & set(options.split(",")))


def mounted_read_only(path: Path) -> bool:
    """Whether the filesystem holding `path` is read-only now."""
    try:
        if os.statvfs(path).f_flag & os.ST_RDONLY:
            return True
        mounts = Path("/proc/self/mounts").read_text().splitlines()
    except OSError:
        return False
    resolved = path.resolve()
    best, best_options = "", ""
    for line in mounts:
        fields = line.split()
        if len(fields) < 4:
            continue
        mountpoint = fields[1].replace("\\040", " ")
        if resolved.is_relative_to(mountpoint) and len(mountpoint) >= len(best):
            best, best_options = mountpoint, fields[3]
    return mount_is_read_only(best_options)


def snapshot_database(source: Path, target: Path) -> None:
    """Copy a live state database to `target` as one consistent, self-contained file.

    The source is opened read-only and copied by SQLite's backup API in one step, i.e. in
    one read transaction: in WAL mode the coordinator's writers go on meanwhile and the
    copy is the database as of one commit. The copy leaves WAL mode (no -wal file beside
    it); the Store turns WAL on again when it opens it."""
    reader = sqlite3.connect(f"file:{source}?mode=ro", uri=True, isolation_level=None)
    try:
        reader.execute("PRAGMA busy_timeout=5000")
        copy = sqlite3.connect(target, isolation_level=None)
        try:
            reader.backup(copy)
            copy.execute("PRAGMA journal_mode=DELETE")
        finally:
            copy.close()
    finally:
        reader.close()


def database_refusal(path: Path) -> str | None:
    """Why the file at `path` is not a state database this coordinator can open (damaged,
    not SQLite, another schema), or None. Opened read-only: nothing is changed."""
    try:
        db = sqlite3.connect(f"file:{path}?mode=ro", uri=True, isolation_level=None)
    except sqlite3.Error as error:
        return f"cannot open it ({error})"
    try:
        check = db.execute("PRAGMA integrity_check").fetchone()[0]
        if check != "ok":
            return f"it is damaged (integrity check: {str(check)[:200]})"
        rows = db.execute("SELECT value FROM meta WHERE key = 'schema_version'").fetchall()
    except sqlite3.Error as error:
        return f"it is not a picoord state database ({error})"
    finally:
        db.close()
    if [tuple(row) for row in rows] != [(str(SCHEMA_VERSION),)]:
        found = rows[0][0] if rows else "none"
        return f"its schema version is {found}, this coordinator's is {SCHEMA_VERSION}"
    return None


class Store:
    def __init__(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self.path = path
        # One connection and one lock: one writer at a time, whichever thread calls.
        self._lock = threading.Lock()
        with self._faults_as_unavailable():  # a disk that is full at start-up says so
            self._db = sqlite3.connect(path, check_same_thread=False, isolation_level=None)
            self._db.row_factory = sqlite3.Row
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=NORMAL")
            self._db.execute("PRAGMA foreign_keys=ON")
            self._db.execute("PRAGMA busy_timeout=5000")
        with self.transaction() as db:
            for statement in filter(str.strip, _SCHEMA.split(";")):
                db.execute(statement)
            for table, column, declaration in _ADDED_COLUMNS:
                present = {row["name"] for row in db.execute(f"PRAGMA table_info({table})")}
                if column not in present:
                    db.execute(f"ALTER TABLE {table} ADD COLUMN {column} {declaration}")
            db.execute(
                "INSERT OR IGNORE INTO meta(key, value) VALUES ('schema_version', ?)", (str(SCHEMA_VERSION),)
            )
        path.chmod(0o600)

    def close(self) -> None:
        with self._lock:
            self._db.close()

    def _unavailable(self, error: BaseException) -> StateUnavailable | None:
        """The typed error for a disk fault, or None when `error` is something else."""
        fault = disk_fault(error, mounted_read_only(self.path.parent), no_space_left(self.path.parent))
        return StateUnavailable(fault, self.path.parent) if fault else None

    @contextmanager
    def _faults_as_unavailable(self) -> Iterator[None]:
        try:
            yield
        except (sqlite3.Error, OSError) as error:
            unavailable = self._unavailable(error)
            if unavailable is None:
                raise
            raise unavailable from error

    @contextmanager
    def transaction(self) -> Iterator[sqlite3.Connection]:
        """All or nothing: any error, a full disk's included (even at COMMIT), rolls back."""
        with self._lock, self._faults_as_unavailable():
            self._db.execute("BEGIN IMMEDIATE")
            try:
                yield self._db
                self._db.execute("COMMIT")
            except BaseException:
                if self._db.in_transaction:
                    with suppress(sqlite3.Error):
                        self._db.execute("ROLLBACK")
                raise

    def _query(self, sql: str, params: tuple = ()) -> list[sqlite3.Row]:
        with self._lock, self._faults_as_unavailable():
            return self._db.execute(sql, params).fetchall()

    def query(self, sql: str, params: tuple = ()) -> list[sqlite3.Row]:
        """One read for the store's other tables (the workload records): same lock and same
        disk-fault translation as the store's own reads."""
        return self._query(sql, params)

    def integrity_ok(self) -> bool:
        return self._query("PRAGMA integrity_check")[0][0] == "ok"

    # tokens
    def add_token(self, record: TokenRecord) -> None:
        with self.transaction() as db:
            db.execute(
                "INSERT INTO tokens(token_id, secret_hash, created_at, expires_at, usage_limit, uses, "
                "description, labels) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                (
                    record.token_id,
                    record.secret_hash,
                    record.created_at,
                    record.expires_at,
                    record.usage_limit,
                    record.uses,
                    record.description,
                    json.dumps(record.labels, sort_keys=True),
                ),
            )

    def _token(self, row: sqlite3.Row) -> TokenRecord:
        fields = dict(row)
        fields["labels"] = json.loads(fields.get("labels") or "{}")
        uses = self._query(
            "SELECT node FROM token_uses WHERE token_id = ? ORDER BY used_at", (fields["token_id"],)
        )
        return TokenRecord(**fields, used_by=tuple(use["node"] for use in uses))

    def get_token(self, token_id: str) -> TokenRecord | None:
        rows = self._query("SELECT * FROM tokens WHERE token_id = ?", (token_id,))
        return self._token(rows[0]) if rows else None

    def list_tokens(self) -> list[TokenRecord]:
        return [self._token(row) for row in self._query("SELECT * FROM tokens ORDER BY created_at")]

    def delete_expired_tokens(self, now: float) -> int:
        with self.transaction() as db:
            db.execute(
                "DELETE FROM token_uses WHERE token_id IN "
                "(SELECT token_id FROM tokens WHERE expires_at <= ?)",
                (now,),
            )
            return db.execute("DELETE FROM tokens WHERE expires_at <= ?", (now,)).rowcount

    # enrollment: one transaction checks and uses the token, creates the node and records
    # its certificate, so two agents racing for the last use of a token cannot both win.
    def enroll(
        self,
        token_id: str,
        node: str,
        labels: dict[str, str],
        certificate: CertificateRecord,
        now: float,
    ) -> None:
        with self.transaction() as db:
            used = db.execute(
                "UPDATE tokens SET uses = uses + 1 WHERE token_id = ? AND expires_at > ? "
                "AND (usage_limit = 0 OR uses < usage_limit)",
                (token_id, now),
            ).rowcount
            if not used:
                raise EnrollmentConflict(f"token {token_id} is expired or used up")
            granted = json.loads(
                db.execute("SELECT labels FROM tokens WHERE token_id = ?", (token_id,)).fetchone()[0] or "{}"
            )
            holder = db.execute(
                "SELECT 1 FROM certificates WHERE node = ? AND revoked_at IS NULL AND not_after > ?",
                (node, now),
            ).fetchone()
            if holder:
                raise EnrollmentConflict(
                    f"node {node!r} is already enrolled: remove it first (coordctl node remove {node})"
                )
            db.execute(
                "INSERT INTO nodes(name, enrolled_at) VALUES (?, ?) "
                "ON CONFLICT(name) DO UPDATE SET enrolled_at = excluded.enrolled_at, "
                "enrolled_hardware = NULL",
                (node, now),
            )
            # The token's labels are granted; the ones the node asks for wait for an operator.
            asked = {key: value for key, value in labels.items() if granted.get(key) != value}
            db.executemany(_UPSERT_LABEL, [(node, key, value, 0) for key, value in asked.items()])
            db.executemany(
                _UPSERT_LABEL, [(node, key, value, 1) for key, value in granted.items() if key not in asked]
            )
            db.execute("INSERT INTO token_uses VALUES (?, ?, ?)", (token_id, node, now))
            db.execute(
                "INSERT INTO certificates VALUES (?, ?, ?, ?, NULL)",
                (certificate.serial, node, certificate.issued_at, certificate.not_after),
            )

    # certificates
    def certificate(self, serial: str) -> CertificateRecord | None:
        rows = self._query("SELECT * FROM certificates WHERE serial = ?", (serial,))
        return CertificateRecord(**dict(rows[0])) if rows else None

    def active_certificates(self, node: str, now: float) -> list[CertificateRecord]:
        rows = self._query(
            "SELECT * FROM certificates WHERE node = ? AND revoked_at IS NULL AND not_after > ? "
            "ORDER BY issued_at DESC",
            (node, now),
        )
        return [CertificateRecord(**dict(row)) for row in rows]

    def add_certificate(self, record: CertificateRecord) -> bool:
        """Record a renewed certificate; False (nothing written) when the node is gone."""
        with self.transaction() as db:
            return bool(
                db.execute(
                    "INSERT INTO certificates SELECT ?, ?, ?, ?, NULL WHERE EXISTS "
                    "(SELECT 1 FROM nodes WHERE name = ?)",
                    (record.serial, record.node, record.issued_at, record.not_after, record.node),
                ).rowcount
            )

    def newest_certificates(self, node: str | None = None) -> dict[str, CertificateRecord]:
        """Each node's most recently issued certificate, expired or revoked ones included."""
        rows = self._query(
            "SELECT c.* FROM certificates c WHERE (? IS NULL OR c.node = ?) AND c.issued_at = "
            "(SELECT MAX(issued_at) FROM certificates WHERE node = c.node) ORDER BY c.node",
            (node, node),
        )
        return {row["node"]: CertificateRecord(**dict(row)) for row in rows}

    # nodes
    def get_node(self, name: str) -> NodeRecord | None:
        rows = self._query("SELECT * FROM nodes WHERE name = ?", (name,))
        if not rows:
            return None
        labels, pending = self._labels(name).get(name, ({}, set()))
        return NodeRecord(**dict(rows[0]), labels=labels, pending_labels=frozenset(pending))

    def list_nodes(self) -> list[NodeRecord]:
        found = self._labels()
        records = []
        for row in self._query("SELECT * FROM nodes ORDER BY name"):
            labels, pending = found.get(row["name"], ({}, set()))
            records.append(NodeRecord(**dict(row), labels=labels, pending_labels=frozenset(pending)))
        return records

    def _labels(self, node: str | None = None) -> dict[str, tuple[dict[str, str], set[str]]]:
        """node -> (its labels, the keys not yet accepted), of one node or of all."""
        found: dict[str, tuple[dict[str, str], set[str]]] = {}
        rows = self._query(
            "SELECT node, key, value, accepted FROM labels WHERE ? IS NULL OR node = ? ORDER BY node, key",
            (node, node),
        )
        for row in rows:
            labels, pending = found.setdefault(row["node"], ({}, set()))
            labels[row["key"]] = row["value"]
            if not row["accepted"]:
                pending.add(row["key"])
        return found

    def record_hello(self, name: str, agent_version: str, hardware: bytes, now: float) -> None:
        """The latest report; the first one after enrollment is also the recorded hardware."""
        with self.transaction() as db:
            db.execute(
                "UPDATE nodes SET agent_version = ?, hardware = ?, last_seen = ?, "
                "enrolled_hardware = COALESCE(enrolled_hardware, ?) WHERE name = ?",
                (agent_version, hardware, now, hardware, name),
            )

    def record_last_seen(
        self, seen: dict[str, float], hellos: dict[str, tuple[str, bytes, float]] | None = None
    ) -> None:
        """Last-seen times, and hellos whose own write was refused (agent version, hardware,
        when), in one transaction."""
        if not seen and not hellos:
            return
        with self.transaction() as db:
            db.executemany(
                "UPDATE nodes SET agent_version = ?, hardware = ?, last_seen = MAX(last_seen, ?), "
                "enrolled_hardware = COALESCE(enrolled_hardware, ?) WHERE name = ?",
                [
                    (version, hardware, when, hardware, name)
                    for name, (version, hardware, when) in (hellos or {}).items()
                ],
            )
            db.executemany(
                "UPDATE nodes SET last_seen = MAX(last_seen, ?) WHERE name = ?",
                [(when, name) for name, when in seen.items()],
            )

    def update_labels(self, name: str, set_labels: dict[str, str], remove: list[str]) -> bool:
        """Relabel a node; False (and nothing changed) when there is no such node."""
        with self.transaction() as db:
            if db.execute("SELECT 1 FROM nodes WHERE name = ?", (name,)).fetchone() is None:
                return False
            db.executemany("DELETE FROM labels WHERE node = ? AND key = ?", [(name, key) for key in remove])
            db.executemany(
                _UPSERT_LABEL,
                [(name, key, value, 1) for key, value in set_labels.items()],  # the operator's word
            )
        return True

    def accept_node(self, name: str) -> bool:
        """Accept the labels the node asked for and record its latest hardware as the one
        placement counts; False (nothing changed) when there is no such node."""
        with self.transaction() as db:
            if db.execute("SELECT 1 FROM nodes WHERE name = ?", (name,)).fetchone() is None:
                return False
            db.execute("UPDATE labels SET accepted = 1 WHERE node = ?", (name,))
            db.execute("UPDATE nodes SET enrolled_hardware = hardware WHERE name = ?", (name,))
        return True

    # action history: one serialized picoord.v1.ActionRecord per action, written at its
    # start and again at its end, so a coordinator crash mid-apply still shows what began.
    def record_action(
        self, action_id: str, node: str, started_at: float, record: bytes, kind: str = ""
    ) -> None:
        with self.transaction() as db:
            db.execute(
                "INSERT INTO actions(action_id, record, node, started_at, kind) VALUES (?, ?, ?, ?, ?) "
                "ON CONFLICT(action_id) DO UPDATE SET record = excluded.record, kind = excluded.kind",
                (action_id, record, node, started_at, kind or None),
            )

    # the cluster's own container registries, by Registry document: the HOST:PORT names
    # each is pulled by, which rollouts pin to digests (coordinator/registry_client.py)
    def record_registry(self, name: str, addresses: Sequence[str]) -> None:
        with self.transaction() as db:
            db.execute(
                "INSERT INTO meta(key, value) VALUES (?, ?) "
                "ON CONFLICT(key) DO UPDATE SET value = excluded.value",
                (f"{REGISTRY_KEY}{name}", json.dumps(list(addresses))),
            )

    def cluster_registries(self) -> list[str]:
        rows = self._query("SELECT value FROM meta WHERE key LIKE ?", (f"{REGISTRY_KEY}%",))
        found: list[str] = []
        for row in rows:
            with suppress(ValueError, TypeError):
                found += [str(address) for address in json.loads(row[0])]
        return sorted(set(found))

    def actions_of_kinds(self, kinds: Iterable[str]) -> list[bytes]:
        """The records of actions of these kinds (and of rows older than the kind column),
        oldest first: what the coordinator's record of cluster roles is built from."""
        wanted = sorted(kinds)
        marks = ", ".join("?" for _ in wanted)
        rows = self._query(
            f"SELECT record FROM actions WHERE kind IS NULL OR kind IN ({marks}) ORDER BY started_at",
            tuple(wanted),
        )
        return [row[0] for row in rows]

    def list_actions(self, node: str | None, limit: int) -> list[bytes]:
        if node:
            sql, params = (
                "SELECT record FROM actions WHERE node = ? ORDER BY started_at DESC LIMIT ?",
                (node, limit),
            )
        else:
            sql, params = "SELECT record FROM actions ORDER BY started_at DESC LIMIT ?", (limit,)
        return [row[0] for row in self._query(sql, params)]

    def remove_node(self, name: str, now: float) -> list[str]:
        """Revoke every certificate of the node and forget it; return the revoked serials."""
        with self.transaction() as db:
            serials = [
                row[0]
                for row in db.execute(
                    "SELECT serial FROM certificates WHERE node = ? AND revoked_at IS NULL", (name,)
                ).fetchall()
            ]
            db.execute(
                "UPDATE certificates SET revoked_at = ? WHERE node = ? AND revoked_at IS NULL", (now, name)
            )
            db.execute("DELETE FROM nodes WHERE name = ?", (name,))
        return serials

    # admin certificates (remote operators)
    def add_admin_certificate(self, record: AdminCertificateRecord, now: float) -> None:
        """Record an issued admin certificate; AdminNameTaken (nothing written) while the
        name still holds one that is neither revoked nor expired."""
        with self.transaction() as db:
            holder = db.execute(
                "SELECT serial FROM admin_certificates "
                "WHERE name = ? AND revoked_at IS NULL AND not_after > ?",
                (record.name, now),
            ).fetchone()
            if holder:
                raise AdminNameTaken(f"admin {record.name!r} already holds certificate {holder[0]}")
            db.execute(
                "INSERT INTO admin_certificates VALUES (?, ?, ?, ?, NULL, ?)",
                (record.serial, record.name, record.issued_at, record.not_after, record.issued_by),
            )

    def admin_certificate(self, serial: str) -> AdminCertificateRecord | None:
        rows = self._query("SELECT * FROM admin_certificates WHERE serial = ?", (serial,))
        return AdminCertificateRecord(**dict(rows[0])) if rows else None

    def list_admin_certificates(self) -> list[AdminCertificateRecord]:
        rows = self._query("SELECT * FROM admin_certificates ORDER BY name, issued_at")
        return [AdminCertificateRecord(**dict(row)) for row in rows]

    def revoke_admin(self, name: str, now: float) -> list[str]:
        """Revoke every unrevoked certificate of the admin; return their serials."""
        with self.transaction() as db:
            serials = [
                row[0]
                for row in db.execute(
                    "SELECT serial FROM admin_certificates WHERE name = ? AND revoked_at IS NULL", (name,)
                ).fetchall()
            ]
            db.execute(
                "UPDATE admin_certificates SET revoked_at = ? WHERE name = ? AND revoked_at IS NULL",
                (now, name),
            )
        return serials

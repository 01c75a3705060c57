"""Durable workload state in the coordinator's SQLite store: applied specs, revisions,
rollouts, the replicas the coordinator placed, secrets and drained nodes.

A thin shell like the node store: plain dataclasses in and out, every change one
transaction. The replicas table is the coordinator's half of each replica (which node,
which revision, whether a stop was asked); the agents' reports are the other half and
live in memory. Keeping placements durable is what lets a restarted coordinator resume a
rollout mid-way without ever exceeding its bounds.
"""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, fields

from picoord.common.plaindata import from_plain, to_plain
from picoord.coordinator.controller.backoff import Backoff
from picoord.coordinator.rollout.history import Revision
from picoord.coordinator.rollout.planner import Rollout
from picoord.coordinator.store import Store
from picoord.coordinator.workloads.codec import spec_from_json, spec_to_json
from picoord.coordinator.workloads.spec import ServiceSpec, revision_key

_SCHEMA = """
CREATE TABLE IF NOT EXISTS services (
    name TEXT PRIMARY KEY,
    spec TEXT NOT NULL,            -- the last applied ServiceSpec, as JSON
    applied_at REAL NOT NULL,
    source TEXT NOT NULL DEFAULT '',
    rollout TEXT,                  -- the current Rollout, as JSON, NULL before the first one
    next_replica INTEGER NOT NULL DEFAULT 1
);
CREATE TABLE IF NOT EXISTS revisions (
    service TEXT NOT NULL,
    revision INTEGER NOT NULL,
    spec TEXT NOT NULL,            -- the ServiceSpec this revision runs, as JSON
    key TEXT NOT NULL,             -- revision_key(spec): what a replica runs
    created_at REAL NOT NULL,
    cause TEXT NOT NULL DEFAULT '',
    PRIMARY KEY (service, revision)
);
CREATE TABLE IF NOT EXISTS replicas (
    id TEXT PRIMARY KEY,
    service TEXT NOT NULL,
    revision INTEGER NOT NULL,
    node TEXT NOT NULL,
    created_at REAL NOT NULL,
    stopping INTEGER NOT NULL DEFAULT 0,
    stop_reason TEXT NOT NULL DEFAULT '',
    replaced INTEGER NOT NULL DEFAULT 0   -- written off while its node was lost
);
CREATE INDEX IF NOT EXISTS replicas_by_service ON replicas(service);
CREATE TABLE IF NOT EXISTS secrets (
    name TEXT NOT NULL,
    key TEXT NOT NULL,
    value BLOB NOT NULL,
    updated_at REAL NOT NULL,
    PRIMARY KEY (name, key)
);
CREATE TABLE IF NOT EXISTS drained (node TEXT PRIMARY KEY, since REAL NOT NULL);
CREATE TABLE IF NOT EXISTS backoffs (
    service TEXT NOT NULL,
    slot TEXT NOT NULL,
    revision INTEGER NOT NULL,
    failures INTEGER NOT NULL,
    failed_at REAL NOT NULL,
    reason TEXT NOT NULL DEFAULT '',
    node TEXT NOT NULL DEFAULT '',
    attempts TEXT NOT NULL DEFAULT '[]',   -- the replica ids tried, at most SLOT_HISTORY
    PRIMARY KEY (service, slot)
);
-- `coordctl rm --volumes`: named volumes a node must remove (once no container uses them);
-- a row goes when the node reports the volume gone, or a service that mounts it is applied
CREATE TABLE IF NOT EXISTS volume_removals (
    node TEXT NOT NULL,
    volume TEXT NOT NULL,
    asked_at REAL NOT NULL,
    PRIMARY KEY (node, volume)
);
"""
# Columns added after the first release: added to an older store when it is opened.
_ADDED_COLUMNS = (
    ("replicas", "slot", "TEXT NOT NULL DEFAULT ''"),
    ("services", "stack", "TEXT NOT NULL DEFAULT ''"),  # '' for a file applied without --stack
    # `coordctl rm`: set when removed. The row stays so replica ids are never reused (a
    # container of the old replica may still be on a node that is away); apply revives it.
    ("services", "removed_at", "REAL"),
)


@dataclass(frozen=True)
class StoredSpec:
    """A revision's spec as the history compares it: by what a replica runs (its key)."""

    key: str
    spec: ServiceSpec

    def __eq__(self, other: object) -> bool:
        return isinstance(other, StoredSpec) and other.key == self.key

    def __hash__(self) -> int:
        return hash(self.key)


def stored(spec: ServiceSpec, secrets: str = "") -> StoredSpec:
    """`secrets`: the spec's secret_stamp, when the values it reads count (a rollout)."""
    return StoredSpec(revision_key(spec) + (f"+{secrets}" if secrets else ""), spec)


@dataclass(frozen=True)
class ReplicaRecord:
    id: str
    service: str
    revision: int
    node: str
    created_at: float
    stopping: bool = False
    stop_reason: str = ""
    replaced: bool = False
    slot: str = ""  # the place it fills: 1..replicas, or its node for a global service


@dataclass(frozen=True)
class NewReplica:
    """A replica to record (and then send): the store gives it its id."""

    service: str
    revision: int
    node: str
    slot: str = ""


@dataclass(frozen=True)
class TickWrites:
    """Everything one tick of the controller changes, written in one transaction."""

    forget: tuple[str, ...] = ()  # stopped replicas confirmed gone
    replaced: tuple[str, ...] = ()
    reclaimed: tuple[str, ...] = ()
    stops: tuple[tuple[str, str], ...] = ()  # (replica, reason)
    rollouts: tuple[Rollout, ...] = ()
    starts: tuple[NewReplica, ...] = ()
    backoffs: tuple[Backoff, ...] = ()  # set
    cleared: tuple[tuple[str, str], ...] = ()  # (service, slot) backoffs to drop

    @property
    def empty(self) -> bool:
        return not any(getattr(self, f.name) for f in fields(self))


@dataclass(frozen=True)
class ServiceRecord:
    name: str
    spec: ServiceSpec
    applied_at: float
    source: str
    rollout: Rollout | None
    next_replica: int
    stack: str = ""  # the stack it was applied in (coordinator/workloads/stacks.py), or ''


class WorkloadRecords:
    """The workload tables of the coordinator's store."""

    def __init__(self, store: Store) -> None:
        self.store = store
        self._watchers: list[Callable[[], None]] = []
        with store.transaction() as db:
            for statement in filter(str.strip, _SCHEMA.split(";")):
                db.execute(statement)
            for table, column, declaration in _ADDED_COLUMNS:
                present = {row[1] for row in db.execute(f"PRAGMA table_info({table})")}
                if column not in present:
                    db.execute(f"ALTER TABLE {table} ADD COLUMN {column} {declaration}")

    def watch(self, changed: Callable[[], None]) -> None:
        """Call `changed` (from the writing thread) after an operator's change: an apply, a
        secret, a drain; the controller wakes on it instead of polling."""
        self._watchers.append(changed)

    def _changed(self) -> None:
        for changed in self._watchers:
            changed()

    def begin_rollout(self, service: str, history: list[Revision], rollout: Rollout) -> None:
        """A new rollout, in one transaction: its revision history, the rollout, and no
        backoff left on its slots (the operator acted: the next start is at once)."""
        with self.store.transaction() as db:
            _replace_history(db, service, history)
            db.execute(
                "UPDATE services SET rollout = ? WHERE name = ?",
                (json.dumps(to_plain(rollout), sort_keys=True), service),
            )
            db.execute("DELETE FROM backoffs WHERE service = ?", (service,))

    # services
    def apply(
        self, specs: list[ServiceSpec], now: float, source: str, stack: str = "", prune: Sequence[str] = ()
    ) -> list[bool]:
        """Record the applied specs of services, all or none, as members of `stack` ('' for
        none), and remove the services `prune` names (apply --prune) in the same transaction;
        for each spec, whether it changed."""
        changed = []
        with self.store.transaction() as db:
            _remove(db, prune, now)
            for spec in specs:
                text = spec_to_json(spec)
                row = db.execute(
                    "SELECT spec, removed_at FROM services WHERE name = ?", (spec.name,)
                ).fetchone()
                changed.append(row is None or row[1] is not None or row[0] != text)
                db.execute(
                    "INSERT INTO services(name, spec, applied_at, source, stack) VALUES (?, ?, ?, ?, ?) "
                    "ON CONFLICT(name) DO UPDATE SET spec = excluded.spec, "
                    "applied_at = excluded.applied_at, source = excluded.source, stack = excluded.stack, "
                    "removed_at = NULL",
                    (spec.name, text, now, source, stack),
                )
                db.executemany(  # a service mounts it again: it is no longer to be removed
                    "DELETE FROM volume_removals WHERE volume = ?", [(v,) for v in spec.named_volumes]
                )
        self._changed()
        return changed

    def services(self) -> list[ServiceRecord]:
        rows = self.store.query("SELECT * FROM services WHERE removed_at IS NULL ORDER BY name")
        return [
            ServiceRecord(
                name=row["name"],
                spec=spec_from_json(row["spec"]),
                applied_at=row["applied_at"],
                source=row["source"],
                rollout=from_plain(Rollout, json.loads(row["rollout"])) if row["rollout"] else None,
                next_replica=row["next_replica"],
                stack=row["stack"],
            )
            for row in rows
        ]

    def service(self, name: str) -> ServiceRecord | None:
        return next((record for record in self.services() if record.name == name), None)

    def remove(self, services: list[str], now: float, volumes: Iterable[tuple[str, str]] = ()) -> None:
        """Forget the services, all or none: no spec, no rollout, no backoff. Their replicas
        stay until stopped (the reconciler stops a replica whose service no longer exists,
        on a node that is away once it returns); revision history and replica numbering stay.
        `volumes`: (node, volume) pairs each node is to remove (coordctl rm --volumes)."""
        with self.store.transaction() as db:
            _remove(db, services, now)
            db.executemany(
                "INSERT OR REPLACE INTO volume_removals(node, volume, asked_at) VALUES (?, ?, ?)",
                [(node, volume, now) for node, volume in volumes],
            )
        self._changed()

    def volume_removals(self) -> dict[str, list[str]]:
        """node -> the named volumes it is to remove."""
        found: dict[str, list[str]] = {}
        for row in self.store.query("SELECT node, volume FROM volume_removals ORDER BY node, volume"):
            found.setdefault(row["node"], []).append(row["volume"])
        return found

    def volumes_removed(self, node: str, volumes: Iterable[str]) -> None:
        """The node reports these volumes gone: nothing more to ask of it."""
        with self.store.transaction() as db:
            db.executemany(
                "DELETE FROM volume_removals WHERE node = ? AND volume = ?", [(node, v) for v in volumes]
            )

    def save_rollout(self, service: str, rollout: Rollout) -> None:
        with self.store.transaction() as db:
            db.execute(
                "UPDATE services SET rollout = ? WHERE name = ?",
                (json.dumps(to_plain(rollout), sort_keys=True), service),
            )

    # revisions
    def history(self, service: str) -> list[Revision]:
        rows = self.store.query("SELECT * FROM revisions WHERE service = ? ORDER BY revision", (service,))
        return [
            Revision(
                row["revision"],
                StoredSpec(row["key"], spec_from_json(row["spec"])),
                row["created_at"],
                row["cause"],
            )
            for row in rows
        ]

    def replace_history(self, service: str, history: list[Revision]) -> None:
        with self.store.transaction() as db:
            _replace_history(db, service, history)

    def revision_spec(self, service: str, revision: int) -> ServiceSpec | None:
        rows = self.store.query(
            "SELECT spec FROM revisions WHERE service = ? AND revision = ?", (service, revision)
        )
        return spec_from_json(rows[0][0]) if rows else None

    # replicas
    def replicas(self, service: str | None = None) -> list[ReplicaRecord]:
        if service is None:
            rows = self.store.query("SELECT * FROM replicas ORDER BY id")
        else:
            rows = self.store.query("SELECT * FROM replicas WHERE service = ? ORDER BY id", (service,))
        return [
            ReplicaRecord(
                row["id"], row["service"], row["revision"], row["node"], row["created_at"],
                bool(row["stopping"]), row["stop_reason"], bool(row["replaced"]), row["slot"],
            )
            for row in rows
        ]  # fmt: skip

    def add_replicas(self, service: str, revision: int, nodes: list[str], now: float) -> list[ReplicaRecord]:
        """New replica records (ids `service.N`, never reused) on the given nodes, at once."""
        with self.store.transaction() as db:
            return _add_replicas(db, [NewReplica(service, revision, node) for node in nodes], now)

    def write_tick(self, writes: TickWrites, now: float) -> list[ReplicaRecord]:
        """One tick's decisions, all or none; returns the replicas recorded (with their ids)."""
        with self.store.transaction() as db:
            db.executemany("DELETE FROM replicas WHERE id = ?", [(replica,) for replica in writes.forget])
            db.executemany(
                "UPDATE replicas SET replaced = ? WHERE id = ?",
                [(1, rid) for rid in writes.replaced] + [(0, rid) for rid in writes.reclaimed],
            )
            db.executemany(
                "UPDATE replicas SET stopping = 1, stop_reason = ? WHERE id = ?",
                [(reason, replica) for replica, reason in writes.stops],
            )
            db.executemany(
                "UPDATE services SET rollout = ? WHERE name = ?",
                [(json.dumps(to_plain(r), sort_keys=True), r.service) for r in writes.rollouts],
            )
            db.executemany("DELETE FROM backoffs WHERE service = ? AND slot = ?", list(writes.cleared))
            db.executemany(
                "INSERT OR REPLACE INTO backoffs VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                [
                    (b.service, b.slot, b.revision, b.failures, b.failed_at, b.reason, b.node,
                     json.dumps(list(b.attempts)))
                    for b in writes.backoffs
                ],
            )  # fmt: skip
            return _add_replicas(db, list(writes.starts), now)

    def backoffs(self) -> list[Backoff]:
        rows = self.store.query("SELECT * FROM backoffs ORDER BY service, slot")
        return [
            Backoff(
                row["service"], row["slot"], row["revision"], row["failures"], row["failed_at"],
                row["reason"], row["node"], tuple(json.loads(row["attempts"])),
            )
            for row in rows
        ]  # fmt: skip

    def clear_backoffs(self, service: str) -> None:
        """The operator acted on the service (a new rollout): its slots start at once."""
        with self.store.transaction() as db:
            db.execute("DELETE FROM backoffs WHERE service = ?", (service,))

    def revision_specs(self) -> dict[tuple[str, int], ServiceSpec]:
        """Every stored revision's spec, by (service, revision): what one tick places with."""
        rows = self.store.query("SELECT service, revision, spec FROM revisions")
        return {(row[0], row[1]): spec_from_json(row[2]) for row in rows}

    def mark_stopping(self, replica_ids: list[tuple[str, str]]) -> None:
        """(id, reason) pairs: the coordinator asked these replicas to stop."""
        with self.store.transaction() as db:
            db.executemany(
                "UPDATE replicas SET stopping = 1, stop_reason = ? WHERE id = ?",
                [(reason, replica) for replica, reason in replica_ids],
            )

    def set_replaced(self, replica_ids: list[str], replaced: bool) -> None:
        """Write replicas off (their node is lost and they are replaced elsewhere), or take
        them back (the node returned before a replacement ran)."""
        with self.store.transaction() as db:
            db.executemany(
                "UPDATE replicas SET replaced = ? WHERE id = ?", [(int(replaced), rid) for rid in replica_ids]
            )

    def forget_replicas(self, replica_ids: list[str]) -> None:
        with self.store.transaction() as db:
            db.executemany("DELETE FROM replicas WHERE id = ?", [(replica,) for replica in replica_ids])

    # secrets
    def put_secret(self, name: str, key: str, value: bytes, now: float) -> None:
        with self.store.transaction() as db:
            db.execute(
                "INSERT INTO secrets VALUES (?, ?, ?, ?) ON CONFLICT(name, key) DO UPDATE SET "
                "value = excluded.value, updated_at = excluded.updated_at",
                (name, key, value, now),
            )
        self._changed()

    def secret_names(self) -> list[tuple[str, str, int, float]]:
        rows = self.store.query("SELECT name, key, length(value), updated_at FROM secrets ORDER BY name, key")
        return [(row[0], row[1], row[2], row[3]) for row in rows]

    def delete_secret(self, name: str) -> int:
        """Remove every key of the secret; how many there were."""
        with self.store.transaction() as db:
            removed = db.execute("DELETE FROM secrets WHERE name = ?", (name,)).rowcount
        self._changed()
        return int(removed)

    def secret_values(self) -> dict[tuple[str, str], str]:
        rows = self.store.query("SELECT name, key, value FROM secrets")
        return {(row[0], row[1]): bytes(row[2]).decode("utf-8", errors="replace") for row in rows}

    # drained nodes
    def drained(self) -> set[str]:
        return {row[0] for row in self.store.query("SELECT node FROM drained")}

    def set_drained(self, node: str, drained: bool, now: float) -> None:
        with self.store.transaction() as db:
            if drained:
                db.execute("INSERT OR IGNORE INTO drained VALUES (?, ?)", (node, now))
            else:
                db.execute("DELETE FROM drained WHERE node = ?", (node,))
        self._changed()


def _add_replicas(db: sqlite3.Connection, new: list[NewReplica], now: float) -> list[ReplicaRecord]:
    """Record new replicas inside the caller's transaction, in order: ids `service.N`,
    never reused."""
    next_ids: dict[str, int] = {}
    made = []
    for replica in new:
        if replica.service not in next_ids:
            row = db.execute(
                "SELECT next_replica FROM services WHERE name = ?", (replica.service,)
            ).fetchone()
            next_ids[replica.service] = row[0] if row else 1
        number = next_ids[replica.service]
        next_ids[replica.service] = number + 1
        made.append(
            ReplicaRecord(
                f"{replica.service}.{number}", replica.service, replica.revision, replica.node, now,
                slot=replica.slot,
            )
        )  # fmt: skip
    db.executemany(
        "UPDATE services SET next_replica = ? WHERE name = ?", [(n, s) for s, n in next_ids.items()]
    )
    db.executemany(
        "INSERT INTO replicas(id, service, revision, node, created_at, slot) VALUES (?, ?, ?, ?, ?, ?)",
        [(r.id, r.service, r.revision, r.node, r.created_at, r.slot) for r in made],
    )
    return made


def _remove(db: sqlite3.Connection, services: Iterable[str], now: float) -> None:
    for name in services:
        db.execute("UPDATE services SET removed_at = ?, rollout = NULL WHERE name = ?", (now, name))
        db.execute("DELETE FROM backoffs WHERE service = ?", (name,))


def _replace_history(db: sqlite3.Connection, service: str, history: list[Revision]) -> None:
    db.execute("DELETE FROM revisions WHERE service = ?", (service,))
    db.executemany(
        "INSERT INTO revisions VALUES (?, ?, ?, ?, ?, ?)",
        [(service, r.number, spec_to_json(r.spec.spec), r.spec.key, r.created_at, r.cause) for r in history],
    )

"""The state disk fills up or turns read-only under a running coordinator, for real: a small
tmpfs filled to the last byte, and an ext4 image the kernel forces read-only.

Every write path must refuse with StateUnavailable and change nothing, on disk or in the
coordinator's memory; sessions go on; once space returns the next write succeeds and the
last-seen times held back are written, not lost. Needs root (mounts): fails without it.
"""

from __future__ import annotations

import errno
import os
import sqlite3
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from structlog.testing import capture_logs

from picoord.coordinator.cluster import Cluster, LiveSession
from picoord.coordinator.status import StatusTimeouts
from picoord.coordinator.store import FULL, READ_ONLY, CertificateRecord, StateUnavailable, Store
from picoord.coordinator.telemetry import MetricsHistory
from picoord.v1 import admin_pb2, agent_pb2, node_pb2
from tests.unit.test_store import token

COMMAND_TIMEOUT = 30


def run(*argv: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(argv, capture_output=True, text=True, timeout=COMMAND_TIMEOUT, check=False)


def mount_tmpfs(target: Path, size: str) -> None:
    target.mkdir(parents=True, exist_ok=True)
    done = run("mount", "-t", "tmpfs", "-o", f"size={size},mode=0700", "tmpfs", str(target))
    assert done.returncode == 0, done.stderr


def unmount(target: Path) -> None:
    done = run("umount", str(target))
    if done.returncode != 0:  # never leave a mount behind, even when something still holds it
        run("umount", "-l", str(target))


@pytest.fixture
def small_disk(root: None, tmp_path: Path) -> Iterator[Path]:
    """A 1 MiB tmpfs, unmounted whatever happens."""
    target = tmp_path / "state"
    mount_tmpfs(target, "1m")
    try:
        yield target
    finally:
        unmount(target)


def fill(directory: Path) -> Path:
    """Write a file until the filesystem has no byte left; return it (delete it to heal)."""
    filler = directory / "filler"
    fd = os.open(filler, os.O_WRONLY | os.O_CREAT, 0o600)
    try:
        for chunk in (1 << 16, 1 << 12, 1 << 9, 1):
            try:
                while True:
                    os.write(fd, b"\0" * chunk)
            except OSError as error:
                if error.errno != errno.ENOSPC:
                    raise
    finally:
        os.close(fd)
    return filler


def checkpoint(db: Path) -> None:
    """Empty the WAL into the database and truncate it, so the next write must grow the
    WAL: a WAL reset by an earlier checkpoint would overwrite space it already holds."""
    connection = sqlite3.connect(db)
    try:
        connection.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    finally:
        connection.close()


def dump(db: Path) -> list[str]:
    """Everything in the database, as SQL, through a second connection."""
    connection = sqlite3.connect(db)
    try:
        return list(connection.iterdump())
    finally:
        connection.close()


def certificate(serial: str, node: str) -> CertificateRecord:
    return CertificateRecord(serial, node, 10.0, 4_000_000_000.0, None)


def hello(version: str) -> agent_pb2.Hello:
    return agent_pb2.Hello(agent_version=version, hardware=node_pb2.Hardware(arch="aarch64", cpu_cores=4))


def action(action_id: str) -> admin_pb2.ActionRecord:
    return admin_pb2.ActionRecord(action_id=action_id, node="pi1", step="s", kind="mount", started_at=5.0)


async def a_cluster(state_dir: Path) -> tuple[Store, Cluster]:
    """A store with pi1 enrolled (labelled, connected) and one spare token."""
    store = Store(state_dir / "state.db")
    cluster = Cluster(store, StatusTimeouts(), MetricsHistory(4))
    _, first = await cluster.create_token(3600.0, 0, "first")
    await cluster.enroll(
        first.token_id, "pi1", {"role": "storage"}, certificate("c1", "pi1"), cluster.clock()
    )
    await cluster.open_session(LiveSession(node="pi1", serial="c1"), hello("0.1.0"))
    await cluster.record_action(action("a1"))
    await cluster.flush()
    return store, cluster


async def refused_writes(cluster: Cluster, fault: str) -> None:
    """Every write path refuses with the fault named, and nothing changes in memory."""
    token = (await cluster.list_tokens())[0]
    before_labels = cluster.node("pi1").labels
    attempts = {
        "token create": cluster.create_token(60.0, 1, "while full"),
        "enroll": cluster.enroll(token.token_id, "pi2", {}, certificate("c2", "pi2"), cluster.clock()),
        "label": cluster.label_node("pi1", {"role": "compute"}, []),
        "record action": cluster.record_action(action("a2")),
        "remove node": cluster.remove_node("pi1"),
    }
    for what, attempt in attempts.items():
        with pytest.raises(StateUnavailable) as raised:
            await attempt
        assert raised.value.fault == fault, what
        assert str(raised.value) == f"state disk {fault} at {cluster.store_dir}", what
    assert cluster.node("pi2") is None and cluster.node("pi1").labels == before_labels
    assert "pi1" in cluster.sessions and not cluster.sessions["pi1"].closed.is_set()
    assert [record.action_id for record in await cluster.list_actions(None, 10)] == ["a1"]  # reads work
    assert [t.token_id for t in await cluster.list_tokens()] == [token.token_id]


async def test_a_full_disk_refuses_every_write_changes_nothing_and_heals(small_disk: Path) -> None:
    store, cluster = await a_cluster(small_disk)
    try:
        db = small_disk / "state.db"
        checkpoint(db)
        before = dump(db)
        filler = fill(small_disk)
        with capture_logs() as logs:
            await refused_writes(cluster, FULL)
            # sessions go on: a new hello and messages are taken while nothing can be written
            await cluster.open_session(LiveSession(node="pi1", serial="c1"), hello("0.2.0"))
            seen = cluster.clock()
            cluster.heard_from("pi1")
            with pytest.raises(StateUnavailable):
                await cluster.flush()
            with pytest.raises(StateUnavailable):
                await cluster.flush()  # and again: what it holds is kept, not dropped
            assert dump(db) == before  # nothing half-written
            assert not cluster.store_writable
            assert cluster.counters.store_write_failures == 8
            assert cluster.node("pi1").agent_version == "0.2.0"  # the view has the hello

            filler.unlink()
            await cluster.flush()  # the held-back last-seen time and hello reach the disk
            assert cluster.store_writable
            _, token = await cluster.create_token(60.0, 1, "after healing")
            await cluster.label_node("pi1", {"role": "compute"}, [])
        record = store.get_node("pi1")
        assert record.agent_version == "0.2.0" and record.last_seen >= seen
        assert record.labels == {"role": "compute"} and store.get_token(token.token_id) is not None
        transitions = [entry["event"] for entry in logs if entry["log_level"] in ("error", "info")]
        assert transitions == [  # one line per change of state, not one per failure
            "state store refuses writes: changes are refused until it heals",
            "state store takes writes again",
        ]
        assert store.integrity_ok()
    finally:
        store.close()


def test_the_store_itself_refuses_each_write_on_a_full_disk(small_disk: Path) -> None:
    """The Store's own methods, below the cluster: each one raises StateUnavailable, the
    transaction rolls back, and the same call succeeds once there is room again."""
    store = Store(small_disk / "state.db")
    try:
        store.add_token(token("tok001", expires_at=4_000_000_000.0))
        store.add_token(token("old001", expires_at=1.0))
        store.enroll("tok001", "pi1", {"a": "1"}, certificate("c1", "pi1"), now=10.0)
        checkpoint(small_disk / "state.db")
        before = dump(small_disk / "state.db")
        filler = fill(small_disk)
        writes = [
            lambda: store.add_token(token("tok002")),
            lambda: store.enroll("tok001", "pi2", {}, certificate("c2", "pi2"), now=11.0),
            lambda: store.update_labels("pi1", {"b": "2"}, ["a"]),
            lambda: store.record_hello("pi1", "0.2.0", b"hw", 12.0),
            lambda: store.record_last_seen({"pi1": 13.0}),
            lambda: store.record_action("a1", "pi1", 14.0, b"record"),
            lambda: store.delete_expired_tokens(now=15.0),
            lambda: store.remove_node("pi1", now=16.0),
        ]
        for write in writes:
            with pytest.raises(StateUnavailable, match=f"^state disk full at {small_disk}$"):
                write()
        assert dump(small_disk / "state.db") == before
        with pytest.raises(StateUnavailable, match=r"^state disk full at"):  # a second coordinator
            Store(small_disk / "other.db")
        filler.unlink()
        for write in writes:
            write()
        assert store.get_node("pi1") is None and store.get_node("pi2").labels == {}
        assert [t.token_id for t in store.list_tokens()] == ["tok001", "tok002"]
        assert store.integrity_ok()
    finally:
        store.close()


@pytest.fixture
def ext4_disk(root: None, tmp_path: Path) -> Iterator[Path]:
    """A small ext4 image mounted with errors=remount-ro, unmounted whatever happens."""
    image, target = tmp_path / "disk.img", tmp_path / "state"
    with image.open("wb") as out:
        out.truncate(8 << 20)
    done = run("mkfs.ext4", "-q", "-F", str(image))
    assert done.returncode == 0, done.stderr
    target.mkdir()
    done = run("mount", "-o", "loop,errors=remount-ro", str(image), str(target))
    assert done.returncode == 0, done.stderr
    try:
        yield target
    finally:
        unmount(target)


def force_read_only(target: Path) -> None:
    """What the kernel does to an ext4 disk that reports errors: make it read-only beneath
    the running coordinator (`mount -o remount,ro` is refused while SQLite holds its files
    open for writing, so the fault is raised the way a failing disk raises it)."""
    device = next(
        line.split()[0]
        for line in Path("/proc/self/mounts").read_text().splitlines()
        if line.split()[1] == str(target)
    )
    Path("/sys/fs/ext4", Path(device).name, "trigger_fs_error").write_text("picoord test\n")


async def test_a_read_only_disk_refuses_every_write_and_changes_nothing(ext4_disk: Path) -> None:
    store, cluster = await a_cluster(ext4_disk)
    try:
        refused = run("mount", "-o", "remount,ro", str(ext4_disk))
        assert refused.returncode != 0 and "busy" in refused.stderr  # why force_read_only exists
        before = dump(ext4_disk / "state.db")
        force_read_only(ext4_disk)
        await refused_writes(cluster, READ_ONLY)
        await cluster.open_session(LiveSession(node="pi1", serial="c1"), hello("0.2.0"))
        cluster.heard_from("pi1")
        with pytest.raises(StateUnavailable, match="read-only"):
            await cluster.flush()
        assert not cluster.store_writable and "pi1" in cluster.sessions
        assert dump(ext4_disk / "state.db") == before
    finally:
        store.close()

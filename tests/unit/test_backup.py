"""Backup and restore: the archive checks as tables, then the commands on real files (a
store being written, the CA on disk) with every refusal changing nothing."""

from __future__ import annotations

import hashlib
import io
import json
import os
import sqlite3
import stat
import tarfile
import threading
from pathlib import Path

import pytest

from picoord.common import limits
from picoord.coordinator import backup
from picoord.coordinator.backup import (
    MANIFEST,
    BackupRefused,
    Member,
    Taken,
    config_refusal,
    manifest_for,
    manifest_refusal,
    member_refusal,
    restore,
    restore_target_refusal,
    take_backup,
)
from picoord.coordinator.ca import ClusterCA
from picoord.coordinator.main import main
from picoord.coordinator.store import Store, TokenRecord, database_refusal

# --------------------------------------------------------------------------- tables


@pytest.mark.parametrize(
    ("member", "seen", "refusal"),
    [
        (Member(MANIFEST, True, 100), [], None),
        (Member("state.db", True, 1 << 20), [MANIFEST], None),
        (Member("coordinator.toml", True, 0), [MANIFEST, "state.db"], None),
        (Member("state.db", True, 10), [], "the first member is 'state.db'"),
        (Member("/etc/passwd", True, 10), [MANIFEST], "has a path"),
        (Member("../ca.key", True, 10), [MANIFEST], "has a path"),
        (Member("x/../ca.key", True, 10), [MANIFEST], "has a path"),
        (Member("state/ca.key", True, 10), [MANIFEST], "has a path"),
        (Member("..\\ca.key", True, 10), [MANIFEST], "has a path"),
        (Member("state.db-wal", True, 10), [MANIFEST], "unexpected member 'state.db-wal'"),
        (Member("ca.key", True, 10), [MANIFEST, "ca.key"], "appears twice"),
        (Member("ca.key", False, 0), [MANIFEST], "not a regular file"),
        (Member("ca.key", True, limits.BACKUP_PEM_BYTES + 1), [MANIFEST], "more than the 65536"),
        (Member(MANIFEST, True, limits.BACKUP_MANIFEST_BYTES + 1), [], "more than"),
    ],
)
def test_member_refusal(member: Member, seen: list[str], refusal: str | None) -> None:
    found = member_refusal(member, seen)
    assert found == refusal if refusal is None else refusal in (found or "")


FILES = {name: Taken(len(name), f"hash-{name}") for name in ("state.db", "ca.key", "ca.crt")}
GOOD = manifest_for(FILES, Path("/var/lib/picoord"), None, "sha256:ab", 0.0)


def _with(**changes: object) -> dict[str, object]:
    return {**GOOD, **changes}


@pytest.mark.parametrize(
    ("manifest", "taken", "refusal"),
    [
        (GOOD, FILES, None),
        ([], FILES, "not a picoord coordinator backup"),
        (_with(format="tarball"), FILES, "not a picoord coordinator backup"),
        (_with(version=2), FILES, "format version 2"),
        (_with(files="all"), FILES, "lists no files"),
        (GOOD, {k: v for k, v in FILES.items() if k != "ca.key"}, "lacks ca.key"),
        (GOOD, {**FILES, "server.key": Taken(1, "h")}, "one of server.key and server.crt"),
        (GOOD, {**FILES, "coordinator.toml": Taken(1, "h")}, "but the archive holds"),
        (GOOD, {**FILES, "state.db": Taken(8, "other")}, "state.db does not match"),
        (GOOD, {**FILES, "ca.crt": Taken(7, "hash-ca.crt")}, "ca.crt does not match"),
        (_with(files={**GOOD["files"], "ca.crt": "x"}), FILES, "ca.crt does not match"),
    ],
)
def test_manifest_refusal(manifest: object, taken: dict[str, Taken], refusal: str | None) -> None:
    found = manifest_refusal(manifest, taken)
    assert found == refusal if refusal is None else refusal in (found or "")


@pytest.mark.parametrize(
    ("entries", "refused"),
    [
        ([], False),
        (["agent"], False),  # the agent's state dir, nested in the coordinator's by default
        (["state.db"], True),
        (["agent", "ca.key"], True),
        ([".hidden"], True),
    ],
)
def test_restore_target_refusal(entries: list[str], refused: bool) -> None:
    found = restore_target_refusal(Path("/var/lib/picoord"), entries)
    assert (found is not None) == refused
    if refused:
        assert "is not empty" in found and "mv /var/lib/picoord /var/lib/picoord.old" in found


@pytest.mark.parametrize(
    ("current", "refused"), [(None, False), (b"log_level = 'info'\n", False), (b"other\n", True)]
)
def test_config_refusal(current: bytes | None, refused: bool) -> None:
    found = config_refusal(Path("/etc/picoord/coordinator.toml"), b"log_level = 'info'\n", current)
    assert (found is not None) == refused


# --------------------------------------------------------------------------- on real files


def _cluster_state(state_dir: Path) -> Store:
    state_dir.mkdir(mode=0o700)
    ClusterCA.load_or_create(state_dir)
    store = Store(state_dir / "state.db")
    store.add_token(TokenRecord("abcdef", "hash", 1.0, 2.0, 0, 0, "first"))
    return store


def _tokens(database: Path) -> list[str]:
    with sqlite3.connect(database) as db:
        return [row[0] for row in db.execute("SELECT token_id FROM tokens ORDER BY token_id")]


def test_backup_while_written_restores_a_consistent_cluster(tmp_path: Path) -> None:
    store = _cluster_state(tmp_path / "state")
    config = tmp_path / "coordinator.toml"
    config.write_text('log_level = "debug"\n')
    stop, written = threading.Event(), [0]

    def writer() -> None:  # a session-like writer: one commit after another
        while not stop.is_set():
            written[0] += 1
            store.add_token(TokenRecord(f"t{written[0]:05d}", "h", 1.0, 2.0, 0, 0, ""))

    thread = threading.Thread(target=writer)
    thread.start()
    old_umask = os.umask(0)
    try:
        manifest = take_backup(tmp_path / "state", config, tmp_path / "b.tgz")
    finally:
        os.umask(old_umask)
        stop.set()
        thread.join()
    assert written[0] > 0, "nothing was written during the backup"
    assert stat.S_IMODE((tmp_path / "b.tgz").stat().st_mode) == 0o600
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no leftovers
    assert set(manifest["files"]) == {
        "state.db",
        "ca.key",
        "ca.crt",
        "server.key",
        "server.crt",
        "coordinator.toml",
    }

    restored_manifest, note = restore(tmp_path / "b.tgz", tmp_path / "new")
    assert restored_manifest == manifest and "--with-config" in note
    new = tmp_path / "new"
    assert stat.S_IMODE(new.stat().st_mode) == 0o700
    assert sorted(p.name for p in new.iterdir()) == [
        "ca.crt",
        "ca.key",
        "server.crt",
        "server.key",
        "state.db",
    ]
    for name in ("ca.key", "ca.crt", "server.key"):
        assert (new / name).read_bytes() == (tmp_path / "state" / name).read_bytes()
    assert stat.S_IMODE((new / "ca.key").stat().st_mode) == 0o600
    tokens = _tokens(new / "state.db")
    # One commit's state: the first token and an unbroken run of the writer's, none half-written.
    assert tokens[0] == "abcdef" and tokens[1:] == [f"t{i:05d}" for i in range(1, len(tokens))]
    Store(new / "state.db").close()  # the coordinator's store opens it
    assert ClusterCA.load_or_create(new).cert_hash == manifest["ca_cert_hash"]
    store.close()


def _archive(path: Path, members: list[tuple[str, bytes | None]]) -> Path:
    """A tar.gz of (name, data) members; data None makes a symlink."""
    with tarfile.open(path, "w:gz") as archive:
        for name, data in members:
            info = tarfile.TarInfo(name)
            if data is None:
                info.type, info.linkname = tarfile.SYMTYPE, "/etc/shadow"
                archive.addfile(info)
            else:
                info.size = len(data)
                archive.addfile(info, io.BytesIO(data))
    return path


def _members(archive: Path) -> list[tuple[str, bytes]]:
    with tarfile.open(archive) as opened:
        return [(info.name, opened.extractfile(info).read()) for info in opened]  # type: ignore[union-attr]


@pytest.fixture
def good_backup(tmp_path: Path) -> Path:
    _cluster_state(tmp_path / "state").close()
    take_backup(tmp_path / "state", None, tmp_path / "good.tgz")
    return tmp_path / "good.tgz"


def _damaged(case: str, good: Path, tmp_path: Path) -> Path:
    members = _members(good)
    bad = tmp_path / f"{case}.tgz"
    if case == "truncated":
        bad.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    elif case == "not gzip":
        bad.write_bytes(b"hello")
    elif case == "foreign tar":
        _archive(bad, [("etc/passwd", b"root:x:0:0")])
    elif case == "flipped byte":
        _archive(bad, [(n, d[:-1] + bytes([d[-1] ^ 1]) if n == "state.db" else d) for n, d in members])
    elif case == "traversal":
        _archive(bad, [*members, ("../ca.key", b"x")])
    elif case == "symlink":
        _archive(bad, [*members[:2], ("ca.key", None), *members[3:]])
    elif case == "extra member":
        _archive(bad, [*members, ("evil.sh", b"#!/bin/sh")])
    elif case == "missing ca.key":
        manifest = json.loads(members[0][1])
        del manifest["files"]["ca.key"]
        _archive(
            bad, [(MANIFEST, json.dumps(manifest).encode())] + [m for m in members[1:] if m[0] != "ca.key"]
        )
    elif case == "not a database":  # listed with its true size and checksum: only its contents are wrong
        junk = b"junk!"
        manifest = json.loads(members[0][1])
        manifest["files"]["state.db"] = {"size": len(junk), "sha256": hashlib.sha256(junk).hexdigest()}
        rest = [(n, junk if n == "state.db" else d) for n, d in members[1:]]
        _archive(bad, [(MANIFEST, json.dumps(manifest).encode()), *rest])
    return bad


@pytest.mark.parametrize(
    ("case", "said"),
    [
        ("truncated", "is damaged or not a picoord backup"),
        ("not gzip", "is damaged or not a picoord backup"),
        ("foreign tar", "has a path"),
        ("flipped byte", "state.db does not match its size and checksum"),
        ("traversal", "member '../ca.key' has a path"),
        ("symlink", "member 'ca.key' is not a regular file"),
        ("extra member", "unexpected member 'evil.sh'"),
        ("missing ca.key", "lacks ca.key"),
        ("not a database", "its state.db is not usable"),
    ],
)
def test_a_damaged_or_foreign_archive_changes_nothing(
    case: str, said: str, good_backup: Path, tmp_path: Path
) -> None:
    bad = _damaged(case, good_backup, tmp_path)
    with pytest.raises(BackupRefused) as refused:
        restore(bad, tmp_path / "new" / "lib" / "picoord")
    assert said in str(refused.value) and refused.value.code == backup.EXIT_DATAERR
    assert not (tmp_path / "new").exists()  # not even the directories above it
    (tmp_path / "empty").mkdir(mode=0o700)
    with pytest.raises(BackupRefused):
        restore(bad, tmp_path / "empty")
    assert list((tmp_path / "empty").iterdir()) == []


def test_a_non_empty_state_dir_is_refused_and_the_agent_dir_may_stay(
    good_backup: Path, tmp_path: Path
) -> None:
    with pytest.raises(BackupRefused) as refused:
        restore(good_backup, tmp_path / "state")
    assert refused.value.code == backup.EXIT_CANTCREAT and "is not empty" in str(refused.value)
    target = tmp_path / "lib"
    (target / "agent").mkdir(parents=True, mode=0o700)
    (target / "agent" / "node.pem").write_text("kept")
    restore(good_backup, target)
    assert (target / "agent" / "node.pem").read_text() == "kept" and (target / "state.db").exists()


def test_the_config_is_written_only_when_asked_and_never_over_another(tmp_path: Path) -> None:
    _cluster_state(tmp_path / "state").close()
    config = tmp_path / "coordinator.toml"
    config.write_text('log_level = "debug"\n')
    take_backup(tmp_path / "state", config, tmp_path / "b.tgz")
    target = tmp_path / "etc" / "coordinator.toml"
    target.parent.mkdir()
    target.write_text("# the package's file\n")
    with pytest.raises(BackupRefused) as refused:
        restore(tmp_path / "b.tgz", tmp_path / "new", target)
    assert "exists and differs" in str(refused.value) and not (tmp_path / "new").exists()
    assert target.read_text() == "# the package's file\n"
    target.unlink()
    _, note = restore(tmp_path / "b.tgz", tmp_path / "new", target)
    assert target.read_text() == 'log_level = "debug"\n' and "written to" in note


def test_commands_exit_with_their_codes(
    good_backup: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    def run(*argv: str) -> int:
        with pytest.raises(SystemExit) as exited:
            main(list(argv))
        return int(exited.value.code or 0)

    nowhere = tmp_path / "missing.toml"
    assert run("backup", str(tmp_path / "x.tgz"), "--config", str(nowhere)) == 78
    assert "does not exist" in capsys.readouterr().err
    assert (
        run("backup", str(tmp_path / "x.tgz"), "--state-dir", str(tmp_path / "none")) == backup.EXIT_NOINPUT
    )
    assert not (tmp_path / "x.tgz").exists()
    assert run("restore", str(good_backup), "--state-dir", str(tmp_path / "state")) == backup.EXIT_CANTCREAT
    assert (
        run("restore", str(tmp_path / "nope.tgz"), "--state-dir", str(tmp_path / "n")) == backup.EXIT_NOINPUT
    )
    open_dir = tmp_path / "open"
    open_dir.mkdir()
    open_dir.chmod(0o777)
    assert run("restore", str(good_backup), "--state-dir", str(open_dir)) == 78
    assert "chmod 700" in capsys.readouterr().err
    assert run("restore", str(good_backup), "--state-dir", str(tmp_path / "fresh")) == 0
    assert "agents reconnect by themselves" in capsys.readouterr().out


def test_database_refusal_names_what_is_wrong(tmp_path: Path) -> None:
    Store(tmp_path / "state.db").close()
    assert database_refusal(tmp_path / "state.db") is None
    with sqlite3.connect(tmp_path / "state.db") as db:
        db.execute("UPDATE meta SET value = '99' WHERE key = 'schema_version'")
    assert "schema version is 99" in (database_refusal(tmp_path / "state.db") or "")
    with sqlite3.connect(tmp_path / "other.db") as db:
        db.execute("CREATE TABLE t (x)")
    assert "not a picoord state database" in (database_refusal(tmp_path / "other.db") or "")
    (tmp_path / "text.db").write_text("hello" * 200)
    assert database_refusal(tmp_path / "text.db") is not None

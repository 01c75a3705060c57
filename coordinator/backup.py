"""`picoord-coordinator backup FILE` and `picoord-coordinator restore FILE`: the coordinator's
whole state in one archive, taken while it runs, put back into an empty state directory.

The archive is a gzip'd tar of flat members, written 0600 from its first byte (it holds the
CA's key): `picoord-backup.json` first (what was taken, each file's size and SHA-256), then
`state.db` (an online copy by SQLite's backup API: the database as of one commit, while
sessions write), `ca.key` and `ca.crt`, `server.key` and `server.crt` (when the pair on disk
belongs together) and `coordinator.toml` (the config file, when there is one).

Restore reads the whole archive into a private directory inside the state directory and
checks it (names, kinds, sizes, checksums, the database's integrity and schema, the CA pair)
before it moves anything into place: a damaged or foreign archive changes nothing. The
config file is written only with --with-config (see `restore_config`), since on a new host
the package's own file is usually there already.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import gzip
import hashlib
import io
import json
import os
import shutil
import sqlite3
import sys
import tarfile
import tempfile
import time
import zlib
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

from picoord.common import VERSION, defaults, limits
from picoord.common.files import UnsafeStateDir, check_state_dir, sync_directory, write_atomically
from picoord.coordinator.ca import CAUnavailable, check_ca_files, server_identity
from picoord.coordinator.config import ConfigError, load_settings
from picoord.coordinator.store import database_refusal, snapshot_database

COMMANDS = ("backup", "restore")
FORMAT = "picoord-coordinator-backup"
FORMAT_VERSION = 1
MANIFEST = "picoord-backup.json"
DATABASE = "state.db"
CONFIG = "coordinator.toml"
SERVER_PAIR = ("server.key", "server.crt")

# Each member the archive may hold: the most bytes it may have, and its mode in the state dir.
MEMBERS: dict[str, tuple[int, int]] = {
    MANIFEST: (limits.BACKUP_MANIFEST_BYTES, 0o600),
    DATABASE: (limits.BACKUP_DATABASE_BYTES, 0o600),
    "ca.key": (limits.BACKUP_PEM_BYTES, 0o600),
    "ca.crt": (limits.BACKUP_PEM_BYTES, 0o644),
    "server.key": (limits.BACKUP_PEM_BYTES, 0o600),
    "server.crt": (limits.BACKUP_PEM_BYTES, 0o644),
    CONFIG: (limits.BACKUP_CONFIG_BYTES, 0o644),
}
REQUIRED = (MANIFEST, DATABASE, "ca.key", "ca.crt")
# Moved into the state dir in this order: the CA last, since systemd's path unit starts a
# coordinator stopped for a missing CA once ca.key or ca.crt appears; by then the database
# is in place, so it never starts a new, empty cluster beside the restored CA.
STATE_ORDER = (DATABASE, "server.key", "server.crt", "ca.crt", "ca.key")
# What may already be in the state dir a restore fills: the agent's own state dir, which
# the defaults nest in the coordinator's (/var/lib/picoord/agent on the desktop).
NEIGHBOURS = frozenset({"agent"})

# sysexits.h, as the daemon's EXIT_CONFIG: systemd and scripts can tell the cases apart.
EXIT_DATAERR = 65  # the archive is damaged, foreign, or of another version
EXIT_NOINPUT = 66  # nothing to back up: no cluster in the state dir
EXIT_CANTCREAT = 73  # the state dir is not empty (or a file restore would write is in the way)
EXIT_IOERR = 74  # reading or writing failed (disk full, permissions)

CHUNK = 1 << 20


class BackupRefused(Exception):
    """A backup or restore that cannot go ahead; nothing was changed. `code` is the exit."""

    def __init__(self, message: str, code: int) -> None:
        super().__init__(message)
        self.code = code


# --------------------------------------------------------------------------- pure checks


@dataclass(frozen=True)
class Member:
    """A tar member as its header describes it."""

    name: str
    regular: bool
    size: int


@dataclass(frozen=True)
class Taken:
    """A member as read: its size and SHA-256 (hex)."""

    size: int
    sha256: str


def member_refusal(member: Member, seen: Iterable[str]) -> str | None:
    """Why a tar member has no place in a backup, or None. Members are flat file names
    from MEMBERS, each once, regular files within their size bound; the manifest first."""
    name = member.name
    if name.startswith("/") or ".." in name.split("/") or "/" in name or "\\" in name:
        return f"member {name[:100]!r} has a path (a backup holds flat file names only)"
    if name not in MEMBERS:
        return f"unexpected member {name[:100]!r} (a backup holds {', '.join(MEMBERS)})"
    seen = list(seen)
    if not seen and name != MANIFEST:
        return f"the first member is {name!r}, not {MANIFEST}"
    if name in seen:
        return f"member {name!r} appears twice"
    if not member.regular:
        return f"member {name!r} is not a regular file"
    bound = MEMBERS[name][0]
    if not 0 <= member.size <= bound:
        return f"member {name!r} has {member.size} bytes, more than the {bound} a backup allows"
    return None


def manifest_refusal(manifest: object, taken: Mapping[str, Taken]) -> str | None:
    """Why a parsed manifest does not describe the members read (`taken`, the manifest
    itself excluded), or None: the format and its version, every required member, the
    server pair whole or absent, and each file's size and checksum."""
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        return f"not a picoord coordinator backup ({MANIFEST} does not name {FORMAT!r})"
    if manifest.get("version") != FORMAT_VERSION:
        return f"backup format version {manifest.get('version')!r}: this coordinator reads {FORMAT_VERSION}"
    files = manifest.get("files")
    if not isinstance(files, dict):
        return f"{MANIFEST} lists no files"
    missing = [name for name in REQUIRED if name != MANIFEST and name not in taken]
    if missing:
        return f"the backup lacks {', '.join(missing)}"
    if len([name for name in SERVER_PAIR if name in taken]) == 1:
        return "the backup holds one of server.key and server.crt without the other"
    if set(files) != set(taken):
        return f"{MANIFEST} lists {sorted(files)} but the archive holds {sorted(taken)}"
    for name, held in taken.items():
        listed = files[name]
        if not isinstance(listed, dict) or Taken(listed.get("size"), listed.get("sha256")) != held:
            return f"{name} does not match its size and checksum in {MANIFEST} (the archive is damaged)"
    return None


def occupied(entries: Iterable[str]) -> list[str]:
    """What makes a state dir not empty for a restore: anything but the agent's own dir."""
    return sorted(set(entries) - NEIGHBOURS)


def restore_target_refusal(state_dir: Path, entries: Iterable[str]) -> str | None:
    """Why a restore may not fill `state_dir`, holding `entries`, or None."""
    found = occupied(entries)
    if not found:
        return None
    shown = ", ".join(found[:5]) + (", ..." if len(found) > 5 else "")
    return (
        f"{state_dir} is not empty ({shown}): a restore fills an empty state directory only, "
        f"so it never mixes two clusters. Stop the coordinator and move what is there away "
        f"(e.g. `mv {state_dir} {state_dir}.old`), then restore again"
    )


def manifest_for(
    taken: Mapping[str, Taken], state_dir: Path, config_path: Path | None, ca_hash: str, now: float
) -> dict[str, Any]:
    """The manifest of a backup of these files."""
    return {
        "format": FORMAT,
        "version": FORMAT_VERSION,
        "picoord_version": VERSION,
        "created_at": dt.datetime.fromtimestamp(now, dt.UTC).isoformat(timespec="seconds"),
        "state_dir": str(state_dir),
        "config_path": str(config_path) if config_path is not None else None,
        "ca_cert_hash": ca_hash,
        "files": {name: {"size": held.size, "sha256": held.sha256} for name, held in sorted(taken.items())},
    }


# --------------------------------------------------------------------------- backup


def _copy_hashed(source: IO[bytes], target: IO[bytes], bound: int) -> Taken:
    """Copy at most `bound` bytes, hashing them; more than that is a refusal."""
    digest, size = hashlib.sha256(), 0
    while chunk := source.read(CHUNK):
        size += len(chunk)
        if size > bound:
            raise BackupRefused(f"more than {bound} bytes", EXIT_DATAERR)
        digest.update(chunk)
        target.write(chunk)
    return Taken(size, digest.hexdigest())


def _server_pair(state_dir: Path) -> dict[str, bytes]:
    """server.key and server.crt as one pair, or nothing: read again if a rotation moved
    one of them between the reads; without a pair the coordinator issues a new one."""
    paths = [state_dir / name for name in SERVER_PAIR]
    for _ in range(3):
        try:
            key_pem, cert_pem = (path.read_bytes() for path in paths)
        except FileNotFoundError:
            return {}
        if server_identity(key_pem, cert_pem) is not None:
            return dict(zip(SERVER_PAIR, (key_pem, cert_pem), strict=True))
        time.sleep(0.2)
    return {}


@contextlib.contextmanager
def _private_dir(parent: Path, prefix: str) -> Iterator[Path]:
    """A 0700 directory under `parent`, removed afterwards whatever happens."""
    path = Path(tempfile.mkdtemp(prefix=prefix, dir=parent))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def _add(archive: tarfile.TarFile, name: str, data: IO[bytes], size: int, now: float) -> None:
    info = tarfile.TarInfo(name)
    info.size, info.mode, info.mtime = size, MEMBERS[name][1], int(now)
    archive.addfile(info, data)


def take_backup(state_dir: Path, config_path: Path | None, archive_path: Path) -> dict[str, Any]:
    """Write a backup of the coordinator's state (and config file) to `archive_path`, 0600
    from its creation, replacing it only once whole. Returns the manifest."""
    missing = [name for name in (DATABASE, "ca.key", "ca.crt") if not (state_dir / name).is_file()]
    if missing:
        raise BackupRefused(
            f"nothing to back up: {', '.join(missing)} missing in {state_dir} "
            "(is this the coordinator's state dir? see --state-dir)",
            EXIT_NOINPUT,
        )
    try:
        ca_hash = check_ca_files(state_dir / "ca.key", state_dir / "ca.crt")
    except CAUnavailable as error:
        raise BackupRefused(f"the cluster CA cannot be backed up: {error}", EXIT_DATAERR) from None
    now = time.time()
    target = archive_path.absolute()
    with _private_dir(target.parent, ".picoord-backup-") as work:
        snapshot = work / DATABASE
        snapshot_database(state_dir / DATABASE, snapshot)
        refusal = database_refusal(snapshot)
        if refusal:
            raise BackupRefused(f"the copy of {state_dir / DATABASE} is not usable: {refusal}", EXIT_DATAERR)
        small = {name: (state_dir / name).read_bytes() for name in ("ca.key", "ca.crt")}
        small |= _server_pair(state_dir)
        if config_path is not None and config_path.is_file():
            small[CONFIG] = config_path.read_bytes()
        for name, data in small.items():
            if len(data) > MEMBERS[name][0]:
                raise BackupRefused(f"{name} has {len(data)} bytes, more than a backup holds", EXIT_DATAERR)
        size = snapshot.stat().st_size
        if size > MEMBERS[DATABASE][0]:
            raise BackupRefused(f"{DATABASE} has {size} bytes, more than a backup holds", EXIT_DATAERR)
        with snapshot.open("rb") as handle:
            taken = {DATABASE: Taken(size, hashlib.file_digest(handle, "sha256").hexdigest())}
        taken |= {name: Taken(len(data), hashlib.sha256(data).hexdigest()) for name, data in small.items()}
        taken_config = config_path.absolute() if config_path is not None and CONFIG in small else None
        manifest = manifest_for(taken, state_dir.absolute(), taken_config, ca_hash, now)
        encoded = json.dumps(manifest, indent=2).encode()
        partial = target.with_name(f".{target.name}.{os.getpid()}.partial")
        fd = os.open(partial, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
        try:
            os.fchmod(fd, 0o600)  # whatever the umask: the archive holds the CA's key
            with os.fdopen(fd, "wb") as raw:
                with tarfile.open(fileobj=raw, mode="w:gz", format=tarfile.PAX_FORMAT) as archive:
                    _add(archive, MANIFEST, io.BytesIO(encoded), len(encoded), now)
                    with snapshot.open("rb") as handle:
                        _add(archive, DATABASE, handle, taken[DATABASE].size, now)
                    for name, data in small.items():
                        _add(archive, name, io.BytesIO(data), len(data), now)
                raw.flush()
                os.fsync(raw.fileno())
            os.replace(partial, target)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(partial)
            raise
    return manifest


# --------------------------------------------------------------------------- restore


def _read_archive(archive_path: Path, into: Path) -> tuple[dict[str, Any], dict[str, Taken]]:
    """Unpack and check the archive's members into `into` (files 0600, flat names only):
    the manifest and what was read. BackupRefused (EXIT_DATAERR) for anything amiss."""
    if not archive_path.is_file():
        raise BackupRefused(f"{archive_path}: no such file", EXIT_NOINPUT)
    taken: dict[str, Taken] = {}
    manifest: object = None
    try:
        with tarfile.open(archive_path, mode="r:gz") as archive:
            for info in archive:
                refusal = member_refusal(Member(info.name, info.isreg(), info.size), taken)
                if refusal:
                    raise BackupRefused(f"{archive_path}: {refusal}", EXIT_DATAERR)
                source = archive.extractfile(info)
                assert source is not None  # a regular file
                fd = os.open(into / info.name, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
                with os.fdopen(fd, "wb") as target:
                    taken[info.name] = _copy_hashed(source, target, MEMBERS[info.name][0])
                if info.name == MANIFEST:
                    manifest = json.loads((into / MANIFEST).read_bytes())
    except (tarfile.TarError, EOFError, gzip.BadGzipFile, zlib.error, ValueError) as error:
        why = f"{archive_path} is damaged or not a picoord backup ({error})"
        raise BackupRefused(why, EXIT_DATAERR) from None
    if MANIFEST not in taken:
        raise BackupRefused(f"{archive_path} is empty: not a picoord backup", EXIT_DATAERR)
    files = {name: held for name, held in taken.items() if name != MANIFEST}
    refusal = manifest_refusal(manifest, files)
    if refusal:
        raise BackupRefused(f"{archive_path}: {refusal}", EXIT_DATAERR)
    assert isinstance(manifest, dict)
    return manifest, files


def _check_contents(archive_path: Path, unpacked: Path) -> None:
    """The unpacked database opens, is whole and of this schema; the CA is one pair."""
    refusal = database_refusal(unpacked / DATABASE)
    if refusal:
        raise BackupRefused(f"{archive_path}: its {DATABASE} is not usable: {refusal}", EXIT_DATAERR)
    try:
        check_ca_files(unpacked / "ca.key", unpacked / "ca.crt")
    except CAUnavailable as error:
        raise BackupRefused(f"{archive_path}: its cluster CA is not usable: {error}", EXIT_DATAERR) from None
    if (unpacked / "server.key").exists() and server_identity(
        (unpacked / "server.key").read_bytes(), (unpacked / "server.crt").read_bytes()
    ) is None:
        raise BackupRefused(f"{archive_path}: server.key is not the key of server.crt", EXIT_DATAERR)


def config_refusal(config_path: Path, wanted: bytes, current: bytes | None) -> str | None:
    """Why the backed-up config may not be written to `config_path`, or None: a different
    file is there, and one restore never overwrites another's settings unasked."""
    if current is None or current == wanted:
        return None
    return (
        f"{config_path} exists and differs from the backed-up config: move it away "
        f"(e.g. `mv {config_path} {config_path}.orig`) and restore again, or leave out --with-config"
    )


def restore(
    archive_path: Path, state_dir: Path, config_path: Path | None = None
) -> tuple[dict[str, Any], str]:
    """Fill the empty `state_dir` from the archive; with `config_path`, also write the
    backed-up config there. Returns the manifest and what happened to the config.
    Everything is checked first: a refusal (BackupRefused) changes nothing."""
    try:
        check_state_dir(state_dir)
    except UnsafeStateDir as error:
        raise BackupRefused(str(error), defaults.EXIT_CONFIG) from None
    state_dir = Path(os.path.abspath(state_dir))
    created: Path | None = None  # the topmost directory this restore made (removed on a refusal)
    if state_dir.exists():
        refusal = restore_target_refusal(state_dir, os.listdir(state_dir))
        if refusal:
            raise BackupRefused(refusal, EXIT_CANTCREAT)
    else:
        created = next(path for path in (state_dir, *state_dir.parents) if path.parent.exists())
        state_dir.parent.mkdir(parents=True, exist_ok=True)
        state_dir.mkdir(mode=0o700)
        os.chmod(state_dir, 0o700)  # the coordinator's state dir mode, whatever the umask
    try:
        with _private_dir(state_dir, ".restore-") as unpacked:
            manifest, files = _read_archive(archive_path, unpacked)
            _check_contents(archive_path, unpacked)
            config_note = _config_outcome(manifest, files, unpacked, config_path, state_dir)
            refusal = restore_target_refusal(state_dir, set(os.listdir(state_dir)) - {unpacked.name})
            if refusal:  # something (a coordinator?) wrote there meanwhile
                raise BackupRefused(refusal, EXIT_CANTCREAT)
            if config_path is not None and CONFIG in files:
                write_atomically(config_path, (unpacked / CONFIG).read_bytes(), MEMBERS[CONFIG][1])
            for name in STATE_ORDER:
                if name in files:
                    os.chmod(unpacked / name, MEMBERS[name][1])
                    os.rename(unpacked / name, state_dir / name)
            sync_directory(state_dir)
    except BaseException:
        if created is not None:
            shutil.rmtree(created, ignore_errors=True)
        raise
    return manifest, config_note


def _config_outcome(
    manifest: Mapping[str, Any], files: Mapping[str, Taken], unpacked: Path, to: Path | None, state_dir: Path
) -> str:
    """What becomes of the backed-up config (checked before anything is written)."""
    taken_from = manifest.get("config_path") or "?"
    if CONFIG not in files:
        return "the backup holds no config file (the coordinator ran on its defaults and flags)"
    if to is None:
        return (
            f"the backup also holds the config file of {taken_from}; it was not written: "
            "restore with --with-config to write it (to --config, default "
            f"{defaults.COORDINATOR_CONFIG})"
        )
    try:
        settings = load_settings(unpacked / CONFIG, {})
    except ConfigError as error:
        raise BackupRefused(f"the backed-up config is not usable: {error}", EXIT_DATAERR) from None
    named = Path(os.path.abspath(settings.state_dir))
    if "state_dir" in settings.file_settings and named != state_dir:
        raise BackupRefused(
            f"the backed-up config names the state dir {named}, not {state_dir}: restore with "
            f"--state-dir {named}, or leave out --with-config",
            EXIT_CANTCREAT,
        )
    wanted = (unpacked / CONFIG).read_bytes()
    try:
        current: bytes | None = to.read_bytes()
    except FileNotFoundError:
        current = None
    refusal = config_refusal(to, wanted, current)
    if refusal:
        raise BackupRefused(refusal, EXIT_CANTCREAT)
    return f"config file of {taken_from} written to {to}"


# --------------------------------------------------------------------------- the command


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="picoord-coordinator",
        description="Back up the coordinator's state, or restore it into an empty state directory.",
    )
    commands = parser.add_subparsers(dest="command", required=True)
    backup = commands.add_parser(
        "backup",
        help="write the state database (online copy), the CA, the server certificate and the "
        "config file into one archive (0600); safe while the coordinator runs",
    )
    backup.add_argument("file", type=Path, help="the archive to write (replaced once whole)")
    restore_cmd = commands.add_parser(
        "restore", help="fill an empty state directory from a backup; the coordinator must be stopped"
    )
    restore_cmd.add_argument("file", type=Path, help="an archive written by `picoord-coordinator backup`")
    restore_cmd.add_argument(
        "--with-config",
        action="store_true",
        help="also write the backed-up config file to --config (refused if a different one is there)",
    )
    for command in (backup, restore_cmd):
        command.add_argument(
            "--config", type=Path, help=f"settings file (default {defaults.COORDINATOR_CONFIG})"
        )
        command.add_argument(
            "--state-dir",
            help=f"state dir (default: the config's, else {defaults.COORDINATOR_STATE_DIR})",
        )
    return parser.parse_args(argv)


def run(argv: list[str]) -> int:
    """The backup or restore command; returns its exit status and prints why on failure."""
    args = parse_args(argv)
    try:
        config_path = args.config or defaults.COORDINATOR_CONFIG
        if args.command == "restore" and args.with_config:
            # --config is where the backed-up file goes, not settings to read; the state dir
            # must be the one that file names (restore checks it).
            state_dir = Path(args.state_dir or defaults.COORDINATOR_STATE_DIR)
        else:  # the state dir the coordinator uses with these settings
            state_dir = Path(load_settings(args.config, {"state_dir": args.state_dir}).state_dir)
        if args.command == "backup":
            manifest = take_backup(state_dir, config_path, args.file)
            print(f"backup of {state_dir} written to {args.file} (mode 0600): {_listing(manifest)}")
        else:
            manifest, note = restore(args.file, state_dir, config_path if args.with_config else None)
            print(
                f"restored {state_dir} from {args.file} (taken {manifest.get('created_at')} of "
                f"{manifest.get('state_dir')}, CA {manifest.get('ca_cert_hash')}): {_listing(manifest)}\n"
                f"{note}\n"
                "start the coordinator (systemctl start picoord-coordinator): agents reconnect by themselves"
            )
        return 0
    except ConfigError as error:
        print(f"picoord-coordinator {args.command}: {error}", file=sys.stderr)
        return defaults.EXIT_CONFIG
    except BackupRefused as error:
        print(f"picoord-coordinator {args.command}: {error}", file=sys.stderr)
        return error.code
    except (OSError, sqlite3.Error) as error:
        print(f"picoord-coordinator {args.command}: {error}; nothing was changed", file=sys.stderr)
        return EXIT_IOERR


def _listing(manifest: Mapping[str, Any]) -> str:
    files = manifest.get("files", {})
    return ", ".join(f"{name} ({held['size']} bytes)" for name, held in files.items())

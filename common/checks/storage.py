"""Checks of the storage actions (gluster peers and volumes, mounts), one per message.

Each `check_<kind>(request)` validates the whole message and raises FieldError naming the
first wrong field; it returns nothing. The coordinator runs them when it reads a
`GlusterVolume` or `Mount` document, and the agent runs them again before its executor does
anything. The `*_spec` functions return the normalised values the executors build argv
from (never the raw request), so what was checked is exactly what runs.

Choices worth knowing:
- A mount option is one entry each: "ro" and "nosuid", not "ro,nosuid" (the executor
  compares options one by one, and a comma would smuggle several past that check). Options
  that change what kind of mount it is (bind, remount, move, helper=) are the executor's
  to choose and are refused here.
- A bind mount takes only the kernel's per-mount flags (ro, nosuid, noexec, ...).
- Bricks of one replica set must sit on different hosts: the executor passes `force` to
  `gluster volume create` (bricks usually live on the root file system of a Pi, which
  gluster refuses without it), and `force` would also let a replica set collapse onto one
  host, which then survives nothing.
"""

from __future__ import annotations

from dataclasses import dataclass

from picoord.common import limits
from picoord.common.validation import (
    FieldError,
    bind_source,
    hostname,
    mount_option,
    mount_target,
    outside_system_directories,
    remote_path,
    safe_word,
    volume_name,
)
from picoord.v1 import actions_pb2

MAX_PEERS = limits.GLUSTER_PEERS
MAX_BRICKS = limits.GLUSTER_BRICKS
MAX_OPTIONS = limits.MOUNT_OPTIONS

# Per-mount flags the kernel keeps for each mount (shown in mountinfo's 6th field).
VFS_FLAGS = frozenset(
    {
        "ro",
        "rw",
        "nosuid",
        "suid",
        "nodev",
        "dev",
        "noexec",
        "exec",
        "noatime",
        "atime",
        "relatime",
        "norelatime",
        "strictatime",
        "nodiratime",
        "diratime",
    }
)
# Options that would turn the mount into another operation than the one asked for.
_RESERVED_OPTIONS = frozenset({"bind", "rbind", "remount", "move", "rmove"})
_RESERVED_PREFIXES = ("helper=", "uhelper=", "x-systemd.", "x-mount.")

FSTYPES = {
    actions_pb2.MOUNT_TYPE_GLUSTERFS: "glusterfs",
    actions_pb2.MOUNT_TYPE_NFS: "nfs",
    actions_pb2.MOUNT_TYPE_BIND: "bind",
    actions_pb2.MOUNT_TYPE_TMPFS: "tmpfs",
}
PERSISTENCE = {
    actions_pb2.MOUNT_PERSISTENCE_NONE: "none",
    actions_pb2.MOUNT_PERSISTENCE_FSTAB: "fstab",
    actions_pb2.MOUNT_PERSISTENCE_SYSTEMD: "systemd",
}


def _expect(request: object, message_type: type) -> None:
    if not isinstance(request, message_type):
        raise FieldError("action", f"expected {message_type.__name__}, got {type(request).__name__}")


# --- gluster -------------------------------------------------------------------------


@dataclass(frozen=True)
class Brick:
    host: str
    path: str

    def __str__(self) -> str:
        return f"{self.host}:{self.path}"


@dataclass(frozen=True)
class VolumeSpec:
    name: str
    replica: int  # 1: plain distribute
    bricks: tuple[Brick, ...]
    start: bool


def brick_path(field: str, value: str) -> str:
    """A brick directory: absolute, normalised, not a system directory."""
    return outside_system_directories(
        field, value, "use {path} as a brick directory", "put a brick under {tree}"
    )


def peers_spec(request: actions_pb2.GlusterPeerProbe) -> tuple[str, ...]:
    _expect(request, actions_pb2.GlusterPeerProbe)
    if not request.peers:
        raise FieldError("peers", "name at least one peer to probe")
    if len(request.peers) > MAX_PEERS:
        raise FieldError("peers", f"more than {MAX_PEERS} peers")
    peers: list[str] = []
    for index, value in enumerate(request.peers):
        peer = hostname(f"peers[{index}]", value)
        if peer in peers:
            raise FieldError(f"peers[{index}]", f"{peer!r} is listed twice")
        peers.append(peer)
    return tuple(peers)


def volume_spec(request: actions_pb2.GlusterVolume) -> VolumeSpec:
    _expect(request, actions_pb2.GlusterVolume)
    name = volume_name("name", request.name)
    if not request.bricks:
        raise FieldError("bricks", "a volume needs at least one brick")
    if len(request.bricks) > MAX_BRICKS:
        raise FieldError("bricks", f"more than {MAX_BRICKS} bricks")
    bricks: list[Brick] = []
    for index, value in enumerate(request.bricks):
        field = f"bricks[{index}]"
        host, _path = remote_path(field, value)
        brick = Brick(host, brick_path(field, value.partition(":")[2]))
        if brick in bricks:
            raise FieldError(field, f"{brick} is listed twice")
        bricks.append(brick)
    replica = max(int(request.replica), 1)
    if request.replica >= 2:
        if request.replica > len(bricks):
            raise FieldError(
                "replica",
                f"replica {request.replica} needs at least {request.replica} bricks, got {len(bricks)}",
            )
        if len(bricks) % replica:
            raise FieldError(
                "replica",
                f"{len(bricks)} bricks do not divide into replica sets of {replica} "
                f"(the number of bricks must be a multiple of the replica count)",
            )
        for first in range(0, len(bricks), replica):
            hosts: dict[str, int] = {}
            for index in range(first, first + replica):
                host = bricks[index].host
                if host in hosts:
                    raise FieldError(
                        f"bricks[{index}]",
                        f"same host {host!r} as bricks[{hosts[host]}] in one replica set: "
                        "the copies would not survive that host failing",
                    )
                hosts[host] = index
    return VolumeSpec(name, replica, tuple(bricks), bool(request.start))


def check_gluster_peer_probe(request: actions_pb2.GlusterPeerProbe) -> None:
    peers_spec(request)


def check_gluster_volume(request: actions_pb2.GlusterVolume) -> None:
    volume_spec(request)


# --- mounts --------------------------------------------------------------------------


@dataclass(frozen=True)
class MountSpec:
    kind: str  # glusterfs, nfs, bind, tmpfs
    source: str  # normalised; "tmpfs" for tmpfs
    target: str  # normalised absolute path
    options: tuple[str, ...]
    persist: str  # none, fstab, systemd


def mount_options(field: str, values: list[str] | tuple[str, ...], kind: str) -> tuple[str, ...]:
    if len(values) > MAX_OPTIONS:
        raise FieldError(field, f"more than {MAX_OPTIONS} options")
    options: list[str] = []
    for index, value in enumerate(values):
        name = f"{field}[{index}]"
        option = mount_option(name, value)
        if option == "defaults":  # what no option means anyway
            continue
        if "," in option:
            raise FieldError(name, f"{option!r} holds several options: give one option per entry")
        key = option.partition("=")[0]
        if key in _RESERVED_OPTIONS or option.startswith(_RESERVED_PREFIXES):
            raise FieldError(name, f"{option!r} is chosen by the agent from the mount type, not an option")
        if kind == "bind" and option not in VFS_FLAGS:
            raise FieldError(
                name, f"{option!r} does not apply to a bind mount (only {', '.join(sorted(VFS_FLAGS))})"
            )
        if option in options:
            raise FieldError(name, f"{option!r} is given twice")
        options.append(option)
    if "ro" in options and "rw" in options:
        raise FieldError(field, "both 'ro' and 'rw' given")
    return tuple(options)


def mount_source(kind: str, value: str) -> str:
    field = "source"
    if kind in ("glusterfs", "nfs"):
        if not value:
            raise FieldError(field, f"a {kind} mount needs HOST:/path")
        host, path = remote_path(field, value)
        if kind == "glusterfs":
            volume_name(field, path.lstrip("/").split("/")[0] or "/")
        return f"{host}:{path}"
    if kind == "bind":
        if not value:
            raise FieldError(field, "a bind mount needs the absolute path of a directory")
        return bind_source(field, value)
    if value not in ("", "tmpfs"):
        safe_word(field, value)
        raise FieldError(field, f"a tmpfs mount takes no source (or 'tmpfs'), got {value!r}")
    return "tmpfs"


def mount_spec(request: actions_pb2.Mount) -> MountSpec:
    _expect(request, actions_pb2.Mount)
    kind = FSTYPES.get(request.type)
    if kind is None:
        raise FieldError("type", "choose glusterfs, nfs, bind or tmpfs")
    persist = PERSISTENCE.get(request.persist)
    if persist is None:
        raise FieldError("persist", f"unknown persistence {request.persist}: choose none, fstab or systemd")
    target = mount_target("target", request.target)
    source = mount_source(kind, request.source)
    options = mount_options("options", tuple(request.options), kind)
    return MountSpec(kind, source, target, options, persist)


def unmount_target(request: actions_pb2.Unmount) -> str:
    _expect(request, actions_pb2.Unmount)
    return mount_target("target", request.target)


def check_mount(request: actions_pb2.Mount) -> None:
    mount_spec(request)


def check_unmount(request: actions_pb2.Unmount) -> None:
    unmount_target(request)

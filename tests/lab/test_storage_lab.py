"""Storage executors for real, on lab Pis: GlusterFS peers, a replica-3 volume, glusterfs,
tmpfs and bind mounts, fstab and systemd persistence, and the issue's bad inputs.

Each executor runs inside a Pi's sandbox (its network, mount and UTS namespaces), as the
agent would there, through tests/actions/runner.py: what it mounts and writes lands in that
Pi's private /mnt, /srv, /etc/fstab and /etc/systemd/system, never on the host, and the
tests check that too. glusterd is the Debian package's, one per storage Pi.

There is no NFS server in the lab: nfs mounts are exercised by validation and dry runs
only (the exact argv), here and in tests/actions/test_storage.py.

The four Pis (glusterd on pi1..pi3; pi4 is a client only) are shared by this module to keep
the run short on two cores; every test undoes what it changes. The rack fixture tears the
sandboxes down afterwards, which drops every mount made inside them.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from google.protobuf.message import Message

from picoord.lab.sandbox import PiRack, PiSandbox, host_mount_points
from picoord.v1 import actions_pb2
from tests.actions.runner import argvs, run_executor

GLUSTER = ["gluster", "--mode=script"]
PROBE = "picoord.agent.actions.gluster:gluster_peer_probe"
VOLUME = "picoord.agent.actions.gluster:gluster_volume"
MOUNT = "picoord.agent.actions.mount:mount"
UNMOUNT = "picoord.agent.actions.mount:unmount"
STORAGE = ("pi1", "pi2", "pi3")
TARGETS = ("gv0", "shared", "scratch", "data", "cache", "media", "x")


@pytest.fixture(scope="module")
def rack(module_sandbox_factory: Callable[..., PiRack]) -> PiRack:
    rack = module_sandbox_factory(4)
    rack.start_service("glusterd", list(STORAGE))
    return rack


def run(
    sb: PiSandbox, kind: str, request: Message, dry_run: bool = False, timeout: float = 90
) -> dict[str, Any]:
    result = run_executor(sb, kind, request, dry_run=dry_run, timeout=timeout)
    assert not result["error"], result["error"]
    return result


def inside(sb: PiSandbox, *argv: str, timeout: float = 30) -> str:
    done = sb.run(list(argv), timeout=timeout)
    assert done.returncode == 0, f"{argv} in {sb.name}: {done.stdout}{done.stderr}"
    return done.stdout


def snapshot(sb: PiSandbox) -> tuple[list[str], str]:
    """What a rejected request must leave as it was: the Pi's mount table and fstab.

    /run/netns is shared with the host by design, so other labs' namespace files come and
    go in it while a test runs; they are not this Pi's mounts."""
    mounts = [point for point in sb.mounts() if not point.startswith("/run/netns/")]
    return mounts, inside(sb, "cat", "/etc/fstab")


def assert_not_on_host(*targets: str) -> None:
    leaked = [point for point in host_mount_points() if point in targets]
    assert not leaked, f"mounted on the host itself: {leaked}"


@pytest.fixture
def host_fstab() -> Iterator[str]:
    before = Path("/etc/fstab").read_text()
    yield before
    assert Path("/etc/fstab").read_text() == before, "the host's /etc/fstab changed"


# --------------------------------------------------------------------------- GlusterFS


def test_replica_3_volume_mounted_on_two_pis(rack: PiRack, host_fstab: str) -> None:
    pi1, pi4 = rack.sandbox("pi1"), rack.sandbox("pi4")
    addresses = [rack.address(node) for node in STORAGE]
    probe = actions_pb2.GlusterPeerProbe(peers=addresses)

    # Peers: pi1 probes the others (itself is skipped); dry run first, then for real, then again.
    planned = run(pi1, PROBE, probe, dry_run=True)
    assert planned["outcome"] == "PLANNED", planned
    assert argvs(planned) == [[*GLUSTER, "peer", "probe", address] for address in addresses[1:]]
    assert "<peer>" not in inside(pi1, *GLUSTER, "peer", "status", "--xml"), "a dry run probed"

    probed = run(pi1, PROBE, probe)
    assert probed["outcome"] == "SUCCEEDED", probed
    assert argvs(probed) == argvs(planned)
    facts = {fact["key"]: fact["value"] for fact in probed["facts"]}
    assert facts == {f"gluster.peer.{address}": "Peer in Cluster, connected" for address in addresses[1:]}
    seen_by_pi3 = inside(rack.sandbox("pi3"), *GLUSTER, "pool", "list")
    assert addresses[0] in seen_by_pi3 and addresses[1] in seen_by_pi3
    again = run(pi1, PROBE, probe)
    assert again["outcome"] == "UNCHANGED" and again["commands"] == [], again

    # The volume. gluster creates each brick's own directory on its Pi, but not its parent:
    # without /srv/brick (on a real Pi, the mount point of the brick disk) the create fails.
    bricks = [f"{address}:/srv/brick/gv0" for address in addresses]
    request = actions_pb2.GlusterVolume(name="gv0", replica=3, bricks=bricks, start=True)
    missing_parent = run(pi1, VOLUME, request)
    assert missing_parent["outcome"] == "FAILED", missing_parent
    assert "Failed to create brick directory" in missing_parent["message"]
    for node in STORAGE:
        inside(rack.sandbox(node), "mkdir", "-p", "/srv/brick")

    planned = run(pi1, VOLUME, request, dry_run=True)
    assert planned["outcome"] == "PLANNED", planned
    assert argvs(planned) == [
        [*GLUSTER, "volume", "create", "gv0", "replica", "3", *bricks, "force"],
        [*GLUSTER, "volume", "start", "gv0"],
    ]
    assert "Volume does not exist" in inside(pi1, *GLUSTER, "volume", "info", "gv0", "--xml")

    created = run(pi1, VOLUME, request)
    assert created["outcome"] == "SUCCEEDED", created
    assert created["message"] == "volume gv0 created and started"
    facts = {fact["key"]: fact["value"] for fact in created["facts"]}
    assert facts["gluster.volume.gv0.status"] == "Started"
    assert facts["gluster.volume.gv0.bricks"] == ",".join(bricks)
    for node in STORAGE:  # each Pi holds a brick directory gluster made there
        assert inside(rack.sandbox(node), "ls", "-a", "/srv/brick/gv0").split()[:2] == [".", ".."]
    again = run(rack.sandbox("pi2"), VOLUME, request)  # any pool member sees the same volume
    assert again["outcome"] == "UNCHANGED" and again["commands"] == [], again

    other = actions_pb2.GlusterVolume(
        name="gv0", replica=3, bricks=[b.replace("gv0", "other") for b in bricks]
    )
    conflict = run(pi1, VOLUME, other)
    assert conflict["outcome"] == "FAILED" and conflict["commands"] == [], conflict
    assert "volume gv0 exists as replica 3 over" in conflict["message"]

    # Mounted on pi1 (persisted in its fstab) and on pi4 (a client that is no gluster peer).
    source = f"{addresses[0]}:/gv0"
    backups = f"backup-volfile-servers={addresses[1]}:{addresses[2]}"
    on_pi1 = actions_pb2.Mount(
        type=actions_pb2.MOUNT_TYPE_GLUSTERFS,
        source=source,
        target="/mnt/gv0",
        options=[backups],
        persist=actions_pb2.MOUNT_PERSISTENCE_FSTAB,
    )
    on_pi4 = actions_pb2.Mount(type=actions_pb2.MOUNT_TYPE_GLUSTERFS, source=source, target="/mnt/shared")
    fstab_before = inside(pi1, "cat", "/etc/fstab")
    try:
        mounted = run(pi1, MOUNT, on_pi1)
        assert mounted["outcome"] == "SUCCEEDED", mounted
        assert argvs(mounted) == [
            ["mkdir", "-p", "/mnt/gv0"],
            ["mount", "-t", "glusterfs", "-o", backups, source, "/mnt/gv0"],
            ["write", "/etc/fstab"],
        ]
        mounted = run(pi4, MOUNT, on_pi4)
        assert mounted["outcome"] == "SUCCEEDED", mounted

        inside(pi1, "sh", "-c", "echo 'written on pi1' > /mnt/gv0/hello.txt")
        assert inside(pi4, "cat", "/mnt/shared/hello.txt") == "written on pi1\n"
        for node in STORAGE:  # replica 3: every brick holds the file
            assert inside(rack.sandbox(node), "cat", "/srv/brick/gv0/hello.txt") == "written on pi1\n"

        for sb, request_message in ((pi1, on_pi1), (pi4, on_pi4)):
            again = run(sb, MOUNT, request_message)
            assert again["outcome"] == "UNCHANGED" and again["commands"] == [], again
            assert again["in_place"].startswith(f"mounted: fuse.glusterfs {source} on "), again

        line = f"{source} /mnt/gv0 glusterfs _netdev,{backups} 0 0 # picoord"
        fstab = inside(pi1, "cat", "/etc/fstab")
        assert fstab.splitlines().count(line) == 1 and fstab == fstab_before + line + "\n"
        assert line not in Path("/etc/fstab").read_text()
        assert line not in inside(pi4, "cat", "/etc/fstab")
        assert_not_on_host("/mnt/gv0", "/mnt/shared")
    finally:
        for sb, target in ((pi1, "/mnt/gv0"), (pi4, "/mnt/shared")):
            done = run(sb, UNMOUNT, actions_pb2.Unmount(target=target, forget=True))
            assert done["outcome"] in ("SUCCEEDED", "UNCHANGED"), done
    assert inside(pi1, "cat", "/etc/fstab") == fstab_before
    assert "/mnt/gv0" not in pi1.mounts() and "/mnt/shared" not in pi4.mounts()
    assert inside(rack.sandbox("pi3"), "cat", "/srv/brick/gv0/hello.txt") == "written on pi1\n"


# --------------------------------------------------------------------------- tmpfs and bind


def test_tmpfs_mount_dry_run_apply_idempotent_and_forget(rack: PiRack, host_fstab: str) -> None:
    sb = rack.sandbox("pi4")
    request = actions_pb2.Mount(
        type=actions_pb2.MOUNT_TYPE_TMPFS,
        target="/mnt/scratch",
        options=["size=8m", "mode=1777"],
        persist=actions_pb2.MOUNT_PERSISTENCE_FSTAB,
    )
    before = snapshot(sb)

    planned = run(sb, MOUNT, request, dry_run=True)
    assert planned["outcome"] == "PLANNED", planned
    assert argvs(planned) == [
        ["mkdir", "-p", "/mnt/scratch"],
        ["mount", "-t", "tmpfs", "-o", "size=8m,mode=1777", "tmpfs", "/mnt/scratch"],
        ["write", "/etc/fstab"],
    ]
    assert not any(command["ran"] for command in planned["commands"])
    assert snapshot(sb) == before
    assert "/mnt/scratch" not in inside(sb, "ls", "/mnt").split()

    try:
        mounted = run(sb, MOUNT, request)
        assert mounted["outcome"] == "SUCCEEDED", mounted
        assert [command["ran"] for command in mounted["commands"]] == [True, True, True]
        table = inside(sb, "findmnt", "--noheadings", "--raw", "-o", "FSTYPE,OPTIONS", "/mnt/scratch").split()
        assert table[0] == "tmpfs" and "size=8192k" in table[1]
        assert inside(sb, "stat", "-c", "%a", "/mnt/scratch") == "1777\n"
        assert_not_on_host("/mnt/scratch")
        again = run(sb, MOUNT, request)
        assert again["outcome"] == "UNCHANGED" and again["commands"] == [], again
        assert inside(sb, "cat", "/etc/fstab").count("/mnt/scratch") == 1
    finally:
        forgot = run(sb, UNMOUNT, actions_pb2.Unmount(target="/mnt/scratch", forget=True))
    assert forgot["outcome"] == "SUCCEEDED", forgot
    assert argvs(forgot) == [["umount", "/mnt/scratch"], ["write", "/etc/fstab"]]
    again = run(sb, UNMOUNT, actions_pb2.Unmount(target="/mnt/scratch", forget=True))
    assert again["outcome"] == "UNCHANGED", again
    assert snapshot(sb) == before


def test_read_only_bind_mount(rack: PiRack, host_fstab: str) -> None:
    sb = rack.sandbox("pi4")
    inside(sb, "mkdir", "-p", "/srv/data")
    inside(sb, "sh", "-c", "echo data > /srv/data/file")
    request = actions_pb2.Mount(
        type=actions_pb2.MOUNT_TYPE_BIND, source="/srv/data", target="/mnt/data", options=["ro", "nosuid"]
    )
    before = snapshot(sb)

    planned = run(sb, MOUNT, request, dry_run=True)
    assert argvs(planned) == [
        ["mkdir", "-p", "/mnt/data"],
        ["mount", "--bind", "/srv/data", "/mnt/data"],
        ["mount", "-o", "remount,bind,ro,nosuid", "/mnt/data"],
    ]
    assert planned["outcome"] == "PLANNED" and snapshot(sb) == before
    try:
        mounted = run(sb, MOUNT, request)
        assert mounted["outcome"] == "SUCCEEDED", mounted
        assert inside(sb, "cat", "/mnt/data/file") == "data\n"
        write = sb.run(["sh", "-c", "echo x > /mnt/data/new"])
        assert write.returncode != 0 and "Read-only file system" in write.stderr
        assert_not_on_host("/mnt/data")
        again = run(sb, MOUNT, request)
        assert again["outcome"] == "UNCHANGED" and again["commands"] == [], again

        # Something else on the target is never replaced: FAILED, nothing run.
        other = actions_pb2.Mount(type=actions_pb2.MOUNT_TYPE_TMPFS, target="/mnt/data")
        conflict = run(sb, MOUNT, other)
        assert conflict["outcome"] == "FAILED" and conflict["commands"] == [], conflict
        assert "/mnt/data already has" in conflict["message"] and "unmount it first" in conflict["message"]
    finally:
        run(sb, UNMOUNT, actions_pb2.Unmount(target="/mnt/data"))
    assert "/mnt/data" not in sb.mounts()


def test_systemd_unit_persistence_without_systemd(rack: PiRack) -> None:
    """No systemd runs here (nor in the sandbox): the unit is written to the Pi's own
    /etc/systemd/system, the message says it applies at boot, and forget removes it."""
    sb = rack.sandbox("pi4")
    unit = sb.host_path("/etc/systemd/system/mnt-cache.mount")
    request = actions_pb2.Mount(
        type=actions_pb2.MOUNT_TYPE_TMPFS, target="/mnt/cache", persist=actions_pb2.MOUNT_PERSISTENCE_SYSTEMD
    )
    try:
        mounted = run(sb, MOUNT, request)
        assert mounted["outcome"] == "SUCCEEDED", mounted
        assert argvs(mounted)[-1] == ["write", "/etc/systemd/system/mnt-cache.mount"]
        assert "takes effect at boot" in mounted["message"]
        assert {"key": "mount.unit", "value": "mnt-cache.mount", "secret": False} in mounted["facts"]
        text = unit.read_text()
        assert "Where=/mnt/cache\n" in text and text.startswith("# picoord")
        assert not Path("/etc/systemd/system/mnt-cache.mount").exists(), "written on the host"
        assert run(sb, MOUNT, request)["outcome"] == "UNCHANGED"
    finally:
        forgot = run(sb, UNMOUNT, actions_pb2.Unmount(target="/mnt/cache", forget=True))
    assert argvs(forgot) == [["umount", "/mnt/cache"], ["remove", "/etc/systemd/system/mnt-cache.mount"]]
    assert not unit.exists()


def test_nfs_is_planned_exactly_in_a_dry_run(rack: PiRack) -> None:
    """No NFS server in the lab: the dry run shows the exact argv and mounts nothing."""
    sb = rack.sandbox("pi4")
    before = snapshot(sb)
    request = actions_pb2.Mount(
        type=actions_pb2.MOUNT_TYPE_NFS,
        source="nas.local:/export/media",
        target="/mnt/media",
        options=["vers=4.2", "ro"],
        persist=actions_pb2.MOUNT_PERSISTENCE_FSTAB,
    )
    planned = run(sb, MOUNT, request, dry_run=True)
    assert planned["outcome"] == "PLANNED", planned
    assert argvs(planned) == [
        ["mkdir", "-p", "/mnt/media"],
        ["mount", "-t", "nfs", "-o", "vers=4.2,ro", "nas.local:/export/media", "/mnt/media"],
        ["write", "/etc/fstab"],
    ]
    assert snapshot(sb) == before


# --------------------------------------------------------------------------- bad input


BAD = [
    (MOUNT, actions_pb2.Mount(type=actions_pb2.MOUNT_TYPE_TMPFS, target="/etc/../proc"), "target: refusing"),
    (
        MOUNT,
        actions_pb2.Mount(
            type=actions_pb2.MOUNT_TYPE_GLUSTERFS,
            source="host:/vol; rm -rf /",
            target="/mnt/x",
            persist=actions_pb2.MOUNT_PERSISTENCE_FSTAB,
        ),
        "source: ",
    ),
    (
        MOUNT,
        actions_pb2.Mount(type=actions_pb2.MOUNT_TYPE_BIND, source="--rbind", target="/mnt/x"),
        "source: ",
    ),
    (VOLUME, actions_pb2.GlusterVolume(name="--force", replica=0, bricks=["pi1:/srv/brick/x"]), "name: "),
    (
        VOLUME,
        actions_pb2.GlusterVolume(
            name="gv9", replica=3, bricks=["a:/srv/b", "b:/srv/b", "c:/srv/b", "d:/srv/b"]
        ),
        "replica: ",
    ),
    (PROBE, actions_pb2.GlusterPeerProbe(peers=["--help"]), "peers[0]: "),
    (UNMOUNT, actions_pb2.Unmount(target="/sys/../proc", forget=True), "target: "),
]


@pytest.mark.parametrize(
    ("kind", "request_message", "prefix"),
    BAD,
    ids=[
        "target-proc",
        "source-injection",
        "bind-option",
        "name-option",
        "replica-mismatch",
        "peer-option",
        "unmount-proc",
    ],
)
def test_bad_input_is_rejected_and_changes_nothing(
    rack: PiRack, kind: str, request_message: Message, prefix: str
) -> None:
    sb = rack.sandbox("pi1")
    before = snapshot(sb)
    volumes = inside(sb, *GLUSTER, "volume", "list")
    result = run(sb, kind, request_message)
    assert result["outcome"] == "REJECTED", result
    assert result["message"].startswith(prefix), result["message"]
    assert result["commands"] == []
    assert snapshot(sb) == before
    assert inside(sb, *GLUSTER, "volume", "list") == volumes


def test_nothing_of_the_lab_is_mounted_on_the_host(rack: PiRack) -> None:
    """What the Pis mount stays inside their mount namespaces: the host sees none of it."""
    assert {"/srv", "/mnt", "/etc/fstab"} <= set(rack.sandbox("pi1").mounts())
    ours = ("/srv", "/srv/brick", "/etc/fstab", *(f"/mnt/{name}" for name in TARGETS))
    assert_not_on_host(*ours)

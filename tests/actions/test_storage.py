"""Storage actions without a lab: checks, parsers and planners as tables, and the executors
against a stand-in command runner and stand-in files (mountinfo, fstab, unit directory).

The XML samples are real `gluster --mode=script ... --xml` output of glusterfs 10.3 (the
Debian 12 package), trimmed of options that do not matter here. The systemd unit names are
checked against the real `systemd-escape`, and the unit files against `systemd-analyze
verify --root` (as tests/test_systemd_units.py does for picoord's own units).
"""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import pytest

from picoord.agent.actions import gluster as gluster_actions
from picoord.agent.actions import mount as mount_actions
from picoord.agent.actions.base import ActionContext, ActionFailed
from picoord.agent.actions.gluster import (
    Peer,
    VolumeConflict,
    VolumeState,
    parse_peer_status,
    parse_volume_info,
    plan_peer_probe,
    plan_volume,
    unsettled_peers,
)
from picoord.agent.actions.mount import (
    MountConflict,
    bind_origin,
    flag_differences,
    fstab_line,
    mount_unit_name,
    mount_unit_text,
    plan_fstab,
    plan_mount,
    plan_unit,
    systemd_escape_path,
)
from picoord.agent.actions.registry import NodeSettings, execute
from picoord.agent.commands import CommandResult
from picoord.common.checks.storage import (
    Brick,
    MountSpec,
    VolumeSpec,
    check_gluster_peer_probe,
    check_gluster_volume,
    check_mount,
    check_unmount,
    mount_spec,
    volume_spec,
)
from picoord.common.mountinfo import MountEntry, parse_mountinfo
from picoord.common.validation import FieldError
from picoord.v1 import actions_pb2, agent_pb2
from tests.systemd_verify import make_unit_root, verify

GLUSTERFS = actions_pb2.MOUNT_TYPE_GLUSTERFS
NFS = actions_pb2.MOUNT_TYPE_NFS
BIND = actions_pb2.MOUNT_TYPE_BIND
TMPFS = actions_pb2.MOUNT_TYPE_TMPFS
FSTAB = actions_pb2.MOUNT_PERSISTENCE_FSTAB
SYSTEMD = actions_pb2.MOUNT_PERSISTENCE_SYSTEMD
G = ["gluster", "--mode=script"]


def volume(name: str = "gv0", replica: int = 3, bricks: Sequence[str] = (), start: bool = True):
    bricks = bricks or [f"10.213.1.1{n}:/srv/brick/gv0" for n in (1, 2, 3)]
    return actions_pb2.GlusterVolume(name=name, replica=replica, bricks=list(bricks), start=start)


def mount_request(kind: int = TMPFS, source: str = "", target: str = "/mnt/x", options=(), persist=0):
    return actions_pb2.Mount(type=kind, source=source, target=target, options=list(options), persist=persist)


# --- checks ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "request_message",
    [
        volume(),
        volume(replica=0, bricks=["pi1:/srv/brick/a"]),
        volume(replica=1, bricks=["pi1:/srv/a", "pi2:/srv/a"]),
        volume(replica=2, bricks=["pi1:/srv/a", "pi2:/srv/a", "pi1:/srv/b", "pi2:/srv/b"]),
        actions_pb2.GlusterPeerProbe(peers=["10.213.1.12", "pi3"]),
        mount_request(GLUSTERFS, "pi1:/gv0", "/mnt/gv0", ["backup-volfile-servers=pi2:pi3", "_netdev"]),
        mount_request(NFS, "nas.local:/export/media", "/srv/media", ["vers=4.2", "ro"]),
        mount_request(BIND, "/srv/data", "/mnt/data", ["ro", "nosuid"]),
        mount_request(TMPFS, "", "/mnt/scratch", ["size=64m", "mode=1777"], FSTAB),
        mount_request(TMPFS, "tmpfs", "/var/cache/picoord", [], SYSTEMD),
        actions_pb2.Unmount(target="/mnt/x", forget=True),
    ],
    ids=lambda message: type(message).__name__,
)
def test_good_requests_pass_their_check(request_message: object) -> None:
    checks: dict[type, Callable[[object], None]] = {
        actions_pb2.GlusterVolume: check_gluster_volume,
        actions_pb2.GlusterPeerProbe: check_gluster_peer_probe,
        actions_pb2.Mount: check_mount,
        actions_pb2.Unmount: check_unmount,
    }
    checks[type(request_message)](request_message)


BAD_REQUESTS = [
    # the bad inputs
    ("target-dotdot-proc", mount_request(target="/etc/../proc"), "target", "/proc"),
    ("source-injection", mount_request(GLUSTERFS, "host:/vol; rm -rf /"), "source", "';'"),
    ("name-option", volume(name="--force"), "name", "starts with '-'"),
    (
        "replica-mismatch",
        volume(replica=3, bricks=["a:/srv/b1", "b:/srv/b1", "c:/srv/b1", "d:/srv/b1"]),
        "replica",
        "multiple",
    ),
    # mount targets
    ("target-root", mount_request(target="/"), "target", "refusing to mount over /"),
    ("target-under-sys", mount_request(target="/mnt/../sys/kernel"), "target", "under /sys"),
    ("target-etc", mount_request(target="/etc"), "target", "/etc"),
    ("target-relative", mount_request(target="mnt/x"), "target", "not an absolute path"),
    ("target-option", mount_request(target="--target"), "target", "starts with '-'"),
    ("target-space", mount_request(target="/mnt/a b"), "target", "' '"),
    # sources
    ("source-host-option", mount_request(GLUSTERFS, "-ohelper=x:/vol"), "source", "starts with '-'"),
    ("glusterfs-no-host", mount_request(GLUSTERFS, "/vol"), "source", "HOST:/path"),
    ("glusterfs-empty", mount_request(GLUSTERFS, ""), "source", "HOST:/path"),
    ("glusterfs-bad-volume", mount_request(GLUSTERFS, "pi1:/"), "source", "volume name"),
    ("nfs-relative", mount_request(NFS, "nas:export"), "source", "absolute"),
    ("nfs-backtick", mount_request(NFS, "nas:/`reboot`"), "source", "'`'"),
    ("bind-relative", mount_request(BIND, "srv/data"), "source", "absolute"),
    ("bind-empty", mount_request(BIND, ""), "source", "bind mount needs"),
    ("tmpfs-device", mount_request(TMPFS, "/dev/sda1"), "source", "takes no source"),
    ("type-unspecified", mount_request(actions_pb2.MOUNT_TYPE_UNSPECIFIED, "x"), "type", "choose"),
    ("persist-unknown", mount_request(persist=7), "persist", "unknown"),
    # options, one by one
    ("option-two-in-one", mount_request(options=["ro,exec"]), "options[0]", "one option per entry"),
    ("option-dash", mount_request(options=["size=1m", "--bind"]), "options[1]", "starts with '-'"),
    ("option-bind", mount_request(options=["bind"]), "options[0]", "chosen by the agent"),
    ("option-remount", mount_request(options=["remount"]), "options[0]", "chosen by the agent"),
    ("option-helper", mount_request(options=["helper=evil"]), "options[0]", "chosen by the agent"),
    ("option-systemd", mount_request(options=["x-systemd.requires=/bin/sh"]), "options[0]", "chosen by"),
    ("option-shell", mount_request(options=["ro;reboot"]), "options[0]", "';'"),
    ("option-bind-size", mount_request(BIND, "/srv", options=["size=1m"]), "options[0]", "bind mount"),
    ("option-ro-rw", mount_request(options=["ro", "rw"]), "options", "both 'ro' and 'rw'"),
    ("option-twice", mount_request(options=["ro", "ro"]), "options[1]", "twice"),
    # volumes
    ("replica-too-big", volume(replica=3, bricks=["a:/srv/b", "b:/srv/b"]), "replica", "at least 3 bricks"),
    ("brick-twice", volume(replica=0, bricks=["a:/srv/b", "a:/srv/b/"]), "bricks[1]", "twice"),
    ("replica-same-host", volume(bricks=["a:/srv/b1", "a:/srv/b2", "c:/srv/b"]), "bricks[1]", "same host"),
    ("brick-root", volume(replica=0, bricks=["a:/"]), "bricks[0]", "brick directory"),
    ("brick-proc", volume(replica=0, bricks=["a:/srv/../proc/x"]), "bricks[0]", "under /proc"),
    ("brick-no-path", volume(replica=0, bricks=["a"]), "bricks[0]", "HOST:/path"),
    ("brick-injection", volume(replica=0, bricks=["a:/srv/b$(reboot)"]), "bricks[0]", "'$'"),
    ("no-bricks", actions_pb2.GlusterVolume(name="gv0"), "bricks", "at least one brick"),
    ("volume-name-slash", volume(name="a/b"), "name", "volume name"),
    # peers
    ("peer-option", actions_pb2.GlusterPeerProbe(peers=["--help"]), "peers[0]", "starts with '-'"),
    ("peer-twice", actions_pb2.GlusterPeerProbe(peers=["pi2", "pi2"]), "peers[1]", "twice"),
    ("peer-bad-name", actions_pb2.GlusterPeerProbe(peers=["pi_2!"]), "peers[0]", "'!'"),
    ("no-peers", actions_pb2.GlusterPeerProbe(), "peers", "at least one"),
    # unmount
    ("unmount-proc", actions_pb2.Unmount(target="/etc/../proc"), "target", "/proc"),
    ("unmount-dev-tree", actions_pb2.Unmount(target="/dev/shm"), "target", "under /dev"),
]


@pytest.mark.parametrize(
    ("request_message", "field", "fragment"),
    [case[1:] for case in BAD_REQUESTS],
    ids=[case[0] for case in BAD_REQUESTS],
)
def test_bad_requests_are_rejected_naming_the_field(
    request_message: object, field: str, fragment: str
) -> None:
    checks: dict[type, Callable[[object], None]] = {
        actions_pb2.GlusterVolume: check_gluster_volume,
        actions_pb2.GlusterPeerProbe: check_gluster_peer_probe,
        actions_pb2.Mount: check_mount,
        actions_pb2.Unmount: check_unmount,
    }
    with pytest.raises(FieldError) as caught:
        checks[type(request_message)](request_message)
    assert caught.value.field == field, str(caught.value)
    assert fragment in caught.value.reason, str(caught.value)


@pytest.mark.parametrize(
    ("kind", "request_message"),
    [
        ("mount", mount_request(target="/etc/../proc")),
        ("mount", mount_request(GLUSTERFS, "host:/vol; rm -rf /", "/mnt/gv0")),
        ("gluster_volume", volume(name="--force")),
        ("gluster_volume", volume(replica=3, bricks=["a:/srv/b", "b:/srv/b"])),
        ("gluster_peer_probe", actions_pb2.GlusterPeerProbe(peers=["--help"])),
        ("unmount", actions_pb2.Unmount(target="/proc")),
    ],
)
def test_the_agent_rejects_bad_requests_before_running_anything(kind: str, request_message: object) -> None:
    """Through the agent's registry: REJECTED, with the field named and no command recorded."""
    action = actions_pb2.Action(**{kind: request_message})
    result = execute(
        agent_pb2.ActionRequest(action_id="a1", timeout_seconds=30, action=action),
        NodeSettings(coordinator_host="10.213.1.1", coordinator_port=7443),
    )
    assert result.outcome == agent_pb2.ACTION_OUTCOME_REJECTED, result.message
    assert not result.commands
    assert result.message.split(":")[0] in ("target", "source", "name", "replica", "peers[0]")


def test_specs_are_normalised() -> None:
    spec = mount_spec(mount_request(TMPFS, "", "/mnt//scratch/", ["defaults", "size=1m"]))
    assert spec == MountSpec("tmpfs", "tmpfs", "/mnt/scratch", ("size=1m",), "none")
    spec = mount_spec(mount_request(GLUSTERFS, "pi1:/gv0/", "/mnt/gv0", persist=FSTAB))
    assert spec == MountSpec("glusterfs", "pi1:/gv0", "/mnt/gv0", (), "fstab")
    assert volume_spec(volume(replica=0, bricks=["pi1://srv/b/"])) == VolumeSpec(
        "gv0", 1, (Brick("pi1", "/srv/b"),), True
    )


# --- gluster: parsing and planning --------------------------------------------------------------

PEER_STATUS_EMPTY = """<?xml version="1.0" encoding="UTF-8" standalone="yes"?>
<cliOutput>
  <opRet>0</opRet>
  <opErrno>0</opErrno>
  <opErrstr/>
  <peerStatus/>
</cliOutput>
"""


def peer_xml(*peers: tuple[str, str, bool, str]) -> str:
    """peer status --xml for (uuid, hostname, connected, stateStr) tuples."""
    body = "".join(
        f"""    <peer>
      <uuid>{uuid}</uuid>
      <hostname>{name}</hostname>
      <hostnames>
        <hostname>{name}</hostname>
      </hostnames>
      <connected>{int(connected)}</connected>
      <state>3</state>
      <stateStr>{state}</stateStr>
    </peer>
"""
        for uuid, name, connected, state in peers
    )
    return f"""<?xml version="1.0" encoding="UTF-8" standalone="yes"?>
<cliOutput>
  <opRet>0</opRet>
  <opErrno>0</opErrno>
  <opErrstr/>
  <peerStatus>
{body}  </peerStatus>
</cliOutput>
"""


PEER_STATUS_TWO = peer_xml(
    ("b32e5485-3ac5-40f0-99bd-463ffaa2fa81", "10.213.231.12", True, "Peer in Cluster"),
    ("6807a51c-3b6e-4880-930f-5c2b92767ba4", "10.213.231.13", False, "Peer in Cluster"),
)

VOLUME_MISSING = """<?xml version="1.0" encoding="UTF-8" standalone="yes"?>
<cliOutput>
  <opRet>-1</opRet>
  <opErrno>30806</opErrno>
  <opErrstr>Volume does not exist</opErrstr>
  <volInfo>
    <volumes>
      <count>0</count>
    </volumes>
  </volInfo>
</cliOutput>
"""


def volume_xml(status: str = "Started", replica: int = 3, hosts: Sequence[str] = ("11", "12", "13")) -> str:
    bricks = "".join(
        f'          <brick uuid="u{host}">10.213.231.{host}:/srv/brick/tv'
        f"<name>10.213.231.{host}:/srv/brick/tv</name><hostUuid>u{host}</hostUuid><isArbiter>0</isArbiter></brick>\n"
        for host in hosts
    )
    code = {"Created": 0, "Started": 1, "Stopped": 2}[status]
    return f"""<?xml version="1.0" encoding="UTF-8" standalone="yes"?>
<cliOutput>
  <opRet>0</opRet>
  <opErrno>0</opErrno>
  <opErrstr/>
  <volInfo>
    <volumes>
      <volume>
        <name>tv</name>
        <id>245ebf76-652c-40b2-b60d-d11ac43cdcc2</id>
        <status>{code}</status>
        <statusStr>{status}</statusStr>
        <snapshotCount>0</snapshotCount>
        <brickCount>{len(hosts)}</brickCount>
        <distCount>1</distCount>
        <replicaCount>{replica}</replicaCount>
        <arbiterCount>0</arbiterCount>
        <disperseCount>0</disperseCount>
        <redundancyCount>0</redundancyCount>
        <type>2</type>
        <typeStr>Replicate</typeStr>
        <transport>0</transport>
        <bricks>
{bricks}        </bricks>
        <optCount>1</optCount>
        <options>
          <option>
            <name>transport.address-family</name>
            <value>inet</value>
          </option>
        </options>
      </volume>
      <count>1</count>
    </volumes>
  </volInfo>
</cliOutput>
"""


TV_BRICKS = tuple(f"10.213.231.{host}:/srv/brick/tv" for host in ("11", "12", "13"))


def test_peer_status_is_parsed() -> None:
    assert parse_peer_status(PEER_STATUS_EMPTY) == []
    assert parse_peer_status(PEER_STATUS_TWO) == [
        Peer("b32e5485-3ac5-40f0-99bd-463ffaa2fa81", ("10.213.231.12",), True, "Peer in Cluster"),
        Peer("6807a51c-3b6e-4880-930f-5c2b92767ba4", ("10.213.231.13",), False, "Peer in Cluster"),
    ]


def test_volume_info_is_parsed_and_a_missing_volume_is_none() -> None:
    assert parse_volume_info(VOLUME_MISSING) is None
    assert parse_volume_info(volume_xml("Created")) == VolumeState(
        name="tv",
        status="Created",
        replica=3,
        bricks=TV_BRICKS,
        type="Replicate",
        volume_id="245ebf76-652c-40b2-b60d-d11ac43cdcc2",
    )


@pytest.mark.parametrize(
    "text",
    [
        "Connection failed. Please check if gluster daemon is operational.",
        "<other/>",
        VOLUME_MISSING.replace("Volume does not exist", "Another transaction is in progress"),
    ],
)
def test_unexpected_gluster_output_is_an_error(text: str) -> None:
    with pytest.raises(gluster_actions.GlusterOutputError):
        parse_volume_info(text)


POOL = [
    Peer("u2", ("10.213.231.12",), True, "Peer in Cluster"),
    Peer("u3", ("pi3", "10.213.231.13"), True, "Peer in Cluster"),
]
LOCAL = {"pi1", "10.213.231.11", "127.0.0.1", "::1", "localhost"}


@pytest.mark.parametrize(
    ("wanted", "pool", "expected"),
    [
        (
            ["10.213.231.12", "10.213.231.13"],
            [],
            [[*G, "peer", "probe", "10.213.231.12"], [*G, "peer", "probe", "10.213.231.13"]],
        ),
        (["10.213.231.12", "10.213.231.13"], POOL, []),
        (["10.213.231.12", "pi3", "pi4"], POOL, [[*G, "peer", "probe", "pi4"]]),
        (["10.213.231.11", "pi1", "10.213.231.12"], [], [[*G, "peer", "probe", "10.213.231.12"]]),  # self
        (["PI3"], POOL, []),  # host names are case-insensitive
    ],
    ids=["empty-pool", "all-present", "by-any-known-name", "self-skipped", "case"],
)
def test_plan_peer_probe(wanted: list[str], pool: list[Peer], expected: list[list[str]]) -> None:
    assert plan_peer_probe(wanted, pool, LOCAL) == expected


def test_unsettled_peers_names_those_not_yet_connected_members() -> None:
    pool = [
        Peer("u2", ("10.213.231.12",), True, "Accepted peer request"),
        Peer("u3", ("pi3",), False, "Peer in Cluster"),
    ]
    assert unsettled_peers(["10.213.231.11", "10.213.231.12", "pi3", "pi4"], pool, LOCAL) == [
        "10.213.231.12 (Accepted peer request, connected)",
        "pi3 (Peer in Cluster, disconnected)",
        "pi4 (not in the pool)",
    ]
    assert unsettled_peers(["10.213.231.12", "pi3"], POOL, LOCAL) == []


def tv_spec(replica: int = 3, start: bool = True, bricks: Sequence[str] = TV_BRICKS) -> VolumeSpec:
    return volume_spec(
        actions_pb2.GlusterVolume(name="tv", replica=replica, bricks=list(bricks), start=start)
    )


@pytest.mark.parametrize(
    ("spec", "current", "expected"),
    [
        (
            tv_spec(),
            None,
            [
                [*G, "volume", "create", "tv", "replica", "3", *TV_BRICKS, "force"],
                [*G, "volume", "start", "tv"],
            ],
        ),
        (tv_spec(start=False), None, [[*G, "volume", "create", "tv", "replica", "3", *TV_BRICKS, "force"]]),
        (
            tv_spec(replica=0, start=False, bricks=TV_BRICKS[:1]),
            None,
            [[*G, "volume", "create", "tv", TV_BRICKS[0], "force"]],
        ),
        (tv_spec(), parse_volume_info(volume_xml("Started")), []),
        (tv_spec(), parse_volume_info(volume_xml("Created")), [[*G, "volume", "start", "tv"]]),
        (tv_spec(), parse_volume_info(volume_xml("Stopped")), [[*G, "volume", "start", "tv"]]),
        (tv_spec(start=False), parse_volume_info(volume_xml("Created")), []),
        (tv_spec(start=False), parse_volume_info(volume_xml("Started")), []),  # never stops a volume
    ],
    ids=[
        "create-start",
        "create-only",
        "distribute",
        "in-place",
        "start-created",
        "start-stopped",
        "created-not-asked",
        "started-not-asked",
    ],
)
def test_plan_volume(spec: VolumeSpec, current: VolumeState | None, expected: list[list[str]]) -> None:
    assert plan_volume(spec, current) == expected


@pytest.mark.parametrize(
    "current",
    [
        parse_volume_info(volume_xml(hosts=("11", "12", "14"))),  # another brick
        parse_volume_info(volume_xml(hosts=("12", "11", "13"))),  # another replica-set order
        parse_volume_info(volume_xml(replica=1)),  # distribute over the same bricks
    ],
    ids=["other-brick", "other-order", "other-replica"],
)
def test_an_existing_volume_with_another_layout_is_never_changed(current: VolumeState) -> None:
    with pytest.raises(VolumeConflict) as caught:
        plan_volume(tv_spec(), current)
    message = str(caught.value)
    assert "volume tv exists as" in message and "replica 3 over 10.213.231.11:/srv/brick/tv" in message
    assert "does not change an existing volume" in message


# --- gluster executors with a stand-in runner ----------------------------------------------------


class FakeRunner:
    """Answers commands from a table of argv prefix -> list of results (the last one repeats)."""

    def __init__(self, answers: dict[tuple[str, ...], list[CommandResult]]) -> None:
        self.answers = {key: list(value) for key, value in answers.items()}
        self.calls: list[list[str]] = []

    def __call__(self, argv: Sequence[str], timeout: float) -> CommandResult:
        assert timeout > 0
        self.calls.append(list(argv))
        for prefix in sorted(self.answers, key=len, reverse=True):
            if tuple(argv[: len(prefix)]) == prefix:
                queue = self.answers[prefix]
                return queue.pop(0) if len(queue) > 1 else queue[0]
        raise AssertionError(f"unexpected command {argv}")


def ok(stdout: str = "") -> CommandResult:
    return CommandResult((), 0, stdout, "")


def context(runner: Callable[..., CommandResult], dry_run: bool = False) -> ActionContext:
    import time

    return ActionContext(dry_run=dry_run, deadline=time.monotonic() + 30, run=runner)


@pytest.fixture
def local_pi1(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(gluster_actions, "local_names", lambda: set(LOCAL))
    monkeypatch.setattr(gluster_actions.time, "sleep", lambda seconds: None)


def test_peer_probe_probes_the_missing_peers_and_waits_until_they_joined(local_pi1: None) -> None:
    joining = peer_xml(("u2", "10.213.231.12", True, "Accepted peer request"))
    joined = peer_xml(
        ("u2", "10.213.231.12", True, "Peer in Cluster"), ("u3", "10.213.231.13", True, "Peer in Cluster")
    )
    runner = FakeRunner(
        {
            (*G, "peer", "status", "--xml"): [ok(PEER_STATUS_EMPTY), ok(joining), ok(joined)],
            (*G, "peer", "probe"): [ok("peer probe: success")],
        }
    )
    request = actions_pb2.GlusterPeerProbe(peers=["10.213.231.11", "10.213.231.12", "10.213.231.13"])
    ctx = context(runner)

    outcome = gluster_actions.gluster_peer_probe(request, ctx)

    assert outcome.outcome == agent_pb2.ACTION_OUTCOME_SUCCEEDED, outcome.message
    assert [list(record.argv) for record in ctx.commands] == [
        [*G, "peer", "probe", "10.213.231.12"],
        [*G, "peer", "probe", "10.213.231.13"],
    ]
    assert runner.calls.count([*G, "peer", "status", "--xml"]) == 3  # before, and twice while waiting
    assert {fact.key: fact.value for fact in outcome.facts} == {
        "gluster.peer.10.213.231.12": "Peer in Cluster, connected",
        "gluster.peer.10.213.231.13": "Peer in Cluster, connected",
    }


def test_peer_probe_dry_run_and_second_run(local_pi1: None) -> None:
    runner = FakeRunner({(*G, "peer", "status", "--xml"): [ok(PEER_STATUS_EMPTY)]})
    ctx = context(runner, dry_run=True)
    outcome = gluster_actions.gluster_peer_probe(actions_pb2.GlusterPeerProbe(peers=["10.213.231.12"]), ctx)
    assert outcome.outcome == agent_pb2.ACTION_OUTCOME_PLANNED
    assert [(list(r.argv), r.ran) for r in ctx.commands] == [([*G, "peer", "probe", "10.213.231.12"], False)]
    assert [*G, "peer", "probe", "10.213.231.12"] not in runner.calls

    runner = FakeRunner({(*G, "peer", "status", "--xml"): [ok(PEER_STATUS_TWO)]})
    ctx = context(runner)
    outcome = gluster_actions.gluster_peer_probe(
        actions_pb2.GlusterPeerProbe(peers=["10.213.231.12", "10.213.231.13"]), ctx
    )
    assert outcome.outcome == agent_pb2.ACTION_OUTCOME_UNCHANGED
    assert not ctx.commands
    assert "not connected: 10.213.231.13 (Peer in Cluster, disconnected)" in outcome.message


def test_peer_probe_fails_when_a_peer_never_joins(local_pi1: None, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(gluster_actions, "PEER_SETTLE_SECONDS", 0.0)
    runner = FakeRunner(
        {
            (*G, "peer", "status", "--xml"): [ok(PEER_STATUS_EMPTY)],
            (*G, "peer", "probe"): [ok("peer probe: success")],
        }
    )
    with pytest.raises(ActionFailed, match=r"did not join the cluster: 10\.213\.231\.12 \(not in the pool\)"):
        gluster_actions.gluster_peer_probe(
            actions_pb2.GlusterPeerProbe(peers=["10.213.231.12"]), context(runner)
        )


def test_glusterd_down_is_a_clear_failure(local_pi1: None) -> None:
    down = CommandResult((), 1, "", "Connection failed. Please check if gluster daemon is operational.\n")
    runner = FakeRunner({(*G, "peer", "status", "--xml"): [down]})
    with pytest.raises(ActionFailed, match="is glusterd running"):
        gluster_actions.gluster_peer_probe(actions_pb2.GlusterPeerProbe(peers=["pi2"]), context(runner))


def test_volume_is_created_and_started_then_unchanged() -> None:
    runner = FakeRunner(
        {
            (*G, "volume", "info", "tv", "--xml"): [ok(VOLUME_MISSING), ok(volume_xml("Started"))],
            (*G, "volume", "create"): [ok("volume create: tv: success")],
            (*G, "volume", "start"): [ok("volume start: tv: success")],
        }
    )
    request = actions_pb2.GlusterVolume(name="tv", replica=3, bricks=list(TV_BRICKS), start=True)
    ctx = context(runner)
    outcome = gluster_actions.gluster_volume(request, ctx)
    assert outcome.outcome == agent_pb2.ACTION_OUTCOME_SUCCEEDED
    assert outcome.message == "volume tv created and started"
    assert [list(r.argv) for r in ctx.commands] == [
        [*G, "volume", "create", "tv", "replica", "3", *TV_BRICKS, "force"],
        [*G, "volume", "start", "tv"],
    ]
    facts = {fact.key: fact.value for fact in outcome.facts}
    assert facts["gluster.volume.tv.status"] == "Started"
    assert facts["gluster.volume.tv.bricks"] == ",".join(TV_BRICKS)

    ctx = context(runner)
    outcome = gluster_actions.gluster_volume(request, ctx)
    assert outcome.outcome == agent_pb2.ACTION_OUTCOME_UNCHANGED and not ctx.commands


def test_volume_with_other_bricks_fails_without_running_anything() -> None:
    runner = FakeRunner({(*G, "volume", "info", "tv", "--xml"): [ok(volume_xml(hosts=("11", "12", "14")))]})
    request = actions_pb2.GlusterVolume(name="tv", replica=3, bricks=list(TV_BRICKS), start=True)
    ctx = context(runner)
    with pytest.raises(ActionFailed, match="exists as replica 3 over"):
        gluster_actions.gluster_volume(request, ctx)
    assert not ctx.commands and runner.calls == [[*G, "volume", "info", "tv", "--xml"]]


# --- mountinfo ------------------------------------------------------------------------------------

MOUNTINFO = r"""52 51 254:0 / / rw,relatime - ext4 /dev/vda rw,discard
54 52 0:21 / /proc rw,relatime - proc proc rw
49 52 254:0 /tmp/lab/pi1/fs/srv /srv rw,relatime - ext4 /dev/vda rw,discard
50 52 254:0 /tmp/lab/pi1/fs/mnt /mnt rw,relatime - ext4 /dev/vda rw,discard
100 50 0:45 / /mnt/tv rw,relatime - fuse.glusterfs 10.213.231.11:/tv rw,user_id=0,allow_other,max_read=131072
101 50 0:46 / /mnt/my\040disk rw,nosuid,nodev,noexec,relatime shared:7 master:1 - tmpfs my\134tmp rw
102 50 254:0 /tmp/lab/pi1/fs/srv/data /mnt/data ro,relatime - ext4 /dev/vda rw,discard
103 50 0:47 / /mnt/stack rw,relatime - tmpfs tmpfs rw
104 103 0:48 / /mnt/stack ro,relatime - tmpfs other rw
"""


def test_mountinfo_is_parsed_with_escapes_and_optional_fields() -> None:
    entries = parse_mountinfo(MOUNTINFO)
    assert len(entries) == 9
    assert entries[4] == MountEntry(
        100,
        50,
        "0:45",
        "/",
        "/mnt/tv",
        ("rw", "relatime"),
        "fuse.glusterfs",
        "10.213.231.11:/tv",
        ("rw", "user_id=0", "allow_other", "max_read=131072"),
    )
    disk = entries[5]
    assert (disk.mount_point, disk.fstype, disk.source) == ("/mnt/my disk", "tmpfs", "my\\tmp")
    assert disk.options == ("rw", "nosuid", "nodev", "noexec", "relatime")
    assert bind_origin(entries, "/srv/data") == ("254:0", "/tmp/lab/pi1/fs/srv/data")
    assert bind_origin(entries, "/srv") == ("254:0", "/tmp/lab/pi1/fs/srv")
    assert bind_origin(entries, "/etc") == ("254:0", "/etc")


@pytest.mark.parametrize(
    ("wanted", "options", "missing"),
    [
        ((), ("rw", "relatime"), []),
        ((), ("ro", "relatime"), ["rw"]),
        (("ro",), ("rw", "relatime"), ["ro"]),
        (("ro", "nosuid"), ("ro", "nosuid"), []),
        (("nosuid", "nodev", "noexec"), ("rw", "nosuid"), ["nodev", "noexec"]),
        (("exec", "suid"), ("rw", "noexec"), ["exec"]),
        (("noatime",), ("rw", "relatime"), ["noatime"]),
        (("strictatime",), ("rw", "relatime"), ["strictatime"]),
        (("size=64m", "mode=1777"), ("rw",), []),  # not per-mount flags: not compared
    ],
)
def test_flag_differences(wanted: tuple[str, ...], options: tuple[str, ...], missing: list[str]) -> None:
    assert flag_differences(wanted, options) == missing


def spec(
    kind: str = "tmpfs", source: str = "tmpfs", target: str = "/mnt/x", options=(), persist="none"
) -> MountSpec:
    return MountSpec(kind, source, target, tuple(options), persist)


ENTRIES = parse_mountinfo(MOUNTINFO)


@pytest.mark.parametrize(
    ("wanted", "exists", "expected"),
    [
        (
            spec(options=["size=1m"]),
            False,
            [["mkdir", "-p", "/mnt/x"], ["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", "/mnt/x"]],
        ),
        (spec(), True, [["mount", "-t", "tmpfs", "tmpfs", "/mnt/x"]]),
        (
            spec("glusterfs", "pi1:/tv", options=["backup-volfile-servers=pi2:pi3"]),
            True,
            [["mount", "-t", "glusterfs", "-o", "backup-volfile-servers=pi2:pi3", "pi1:/tv", "/mnt/x"]],
        ),
        (
            spec("nfs", "nas:/export", options=["vers=4.2"]),
            True,
            [["mount", "-t", "nfs", "-o", "vers=4.2", "nas:/export", "/mnt/x"]],
        ),
        (spec("bind", "/srv/data"), True, [["mount", "--bind", "/srv/data", "/mnt/x"]]),
        (
            spec("bind", "/srv/data", options=["ro", "nosuid"]),
            True,
            [["mount", "--bind", "/srv/data", "/mnt/x"], ["mount", "-o", "remount,bind,ro,nosuid", "/mnt/x"]],
        ),
        # in place
        (spec("glusterfs", "10.213.231.11:/tv", "/mnt/tv", ["backup-volfile-servers=a:b"]), True, []),
        (spec("bind", "/srv/data", "/mnt/data", ["ro"]), True, []),
        (spec("tmpfs", "tmpfs", "/mnt/my disk", ["nosuid", "size=2m"]), True, []),
        # in place but a per-mount flag differs: bind and tmpfs are remounted
        (spec("bind", "/srv/data", "/mnt/data"), True, [["mount", "-o", "remount,bind,rw", "/mnt/data"]]),
        (
            spec("tmpfs", "tmpfs", "/mnt/stack", ["size=1m"]),
            True,
            [["mount", "-o", "remount,size=1m", "/mnt/stack"]],
        ),
        # ... a network mount is not
        (spec("glusterfs", "10.213.231.11:/tv", "/mnt/tv", ["ro"]), True, []),
    ],
    ids=[
        "tmpfs-mkdir",
        "tmpfs",
        "glusterfs",
        "nfs",
        "bind",
        "bind-ro",
        "glusterfs-in-place",
        "bind-in-place",
        "tmpfs-escaped-in-place",
        "bind-rw-remount",
        "tmpfs-stacked-ro-remount",
        "glusterfs-ro-reported",
    ],
)
def test_plan_mount(wanted: MountSpec, exists: bool, expected: list[list[str]]) -> None:
    origin = bind_origin(ENTRIES, wanted.source) if wanted.kind == "bind" else None
    assert plan_mount(wanted, ENTRIES, exists, origin).commands == expected


def test_plan_mount_reports_what_is_in_place_and_option_differences() -> None:
    plan = plan_mount(spec("glusterfs", "10.213.231.11:/tv", "/mnt/tv", ["ro"]), ENTRIES, True)
    assert plan.in_place.startswith("mounted: fuse.glusterfs 10.213.231.11:/tv on /mnt/tv")
    assert plan.notes == [
        "mounted without ro (mounted rw,relatime); "
        "unmount and apply again to change a network mount's options"
    ]


@pytest.mark.parametrize(
    ("wanted", "fragment"),
    [
        (spec("glusterfs", "10.213.231.12:/tv", "/mnt/tv"), "already has fuse.glusterfs 10.213.231.11:/tv"),
        (spec("tmpfs", "tmpfs", "/mnt/tv"), "already has fuse.glusterfs"),
        (spec("bind", "/srv/other", "/mnt/data"), "already has ext4 /dev/vda[/tmp/lab/pi1/fs/srv/data]"),
        (spec("nfs", "nas:/e", "/mnt/my disk"), "already has tmpfs my\\tmp"),
    ],
)
def test_another_mount_on_the_target_is_a_conflict(wanted: MountSpec, fragment: str) -> None:
    origin = bind_origin(ENTRIES, wanted.source) if wanted.kind == "bind" else None
    with pytest.raises(MountConflict) as caught:
        plan_mount(wanted, ENTRIES, True, origin)
    assert fragment in str(caught.value) and "unmount it first" in str(caught.value)


# --- fstab -------------------------------------------------------------------------------------------

HOST_FSTAB = "# /etc/fstab: static file system information.\nUUID=abc / ext4 errors=remount-ro 0 1\n"
GV0 = spec("glusterfs", "pi1:/gv0", "/mnt/gv0", ["backup-volfile-servers=pi2:pi3"], "fstab")
GV0_LINE = "pi1:/gv0 /mnt/gv0 glusterfs _netdev,backup-volfile-servers=pi2:pi3 0 0 # picoord"


@pytest.mark.parametrize(
    ("wanted", "line"),
    [
        (GV0, GV0_LINE),
        (spec("nfs", "nas:/e", "/srv/e", ["_netdev", "ro"]), "nas:/e /srv/e nfs _netdev,ro 0 0 # picoord"),
        (spec("bind", "/srv/d", "/mnt/d", ["ro"]), "/srv/d /mnt/d none bind,ro 0 0 # picoord"),
        (spec("tmpfs", "tmpfs", "/mnt/t"), "tmpfs /mnt/t tmpfs defaults 0 0 # picoord"),
        (spec("bind", "/srv/a b", "/mnt/a\\b"), "/srv/a\\040b /mnt/a\\134b none bind 0 0 # picoord"),
    ],
)
def test_fstab_lines(wanted: MountSpec, line: str) -> None:
    assert fstab_line(wanted) == line


@pytest.mark.parametrize(
    ("text", "line", "expected"),
    [
        (HOST_FSTAB, GV0_LINE, HOST_FSTAB + GV0_LINE + "\n"),
        ("", GV0_LINE, GV0_LINE + "\n"),
        (HOST_FSTAB + GV0_LINE + "\n", GV0_LINE, None),
        (
            HOST_FSTAB.rstrip("\n"),
            None,
            None,
        ),  # nothing of ours, nothing wanted: untouched, even without newline
        (
            HOST_FSTAB + "pi9:/gv0 /mnt/gv0 glusterfs defaults 0 0 # picoord\n",
            GV0_LINE,
            HOST_FSTAB + GV0_LINE + "\n",
        ),
        (
            GV0_LINE + "\n" + HOST_FSTAB + GV0_LINE + "\n",
            GV0_LINE,
            GV0_LINE + "\n" + HOST_FSTAB,
        ),  # duplicates collapse
        (HOST_FSTAB + GV0_LINE + "\n", None, HOST_FSTAB),
        (
            HOST_FSTAB + "# pi1:/gv0 /mnt/gv0 glusterfs defaults 0 0 # picoord\n",
            GV0_LINE,
            HOST_FSTAB + "# pi1:/gv0 /mnt/gv0 glusterfs defaults 0 0 # picoord\n" + GV0_LINE + "\n",
        ),  # comments stay
        (
            HOST_FSTAB + "tmpfs /mnt/other tmpfs defaults 0 0 # picoord\n",
            GV0_LINE,
            HOST_FSTAB + "tmpfs /mnt/other tmpfs defaults 0 0 # picoord\n" + GV0_LINE + "\n",
        ),  # other targets stay
    ],
    ids=[
        "add",
        "add-to-empty",
        "in-place",
        "untouched",
        "replace",
        "collapse",
        "remove",
        "comment",
        "other-target",
    ],
)
def test_plan_fstab(text: str, line: str | None, expected: str | None) -> None:
    assert plan_fstab(text, "/mnt/gv0", line) == expected


def test_a_foreign_fstab_line_for_the_target_is_a_conflict_and_survives_removal() -> None:
    foreign = HOST_FSTAB + "nas:/gv0 /mnt/gv0 nfs defaults 0 0\n"
    with pytest.raises(MountConflict, match="picoord did not write"):
        plan_fstab(foreign, "/mnt/gv0", GV0_LINE)
    assert plan_fstab(foreign, "/mnt/gv0", None) is None


def test_findmnt_reads_our_fstab_lines(tmp_path: Path) -> None:
    """util-linux (mount -a, systemd's fstab generator) parses the line with its marker."""
    path = tmp_path / "fstab"
    path.write_text(
        HOST_FSTAB + GV0_LINE + "\n" + fstab_line(spec("bind", "/srv/d", "/mnt/d", ["ro"])) + "\n"
    )
    done = subprocess.run(
        ["findmnt", "--tab-file", str(path), "--noheadings", "--raw", "-o", "SOURCE,TARGET,FSTYPE,OPTIONS"],
        capture_output=True,
        text=True,
        timeout=30,
        check=True,
    )
    assert done.stdout.splitlines()[1:] == [
        "pi1:/gv0 /mnt/gv0 glusterfs _netdev,backup-volfile-servers=pi2:pi3",
        "/srv/d /mnt/d none bind,ro",
    ]


# --- systemd units --------------------------------------------------------------------------------------

ESCAPE_CASES = [
    "/",
    "/mnt/tv",
    "/mnt/my-data",
    "/mnt/.hidden",
    "/.x",
    "/mnt/a b",
    "/mnt/ü",
    "/mnt//x/",
    "/mnt/x:y",
    "/mnt/a_b.c",
    "/mnt/a\\b",
    "/srv/brick/gv0",
    "/mnt/a.b/.c",
    "/a-",
    "/-x",
    "/mnt/tab\tx",
    "/ä/€",
    "/mnt/a%b",
    "/mnt/x@y+z",
]


@pytest.mark.parametrize("path", ESCAPE_CASES)
def test_unit_names_match_systemd_escape(path: str) -> None:
    if not shutil.which("systemd-escape"):
        pytest.fail("systemd-escape is missing: apt-get install systemd", pytrace=False)
    done = subprocess.run(
        ["systemd-escape", "--path", "--suffix=mount", "--", path],
        capture_output=True,
        text=True,
        timeout=30,
        check=True,
    )
    assert mount_unit_name(path) == done.stdout.strip()
    assert systemd_escape_path(path) + ".mount" == done.stdout.strip()


@pytest.fixture(scope="module")
def unit_root(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """A root for `systemd-analyze verify --root`: this machine's system units."""
    root = tmp_path_factory.mktemp("unit-root")
    try:
        yield make_unit_root(root)
    finally:
        shutil.rmtree(root, ignore_errors=True)


UNIT_SPECS = [
    spec(
        "glusterfs",
        "10.213.231.11:/gv0",
        "/mnt/gv0",
        ["backup-volfile-servers=10.213.231.12:10.213.231.13"],
        "systemd",
    ),
    spec("nfs", "nas.local:/export/media", "/srv/media", ["vers=4.2", "ro"], "systemd"),
    spec("bind", "/srv/data", "/mnt/data", ["ro", "nosuid"], "systemd"),
    spec("tmpfs", "tmpfs", "/var/cache/picoord-scratch", ["size=64m", "mode=1777"], "systemd"),
    spec("tmpfs", "tmpfs", "/mnt/my-disk%1", [], "systemd"),
]


@pytest.mark.parametrize("wanted", UNIT_SPECS, ids=lambda s: f"{s.kind}-{s.target}")
def test_mount_units_verify_silently(unit_root: Path, wanted: MountSpec) -> None:
    code, output = verify(unit_root, mount_unit_name(wanted.target), mount_unit_text(wanted))
    assert code == 0 and not output, "\n".join([mount_unit_text(wanted), *output])


def test_verify_catches_a_unit_whose_name_does_not_match(unit_root: Path) -> None:
    """The check above is not vacuous: systemd refuses a unit named for another path."""
    code, output = verify(unit_root, "mnt-other.mount", mount_unit_text(UNIT_SPECS[0]))
    assert code != 0 and any("doesn't match unit name" in line for line in output), output


def test_mount_unit_content() -> None:
    text = mount_unit_text(UNIT_SPECS[0])
    assert text.splitlines()[0].startswith("# picoord")
    assert "What=10.213.231.11:/gv0\nWhere=/mnt/gv0\nType=glusterfs\n" in text
    assert "Options=_netdev,backup-volfile-servers=10.213.231.12:10.213.231.13\n" in text
    assert "After=network-online.target" in text and "WantedBy=remote-fs.target" in text
    bind = mount_unit_text(UNIT_SPECS[2])
    assert (
        "Type=" not in bind and "Options=bind,ro,nosuid\n" in bind and "RequiresMountsFor=/srv/data" in bind
    )
    assert "WantedBy=local-fs.target" in bind
    assert "Where=/mnt/my-disk%%1" in mount_unit_text(UNIT_SPECS[4])


@pytest.mark.parametrize(
    ("existing", "wanted", "expected"),
    [
        (None, "# picoord: x\n", "write"),
        ("# picoord: x\n", "# picoord: x\n", None),
        ("# picoord: old\n", "# picoord: x\n", "write"),
        ("# picoord: x\n", None, "remove"),
        (None, None, None),
        ("[Mount]\nWhat=/x\n", None, None),  # someone else's, not asked for: left alone
    ],
)
def test_plan_unit(existing: str | None, wanted: str | None, expected: str | None) -> None:
    assert plan_unit(existing, wanted, "mnt-x.mount") == expected


def test_someone_elses_unit_is_a_conflict() -> None:
    with pytest.raises(MountConflict, match="not written by picoord"):
        plan_unit("[Mount]\nWhat=/x\n", "# picoord: x\n", "mnt-x.mount")


# --- mount executors against stand-in files and runner --------------------------------------------------


class MountWorld:
    """Stand-in /proc/self/mountinfo, /etc/fstab, /etc/systemd/system and /run/systemd/system;
    the runner applies mount/umount to the stand-in mountinfo so second runs see them."""

    def __init__(self, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
        self.mountinfo = tmp_path / "mountinfo"
        self.fstab = tmp_path / "etc" / "fstab"
        self.units = tmp_path / "etc" / "systemd" / "system"
        self.systemd = tmp_path / "run" / "systemd" / "system"
        self.units.mkdir(parents=True)
        self.mountinfo.write_text(MOUNTINFO)
        self.fstab.write_text(HOST_FSTAB)
        self.fstab.chmod(0o640)
        self.calls: list[list[str]] = []
        self.enabled: set[str] = set()
        for name, value in (
            ("MOUNTINFO", self.mountinfo),
            ("FSTAB", self.fstab),
            ("UNIT_DIR", self.units),
            ("SYSTEMD_RUNNING", self.systemd),
        ):
            monkeypatch.setattr(mount_actions, name, value)
        self.next_id = 200

    def __call__(self, argv: Sequence[str], timeout: float) -> CommandResult:
        if list(argv[:2]) == ["mount", "--no-canonicalize"]:  # pinned: /proc/PID/fd/N is this process's
            argv = ["mount", *(os.readlink(w) if w.startswith("/proc/") else w for w in argv[2:])]
        argv = list(argv)
        self.calls.append(argv)
        if argv[:2] == ["mount", "-t"]:
            fstype, source, target = argv[2], argv[-2], argv[-1]
            options = argv[argv.index("-o") + 1] if "-o" in argv else "rw"
            self.add_line(
                f"{self.next_id} 50 0:{self.next_id} / {target} rw,relatime - {fstype} {source} rw,{options}"
            )
        elif argv[:2] == ["mkdir", "-p"]:
            os.makedirs(argv[2], exist_ok=True)
        elif argv[0] == "umount":
            lines = self.mountinfo.read_text().splitlines()
            last = max(i for i, line in enumerate(lines) if line.split(" ")[4] == argv[1])
            del lines[last]
            self.mountinfo.write_text("\n".join(lines) + "\n")
        elif argv[:2] == ["systemctl", "is-enabled"]:
            return CommandResult(
                tuple(argv),
                0 if argv[2] in self.enabled else 1,
                "enabled\n" if argv[2] in self.enabled else "disabled\n",
                "",
            )
        elif argv[:2] == ["systemctl", "enable"]:
            self.enabled.add(argv[2])
        elif argv[:2] == ["systemctl", "disable"]:
            self.enabled.discard(argv[2])
        elif argv[:2] == ["systemctl", "daemon-reload"]:
            pass
        else:
            raise AssertionError(f"unexpected command {argv}")
        return CommandResult(tuple(argv), 0, "", "")

    def add_line(self, line: str) -> None:
        self.mountinfo.write_text(self.mountinfo.read_text() + line + "\n")
        self.next_id += 1

    def context(self, dry_run: bool = False) -> ActionContext:
        return context(self, dry_run)


@pytest.fixture
def world(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> MountWorld:
    return MountWorld(tmp_path, monkeypatch)


def records(ctx: ActionContext) -> list[tuple[list[str], bool]]:
    return [(list(record.argv), record.ran) for record in ctx.commands]


def test_tmpfs_with_fstab_dry_run_then_apply_then_unchanged(world: MountWorld, tmp_path: Path) -> None:
    target = str(tmp_path / "scratch")
    request = mount_request(TMPFS, "", target, ["size=1m"], FSTAB)
    line = f"tmpfs {target} tmpfs size=1m 0 0 # picoord"

    ctx = world.context(dry_run=True)
    outcome = mount_actions.mount(request, ctx)
    assert outcome.outcome == agent_pb2.ACTION_OUTCOME_PLANNED, outcome.message
    assert records(ctx) == [
        (["mkdir", "-p", target], False),
        (["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", target], False),
        (["write", str(world.fstab)], False),
    ]
    assert world.calls == [] and world.fstab.read_text() == HOST_FSTAB

    inode = world.fstab.stat().st_ino
    ctx = world.context()
    outcome = mount_actions.mount(request, ctx)
    assert outcome.outcome == agent_pb2.ACTION_OUTCOME_SUCCEEDED, outcome.message
    assert [argv for argv, ran in records(ctx) if ran] == [argv for argv, _ in records(ctx)]
    assert ctx.commands[-1].output_tail == f"+ {line}"
    assert world.fstab.read_text() == HOST_FSTAB + line + "\n"
    assert world.fstab.stat().st_mode & 0o777 == 0o640, "the original mode is kept"
    assert world.fstab.stat().st_ino != inode, "rewritten by rename, not in place"
    assert "takes effect at boot" in outcome.message

    ctx = world.context()
    outcome = mount_actions.mount(request, ctx)
    assert outcome.outcome == agent_pb2.ACTION_OUTCOME_UNCHANGED, outcome.message
    assert not ctx.commands
    assert outcome.in_place.startswith(f"mounted: tmpfs tmpfs on {target}")


def test_fstab_that_is_a_mount_point_is_rewritten_in_place(world: MountWorld, tmp_path: Path) -> None:
    world.add_line(f"90 52 254:0 /tmp/lab/pi1/fs/etc/fstab {world.fstab} rw,relatime - ext4 /dev/vda rw")
    inode = world.fstab.stat().st_ino
    outcome = mount_actions.mount(mount_request(TMPFS, "", str(tmp_path), [], FSTAB), world.context())
    assert outcome.outcome == agent_pb2.ACTION_OUTCOME_SUCCEEDED, outcome.message
    assert world.fstab.stat().st_ino == inode
    assert world.fstab.read_text() == HOST_FSTAB + f"tmpfs {tmp_path} tmpfs defaults 0 0 # picoord\n"


def test_systemd_unit_with_systemd_running(world: MountWorld, tmp_path: Path) -> None:
    world.systemd.mkdir(parents=True)
    target = str(tmp_path / "cache")
    name = systemd_escape_path(target) + ".mount"
    request = mount_request(TMPFS, "", target, [], SYSTEMD)

    ctx = world.context()
    outcome = mount_actions.mount(request, ctx)
    assert outcome.outcome == agent_pb2.ACTION_OUTCOME_SUCCEEDED, outcome.message
    assert [argv for argv, _ in records(ctx)] == [
        ["mkdir", "-p", target],
        ["mount", "-t", "tmpfs", "tmpfs", target],
        ["write", str(world.units / name)],
        ["systemctl", "daemon-reload"],
        ["systemctl", "enable", name],
    ]
    assert (world.units / name).read_text() == mount_unit_text(spec("tmpfs", "tmpfs", target, [], "systemd"))
    assert [fact.value for fact in outcome.facts if fact.key == "mount.unit"] == [name]

    ctx = world.context()
    assert mount_actions.mount(request, ctx).outcome == agent_pb2.ACTION_OUTCOME_UNCHANGED
    assert not ctx.commands

    # Switching to fstab persistence removes the unit (ours) and adds the line.
    world.calls.clear()
    ctx = world.context()
    outcome = mount_actions.mount(mount_request(TMPFS, "", target, [], FSTAB), ctx)
    assert [argv for argv, _ in records(ctx)] == [
        ["write", str(world.fstab)],
        ["systemctl", "disable", name],
        ["remove", str(world.units / name)],
        ["systemctl", "daemon-reload"],
    ]
    assert not (world.units / name).exists()


def test_something_else_mounted_fails_and_changes_nothing(world: MountWorld) -> None:
    before = world.mountinfo.read_text()
    ctx = world.context()
    with pytest.raises(ActionFailed, match=r"/mnt/tv already has fuse.glusterfs 10.213.231.11:/tv"):
        mount_actions.mount(mount_request(TMPFS, "", "/mnt/tv", [], FSTAB), ctx)
    assert not ctx.commands and not world.calls
    assert world.mountinfo.read_text() == before and world.fstab.read_text() == HOST_FSTAB


def test_a_foreign_fstab_line_fails_before_mounting(world: MountWorld, tmp_path: Path) -> None:
    foreign = HOST_FSTAB + f"tmpfs {tmp_path} tmpfs size=9m 0 0\n"
    world.fstab.write_text(foreign)
    ctx = world.context()
    with pytest.raises(ActionFailed, match="picoord did not write"):
        mount_actions.mount(mount_request(TMPFS, "", str(tmp_path), [], FSTAB), ctx)
    assert not ctx.commands and not world.calls and world.fstab.read_text() == foreign


def test_a_symlink_target_into_proc_is_rejected(world: MountWorld, tmp_path: Path) -> None:
    link = tmp_path / "sneaky"
    link.symlink_to("/proc/sys")
    ctx = world.context()
    with pytest.raises(FieldError) as caught:
        mount_actions.mount(mount_request(TMPFS, "", str(link)), ctx)
    assert caught.value.field == "target" and "resolves to /proc/sys" in caught.value.reason
    assert not ctx.commands and not world.calls


def test_a_missing_bind_source_fails(world: MountWorld, tmp_path: Path) -> None:
    with pytest.raises(ActionFailed, match="not an existing directory"):
        mount_actions.mount(mount_request(BIND, str(tmp_path / "nope"), "/mnt/x"), world.context())
    assert not world.calls


def test_unmount_and_forget(world: MountWorld, tmp_path: Path) -> None:
    target = str(tmp_path)
    mount_actions.mount(mount_request(TMPFS, "", target, [], FSTAB), world.context())
    assert f"{target} tmpfs" in world.fstab.read_text()

    ctx = world.context(dry_run=True)
    outcome = mount_actions.unmount(actions_pb2.Unmount(target=target, forget=True), ctx)
    assert outcome.outcome == agent_pb2.ACTION_OUTCOME_PLANNED
    assert records(ctx) == [(["umount", target], False), (["write", str(world.fstab)], False)]

    ctx = world.context()
    outcome = mount_actions.unmount(actions_pb2.Unmount(target=target, forget=True), ctx)
    assert outcome.outcome == agent_pb2.ACTION_OUTCOME_SUCCEEDED, outcome.message
    assert world.fstab.read_text() == HOST_FSTAB
    assert target not in world.mountinfo.read_text()

    ctx = world.context()
    outcome = mount_actions.unmount(actions_pb2.Unmount(target=target, forget=True), ctx)
    assert (
        outcome.outcome == agent_pb2.ACTION_OUTCOME_UNCHANGED
        and outcome.message == f"nothing mounted on {target}"
    )


def test_unmount_leaves_lines_picoord_did_not_write(world: MountWorld) -> None:
    foreign = HOST_FSTAB + "nas:/e /mnt/e nfs defaults 0 0\n"
    world.fstab.write_text(foreign)
    ctx = world.context()
    outcome = mount_actions.unmount(actions_pb2.Unmount(target="/mnt/e", forget=True), ctx)
    assert outcome.outcome == agent_pb2.ACTION_OUTCOME_UNCHANGED
    assert "picoord did not write; left as is" in outcome.message
    assert world.fstab.read_text() == foreign


def test_unmount_of_stacked_mounts_unmounts_each(world: MountWorld) -> None:
    ctx = world.context()
    outcome = mount_actions.unmount(actions_pb2.Unmount(target="/mnt/stack"), ctx)
    assert outcome.outcome == agent_pb2.ACTION_OUTCOME_SUCCEEDED
    assert records(ctx) == [(["umount", "/mnt/stack"], True), (["umount", "/mnt/stack"], True)]
    assert "/mnt/stack" not in world.mountinfo.read_text()


def test_file_writes_keep_owner_and_mode_and_leave_no_temp_files(tmp_path: Path) -> None:
    path = tmp_path / "fstab"
    path.write_text("old\n")
    os.chmod(path, 0o600)
    mount_actions.write_file(path, "new\n")
    assert path.read_text() == "new\n" and path.stat().st_mode & 0o777 == 0o600
    mount_actions.write_file(tmp_path / "fresh", "x\n")
    assert (tmp_path / "fresh").stat().st_mode & 0o777 == 0o644
    assert sorted(p.name for p in tmp_path.iterdir()) == ["fresh", "fstab"]


def test_a_symlink_planted_after_the_check_is_not_followed(tmp_path: Path) -> None:
    """pin_directory opens the checked path component by component without following
    symlinks: swapping a directory for a symlink to /etc between check and mount fails."""
    target = tmp_path / "swap" / "x"
    target.mkdir(parents=True)
    fd = mount_actions.pin_directory(str(target))
    try:
        assert os.readlink(f"/proc/self/fd/{fd}") == str(target)
    finally:
        os.close(fd)
    shutil.rmtree(tmp_path / "swap")
    (tmp_path / "swap").symlink_to("/etc")
    with pytest.raises(ActionFailed, match="changed after it was checked"):
        mount_actions.pin_directory(str(target))


def test_a_symlink_on_the_way_into_a_system_tree_is_refused(world: MountWorld, tmp_path: Path) -> None:
    (tmp_path / "way").symlink_to("/etc")
    ctx = world.context()
    with pytest.raises(FieldError) as caught:
        mount_actions.mount(mount_request(TMPFS, "", str(tmp_path / "way" / "ufw")), ctx)
    assert caught.value.field == "target"
    assert f"goes through the symlink {tmp_path / 'way'} to /etc" in caught.value.reason
    assert not ctx.commands and not world.calls


def test_a_mount_runs_on_the_pinned_directory_and_records_its_path(world: MountWorld, tmp_path: Path) -> None:
    source, target = tmp_path / "src", tmp_path / "dst"
    source.mkdir()
    target.mkdir()
    ran: list[list[str]] = []

    def runner(argv: Sequence[str], timeout: float) -> CommandResult:
        ran.append(list(argv))
        return world(argv, timeout) if argv[:2] != ["mount", "--no-canonicalize"] else ok()

    ctx = context(runner)
    mount_actions.mount(mount_request(BIND, str(source), str(target)), ctx)
    assert [list(c.argv) for c in ctx.commands] == [["mount", "--bind", str(source), str(target)]]
    pid = os.getpid()
    assert ran[0][:3] == ["mount", "--no-canonicalize", "--bind"]
    assert all(word.startswith(f"/proc/{pid}/fd/") for word in ran[0][3:]), ran

"""GlusterFS executors: probe peers into the trusted pool, create and start a volume.

Both go through the `gluster` CLI in script mode (no prompts) and read state from its
`--xml` output, which is stable across releases where the plain text is not. The
decisions are pure functions over parsed data (`plan_peer_probe`, `plan_volume`), tested
with tables; the executors only read, decide, and run what was decided.

What the coordinator must know:
- Run `gluster_peer_probe` on one storage node, naming the others, before
  `gluster_volume`; `volume create` refuses bricks on hosts that are not "Peer in Cluster".
  The probe waits until every probed peer is in the cluster and connected, so a volume
  create right after it does not race the handshake.
- Run `gluster_volume` on one storage node only (any node of the pool). gluster creates
  each brick's directory on its node itself, also on the other nodes, but only the last
  path component: the parent (e.g. /srv/brick for a brick /srv/brick/gv0, usually the
  mount point of the disk that holds the bricks) must exist on every brick node, or the
  create fails with "Failed to create brick directory ... No such file or directory".
- The create always passes `force`: on a Pi the bricks live on the root file system,
  which gluster otherwise refuses. The check in common/checks/storage.py refuses a
  replica set whose bricks share a host, which `force` would otherwise let through.
- An existing volume is never changed: the same bricks and replica count mean UNCHANGED
  (plus a start if asked and not started); anything else is FAILED with both layouts in
  the message, because changing a volume's bricks can lose data and is the operator's call.
"""

from __future__ import annotations

import ipaddress
import socket
import time
import xml.etree.ElementTree as ElementTree
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import psutil

from picoord.agent.actions.base import ActionContext, ActionFailed, Outcome
from picoord.common.checks.storage import VolumeSpec, peers_spec, volume_spec
from picoord.v1 import actions_pb2

GLUSTER = ("gluster", "--mode=script")
READ_TIMEOUT = 30.0
CHANGE_TIMEOUT = 120.0  # gluster's own CLI timeout; a volume start spawns brick processes
PEER_SETTLE_SECONDS = 60.0  # how long a probed peer may take to reach "Peer in Cluster"
PEER_IN_CLUSTER = "Peer in Cluster"
VOLUME_STARTED = "Started"
_NO_SUCH_VOLUME = "does not exist"


class GlusterOutputError(ValueError):
    """The gluster CLI answered something that is not the XML we expect."""


@dataclass(frozen=True)
class Peer:
    uuid: str
    hostnames: tuple[str, ...]  # the names gluster knows it by, first the primary one
    connected: bool
    state: str  # e.g. "Peer in Cluster", "Accepted peer request", "Peer Rejected"

    @property
    def in_cluster(self) -> bool:
        return self.connected and self.state == PEER_IN_CLUSTER


@dataclass(frozen=True)
class VolumeState:
    name: str
    status: str  # Created, Started, Stopped
    replica: int
    bricks: tuple[str, ...]  # HOST:/path, as gluster reports them, in order
    type: str  # Distribute, Replicate, Distributed-Replicate, Disperse, ...
    arbiter: int = 0
    disperse: int = 0
    volume_id: str = ""


# --- parsing ---------------------------------------------------------------------------


def _cli_output(text: str) -> ElementTree.Element:
    try:
        root = ElementTree.fromstring(text)
    except ElementTree.ParseError as error:
        raise GlusterOutputError(f"not gluster XML ({error}): {text.strip()[:200]!r}") from None
    if root.tag != "cliOutput":
        raise GlusterOutputError(f"unexpected XML root <{root.tag}>")
    return root


def _op_error(root: ElementTree.Element) -> str | None:
    """gluster's own error, which it reports with exit code 0 in XML mode."""
    if (root.findtext("opRet") or "0").strip() == "0":
        return None
    return (root.findtext("opErrstr") or "").strip() or f"opErrno {root.findtext('opErrno')}"


def parse_peer_status(text: str) -> list[Peer]:
    """`gluster peer status --xml` -> the other members of the pool (never this node)."""
    root = _cli_output(text)
    error = _op_error(root)
    if error:
        raise GlusterOutputError(f"peer status failed: {error}")
    peers = []
    for node in root.iterfind("./peerStatus/peer"):
        names = [(node.findtext("hostname") or "").strip()]
        names += [(name.text or "").strip() for name in node.iterfind("./hostnames/hostname")]
        unique = tuple(dict.fromkeys(name for name in names if name))
        peers.append(
            Peer(
                uuid=(node.findtext("uuid") or "").strip(),
                hostnames=unique,
                connected=(node.findtext("connected") or "0").strip() == "1",
                state=(node.findtext("stateStr") or "").strip(),
            )
        )
    return peers


def _int(node: ElementTree.Element, tag: str) -> int:
    try:
        return int((node.findtext(tag) or "0").strip())
    except ValueError:
        raise GlusterOutputError(f"<{tag}> is not a number") from None


def parse_volume_info(text: str) -> VolumeState | None:
    """`gluster volume info NAME --xml` -> the volume, or None when it does not exist."""
    root = _cli_output(text)
    error = _op_error(root)
    if error:
        if _NO_SUCH_VOLUME in error:
            return None
        raise GlusterOutputError(f"volume info failed: {error}")
    volumes = root.findall("./volInfo/volumes/volume")
    if not volumes:
        return None
    if len(volumes) > 1:
        raise GlusterOutputError(f"asked for one volume, got {len(volumes)}")
    node = volumes[0]
    bricks = []
    for brick in node.iterfind("./bricks/brick"):
        name = (brick.findtext("name") or brick.text or "").strip()
        bricks.append(name)
    return VolumeState(
        name=(node.findtext("name") or "").strip(),
        status=(node.findtext("statusStr") or "").strip(),
        replica=_int(node, "replicaCount") or 1,
        bricks=tuple(bricks),
        type=(node.findtext("typeStr") or "").strip(),
        arbiter=_int(node, "arbiterCount"),
        disperse=_int(node, "disperseCount"),
        volume_id=(node.findtext("id") or "").strip(),
    )


# --- decisions (pure) --------------------------------------------------------------------


def _same_address(a: str, b: str) -> bool:
    try:
        return ipaddress.ip_address(a) == ipaddress.ip_address(b)
    except ValueError:
        return a.lower() == b.lower()


def _known(name: str, names: Iterable[str]) -> bool:
    return any(_same_address(name, other) for other in names)


def plan_peer_probe(
    wanted: Sequence[str], pool: Sequence[Peer], local_names: Iterable[str]
) -> list[list[str]]:
    """One `peer probe` per wanted peer that is neither this node nor in the pool already.

    Names are compared as gluster reports them (a peer probed by address is known by that
    address); an address is compared as an address (10.0.0.1 == 10.0.0.01 is not a thing,
    but ::1 == 0:0:0:0:0:0:0:1 is)."""
    local = list(local_names)
    known = [name for peer in pool for name in peer.hostnames]
    commands = []
    for peer in wanted:
        if _known(peer, local) or _known(peer, known):
            continue
        commands.append([*GLUSTER, "peer", "probe", peer])
    return commands


def unsettled_peers(wanted: Sequence[str], pool: Sequence[Peer], local_names: Iterable[str]) -> list[str]:
    """The wanted peers (other than this node) that are not yet connected members."""
    local = list(local_names)
    waiting = []
    for name in wanted:
        if _known(name, local):
            continue
        match = [peer for peer in pool if _known(name, peer.hostnames)]
        if not match or not match[0].in_cluster:
            state = "not in the pool" if not match else _describe_peer(match[0])
            waiting.append(f"{name} ({state})")
    return waiting


def _describe_peer(peer: Peer) -> str:
    return f"{peer.state or 'unknown state'}, {'connected' if peer.connected else 'disconnected'}"


class VolumeConflict(ValueError):
    """A volume of that name exists with another layout; it is never changed silently."""


def describe_layout(replica: int, bricks: Sequence[str]) -> str:
    kind = f"replica {replica}" if replica > 1 else "distribute"
    return f"{kind} over {', '.join(bricks)}"


def plan_volume(spec: VolumeSpec, current: VolumeState | None) -> list[list[str]]:
    """Create the volume when absent, start it when asked and not started, nothing else."""
    commands: list[list[str]] = []
    wanted_bricks = [str(brick) for brick in spec.bricks]
    if current is None:
        create = [*GLUSTER, "volume", "create", spec.name]
        if spec.replica > 1:
            create += ["replica", str(spec.replica)]
        commands.append([*create, *wanted_bricks, "force"])
    else:
        same = (
            list(current.bricks) == wanted_bricks
            and current.replica == spec.replica
            and current.arbiter == 0
            and current.disperse == 0
        )
        if not same:
            have = describe_layout(current.replica, current.bricks)
            if current.arbiter or current.disperse:
                have = f"{current.type} ({have})"
            raise VolumeConflict(
                f"volume {spec.name} exists as {have}; the request is "
                f"{describe_layout(spec.replica, wanted_bricks)}. picoord does not change an existing "
                "volume's bricks (that can lose data): change the document, or migrate the volume "
                "by hand with gluster volume add-brick/remove-brick/replace-brick"
            )
    if spec.start and (current is None or current.status != VOLUME_STARTED):
        commands.append([*GLUSTER, "volume", "start", spec.name])
    return commands


# --- the imperative shell ------------------------------------------------------------------


def local_names() -> set[str]:
    """This node's names and addresses, so a probe of itself is recognised and skipped."""
    names = {"localhost", "127.0.0.1", "::1", socket.gethostname()}
    for addresses in psutil.net_if_addrs().values():
        for address in addresses:
            if address.family in (socket.AF_INET, socket.AF_INET6):
                names.add(address.address.split("%")[0])
    return {name for name in names if name}


def _read_xml(context: ActionContext, argv: Sequence[str]) -> str:
    result = context.read(argv, READ_TIMEOUT)
    if not result.ok:
        reason = "timed out" if result.timed_out else f"exited {result.exit_code}"
        output = (result.stdout + result.stderr).strip()[-500:]
        raise ActionFailed(f"{' '.join(argv)} {reason} (is glusterd running?): {output}")
    return result.stdout


def read_pool(context: ActionContext) -> list[Peer]:
    try:
        return parse_peer_status(_read_xml(context, [*GLUSTER, "peer", "status", "--xml"]))
    except GlusterOutputError as error:
        raise ActionFailed(str(error)) from None


def read_volume(context: ActionContext, name: str) -> VolumeState | None:
    try:
        return parse_volume_info(_read_xml(context, [*GLUSTER, "volume", "info", name, "--xml"]))
    except GlusterOutputError as error:
        raise ActionFailed(str(error)) from None


def _peer_facts(pool: Sequence[Peer]) -> list[actions_pb2.Fact]:
    return [
        actions_pb2.Fact(
            key=f"gluster.peer.{peer.hostnames[0] if peer.hostnames else peer.uuid}",
            value=_describe_peer(peer),
        )
        for peer in pool
    ]


def gluster_peer_probe(request: actions_pb2.GlusterPeerProbe, context: ActionContext) -> Outcome:
    """Bring the named storage nodes into this node's trusted pool."""
    wanted = peers_spec(request)
    names = local_names()
    pool = read_pool(context)
    commands = plan_peer_probe(wanted, pool, names)
    present = [name for name in wanted if not any(command[-1] == name for command in commands)]
    in_place = f"in the pool already: {', '.join(present)}" if present else ""
    for argv in commands:
        context.change(argv, CHANGE_TIMEOUT)
    if commands and not context.dry_run:
        deadline = time.monotonic() + PEER_SETTLE_SECONDS
        while True:
            pool = read_pool(context)
            waiting = unsettled_peers(wanted, pool, names)
            if not waiting:
                break
            if time.monotonic() > deadline:
                raise ActionFailed(f"probed peers did not join the cluster: {'; '.join(waiting)}")
            context.remaining(1.0)  # raises when the action's own time is up
            time.sleep(0.5)
    probed = [argv[-1] for argv in commands]
    waiting = [] if context.dry_run else unsettled_peers(wanted, pool, names)
    if context.dry_run and probed:
        message = f"would probe {', '.join(probed)}"
    elif probed:
        message = f"probed {', '.join(probed)}; all {len(wanted)} peer(s) in the cluster"
    else:
        message = f"all {len(wanted)} peer(s) in the pool already"
    if waiting:
        message += f"; not connected: {'; '.join(waiting)}"
    outcome = Outcome.done(context, message, in_place)
    outcome.facts.extend(_peer_facts(pool))
    return outcome


def gluster_volume(request: actions_pb2.GlusterVolume, context: ActionContext) -> Outcome:
    """Create the volume if absent and start it if asked; never change an existing one."""
    spec = volume_spec(request)
    current = read_volume(context, spec.name)
    try:
        commands = plan_volume(spec, current)
    except VolumeConflict as error:
        raise ActionFailed(str(error)) from None
    in_place = ""
    if current is not None:
        layout = describe_layout(current.replica, current.bricks)
        in_place = f"volume {spec.name} exists ({current.status}, {layout})"
    for argv in commands:
        context.change(argv, CHANGE_TIMEOUT)
    state = current
    if commands and not context.dry_run:
        state = read_volume(context, spec.name)
        if state is None:
            raise ActionFailed(f"volume {spec.name} is missing right after it was created")
    verbs = [argv[len(GLUSTER) + 1] for argv in commands]  # create, start
    if not commands:
        message = f"volume {spec.name} in place" + (" and started" if spec.start else "")
    elif context.dry_run:
        message = f"would {' and '.join(verbs)} volume {spec.name}"
    else:
        done = {"create": "created", "start": "started"}
        message = f"volume {spec.name} {' and '.join(done[verb] for verb in verbs)}"
    outcome = Outcome.done(context, message, in_place)
    if state is not None:
        prefix = f"gluster.volume.{state.name}"
        outcome.facts.extend(
            [
                actions_pb2.Fact(key=f"{prefix}.status", value=state.status),
                actions_pb2.Fact(key=f"{prefix}.id", value=state.volume_id),
                actions_pb2.Fact(key=f"{prefix}.type", value=state.type),
                actions_pb2.Fact(key=f"{prefix}.bricks", value=",".join(state.bricks)),
            ]
        )
    return outcome

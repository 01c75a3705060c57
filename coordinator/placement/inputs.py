"""From what the coordinator holds (a node's Hardware, its latest MetricsSample, labels,
session and drain state) to the scheduler's plain data, in one place.

Pure conversions, so the reconcile loop stays a thin shell and the scheduler never sees
protobuf. The SoC temperature is picked by telemetry's one rule (`soc_temperature`);
throttling bits count only when the agent could read them (`throttled_available`).

Node restriction (in the spirit of Kubernetes' NodeRestriction admission plugin): what
places workloads is the coordinator's record, never a node's later word. The hardware
that counts is the one recorded at the node's first hello (or accepted by an operator
since); a hello that reports other arch, cores, memory or GPUs is held from placement
until `coordctl node accept`. `node.role` comes from the membership actions the
coordinator ran (`roles_from_actions`), and `node.hostname` never names another node.
"""

from __future__ import annotations

from collections.abc import Collection, Iterable, Mapping
from dataclasses import dataclass, field

from picoord.coordinator.ctl.output import human_bytes
from picoord.coordinator.placement.constraints import NodeFacts
from picoord.coordinator.placement.scheduler import Load, Node
from picoord.coordinator.telemetry import soc_temperature
from picoord.v1 import admin_pb2, agent_pb2, node_pb2

MANAGER, WORKER = "manager", "worker"
# Membership actions that make their node a control-plane node, and those that end that.
_MANAGER_KINDS = frozenset({"swarm_init", "kubeadm_init", "k3s_server"})
MEMBERSHIP_KINDS = _MANAGER_KINDS | {
    "swarm_join",
    "kubeadm_join",
    "k3s_agent",
    "swarm_leave",
    "kubeadm_reset",
    "k3s_uninstall",
}
_TOOK_EFFECT = (agent_pb2.ACTION_OUTCOME_SUCCEEDED, agent_pb2.ACTION_OUTCOME_UNCHANGED)


def load_from_sample(sample: node_pb2.MetricsSample | None) -> Load:
    """The scheduler's view of a node's load; all unknown without a sample yet."""
    if sample is None:
        return Load()
    return Load(
        cpu_percent=sample.cpu_percent,
        memory_available_bytes=sample.memory_available_bytes if sample.memory_total_bytes else None,
        soc_celsius=soc_temperature(sample),
        throttled=sample.throttled if sample.throttled_available else 0,
    )


@dataclass(frozen=True)
class Enrolled:
    """The coordinator's record of a node, against which its reports are claims.

    `hardware` is what its first hello reported (or what an operator accepted since); None
    before any hello. `pending_labels` are the keys it asked for at join and no operator or
    token granted: no placement fact. `node_names` are every node's names by their casefold
    (`names_by_fold`): a hostname claiming another node's name is no `node.hostname` fact."""

    hardware: node_pb2.Hardware | None
    pending_labels: Collection[str] = field(default_factory=frozenset)
    node_names: Mapping[str, Collection[str]] = field(default_factory=dict)


def hardware_changes(recorded: node_pb2.Hardware, reported: node_pb2.Hardware) -> list[str]:
    """What placement would read differently in `reported`: one line per changed fact
    (arch, cores, memory, GPUs), e.g. "memory 1.0 GiB -> 64.0 GiB"; [] when none did."""
    changes = []
    if recorded.arch != reported.arch:
        changes.append(f"arch {recorded.arch or '-'} -> {reported.arch or '-'}")
    if recorded.cpu_cores != reported.cpu_cores:
        changes.append(f"cores {recorded.cpu_cores} -> {reported.cpu_cores}")
    if recorded.memory_total_bytes != reported.memory_total_bytes:
        before, after = human_bytes(recorded.memory_total_bytes), human_bytes(reported.memory_total_bytes)
        changes.append(f"memory {before} -> {after}")
    gpus = [(gpu.vendor, gpu.name, gpu.memory_bytes) for gpu in recorded.gpus]
    if gpus != [(gpu.vendor, gpu.name, gpu.memory_bytes) for gpu in reported.gpus]:
        changes.append(f"gpus {len(recorded.gpus)} -> {len(reported.gpus)}")
    return changes


def accepted_labels(labels: Mapping[str, str], pending: Collection[str]) -> dict[str, str]:
    """The labels that select nodes (placement, apply selectors): all but those still pending."""
    return {key: value for key, value in labels.items() if key not in pending}


def names_by_fold(names: Iterable[str]) -> dict[str, frozenset[str]]:
    """Node names by their casefold, as constraints match them: built once for the whole
    inventory, so checking a node's hostname costs one lookup, not a pass over every node
    (at 5,000 nodes that pass, for each node with a new sample, was the coordinator's
    biggest cost)."""
    index: dict[str, set[str]] = {}
    for name in names:
        index.setdefault(name.casefold(), set()).add(name)
    return {fold: frozenset(held) for fold, held in index.items()}


def hostname_fact(name: str, hostname: str, node_names: Mapping[str, Collection[str]]) -> str:
    """The hostname `node.hostname` may also match: "" when it names another node (a node
    cannot pull that node's pinned workloads by calling itself after it). `node_names` is
    `names_by_fold` of every node."""
    holders = node_names.get(hostname.casefold(), ())
    return "" if any(holder != name for holder in holders) else hostname


def _latest_effective(records: Iterable[admin_pb2.ActionRecord], kinds: Collection[str]) -> dict[str, str]:
    """node -> the kind of its latest action of `kinds` that took effect (not a dry run)."""
    latest: dict[str, tuple[float, str]] = {}
    for record in records:
        if record.kind not in kinds or record.dry_run or record.outcome not in _TOOK_EFFECT:
            continue
        when = record.finished_at or record.started_at
        if record.node not in latest or when >= latest[record.node][0]:
            latest[record.node] = (when, record.kind)
    return {node: kind for node, (_, kind) in sorted(latest.items())}


def roles_from_actions(records: Iterable[admin_pb2.ActionRecord]) -> dict[str, str]:
    """node -> MANAGER or WORKER, from the cluster-membership actions the coordinator ran:
    the latest one that took effect (not a dry run) decides. Nodes absent never joined."""
    latest = _latest_effective(records, MEMBERSHIP_KINDS)
    return {node: MANAGER if kind in _MANAGER_KINDS else WORKER for node, kind in latest.items()}


_SWARM_ROLE = {"swarm_init": MANAGER, "swarm_join": WORKER, "swarm_leave": ""}


def swarm_members(records: Iterable[admin_pb2.ActionRecord]) -> dict[str, str]:
    """node -> MANAGER or WORKER for the nodes in the Docker Swarm the coordinator made: their
    latest swarm init/join/leave action that took effect (not a dry run) decides, and a node
    whose latest was a leave is in no Swarm (unlike roles_from_actions, which says worker)."""
    latest = _latest_effective(records, _SWARM_ROLE)
    return {node: _SWARM_ROLE[kind] for node, kind in latest.items() if _SWARM_ROLE[kind]}


def node_from(
    name: str,
    hardware: node_pb2.Hardware,
    sample: node_pb2.MetricsSample | None,
    labels: Mapping[str, str],
    ready: bool,
    draining: bool = False,
    role: str = WORKER,
    enrolled: Enrolled | None = None,
    swarm: bool = False,
) -> Node:
    """The scheduler's node. With `enrolled`, placement reads the recorded hardware, not
    `hardware` (the latest hello): a hello that changed it holds the node (`Node.held`);
    labels still pending are left out."""
    held: tuple[str, ...] = ()
    hostname = hardware.hostname
    if enrolled is not None:
        recorded = enrolled.hardware if enrolled.hardware is not None else hardware
        held = tuple(hardware_changes(recorded, hardware))
        hardware = recorded
        hostname = hostname_fact(name, recorded.hostname, enrolled.node_names)
        labels = accepted_labels(labels, enrolled.pending_labels)
    facts = NodeFacts(
        name, arch=hardware.arch, hostname=hostname, role=role, labels=dict(labels), swarm=swarm
    )
    return Node(
        facts,
        memory_bytes=hardware.memory_total_bytes,
        cpu_cores=hardware.cpu_cores,
        gpus=len(hardware.gpus),
        ready=ready,
        draining=draining,
        held=held,
        load=load_from_sample(sample),
    )

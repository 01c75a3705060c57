"""Where new replicas go: a pure function over nodes, what already runs, and a request.

No I/O and no clock, like Nomad's scheduler: the shell passes the inventory, the latest
streamed metrics and the replicas it knows of, and gets back a node per new replica or,
for each node that cannot take one, why not, aggregated the way Kubernetes reports a
FailedScheduling: `0/5 nodes available: 3 node.arch != aarch64, 2 insufficient memory
(256 MiB requested, 180 MiB allocatable)`.

Feasibility, checked in this order per node (the first failure is the node's reason):
not ready (no live session), draining, a constraint, the spread's per-node maximum,
memory, CPU, GPUs (a request of 0 always fits that resource, as a best-effort pod
does). Resources count *requests*, never live usage, so a decision does not change with
a noisy sample and a replica that has just started is not counted twice:
allocatable = total - system reserve - requests of what is already placed there. The
reserve is max(10% of total, 128 MiB): on a 1 GB Pi that keeps 128 MiB for the OS,
dockerd and the agent (~896 MiB allocatable); on the 55 GB desktop it keeps 5.5 GB.
CPU is not reserved (it is compressible; an overloaded Pi scores worse instead).

Choice among feasible nodes, in this order:
1. Cool before hot. A node is *hot* when its SoC is at or above 80 C (the Pi firmware
   starts soft-throttling at 80 C) or its firmware reports a condition *now*
   (under-voltage, frequency capped, throttled, soft temperature limit: bits 0-3 of
   `get_throttled`). Hot nodes are a last resort, used only when no cool node fits: a
   slow replica beats none on a small lab, and each such placement comes with a warning.
2. Spread: the spread label's value with the fewest replicas of this service, then the
   node with the fewest replicas of this service (Swarm's spread, fewest first).
3. Load score (lower is better), from the streamed metrics:
      0.4 * CPU busy fraction                       (no sample: 0.5)
    + 0.3 * memory pressure = max(requested fraction after this replica,
                                  live used fraction)
    + 0.2 * temperature, 0 at 50 C or below up to 1 at 80 C   (no sensor: 0)
    + 0.1 if throttling or under-voltage happened since boot (bits 16-19)
4. Node name, so equal inputs always give the same answer.

A global service gets one replica on every ready, non-draining node that matches its
constraints and has room, hot or not (a warning says so); a matching node without room
is reported as a pending replica.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field

from picoord.common.pi_throttled_flags import describe_throttled
from picoord.common.validation import FieldError
from picoord.coordinator.placement.constraints import Constraint, NodeFacts, Spread, first_unmet

MIB = 1024 * 1024
RESERVE_FRACTION = 0.10
RESERVE_MIN_BYTES = 128 * MIB
HOT_CELSIUS = 80.0
WARM_FROM_CELSIUS = 50.0
THROTTLED_NOW_MASK = 0xF  # bits 0-3: conditions now
THROTTLED_SINCE_BOOT_MASK = 0xF << 16  # bits 16-19: the same conditions since boot
ALL_GPUS = -1  # a request for every GPU of a node (Docker's `count: -1`)


@dataclass(frozen=True)
class Load:
    """The latest streamed metrics of a node; None where the node has no such sensor."""

    cpu_percent: float | None = None
    memory_available_bytes: int | None = None
    soc_celsius: float | None = None
    throttled: int = 0  # `vcgencmd get_throttled` bits (common/pi_throttled_flags.py)


@dataclass(frozen=True)
class Node:
    facts: NodeFacts
    memory_bytes: int
    cpu_cores: int
    gpus: int = 0
    ready: bool = True  # a live session
    draining: bool = False
    # hardware changes the node reported since enrollment, not yet accepted: no new replicas
    held: tuple[str, ...] = ()
    load: Load = field(default_factory=Load)

    @property
    def name(self) -> str:
        return self.facts.name


@dataclass(frozen=True)
class Placed:
    """A replica that exists (or is being started) and holds its requests on a node."""

    service: str
    node: str
    memory_bytes: int = 0
    cpu_millis: int = 0
    gpus: int = 0


@dataclass(frozen=True)
class Request:
    """Place `replicas` new replicas of `service` (ignored in global mode: one per node)."""

    service: str
    replicas: int = 1
    global_mode: bool = False
    memory_bytes: int = 0
    cpu_millis: int = 0
    gpus: int = 0  # ALL_GPUS for every GPU of the node
    constraints: tuple[Constraint, ...] = ()
    spread: Spread = field(default_factory=Spread)
    swarm_only: bool = False  # a stack's service on Swarm overlay networks: Swarm nodes only


@dataclass(frozen=True)
class Placement:
    assignments: tuple[str, ...]  # a node per new replica, in order
    unplaced: int = 0  # replicas that found no node
    reason: str = ""  # why not, when unplaced (or nothing matched a global service)
    rejected: Mapping[str, str] = field(default_factory=dict)  # node -> why, when the reason was made
    warnings: tuple[str, ...] = ()

    @property
    def complete(self) -> bool:
        return self.unplaced == 0 and not self.reason


@dataclass(frozen=True)
class SchedulerConfig:
    reserve_fraction: float = RESERVE_FRACTION
    reserve_min_bytes: int = RESERVE_MIN_BYTES
    hot_celsius: float = HOT_CELSIUS


def reserve_bytes(total: int, config: SchedulerConfig = SchedulerConfig()) -> int:
    return max(config.reserve_min_bytes, math.ceil(total * config.reserve_fraction))


def mebibytes(size: int) -> str:
    """Whole MiB for messages (a request rounds up, so it never looks like it fits)."""
    return f"{math.ceil(size / MIB)} MiB"


def _allocatable_mebibytes(size: int) -> str:
    return f"{max(0, size) // MIB} MiB"


def millicpus(millis: int) -> str:
    return f"{millis}m"


def is_hot(node: Node, config: SchedulerConfig = SchedulerConfig()) -> bool:
    load = node.load
    hot = load.soc_celsius is not None and load.soc_celsius >= config.hot_celsius
    return hot or bool(load.throttled & THROTTLED_NOW_MASK)


def hot_reason(node: Node, config: SchedulerConfig = SchedulerConfig()) -> str:
    parts = []
    if node.load.soc_celsius is not None and node.load.soc_celsius >= config.hot_celsius:
        parts.append(f"{node.load.soc_celsius:.0f} C")
    parts.extend(describe_throttled(node.load.throttled & THROTTLED_NOW_MASK))
    return ", ".join(parts)


class _Usage:
    """Requests held per node, and replicas of the service per node."""

    def __init__(self, nodes: Sequence[Node], placed: Iterable[Placed], request: Request) -> None:
        self.memory: Counter[str] = Counter()
        self.cpu: Counter[str] = Counter()
        self.gpus: Counter[str] = Counter()
        self.gpus_all: set[str] = set()
        self.of_service: Counter[str] = Counter()
        self.by_name = {node.name: node for node in nodes}
        for replica in placed:
            self.add(replica.node, replica.memory_bytes, replica.cpu_millis, replica.gpus)
            if replica.service == request.service:
                self.of_service[replica.node] += 1

    def add(self, node: str, memory: int, cpu: int, gpus: int) -> None:
        self.memory[node] += memory
        self.cpu[node] += cpu
        if gpus == ALL_GPUS:
            self.gpus_all.add(node)
        else:
            self.gpus[node] += gpus


@dataclass(frozen=True)
class _Rejection:
    kind: str  # groups nodes in the summary
    text: str  # this node's own words
    allocatable: int = 0  # memory/cpu/gpu left, for the summary's "at most"


def _reject(node: Node, request: Request, usage: _Usage, config: SchedulerConfig) -> _Rejection | None:
    if not node.ready:
        return _Rejection("not ready", "not ready")
    if node.draining:
        return _Rejection("draining", "draining")
    if node.held:
        return _Rejection(
            "held (hardware claim)",
            f"held: it reports {', '.join(node.held)} (coordctl node accept {node.name})",
        )
    unmet = first_unmet(request.constraints, node.facts)
    if unmet is not None:
        return _Rejection(unmet.unmet(), unmet.unmet())
    if request.swarm_only and not node.facts.swarm:
        return _Rejection("not in the Swarm", "not in the Swarm (the stack's overlay networks need it)")
    limit = request.spread.max_per_node
    if limit and usage.of_service[node.name] >= limit:
        text = f"already running {request.service} (max {limit} per node)"
        return _Rejection(text, text)
    memory_left = node.memory_bytes - reserve_bytes(node.memory_bytes, config) - usage.memory[node.name]
    if request.memory_bytes and request.memory_bytes > memory_left:
        return _Rejection(
            "insufficient memory",
            f"insufficient memory ({mebibytes(request.memory_bytes)} requested, "
            f"{_allocatable_mebibytes(memory_left)} allocatable)",
            memory_left,
        )
    cpu_left = node.cpu_cores * 1000 - usage.cpu[node.name]
    if request.cpu_millis and request.cpu_millis > cpu_left:
        return _Rejection(
            "insufficient cpu",
            f"insufficient cpu ({millicpus(request.cpu_millis)} requested, "
            f"{millicpus(max(0, cpu_left))} allocatable)",
            cpu_left,
        )
    if request.gpus:
        gpus_left = 0 if node.name in usage.gpus_all else node.gpus - usage.gpus[node.name]
        wanted = 1 if request.gpus == ALL_GPUS else request.gpus
        whole = request.gpus == ALL_GPUS and gpus_left < node.gpus
        if wanted > gpus_left or whole:
            shown = "all" if request.gpus == ALL_GPUS else str(request.gpus)
            return _Rejection(
                "insufficient gpu",
                f"insufficient gpu ({shown} requested, {max(0, gpus_left)} free)",
                gpus_left,
            )
    return None


def _summary_text(kind: str, members: list[_Rejection], request: Request) -> str:
    if kind == "insufficient memory":
        most = max(member.allocatable for member in members)
        prefix = "" if all(member.allocatable == most for member in members) else "at most "
        return (
            f"insufficient memory ({mebibytes(request.memory_bytes)} requested, "
            f"{prefix}{_allocatable_mebibytes(most)} allocatable)"
        )
    if kind == "insufficient cpu":
        most = max(member.allocatable for member in members)
        prefix = "" if all(member.allocatable == most for member in members) else "at most "
        return (
            f"insufficient cpu ({millicpus(request.cpu_millis)} requested, "
            f"{prefix}{millicpus(max(0, most))} allocatable)"
        )
    if kind == "insufficient gpu":
        most = max(member.allocatable for member in members)
        shown = "all" if request.gpus == ALL_GPUS else str(request.gpus)
        prefix = "" if all(member.allocatable == most for member in members) else "at most "
        return f"insufficient gpu ({shown} requested, {prefix}{max(0, most)} free)"
    return kind


def explain(total: int, available: int, rejections: Mapping[str, _Rejection], request: Request) -> str:
    """`0/5 nodes available: 3 node.arch != aarch64, 2 insufficient memory (...)`."""
    groups: dict[str, list[_Rejection]] = {}
    for name in sorted(rejections):
        groups.setdefault(rejections[name].kind, []).append(rejections[name])
    parts = sorted(
        ((len(members), _summary_text(kind, members, request)) for kind, members in groups.items()),
        key=lambda item: (-item[0], item[1]),
    )
    reasons = ", ".join(f"{count} {text}" for count, text in parts)
    head = f"{available}/{total} nodes available"
    return f"{head}: {reasons}" if reasons else head


def load_score(
    node: Node, placed_memory: int, request_memory: int, config: SchedulerConfig = SchedulerConfig()
) -> float:
    """Lower is better; see the module docstring for the weights. `placed_memory` is what
    replicas already request on the node, `request_memory` what the new one asks."""
    load = node.load
    cpu = 0.5 if load.cpu_percent is None else min(max(load.cpu_percent, 0.0), 100.0) / 100.0
    allocatable = max(1, node.memory_bytes - reserve_bytes(node.memory_bytes, config))
    requested = (placed_memory + request_memory) / allocatable
    live = 0.0
    if load.memory_available_bytes is not None and node.memory_bytes > 0:
        live = 1.0 - load.memory_available_bytes / node.memory_bytes
    memory = min(max(requested, live, 0.0), 1.0)
    temperature = 0.0
    if load.soc_celsius is not None:
        span = config.hot_celsius - WARM_FROM_CELSIUS
        temperature = min(max((load.soc_celsius - WARM_FROM_CELSIUS) / span, 0.0), 1.0)
    history = 1.0 if load.throttled & THROTTLED_SINCE_BOOT_MASK else 0.0
    return 0.4 * cpu + 0.3 * memory + 0.2 * temperature + 0.1 * history


def _local_rank(node: Node, request: Request, usage: _Usage, config: SchedulerConfig) -> tuple:
    """The parts of a node's rank that only its own replicas change."""
    score = round(load_score(node, usage.memory[node.name], request.memory_bytes, config), 9)
    return (is_hot(node, config), usage.of_service[node.name], score, node.name)


def place(
    nodes: Sequence[Node],
    placed: Iterable[Placed],
    request: Request,
    config: SchedulerConfig = SchedulerConfig(),
) -> Placement:
    """A node for each new replica of `request`, or why not (module docstring)."""
    usage = _Usage(nodes, placed, request)
    ordered = sorted(nodes, key=lambda node: node.name)
    if request.global_mode:
        return _place_global(ordered, request, usage, config)
    spread_error = _spread_shortfall(ordered, request, usage)
    label = request.spread.over_label
    groups: Counter[str | None] = Counter()
    if label:
        for name, count in usage.of_service.items():
            if name in usage.by_name:
                groups[usage.by_name[name].facts.labels.get(label)] += count
    # Only the chosen node's own checks and rank change from one replica to the next.
    rejections = {node.name: _reject(node, request, usage, config) for node in ordered}
    local = {node.name: _local_rank(node, request, usage, config) for node in ordered}

    def rank(node: Node) -> tuple:
        hot, *rest = local[node.name]
        group = groups[node.facts.labels.get(label)] if label else 0
        return (hot, group, *rest)

    assignments: list[str] = []
    warnings: list[str] = []
    for _ in range(request.replicas):
        feasible = [node for node in ordered if rejections[node.name] is None]
        if not feasible:
            break
        best = min(feasible, key=rank)
        if is_hot(best, config):
            warnings.append(f"{best.name} is hot ({hot_reason(best, config)}) but no cool node fits")
        assignments.append(best.name)
        usage.add(best.name, request.memory_bytes, request.cpu_millis, request.gpus)
        usage.of_service[best.name] += 1
        if label:
            groups[best.facts.labels.get(label)] += 1
        rejections[best.name] = _reject(best, request, usage, config)
        local[best.name] = _local_rank(best, request, usage, config)
    rejected = {name: rejection for name, rejection in rejections.items() if rejection is not None}
    unplaced = request.replicas - len(assignments)
    reason = ""
    if unplaced:
        reason = explain(len(ordered), 0, rejected, request)
        if spread_error:
            reason = f"{spread_error}; {reason}"
    return Placement(
        tuple(assignments),
        unplaced,
        reason,
        {name: rejection.text for name, rejection in rejected.items()},
        tuple(warnings),
    )


def _eligible_for_spread(node: Node, request: Request) -> bool:
    return (
        node.ready
        and not node.draining
        and not node.held
        and first_unmet(request.constraints, node.facts) is None
    )


def _spread_shortfall(nodes: Sequence[Node], request: Request, usage: _Usage) -> str:
    """The plain error when a per-node maximum cannot hold the replicas on matching nodes."""
    limit = request.spread.max_per_node
    if not limit:
        return ""
    wanted = request.replicas + sum(usage.of_service.values())
    eligible = [node for node in nodes if _eligible_for_spread(node, request)]
    if wanted <= limit * len(eligible):
        return ""
    return (
        f"{wanted} replicas of {request.service} with at most {limit} per node need "
        f"{math.ceil(wanted / limit)} nodes; {len(eligible)} of {len(nodes)} are ready and match"
    )


def check_spread(field: str, replicas: int, spread: Spread, matching_nodes: int) -> None:
    """Refuse a spec up front when its per-node maximum cannot hold its replica count."""
    if spread.max_per_node and replicas > spread.max_per_node * matching_nodes:
        raise FieldError(
            field,
            f"{replicas} replicas with at most {spread.max_per_node} per node need "
            f"{math.ceil(replicas / spread.max_per_node)} nodes, but only {matching_nodes} match",
        )


def _place_global(
    nodes: Sequence[Node], request: Request, usage: _Usage, config: SchedulerConfig
) -> Placement:
    """One replica on every matching ready node that has none; the others say why."""
    assignments: list[str] = []
    warnings: list[str] = []
    rejected: dict[str, _Rejection] = {}
    matched = 0
    pending = 0
    for node in nodes:
        if usage.of_service[node.name]:
            matched += 1
            continue
        rejection = _reject(node, request, usage, config)
        if rejection is None:
            matched += 1
            assignments.append(node.name)
            if is_hot(node, config):
                warnings.append(f"{node.name} is hot ({hot_reason(node, config)}); global replica placed")
            continue
        rejected[node.name] = rejection
        if rejection.kind.startswith("insufficient"):
            matched += 1
            pending += 1
    reason = ""
    if pending or not matched:
        reason = explain(len(nodes), len(nodes) - len(rejected), rejected, request)
    return Placement(
        tuple(assignments),
        pending,
        reason,
        {name: rejection.text for name, rejection in rejected.items()},
        tuple(warnings),
    )

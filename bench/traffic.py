"""Traffic: a steady client against picoord's virtual address (VIP) and against Docker Swarm's
routing mesh, on the same lab Pis, with the same images and health check, in one run.

One run brings up a lab (sandboxes, a dockerd in every Pi, the lab registry; traffic stays
inside the lab's namespaces and the lab bridge), forms a real Swarm of the same Pis
(picoord's own ClusterMembership apply) and pulls mcp:1 and mcp:2 on every Pi. A client on
the lab bridge (where a LAN client would be) sends GET /version at a steady `--rate`
(50 requests/s), a new connection each, 1 s timeout, and records every answer. Then, one
system after the other (both publish 8080):

picoord: a stack of one service, 2 replicas of mcp:1 at most one per Pi, port 8080
published, `healthcheck: wget /health` every 1 s (3 retries), stop-first updates with a 5 s
monitor, deployed with `coordctl stack deploy --address VIP`:
1. **steady**: `--steady` seconds against a replica addressed directly (the VIP holder's
   own address) and, at the same time, against the VIP: p50/p99 latency, answered/s;
2. **rollout**: the client on the VIP during `coordctl rollout mcp --image mcp:2`: failed
   requests;
3. **failover**: the Pi holding the VIP taken away (link down, agent, dockerd and
   containerd frozen) for `--away` seconds: seconds with failed requests.

Swarm: `docker service create` of the same workload (`--publish 8080`, ingress mode: the
routing mesh), the same health check run by `wget` in the container; the client on the
manager Pi's address, which is never taken away (the mesh needs IPVS in the kernel; without
it the Swarm half says so and is not measured):
1. **steady** through the mesh; 2. `docker service update --image mcp:2`: failed
requests; 3. a Pi with a task (not the manager) taken away the same way.

    .venv/bin/python bench/traffic.py [--rate 50] [--steady 20] [--away 20] [--strict] [--json F]

Targets (issue 13): zero failed requests during the rollout; at most 5 s with failed
requests when a Pi is taken away; steady p50 through the VIP within 10 % of a replica
addressed directly. Exit status as in bench/README.md: 0 ran, 1 with --strict and a target
missed, 2 could not run, 130 interrupted. Run as root.
"""

from __future__ import annotations

import argparse
import http.client
import statistics
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from _common import BenchError, bench_workspace, finish_lab_bench, table, verdict
from failover import outage
from rollout_vs_swarm import (
    SERVICE,
    SwarmView,
    Workload,
    coordctl,
    docker,
    form_swarm,
    image_ref,
    lab_up,
    prepull,
    wait_until,
)

from picoord.lab.cluster import Lab

PORT = 8080
REPLICAS = 2
FAILOVER_TARGET = 5.0
LATENCY_TARGET = 1.10  # VIP p50 / direct p50
POLL = 0.2


# --- the client ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Sample:
    at: float  # monotonic send time
    ok: bool
    latency: float


def get_version(address: str, timeout: float = 1.0) -> bool:
    """GET /version on a new connection: answered by an mcp stand-in or not."""
    try:
        connection = http.client.HTTPConnection(address, PORT, timeout=timeout)
        try:
            connection.request("GET", "/version")
            reply = connection.getresponse()
            return reply.status == 200 and reply.read().startswith(b"mcp ")
        finally:
            connection.close()
    except OSError:
        return False


class SteadyClient:
    """GET /version at a fixed rate, each on a new connection (as a browser's first request
    or a health checker's), from a pool so a slow answer does not delay the next send."""

    def __init__(self, address: str, rate: float, timeout: float = 1.0) -> None:
        self.address, self.rate, self.timeout = address, rate, timeout
        self.samples: list[Sample] = []
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._pool = ThreadPoolExecutor(max(4, int(rate * timeout) + 4))
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _get(self, sent: float) -> None:
        ok = get_version(self.address, self.timeout)
        sample = Sample(sent, ok, time.monotonic() - sent)
        with self._lock:
            self.samples.append(sample)

    def _run(self) -> None:
        step = 1.0 / self.rate
        due = time.monotonic()
        while not self._stop.is_set():
            self._pool.submit(self._get, due)
            due += step
            pause = due - time.monotonic()
            if pause > 0:
                self._stop.wait(pause)

    def __enter__(self) -> SteadyClient:
        self._thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self._stop.set()
        self._thread.join()
        self._pool.shutdown(wait=True)

    def between(self, start: float, end: float) -> list[Sample]:
        with self._lock:
            return sorted((s for s in self.samples if start <= s.at < end), key=lambda s: s.at)


@dataclass
class Steady:
    p50_ms: float | None = None
    p99_ms: float | None = None
    per_second: float | None = None
    failed: int = 0


def steady_figures(samples: list[Sample], seconds: float) -> Steady:
    answered = sorted(s.latency for s in samples if s.ok)
    if not answered:
        return Steady(failed=len(samples))
    p99 = answered[min(len(answered) - 1, int(len(answered) * 0.99))]
    return Steady(
        p50_ms=statistics.median(answered) * 1000,
        p99_ms=p99 * 1000,
        per_second=len(answered) / seconds,
        failed=len(samples) - len(answered),
    )


def failed_seconds(samples: list[Sample], start: float) -> int:
    """How many whole seconds (counted from `start`) had a failed request."""
    return len({int(s.at - start) for s in samples if not s.ok})


def measure(addresses: list[str], rate: float, seconds: float) -> list[Steady]:
    """Steady figures for each address, measured at once (a client each, in the same window,
    so a busy machine weighs on both alike)."""
    clients = [SteadyClient(address, rate) for address in addresses]
    for client in clients:
        client.__enter__()
    start = time.monotonic()
    try:
        time.sleep(seconds)
    finally:
        end = time.monotonic()
        for client in clients:
            client.__exit__()
    return [steady_figures(client.between(start, end), end - start) for client in clients]


# --- results ---------------------------------------------------------------------------------------


@dataclass
class SystemFigures:
    system: str
    steady: Steady = field(default_factory=Steady)
    rollout_failed: int | None = None
    rollout_requests: int = 0
    failover_failed_seconds: int | None = None
    failover_failed: int = 0
    taken_away: str = ""


@dataclass
class Result:
    direct: Steady = field(default_factory=Steady)
    picoord: SystemFigures = field(default_factory=lambda: SystemFigures("picoord VIP"))
    swarm: SystemFigures = field(default_factory=lambda: SystemFigures("swarm mesh"))
    settings: dict[str, Any] = field(default_factory=dict)
    errors: list[str] = field(default_factory=list)


# --- picoord ---------------------------------------------------------------------------------------


def stack_file(image: str, work: Workload, network_mode: str = "overlay") -> str:
    return f"""\
x-picoord: {{network_mode: {network_mode}}}
services:
  {SERVICE}:
    image: {image}
    ports: ["{PORT}:{PORT}"]
    stop_grace_period: {work.stop_grace:g}s
    healthcheck:
      test: ["CMD", "wget", "-q", "-O", "/dev/null", "http://127.0.0.1:{PORT}/health"]
      interval: {work.health_interval:g}s
      timeout: {work.health_timeout:g}s
      retries: {work.health_retries}
    deploy:
      replicas: {work.replicas}
      placement: {{max_replicas_per_node: 1}}
      restart_policy: {{condition: any, delay: {work.restart_delay:g}s}}
      update_config: {{parallelism: 1, delay: 0s, order: {work.order}, monitor: {work.monitor:g}s,
                      failure_action: {work.failure_action}}}
"""


def vip_holders(lab: Lab, address: str) -> list[str]:
    return [
        node
        for node in lab.nodes
        if f" {address}/" in lab.exec_in(node, "ip", "-4", "-o", "addr", "show", timeout=10).stdout
    ]


def picoord_phase(lab: Lab, root: Path, args: argparse.Namespace, result: Result) -> None:
    work = Workload(replicas=REPLICAS, monitor=args.monitor, stop_grace=args.stop_grace)
    vip = lab.spare_address()
    path = root / "stack.yml"
    path.write_text(stack_file(image_ref(lab, 1), work, args.network_mode))
    coordctl(lab, "stack", "deploy", "-c", str(path), "--address", vip, SERVICE)
    coordctl(lab, "rollout", SERVICE, timeout=300)
    wait_until(f"the VIP {vip} answering", lambda: len(vip_holders(lab, vip)) == 1 and get_version(vip), 60)
    [holder] = vip_holders(lab, vip)
    print(f"picoord: VIP {vip} held by {holder}", flush=True)
    figures = result.picoord

    result.direct, figures.steady = measure([lab.address(holder), vip], args.rate, args.steady)
    print(f"picoord: steady direct {result.direct}, VIP {figures.steady}", flush=True)

    with SteadyClient(vip, args.rate) as client:
        start = time.monotonic()
        coordctl(lab, "rollout", SERVICE, "--image", image_ref(lab, 2), timeout=300)
        time.sleep(2.0)
        samples = client.between(start, time.monotonic())
    figures.rollout_failed = sum(not s.ok for s in samples)
    figures.rollout_requests = len(samples)
    print(f"picoord: rollout, {figures.rollout_failed} of {len(samples)} requests failed", flush=True)

    wait_until("one VIP holder", lambda: len(vip_holders(lab, vip)) == 1 and get_version(vip), 60)
    [holder] = vip_holders(lab, vip)
    figures.taken_away = holder
    with SteadyClient(vip, args.rate) as client, outage(lab, holder) as cut:
        start = cut.take_away(freeze=True)
        time.sleep(args.away)
        cut.give_back()
        samples = client.between(start, time.monotonic())
    figures.failover_failed_seconds = failed_seconds(samples, start)
    figures.failover_failed = sum(not s.ok for s in samples)
    print(f"picoord: {holder} away, {figures.failover_failed_seconds} s with failed requests", flush=True)
    lab.wait_ready()
    coordctl(lab, "rm", "stack", SERVICE)
    wait_until(
        "picoord's containers to go", lambda: SwarmView(lab).containers("org.picoord.service") == 0, 120
    )


# --- swarm -----------------------------------------------------------------------------------------


def swarm_phase(lab: Lab, args: argparse.Namespace, result: Result) -> None:
    work = Workload(replicas=REPLICAS, monitor=args.monitor, stop_grace=args.stop_grace, publish=False)
    create = work.swarm_create_args(image_ref(lab, 1))
    create[-1:-1] = ["--publish", f"published={PORT},target={PORT}"]  # ingress: the routing mesh
    entry = lab.address(lab.nodes[0])
    figures = result.swarm
    if not Path("/proc/net/ip_vs").exists():
        raise BenchError(
            "Swarm's routing mesh forwards with IPVS, which this kernel lacks (no /proc/net/ip_vs, "
            "no ip_vs module to load): the mesh cannot answer here"
        )
    view = SwarmView(lab)
    try:
        docker(lab, lab.nodes[0], *create)
        wait_until(
            "swarm's tasks healthy",
            lambda: (
                sum(view.healthy(t) for t in view.running_tasks(SERVICE)) == REPLICAS and get_version(entry)
            ),
            180,
        )
        [figures.steady] = measure([entry], args.rate, args.steady)
        print(f"swarm: steady through the mesh {figures.steady}", flush=True)

        with SteadyClient(entry, args.rate) as client:
            start = time.monotonic()
            docker(lab, lab.nodes[0], "service", "update", "--detach", "--image", image_ref(lab, 2), SERVICE)
            wait_until("swarm's update", lambda: view.update_state(SERVICE) == "completed", 300)
            time.sleep(2.0)
            samples = client.between(start, time.monotonic())
        figures.rollout_failed = sum(not s.ok for s in samples)
        figures.rollout_requests = len(samples)
        print(f"swarm: update, {figures.rollout_failed} of {len(samples)} requests failed", flush=True)

        nodes = [view.hostnames.get(t["NodeID"], "") for t in view.running_tasks(SERVICE)]
        victims = [node for node in nodes if node and node != lab.nodes[0]]
        if not victims:
            raise BenchError(f"swarm's tasks run on {nodes}: none to take away but the manager")
        figures.taken_away = victims[0]
        with SteadyClient(entry, args.rate) as client, outage(lab, victims[0]) as cut:
            start = cut.take_away(freeze=True)
            time.sleep(args.away)
            cut.give_back()
            samples = client.between(start, time.monotonic())
        figures.failover_failed_seconds = failed_seconds(samples, start)
        figures.failover_failed = sum(not s.ok for s in samples)
        print(
            f"swarm: {victims[0]} away, {figures.failover_failed_seconds} s with failed requests", flush=True
        )
    finally:
        docker(lab, lab.nodes[0], "service", "rm", SERVICE, check=False)
        view.close()


# --- run and report ----------------------------------------------------------------------------------


def run(args: argparse.Namespace) -> Result:
    result = Result(
        settings={k: getattr(args, k) for k in ("rate", "steady", "away", "monitor", "stop_grace")}
    )
    coordinator_args = ["--heartbeat-interval", "1", "--heartbeat-timeout", "3"]
    with (
        bench_workspace("traffic") as (root, _processes),
        lab_up(keep_logs=args.keep_logs, coordinator_args=coordinator_args) as lab,
    ):
        print(f"lab {lab.lab_id} up: {', '.join(lab.nodes)}", flush=True)
        form_swarm(lab, root)
        prepull(lab, [image_ref(lab, 1), image_ref(lab, 2)])
        try:
            picoord_phase(lab, root, args, result)
        except BenchError as error:  # one system failing still reports the other
            result.errors.append(f"picoord: {error}")
            print(f"picoord: {error}", file=sys.stderr, flush=True)
        try:
            swarm_phase(lab, args, result)
        except BenchError as error:
            result.errors.append(f"swarm: {error}")
            print(f"swarm: {error}", file=sys.stderr, flush=True)
    return result


def _ms(value: float | None) -> str:
    return "-" if value is None else f"{value:.1f} ms"


def _count(value: int | None) -> str:
    return "-" if value is None else str(value)


def report(result: Result) -> bool:
    settings = result.settings
    print(f"\nclient: {settings['rate']:g} requests/s, {settings['steady']:g} s per steady measurement")
    direct, vip, mesh = result.direct, result.picoord, result.swarm
    rows = [
        ["steady p50", _ms(direct.p50_ms), _ms(vip.steady.p50_ms), _ms(mesh.steady.p50_ms)],
        ["steady p99", _ms(direct.p99_ms), _ms(vip.steady.p99_ms), _ms(mesh.steady.p99_ms)],
        [
            "steady answered/s",
            *(f"{s.per_second:.1f}" if s.per_second else "-" for s in (direct, vip.steady, mesh.steady)),
        ],
        [
            "rollout: failed requests",
            "",
            f"{_count(vip.rollout_failed)} of {vip.rollout_requests}",
            f"{_count(mesh.rollout_failed)} of {mesh.rollout_requests}",
        ],
        [
            "Pi away: seconds with failures",
            "",
            f"{_count(vip.failover_failed_seconds)} ({vip.taken_away or '-'})",
            f"{_count(mesh.failover_failed_seconds)} ({mesh.taken_away or '-'})",
        ],
    ]
    print(table(["", "replica direct", vip.system, mesh.system], rows))
    vip_ratio = vip.steady.p50_ms / direct.p50_ms if vip.steady.p50_ms and direct.p50_ms else None
    mesh_ratio = mesh.steady.p50_ms / direct.p50_ms if mesh.steady.p50_ms and direct.p50_ms else None
    if vip_ratio is not None:
        print(f"ratio p50 VIP / direct: {vip_ratio:.2f}")
    if mesh_ratio is not None:
        print(f"ratio p50 mesh / direct: {mesh_ratio:.2f}")
    if vip.failover_failed_seconds is not None and mesh.failover_failed_seconds:
        ratio_away = vip.failover_failed_seconds / mesh.failover_failed_seconds
        print(f"ratio seconds with failures, Pi away, VIP / mesh: {ratio_away:.2f}")
    rollout_ok = vip.rollout_failed == 0
    failover_ok = vip.failover_failed_seconds is not None and vip.failover_failed_seconds <= FAILOVER_TARGET
    latency_ok = vip_ratio is not None and vip_ratio <= LATENCY_TARGET
    print(f"target zero failed requests in a rollout: {_count(vip.rollout_failed)} {verdict(rollout_ok)}")
    print(
        f"target <= {FAILOVER_TARGET:g} s with failures, Pi away: "
        f"{_count(vip.failover_failed_seconds)} {verdict(failover_ok)}"
    )
    ratio = "-" if vip_ratio is None else f"{vip_ratio:.2f}"
    print(f"target p50 VIP / direct <= {LATENCY_TARGET:.2f}: {ratio} {verdict(latency_ok)}")
    for error in result.errors:
        print(f"not measured: {error}")
    return rollout_ok and failover_ok and latency_ok and not result.errors


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--rate", type=float, default=50.0, help="client requests per second (50)")
    parser.add_argument("--steady", type=float, default=20.0, help="seconds per steady measurement (20)")
    parser.add_argument("--away", type=float, default=20.0, help="seconds the Pi stays away (20)")
    parser.add_argument("--monitor", type=float, default=5.0, help="update monitor window of both, s (5)")
    parser.add_argument("--stop-grace", type=float, default=2.0, help="stop grace of both, s (2)")
    parser.add_argument(
        "--network-mode",
        choices=("overlay", "published-ports"),
        default="overlay",
        help="picoord's stack on Swarm overlay networks (the default) or in published-ports mode",
    )
    parser.add_argument("--keep-logs", action="store_true", help="keep the lab's logs (its work dir)")
    parser.add_argument("--strict", action="store_true", help="exit 1 when a target is missed")
    parser.add_argument("--json", type=Path, help="also write the results to this file")
    args = parser.parse_args(argv)
    if args.rate <= 0 or args.steady <= 0 or args.away <= 0:
        parser.error("--rate, --steady and --away must be positive")
    return finish_lab_bench("traffic", args, run, report)


if __name__ == "__main__":
    sys.exit(main())

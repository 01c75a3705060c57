"""Failover: a lab Pi taken away, picoord against Docker Swarm on the same Pis, in one run.

One run brings up a lab (sandboxes, a dockerd in every Pi, the lab registry; traffic stays
inside the lab's namespaces), forms a real Swarm of the same Pis (picoord's own
ClusterMembership apply) and pulls mcp:1 on every Pi. Then, one system after the other:

picoord (`kind: Service`, 2 replicas of mcp:1, no max_per_node, GET /health every 1 s):
1. **Short outage:** the link of a Pi running a replica goes down for `--outage` seconds
   (3) and comes back; its processes are never frozen. Then the bench waits the grace
   period and more, and checks that the replica ids in `coordctl ps` are unchanged and
   both replicas are healthy: nothing was rescheduled.
2. **Failover:** the Pi running a replica (a worker of the swarm, so that Swarm's manager
   stays) is taken away: its host-side veth goes down (`ip link set <veth> down`) and its
   agent, dockerd and containerd get SIGSTOP. Measured from link down until the service
   again has 2 running, healthy replicas meant to run, on the other Pis (polled 10 times a
   second through the admin API `coordctl ps` uses).
3. **Return:** after `--away` seconds the link comes up and the processes get SIGCONT.
   Measured until the Pis run exactly 2 containers of the service again (the stale
   replica on the returned Pi stopped; counted on every Pi's dockerd) and `coordctl ps`
   lists only those 2 as running.

Swarm (a service of 2 replicas of the same image, the same health check run by `wget` in
the container, Swarm's defaults otherwise: 5 s dispatcher heartbeat, 5 s restart delay):
the same Pi taken away the same way; measured from link down until 2 running tasks with
healthy containers on the other Pis; then the same return, until 2 containers run.

    .venv/bin/python bench/failover.py [--outage 3] [--away 40] [--strict] [--json out.json]

Targets: picoord failover <= 10 s; the short outage reschedules nothing; converged within
10 s after the Pi returns. Links are restored and processes continued in `finally`,
whatever happened, and the lab is brought down. Exit status as in bench/README.md.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import signal
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil
from _common import BenchError, bench_workspace, finish_lab_bench, table, verdict
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

from picoord.common.vocabulary import ReplicaState
from picoord.coordinator.ctl.client import socket_channel
from picoord.lab.cluster import Lab
from picoord.v1 import services_pb2, services_pb2_grpc, workloads_pb2

REPLICAS = 2
FAILOVER_TARGET = 10.0
RETURN_TARGET = 10.0
POLL = 0.1
SETTINGS = ("outage", "away", "grace", "heartbeat_interval", "heartbeat_timeout", "stop_grace")
FROZEN = ("dockerd", "containerd")  # besides the agent; containerd-shim and the containers run on


@dataclass
class Figures:
    """One system's figures for one Pi taken away."""

    system: str
    failover: float | None = None  # link down -> 2 healthy replicas on the other Pis
    stop_asked: float | None = None  # link up -> the stale replica marked for stopping (picoord)
    returned: float | None = None  # link up -> exactly 2 containers of the service run


@dataclass
class Result:
    victim: str = ""
    outage_seconds: float = 0.0
    outage_rescheduled: bool | None = None
    outage_detail: str = ""
    picoord: Figures = field(default_factory=lambda: Figures("picoord"))
    swarm: list[Figures] = field(default_factory=list)
    settings: dict[str, Any] = field(default_factory=dict)


# --- taking a Pi away and giving it back ---------------------------------------------------------


class Outage:
    """The link of one Pi and (optionally) its agent, dockerd and containerd stopped; always
    undone on the way out, so a failure or Ctrl-C never leaves a Pi cut off or frozen."""

    def __init__(self, lab: Lab, node: str) -> None:
        self.lab, self.node = lab, node
        self.veth = lab.network.pi(node).veth_host if lab.network else ""
        self.frozen: list[psutil.Process] = []
        self.down = False

    def processes(self) -> list[psutil.Process]:
        """The Pi's agent, dockerd and containerd, found in its mount namespace."""
        found = []
        for pid in self.lab.sandbox(self.node).pids():
            with contextlib.suppress(psutil.Error):
                process = psutil.Process(pid)
                name, argv = process.name(), " ".join(process.cmdline())
                if name in FROZEN or ("picoord-agent" in argv and " run " in f"{argv} "):
                    found.append(process)
        names = sorted(p.name() for p in found)
        if len(found) != 3:
            raise BenchError(f"expected the agent, dockerd and containerd on {self.node}, found {names}")
        return found

    def link(self, up: bool) -> None:
        from picoord.agent.commands import run_command

        done = run_command(["ip", "link", "set", "dev", self.veth, "up" if up else "down"], timeout=10)
        if not done.ok:
            raise BenchError(f"ip link set {self.veth} {'up' if up else 'down'}: {done.stderr[-300:]}")
        self.down = not up

    def take_away(self, freeze: bool) -> float:
        """Link down (then SIGSTOP when `freeze`); returns the monotonic time of link down."""
        targets = self.processes() if freeze else []
        self.link(False)
        at = time.monotonic()
        for process in targets:
            self.frozen.append(process)  # first: an interrupt right after the SIGSTOP still undoes it
            with contextlib.suppress(psutil.Error):
                process.send_signal(signal.SIGSTOP)
        return at

    def give_back(self) -> float:
        """Link up and SIGCONT; returns the monotonic time of link up."""
        errors = []
        try:
            if self.down:
                self.link(True)
        except BenchError as error:
            errors.append(str(error))
        at = time.monotonic()
        for process in self.frozen:
            with contextlib.suppress(psutil.Error):
                process.send_signal(signal.SIGCONT)
        self.frozen.clear()
        if errors:
            raise BenchError("; ".join(errors))
        return at


@contextlib.contextmanager
def outage(lab: Lab, node: str) -> Iterator[Outage]:
    cut = Outage(lab, node)
    try:
        yield cut
    finally:
        cut.give_back()


# --- picoord ---------------------------------------------------------------------------------------


class Replicas:
    """The service's replicas through the admin API `coordctl ps` uses (cheap to poll)."""

    def __init__(self, lab: Lab) -> None:
        self.stub = services_pb2_grpc.WorkloadsStub(socket_channel(lab.admin_socket))

    def list(self) -> list[services_pb2.ReplicaInfo]:
        return list(self.stub.ListReplicas(services_pb2.ServiceRef(name=SERVICE), timeout=5).replicas)

    def healthy(self, away: str = "") -> list[services_pb2.ReplicaInfo]:
        return [
            r
            for r in self.list()
            if r.state == ReplicaState.RUNNING.wire
            and not r.node_unreachable
            and r.health == workloads_pb2.REPLICA_HEALTH_HEALTHY
            and r.desired == "running"
            and r.node != away
        ]

    def running(self) -> list[services_pb2.ReplicaInfo]:
        return [r for r in self.list() if r.state == ReplicaState.RUNNING.wire]  # reachable or not


def running_containers(view: SwarmView, label: str) -> int:
    """Containers of the service that run, counted on every Pi's own dockerd."""
    return sum(
        len(client.containers(filters={"label": label, "status": "running"}))
        for client in view.engines.values()
    )


def workload(args: argparse.Namespace) -> Workload:
    """2 replicas, no per-node limit, the port exposed but not published (nothing to clash)."""
    return Workload(replicas=REPLICAS, publish=False, max_per_node=0, stop_grace=args.stop_grace)


def picoord_phase(lab: Lab, root: Path, view: SwarmView, args: argparse.Namespace, result: Result) -> None:
    work = workload(args)
    spec = root / "mcp.yaml"
    spec.write_text(work.picoord_spec(image_ref(lab, 1)))
    coordctl(lab, "apply", "-f", str(spec))
    coordctl(lab, "rollout", SERVICE, timeout=300)
    replicas = Replicas(lab)
    label = f"org.picoord.service={SERVICE}"
    placed = sorted(r.node for r in replicas.healthy())
    workers = [node for node in placed if node != lab.nodes[0]]
    if len(placed) != REPLICAS or not workers:
        raise BenchError(f"expected {REPLICAS} healthy replicas, one on a swarm worker; they run on {placed}")
    result.victim = victim = workers[0]
    print(f"picoord: replicas on {', '.join(placed)}; the Pi taken away is {victim}", flush=True)

    # 1. a short outage reschedules nothing
    before = sorted((r.replica, r.node) for r in replicas.list())
    with outage(lab, victim) as cut:
        cut.take_away(freeze=False)
        time.sleep(args.outage)
        cut.give_back()
    time.sleep(args.grace + 10)
    after = sorted((r.replica, r.node) for r in replicas.list())
    healthy_after = len(replicas.healthy())
    result.outage_seconds = args.outage
    result.outage_rescheduled = before != after or healthy_after != REPLICAS
    result.outage_detail = f"replicas before {before}, after {after}, {healthy_after} healthy"
    print(f"picoord: {args.outage:g} s outage: {result.outage_detail}", flush=True)
    wait_until("picoord's 2 healthy replicas", lambda: len(replicas.healthy()) == REPLICAS, 60)

    # 2. failover, 3. return
    figures = result.picoord
    with outage(lab, victim) as cut:
        down_at = cut.take_away(freeze=True)
        moved_at = wait_until(
            "picoord's replacement", lambda: len(replicas.healthy(away=victim)) == REPLICAS, 180, POLL
        )
        figures.failover = moved_at - down_at
        print(f"picoord: failover {figures.failover:.1f} s", flush=True)
        stale = [r.replica for r in replicas.list() if r.node == victim]
        time.sleep(max(0.0, args.away - (time.monotonic() - down_at)))
        up_at = cut.give_back()
    asked_at = wait_until(
        "picoord to stop the stale replica",
        lambda: all(r.desired != "running" for r in replicas.list() if r.replica in stale),
        180,
        POLL,
    )
    figures.stop_asked = asked_at - up_at
    settled_at = wait_until(
        "picoord back at 2 running replicas",
        lambda: running_containers(view, label) == REPLICAS and len(replicas.running()) == REPLICAS,
        180,
        POLL,
    )
    figures.returned = settled_at - up_at
    print(
        f"picoord: stale replica told to stop {figures.stop_asked:.1f} s, 2 running "
        f"{figures.returned:.1f} s after the Pi returned",
        flush=True,
    )
    spec.write_text(work.picoord_spec(image_ref(lab, 1), replicas=0))
    coordctl(lab, "apply", "-f", str(spec))
    coordctl(lab, "rollout", SERVICE, timeout=300)
    wait_until("picoord's containers to go", lambda: view.containers("org.picoord.service") == 0, 120)


# --- swarm -----------------------------------------------------------------------------------------


def swarm_healthy(view: SwarmView, away: str) -> int:
    count = 0
    for task in view.running_tasks(SERVICE):
        if view.hostnames.get(task["NodeID"]) != away and view.healthy(task):
            count += 1
    return count


def swarm_phase(
    lab: Lab, view: SwarmView, args: argparse.Namespace, result: Result, heartbeat: float
) -> None:
    """Swarm with this dispatcher heartbeat (Swarm marks a node down after 3 missed ones)."""
    figures = Figures(f"swarm, heartbeat {heartbeat:g} s")
    result.swarm.append(figures)
    docker(lab, lab.nodes[0], "swarm", "update", "--dispatcher-heartbeat", f"{heartbeat:g}s")
    period = view.manager.inspect_swarm()["Spec"]["Dispatcher"]["HeartbeatPeriod"] / 1e9
    if period != heartbeat:
        raise BenchError(f"swarm's dispatcher heartbeat is {period:g} s after asking for {heartbeat:g} s")
    create = workload(args).swarm_create_args(image_ref(lab, 1))
    victim = result.victim
    for _attempt in range(6):
        docker(lab, lab.nodes[0], *create)
        wait_until("the swarm service", lambda: swarm_healthy(view, "") == REPLICAS, 120)
        nodes = {view.hostnames.get(t["NodeID"]) for t in view.running_tasks(SERVICE)}
        if victim in nodes:
            break
        docker(lab, lab.nodes[0], "service", "rm", SERVICE)
        wait_until(
            "swarm's containers to go",
            lambda: view.containers(f"com.docker.swarm.service.name={SERVICE}") == 0,
            60,
        )
    else:
        raise BenchError(f"swarm never placed a task on {victim}")
    print(f"{figures.system}: tasks on {', '.join(sorted(n or '?' for n in nodes))}", flush=True)
    label = f"com.docker.swarm.service.name={SERVICE}"
    with outage(lab, victim) as cut:
        down_at = cut.take_away(freeze=True)
        moved_at = wait_until(
            "swarm's replacement", lambda: swarm_healthy(view, victim) == REPLICAS, 180, POLL
        )
        figures.failover = moved_at - down_at
        print(f"{figures.system}: failover {figures.failover:.1f} s", flush=True)
        time.sleep(max(0.0, args.away - (time.monotonic() - down_at)))
        up_at = cut.give_back()
    settled_at = wait_until(
        "swarm back at 2 running containers", lambda: running_containers(view, label) == REPLICAS, 180, POLL
    )
    figures.returned = settled_at - up_at
    print(f"{figures.system}: 2 running {figures.returned:.1f} s after the Pi returned", flush=True)
    docker(lab, lab.nodes[0], "service", "rm", SERVICE, check=False)
    wait_until("swarm's containers to go", lambda: view.containers(label) == 0, 120)
    wait_until("every swarm node ready", lambda: swarm_nodes_ready(view), 120)


def swarm_nodes_ready(view: SwarmView) -> bool:
    return all(node["Status"]["State"] == "ready" for node in view.manager.nodes())


# --- run and report ----------------------------------------------------------------------------------


def run(args: argparse.Namespace) -> Result:
    result = Result(settings={k: getattr(args, k) for k in SETTINGS})
    coordinator_args = [
        *("--disconnect-grace", f"{args.grace:g}"),
        *("--heartbeat-timeout", f"{args.heartbeat_timeout:g}"),
    ]
    if args.heartbeat_interval:
        coordinator_args += ["--heartbeat-interval", f"{args.heartbeat_interval:g}"]
    lab_args = {"keep_logs": args.keep_logs, "coordinator_args": coordinator_args}
    with bench_workspace("failover") as (root, _processes), lab_up(**lab_args) as lab:
        print(f"lab {lab.lab_id} up: {', '.join(lab.nodes)}", flush=True)
        form_swarm(lab, root)
        prepull(lab, [image_ref(lab, 1)])
        view = SwarmView(lab)
        try:
            picoord_phase(lab, root, view, args, result)
            for heartbeat in args.swarm_heartbeat:
                view.close()
                view = SwarmView(lab)
                swarm_phase(lab, view, args, result, heartbeat)
        finally:
            view.close()
    return result


def _seconds(value: float | None) -> str:
    return "-" if value is None else f"{value:.1f} s"


def report(result: Result) -> bool:
    settings = result.settings
    print(
        f"\npicoord: keepalive pings every {settings['heartbeat_timeout'] / 3:g} s, a session silent "
        f"for {settings['heartbeat_timeout']:g} s ends (NotReady), then a {settings['grace']:g} s grace; "
        f"agent messages: "
        + (
            f"at least every {settings['heartbeat_interval']:g} s; "
            if settings["heartbeat_interval"]
            else "samples only; "
        )
        + f"stop grace {settings['stop_grace']:g} s for both; the Pi taken away: {result.victim}"
    )
    systems = [result.picoord, *result.swarm]
    rows = [
        ["failover: link down -> 2 healthy elsewhere", *(_seconds(f.failover) for f in systems)],
        ["return: link up -> stale replica told to stop", *(_seconds(f.stop_asked) for f in systems)],
        ["return: link up -> 2 containers running", *(_seconds(f.returned) for f in systems)],
    ]
    print(table(["event", *(f.system for f in systems)], rows))
    for swarm in result.swarm:
        if result.picoord.failover and swarm.failover:
            print(f"ratio picoord / {swarm.system} failover: {result.picoord.failover / swarm.failover:.2f}")
    failover_ok = result.picoord.failover is not None and result.picoord.failover <= FAILOVER_TARGET
    outage_ok = result.outage_rescheduled is False
    return_ok = result.picoord.returned is not None and result.picoord.returned <= RETURN_TARGET
    failover = _seconds(result.picoord.failover)
    print(f"target failover <= {FAILOVER_TARGET:g} s: {failover} {verdict(failover_ok)}")
    print(
        f"target a {result.outage_seconds:g} s outage reschedules nothing: "
        f"{'nothing' if outage_ok else 'something'} rescheduled {verdict(outage_ok)} ({result.outage_detail})"
    )
    returned = _seconds(result.picoord.returned)
    print(f"target 2 running <= {RETURN_TARGET:g} s after return: {returned} {verdict(return_ok)}")
    return failover_ok and outage_ok and return_ok


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--outage", type=float, default=3.0, help="the short link outage, s (default 3)")
    parser.add_argument("--away", type=float, default=25.0, help="least time the Pi stays away, s (25)")
    parser.add_argument("--grace", type=float, default=5.0, help="coordinator's disconnect grace, s (5)")
    parser.add_argument(
        "--heartbeat-interval",
        type=float,
        default=0.0,
        help="coordinator's, s (default: its own, the metrics interval)",
    )
    parser.add_argument("--heartbeat-timeout", type=float, default=3.0, help="coordinator's, s (3)")
    parser.add_argument("--stop-grace", type=float, default=2.0, help="stop grace of both, s (2)")
    parser.add_argument(
        "--swarm-heartbeat",
        type=float,
        nargs="*",
        default=[5.0, 1.0],
        help="a swarm run per dispatcher heartbeat, s (default: 5, Swarm's default, and 1)",
    )
    parser.add_argument("--keep-logs", action="store_true", help="keep the lab's logs (its work dir)")
    parser.add_argument("--strict", action="store_true", help="exit 1 when a target is missed")
    parser.add_argument("--json", type=Path, help="also write the results to this file")
    args = parser.parse_args(argv)
    if os.geteuid() != 0:
        print("failover: run as root (the lab makes namespaces and links)", file=sys.stderr)
        return 2
    return finish_lab_bench("failover", args, run, report)


if __name__ == "__main__":
    sys.exit(main())

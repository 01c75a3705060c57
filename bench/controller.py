#!/usr/bin/env python3
"""The workload controller at rest, under churn and through one rollout, with 1,000
simulated nodes and 100 settled services: coordinator CPU seconds and tick count, this
checkout against a base commit (default `main`), in one run.

Simulated nodes: the controller is driven directly with a real SQLite store and Cluster,
and the bench plays the agents (as tests/unit/controller/test_controller.py does): it
reads each node's assignment from its session's outbox, answers with replica reports
(running, no health check) and repeats them every 10 s as an agent does, and sends each
node's heartbeat every 5 s. No network.

Each side runs in its own subprocess (`--worker ROOT`), with `picoord` imported from
ROOT: this checkout, or the base commit exported with `git archive` into the bench's temp
dir (the generated protobuf modules are this checkout's: the .proto files are the same).
CPU is the worker's process CPU time (the controller's threads included) in each window;
ticks are counted by wrapping the controller's `tick`.

Phases, for each side: setup (enroll and connect the nodes, apply and roll out the
services, not measured), then `rest` (`--seconds`), then `churn` (`--seconds`: every
second `--churn` nodes report a changed replica (a restart) and one node reconnects),
then `rollout` (one service to a new image, until complete).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import subprocess
import sys
import tarfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import BenchError, bench_workspace, install_signal_handlers, table

HERE = Path(__file__).resolve().parent.parent
REPORT_EVERY = 10.0  # agent/runtime/supervisor.py REPORT_EVERY
HEARTBEAT_EVERY = 5.0


# --------------------------------------------------------------------------- the worker


def _use_tree(root: Path, generated: Path, shim: Path) -> None:
    """Import `picoord` from `root` (its v1 protobuf modules from `generated`), not from
    the venv's editable install."""
    package = shim / "picoord"
    package.mkdir(parents=True, exist_ok=True)
    (package / "__init__.py").write_text("")
    for name, target in {
        "common": root / "common",
        "agent": root / "agent",
        "coordinator": root / "coordinator",
        "lab": root / "lab",
        "v1": generated,
    }.items():
        link = package / name
        if not link.exists():
            link.symlink_to(target, target_is_directory=True)
    sys.meta_path[:] = [f for f in sys.meta_path if "editable" not in getattr(f, "__module__", "")]
    sys.meta_path[:] = [f for f in sys.meta_path if "editable" not in repr(f)]
    for module in [m for m in sys.modules if m == "picoord" or m.startswith("picoord.")]:
        del sys.modules[module]
    sys.path.insert(0, str(shim))


async def _measure(args: argparse.Namespace) -> dict[str, Any]:
    from picoord.coordinator.cluster import Cluster, LiveSession
    from picoord.coordinator.controller.controller import WorkloadController
    from picoord.coordinator.controller.records import WorkloadRecords
    from picoord.coordinator.status import StatusTimeouts
    from picoord.coordinator.store import CertificateRecord, Store
    from picoord.coordinator.telemetry import MetricsHistory
    from picoord.coordinator.workloads.reader import read_workloads
    from picoord.v1 import agent_pb2, node_pb2, workloads_pb2

    work = Path(args.state)
    store = Store(work / "state.db")
    cluster = Cluster(store, StatusTimeouts(), MetricsHistory(4))
    _, token = await cluster.create_token(3600.0, 0, "")
    names = [f"pi{index:04d}" for index in range(args.nodes)]
    sessions: dict[str, LiveSession] = {}
    for index, node in enumerate(names):
        await cluster.enroll(
            token.token_id, node, {}, CertificateRecord(f"c{index}", node, 1.0, 4e9, None), time.time()
        )
        session = LiveSession(node=node, serial=f"c{index}", address=f"10.{index // 250}.{index % 250}.1")
        hardware = node_pb2.Hardware(arch="aarch64", memory_total_bytes=4 << 30, cpu_cores=4, hostname=node)
        await cluster.open_session(session, agent_pb2.Hello(agent_version="0", hardware=hardware))
        sessions[node] = session
    records = WorkloadRecords(store)
    controller = WorkloadController(cluster, records)
    for node in names:
        controller.on_session_open(node)
    docs = "\n---\n".join(
        f"kind: Service\nname: svc{index:03d}\nimage: app:1\nreplicas: {args.replicas}\n"
        "resources: {requests: {memory: 32Mi}}\nupdate: {monitor: 0s, parallelism: 0}"
        for index in range(args.services)
    )
    records.apply(list(read_workloads(docs).services), time.time(), "bench")

    ticks = 0
    real_tick = controller.tick

    async def counted_tick() -> None:
        nonlocal ticks
        ticks += 1
        await real_tick()

    controller.tick = counted_tick  # type: ignore[method-assign]
    running: dict[str, dict[str, workloads_pb2.ReplicaSpec]] = {}
    generation: dict[str, int] = {}
    restarts: dict[str, int] = {}
    last_report: dict[str, float] = {}

    def report(node: str) -> None:
        reports = workloads_pb2.ReplicaReports(generation=generation.get(node, 0))
        for spec in running.get(node, {}).values():
            reports.replicas.add(
                service=spec.service, revision=spec.revision, replica=spec.replica, state="running",
                health=workloads_pb2.REPLICA_HEALTH_NONE, restarts=restarts.get(spec.replica, 0),
            )  # fmt: skip
        last_report[node] = time.monotonic()
        controller.on_reports(node, reports)

    stop = asyncio.Event()

    async def agents() -> None:
        """Every node: take assignments, report changes at once and repeat every 10 s;
        heartbeat every 5 s (spread over the period)."""
        offsets = {node: random.Random(node).random() for node in names}
        beat_at = {node: time.monotonic() + offsets[node] * HEARTBEAT_EVERY for node in names}
        while not stop.is_set():
            now = time.monotonic()
            for node, session in sessions.items():
                changed = False
                while not session.outbox.empty():
                    message = session.outbox.get_nowait()
                    if message.WhichOneof("body") == "assignment":
                        running[node] = {s.replica: s for s in message.assignment.replicas}
                        generation[node] = message.assignment.generation
                        changed = True
                if changed or (running.get(node) and now - last_report.get(node, 0) >= REPORT_EVERY):
                    report(node)
                if now >= beat_at[node]:
                    cluster.heard_from(node)
                    beat_at[node] = now + HEARTBEAT_EVERY
            await asyncio.sleep(0.1)

    def all_complete() -> bool:
        done = [s.rollout is not None and s.rollout.status == "complete" for s in records.services()]
        return all(done)

    loop = asyncio.create_task(controller.run(stop))
    playing = asyncio.create_task(agents())
    process_cpu = time.process_time
    figures: dict[str, Any] = {"nodes": args.nodes, "services": args.services, "replicas": args.replicas}
    try:
        started = time.monotonic()
        for index in range(args.services):
            await controller.start_rollout(f"svc{index:03d}")
        while not all_complete():
            if time.monotonic() - started > args.timeout:
                raise BenchError(f"the services did not settle within {args.timeout:.0f} s")
            await asyncio.sleep(0.5)
        figures["settle_seconds"] = round(time.monotonic() - started, 1)
        await asyncio.sleep(2.0)

        ticks, cpu = 0, process_cpu()
        await asyncio.sleep(args.seconds)
        figures["rest"] = {
            "cpu_seconds": round(process_cpu() - cpu, 2),
            "ticks": ticks,
            "seconds": args.seconds,
        }

        ticks, cpu, end = 0, process_cpu(), time.monotonic() + args.seconds
        chooser = random.Random(7)
        while time.monotonic() < end:
            for node in chooser.sample([n for n in names if running.get(n)], args.churn):
                for replica in running[node]:
                    restarts[replica] = restarts.get(replica, 0) + 1
                report(node)
            node = chooser.choice(names)
            controller.on_session_closed(node)
            controller.on_session_open(node)
            await asyncio.sleep(1.0)
        figures["churn"] = {
            "cpu_seconds": round(process_cpu() - cpu, 2),
            "ticks": ticks,
            "seconds": args.seconds,
            "changed_reports_per_second": args.churn,
        }

        ticks, cpu, started = 0, process_cpu(), time.monotonic()
        await controller.start_rollout("svc000", image="app:2")
        while not all_complete():
            if time.monotonic() - started > args.timeout:
                raise BenchError(f"the rollout did not complete within {args.timeout:.0f} s")
            await asyncio.sleep(0.1)
        figures["rollout"] = {
            "cpu_seconds": round(process_cpu() - cpu, 2),
            "ticks": ticks,
            "seconds": round(time.monotonic() - started, 1),
        }
    finally:
        stop.set()
        controller.wake()
        await asyncio.gather(loop, playing, return_exceptions=True)
        store.close()
    return figures


def worker(args: argparse.Namespace) -> int:
    _use_tree(Path(args.worker), Path(args.generated), Path(args.state) / "shim")
    figures = asyncio.run(_measure(args))
    print(json.dumps(figures))
    return 0


# --------------------------------------------------------------------------- the driver


def export(commit: str, into: Path) -> Path:
    """The base commit's tree, exported (no worktree, nothing left in the repository)."""
    archive = into / "base.tar"
    with archive.open("wb") as out:
        subprocess.run(["git", "-C", str(HERE), "archive", commit], stdout=out, check=True, timeout=120)
    root = into / "base"
    root.mkdir()
    with tarfile.open(archive) as tar:
        tar.extractall(root, filter="data")
    archive.unlink()
    return root


def merge_base() -> str:
    done = subprocess.run(
        ["git", "-C", str(HERE), "merge-base", "HEAD", "main"], capture_output=True, text=True, timeout=30
    )
    if done.returncode != 0:
        raise BenchError(f"no merge base of HEAD and main: {done.stderr.strip()}: give --base")
    return done.stdout.strip()


def run_side(label: str, root: Path, args: argparse.Namespace, state: Path) -> dict[str, Any]:
    state.mkdir()
    argv = [
        sys.executable, __file__, "--worker", str(root), "--generated", str(HERE / "proto/picoord/v1"),
        "--state", str(state), "--nodes", str(args.nodes), "--services", str(args.services),
        "--replicas", str(args.replicas), "--seconds", str(args.seconds), "--churn", str(args.churn),
        "--timeout", str(args.timeout),
    ]  # fmt: skip
    print(f"controller bench: {label} ({root}) ...", flush=True)
    done = subprocess.run(
        argv, capture_output=True, text=True, timeout=args.timeout * 3 + 4 * args.seconds + 600
    )
    if done.returncode != 0:
        raise BenchError(f"{label} worker exited {done.returncode}:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--base", default="", help="the commit to compare with (default: where this branch left main)"
    )
    parser.add_argument("--nodes", type=int, default=1000)
    parser.add_argument("--services", type=int, default=100)
    parser.add_argument("--replicas", type=int, default=3, help="replicas per service")
    parser.add_argument("--seconds", type=float, default=30.0, help="length of the rest and churn windows")
    parser.add_argument("--churn", type=int, default=20, help="nodes reporting a change each second")
    parser.add_argument("--timeout", type=float, default=300.0, help="most seconds to settle or roll out")
    parser.add_argument("--json", type=Path, help="also write the figures here")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--generated", help=argparse.SUPPRESS)
    parser.add_argument("--state", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        return worker(args)
    install_signal_handlers()
    try:
        with bench_workspace("controller") as (work, _processes):
            base_commit = subprocess.run(
                ["git", "-C", str(HERE), "rev-parse", "--short", args.base or merge_base()],
                capture_output=True, text=True, check=True, timeout=30,
            ).stdout.strip()  # fmt: skip
            base = run_side(f"base {base_commit}", export(base_commit, work), args, work / "state-base")
            this = run_side("this checkout", HERE, args, work / "state-this")
    except BenchError as error:
        print(f"controller bench: cannot run: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    rows = []
    for phase in ("rest", "churn", "rollout"):
        before, after = base[phase], this[phase]
        ratio = after["cpu_seconds"] / before["cpu_seconds"] if before["cpu_seconds"] else float("nan")
        rows.append(
            [
                phase,
                f"{before['cpu_seconds']:.2f}",
                f"{after['cpu_seconds']:.2f}",
                f"{ratio:.2f}x",
                str(before["ticks"]),
                str(after["ticks"]),
                f"{before['seconds']}",
                f"{after['seconds']}",
            ]
        )
    print(
        f"\n{args.nodes} simulated nodes, {args.services} services x {args.replicas} replicas; "
        f"rest and churn windows {args.seconds:g} s, churn {args.churn} changed reports/s + 1 reconnect/s"
    )
    print(
        table(
            [
                "PHASE",
                f"CPU s {base_commit}",
                "CPU s this",
                "RATIO",
                f"TICKS {base_commit}",
                "TICKS this",
                f"SECONDS {base_commit}",
                "SECONDS this",
            ],
            rows,
        )
    )
    print(f"settle (not measured): {base['settle_seconds']} s base, {this['settle_seconds']} s this")
    if args.json:
        args.json.write_text(json.dumps({"base": base, "this": this, "base_commit": base_commit}, indent=2))
    return 0


if __name__ == "__main__":
    os.environ.setdefault("PYTHONDONTWRITEBYTECODE", "1")
    sys.exit(main())

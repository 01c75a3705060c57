"""What one picoord-agent costs a node, next to Debian's prometheus-node-exporter.

Starts a coordinator on loopback, enrolls one agent (`pi1`), runs `picoord-agent run
--metrics-interval 1` and, over the same window, `prometheus-node-exporter` scraped once a
second by this process. Samples both processes' RSS/USS and CPU time every second and
prints steady/peak memory, CPU % of one core, the agent/node_exporter ratios and PASS/FAIL
against the targets (agent RSS <= 40 MiB, CPU <= 1 % of one core). The run is only valid
if the coordinator shows pi1 Ready with recent samples; otherwise it exits 2.

    .venv/bin/python bench/agent_footprint.py [--seconds 60] [--strict] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import threading
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

from _common import (
    BIN,
    LOOPBACK,
    BenchError,
    Coordinator,
    Footprint,
    MachineCpu,
    Processes,
    Sampler,
    bench_workspace,
    footprint,
    http_get,
    mib,
    pick_ports,
    program,
    table,
    verdict,
    wait_for,
)

NODE = "pi1"
RSS_TARGET = 40 * 2**20
CPU_TARGET = 1.0  # % of one core
NODE_EXPORTER = Path("/usr/bin/prometheus-node-exporter")
MIN_COVERAGE = 0.9  # share of the expected 1/s samples the coordinator must have received


class Scraper(threading.Thread):
    """GETs node_exporter's /metrics every `interval` seconds, as Prometheus would."""

    def __init__(self, url: str, interval: float = 1.0) -> None:
        super().__init__(name="scraper", daemon=True)
        self.url = url
        self.interval = interval
        self.scrapes = 0
        self.failures = 0
        self.bytes = 0
        self._stop_event = threading.Event()

    def run(self) -> None:
        next_at = time.monotonic()
        while not self._stop_event.is_set():
            try:
                self.bytes += len(http_get(self.url, timeout=5))
                self.scrapes += 1
            except OSError:
                self.failures += 1
            next_at += self.interval
            self._stop_event.wait(max(0.0, next_at - time.monotonic()))

    def stop(self) -> None:
        self._stop_event.set()
        self.join(10)


def enroll_agent(coordinator: Coordinator, root: Path) -> Path:
    """`coordctl token create` then `picoord-agent join`, exactly as an operator would."""
    created = coordinator.coordctl("token", "create", "--ttl", "1h", "--uses", "1")
    state_dir = root / "agent"
    argv = [
        str(BIN / "picoord-agent"),
        "join",
        coordinator.address,
        "--token",
        created["token"],
        "--ca-cert-hash",
        created["ca_cert_hash"],
        "--node-name",
        NODE,
        "--state-dir",
        str(state_dir),
    ]
    done = subprocess.run(argv, capture_output=True, text=True, timeout=60, check=False)
    if done.returncode != 0:
        raise BenchError(f"picoord-agent join failed: {done.stderr.strip()}")
    return state_dir


def node_state(coordinator: Coordinator) -> tuple[str | None, list[dict[str, Any]]]:
    """pi1's status from `coordctl nodes` and its samples from `coordctl node show`."""
    nodes = coordinator.coordctl("nodes")
    status = next((node["status"] for node in nodes if node["name"] == NODE), None)
    detail = coordinator.coordctl("node", "show", NODE, "--samples", "120")
    return status, detail.get("recent_metrics", [])


def check_delivery(coordinator: Coordinator, window_start: float, window_end: float) -> dict[str, Any]:
    """The run is valid only if the coordinator really received the agent's samples."""
    status, samples = node_state(coordinator)
    now = time.time()
    stamps = [float(sample.get("timestamp", 0)) for sample in samples]
    # the coordinator keeps 120 samples: judge coverage over at most the last 100 s
    judged_from = max(window_start, window_end - 100)
    in_window = [t for t in stamps if judged_from <= t <= window_end]
    expected = window_end - judged_from  # seconds, so samples at 1/s
    return {
        "status": status,
        "samples_kept": len(stamps),
        "samples_in_judged_window": len(in_window),
        "expected_in_judged_window": expected,
        "latest_age_seconds": now - max(stamps) if stamps else None,
    }


def run(args: argparse.Namespace) -> dict[str, Any]:
    with bench_workspace("footprint") as (root, processes):
        coordinator = Coordinator.start(root, processes)
        agent_dir = enroll_agent(coordinator, root)
        agent = processes.start(
            "picoord-agent",
            [*program("picoord-agent"), "run", "--state-dir", str(agent_dir), "--metrics-interval", "1"],
            root / "agent.log",
        )
        (exporter_port,) = pick_ports(1)
        exporter = processes.start(
            "prometheus-node-exporter",
            [str(args.node_exporter), f"--web.listen-address={LOOPBACK}:{exporter_port}"],
            root / "node_exporter.log",
        )
        url = f"http://{LOOPBACK}:{exporter_port}/metrics"
        wait_for("node_exporter to answer", lambda: bool(http_get(url, timeout=2)), 30, processes.check_alive)

        def agent_ready() -> bool:
            status, samples = node_state(coordinator)
            return status == "Ready" and bool(samples)

        wait_for(f"{NODE} to be Ready with a sample", agent_ready, 60, processes.check_alive)
        return measure(args, coordinator, processes, agent, exporter, url)


def measure(
    args: argparse.Namespace,
    coordinator: Coordinator,
    processes: Processes,
    agent: Any,
    exporter: Any,
    url: str,
) -> dict[str, Any]:
    print(f"measuring for {args.seconds:.0f} s ...", file=sys.stderr, flush=True)
    sampler = Sampler({"picoord-agent": agent, "node_exporter": exporter}, interval=1.0)
    scraper = Scraper(url)
    machine = MachineCpu()
    window_start = time.time()
    sampler.start()
    scraper.start()
    try:
        deadline = time.monotonic() + args.seconds
        while time.monotonic() < deadline:
            processes.check_alive()
            time.sleep(min(1.0, max(0.0, deadline - time.monotonic())))
    finally:
        scraper.stop()
        sampler.stop()
        machine.stop()
    window_end = time.time()
    processes.check_alive()
    delivery = check_delivery(coordinator, window_start, window_end)
    return {
        "seconds": args.seconds,
        "agent": asdict(footprint(sampler.samples["picoord-agent"])),
        "node_exporter": asdict(footprint(sampler.samples["node_exporter"])),
        "scrapes": scraper.scrapes,
        "scrape_failures": scraper.failures,
        "scrape_bytes": scraper.bytes,
        "sampler_errors": sampler.errors,
        "machine_busy_cores": machine.busy_cores,
        "machine_steal_cores": machine.steal_cores,
        "delivery": delivery,
    }


def report(result: dict[str, Any]) -> tuple[bool, bool]:
    """Print the figures; return (valid, all targets met)."""
    agent, exporter = Footprint(**result["agent"]), Footprint(**result["node_exporter"])
    print(
        f"\npicoord agent footprint: {result['seconds']:.0f} s window, 1 s sampling, "
        f"agent metrics every 1 s, node_exporter scraped every 1 s (loopback)"
    )
    rows = []
    for name, fp in (("picoord-agent", agent), ("node_exporter 1.5.0 (anchor)", exporter)):
        rows.append(
            [
                name,
                mib(fp.steady_rss),
                mib(fp.peak_rss),
                mib(fp.steady_uss),
                mib(fp.peak_uss),
                f"{fp.cpu_percent:.2f} %",
                str(fp.samples),
            ]
        )
    headers = ["process", "steady RSS", "peak RSS", "steady USS", "peak USS", "CPU (1 core)", "samples"]
    print(table(headers, rows))
    ratios = [
        f"steady RSS {agent.steady_rss / exporter.steady_rss:.2f}x",
        f"peak RSS {agent.peak_rss / exporter.peak_rss:.2f}x",
    ]
    if agent.steady_uss and exporter.steady_uss:
        ratios.append(f"steady USS {agent.steady_uss / exporter.steady_uss:.2f}x")
    cpu_ratio = f"{agent.cpu_percent / exporter.cpu_percent:.2f}x" if exporter.cpu_percent > 0 else "n/a"
    ratios.append(f"CPU {cpu_ratio}")
    print("ratio agent/node_exporter: " + ", ".join(ratios))
    print(
        f"node_exporter scrapes: {result['scrapes']} ok, {result['scrape_failures']} failed, "
        f"{result['scrape_bytes'] / max(1, result['scrapes']) / 1024:.0f} KiB each; "
        f"machine busy {result['machine_busy_cores']:.2f} cores of 2 during the window "
        f"(steal {result['machine_steal_cores']:.2f})"
    )
    delivery = result["delivery"]
    age = delivery["latest_age_seconds"]
    valid = (
        delivery["status"] == "Ready"
        and age is not None
        and age <= 5
        and delivery["samples_in_judged_window"] >= MIN_COVERAGE * delivery["expected_in_judged_window"]
    )
    print(
        f"coordinator check: {NODE} {delivery['status']}, "
        f"{delivery['samples_in_judged_window']} samples received in the last "
        f"{delivery['expected_in_judged_window']:.1f} s of the window (1/s expected), latest "
        + (f"{age:.1f} s old" if age is not None else "missing")
        + f": {'VALID' if valid else 'INVALID'}"
    )
    checks = [
        (f"agent peak RSS <= {mib(RSS_TARGET)}", mib(agent.peak_rss), agent.peak_rss <= RSS_TARGET),
        (f"agent steady RSS <= {mib(RSS_TARGET)}", mib(agent.steady_rss), agent.steady_rss <= RSS_TARGET),
        (
            f"agent CPU <= {CPU_TARGET:.0f} % of one core",
            f"{agent.cpu_percent:.2f} %",
            agent.cpu_percent <= CPU_TARGET,
        ),
    ]
    print(table(["target", "measured", "result"], [[t, m, verdict(ok)] for t, m, ok in checks]))
    return valid, all(ok for _, _, ok in checks)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--seconds", type=float, default=60.0, help="measurement window (default 60)")
    parser.add_argument("--strict", action="store_true", help="exit 1 when a target is missed")
    parser.add_argument("--json", type=Path, help="also write the results to this file")
    parser.add_argument("--node-exporter", type=Path, default=NODE_EXPORTER, help="node_exporter binary")
    args = parser.parse_args(argv)
    if args.seconds < 60:
        print(
            f"note: --seconds {args.seconds:g} is shorter than the 60 s the targets assume", file=sys.stderr
        )
    if not args.node_exporter.exists():
        print(f"agent_footprint: {args.node_exporter} not found (apt-get install prometheus-node-exporter)")
        return 2
    try:
        result = run(args)
    except BenchError as error:
        print(f"agent_footprint: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("agent_footprint: interrupted, cleaned up", file=sys.stderr)
        return 130
    valid, met = report(result)
    result["valid"], result["targets_met"] = valid, met
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n")
    if not valid:
        print(
            "agent_footprint: INVALID: the coordinator did not receive the agent's samples", file=sys.stderr
        )
        return 2
    return 1 if args.strict and not met else 0


if __name__ == "__main__":
    sys.exit(main())

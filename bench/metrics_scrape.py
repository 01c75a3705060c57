"""What a Prometheus scrape of the coordinator costs at `--nodes` nodes, and what it does to
the coordinator's event loop.

In this process: a real `Cluster` (SQLite store in a temp dir) with `--nodes` enrolled,
connected nodes, each fed one Raspberry-Pi-sized MetricsSample per second (fanin.py's
sample: 4 CPUs, 2 filesystems, 2 NICs, 1 thermal zone; about 65 series per node) by a task
on an asyncio loop, as the session servicer does. A second task ticks every 10 ms and
records how late each tick wakes (the loop's lag). A separate scraper process GETs
/metrics over HTTP on loopback, back to back with a `--pause` between scrapes, as a
Prometheus would (only much more often). Three windows of `--seconds` each:

* idle: no scrapes (the lag the loop has anyway on this machine);
* anchor: the previous endpoint, prometheus_client's `start_http_server` with the
  collector rendering every node's series at every scrape;
* cached: `serve_metrics`, the cached exposition re-rendered in the background every
  `--interval` s from a snapshot taken on the loop.

Then two windows at Prometheus's cadence (a scrape every `--cadence` s, 15 by default; at
least four scrapes each), where the renders are the cost:

* every interval (anchor): the rule before cadences were kept, a render every `--interval`
  s while anyone scraped in the last 5 minutes;
* per scrape: `serve_metrics` as it is, one render timed to finish just before each
  expected scrape.

Reported: scrape latency p50/p99/max through HTTP and the body size, render time of the
cached exposition, loop lag p99/max in each window, and the anchor/cached ratios; at the
cadence, the renders and their seconds, and the age of the bytes each scrape got.
Targets: cached scrape p99 <= 250 ms; loop lag max <= 50 ms while scrapes run; at the
cadence, no more renders than the anchor and, once the first two scrapes have shown the
cadence, no older bytes than its plus a second. (Where a render is slow, at thousands of
nodes, the render duty cap already spaces the anchor's renders: the counts come close,
and the gain is mostly the bytes' age.)

    .venv/bin/python bench/metrics_scrape.py [--nodes 1000] [--seconds 20] [--strict] [--json out.json]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing
import queue
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any

from _common import (
    LOOPBACK,
    BenchError,
    bench_workspace,
    die_with_parent,
    http_get,
    percentile,
    pick_ports,
    table,
    verdict,
)
from _prometheus_client_anchor import ClusterCollector
from fanin import pi_hardware, pi_sample
from prometheus_client import CollectorRegistry, generate_latest, start_http_server

from picoord.coordinator.cluster import Cluster, LiveSession
from picoord.coordinator.prometheus import RENDER_INTERVAL, MetricsEndpoint, MetricsExposition, serve_metrics
from picoord.coordinator.status import StatusTimeouts
from picoord.coordinator.store import CertificateRecord, Store, TokenRecord
from picoord.coordinator.telemetry import MetricsHistory
from picoord.v1 import agent_pb2, node_pb2

SCRAPE_P99_TARGET = 0.250  # seconds
LOOP_LAG_TARGET = 0.050  # seconds
TICK = 0.010


# --- the cluster ---------------------------------------------------------------------------------


async def build_cluster(store: Store, count: int) -> Cluster:
    """`count` enrolled nodes with an open session and one sample each."""
    now = time.time()
    store.add_token(TokenRecord("abcdef", "bench", now, now + 86400, 0, 0, "metrics bench"))
    for index in range(count):
        name = f"pi{index}"
        store.enroll(
            "abcdef", name, {}, CertificateRecord(f"serial{index}", name, now, now + 86400, None), now
        )
    cluster = Cluster(store, StatusTimeouts(), MetricsHistory())
    template = pi_sample().metrics
    for index in range(count):
        name = f"pi{index}"
        hello = agent_pb2.Hello(agent_version="0.1.0", hardware=pi_hardware(name, index))
        await cluster.open_session(LiveSession(name, f"serial{index}"), hello)
        cluster.history.add(name, next_sample(template, index))
    if len(cluster.sessions) != count:  # what every figure here assumes
        raise RuntimeError(f"{len(cluster.sessions)} of {count} sessions open")
    return cluster


def next_sample(template: node_pb2.MetricsSample, index: int) -> node_pb2.MetricsSample:
    """A new sample (never one changed in place: the coordinator keeps the latest by reference)."""
    sample = node_pb2.MetricsSample()
    sample.CopyFrom(template)
    sample.timestamp = time.time()
    sample.cpu_percent = index % 100
    for cpu in sample.cpus:
        cpu.user += index
        cpu.idle += 2 * index
    for counters in sample.network:
        counters.receive_bytes += 1000 * index
    return sample


async def feed(cluster: Cluster, names: list[str], stop: asyncio.Event) -> None:
    """One sample per node per second, spread in 10 ms slices, as sessions deliver them."""
    template = pi_sample().metrics
    per_tick = max(1, round(len(names) * TICK))
    position = 0
    while not stop.is_set():
        for name in names[position : position + per_tick]:
            cluster.heard_from(name)
            cluster.history.add(name, next_sample(template, position))
        position = (position + per_tick) % len(names)
        await asyncio.sleep(TICK)


async def tick(lags: list[tuple[float, float]], stop: asyncio.Event) -> None:
    """How late the loop wakes a 10 ms sleep: (when, lag)."""
    while not stop.is_set():
        before = time.monotonic()
        await asyncio.sleep(TICK)
        after = time.monotonic()
        lags.append((after, after - before - TICK))


# --- the scraper (a separate process, as Prometheus is) --------------------------------------------


def scraper_main(url: str, seconds: float, pause: float, results: multiprocessing.Queue) -> None:
    die_with_parent()
    latencies: list[float] = []
    sizes: list[int] = []
    ages: list[int] = []  # the Age header: whole seconds since the node section was rendered
    errors: list[str] = []
    first = http_get(url, timeout=60).decode()  # a fresh endpoint renders on its first scrape: not timed
    series = sum(1 for line in first.splitlines() if line and not line.startswith("#"))
    time.sleep(pause)  # then at the cadence, as Prometheus scrapes from its first
    started = time.monotonic()
    while time.monotonic() - started < seconds:
        before = time.perf_counter()
        try:
            with urllib.request.urlopen(url, timeout=60) as reply:
                sizes.append(len(reply.read()))
                ages.append(int(reply.headers.get("Age", "-1")))
            latencies.append(time.perf_counter() - before)
        except Exception as error:
            errors.append(f"{type(error).__name__}: {error}")
        time.sleep(pause)
    results.put(
        {
            "latencies": latencies,
            "sizes": sizes,
            "ages": ages,
            "errors": errors,
            "series": series,
            "start": started,
            "end": time.monotonic(),
        }
    )


async def scrape_window(url: str, seconds: float, pause: float) -> dict[str, Any]:
    context = multiprocessing.get_context("spawn")
    results: multiprocessing.Queue = context.Queue()
    process = context.Process(target=scraper_main, args=(url, seconds, pause, results), daemon=True)
    process.start()
    try:
        deadline = time.monotonic() + seconds + 120
        while True:
            try:
                return results.get_nowait()
            except queue.Empty:
                if not process.is_alive() or time.monotonic() > deadline:
                    raise BenchError(f"the scraper of {url} died or hung") from None
                await asyncio.sleep(0.1)
    finally:
        process.join(10)
        if process.is_alive():
            process.kill()


def lag_figures(lags: list[tuple[float, float]], start: float, end: float) -> dict[str, float]:
    inside = [lag for when, lag in lags if start <= when <= end]
    if not inside:
        raise BenchError("the loop never ticked during a window")
    return {
        "ticks": len(inside),
        "p50": percentile(inside, 50),
        "p99": percentile(inside, 99),
        "max": max(inside),
    }


def scrape_figures(scraped: dict[str, Any]) -> dict[str, Any]:
    latencies = scraped["latencies"]
    if not latencies:
        raise BenchError(f"no successful scrape: {scraped['errors'][:3]}")
    return {
        "scrapes": len(latencies),
        "errors": len(scraped["errors"]),
        "p50": percentile(latencies, 50),
        "p99": percentile(latencies, 99),
        "max": max(latencies),
        "bytes": max(scraped["sizes"]),
        "series": scraped["series"],
        "age_max": max(scraped["ages"]),
        # A fresh endpoint learns the cadence from the first scrapes' gaps: after them.
        "age_max_after_two": max(scraped["ages"][2:], default=-1),
    }


# --- the run ----------------------------------------------------------------------------------------


async def windows(cluster: Cluster, args: argparse.Namespace) -> dict[str, Any]:
    stop = asyncio.Event()
    lags: list[tuple[float, float]] = []
    names = [record.name for record in cluster.nodes()]
    tasks = [asyncio.create_task(feed(cluster, names, stop)), asyncio.create_task(tick(lags, stop))]
    result: dict[str, Any] = {}
    try:
        say(f"idle window: {args.seconds:.0f} s, no scrapes")
        start = time.monotonic()
        await asyncio.sleep(args.seconds)
        result["idle"] = {"loop_lag": lag_figures(lags, start, time.monotonic())}

        # The anchor: prometheus_client renders all series at every scrape, in its own thread.
        registry = CollectorRegistry(auto_describe=False)
        registry.register(ClusterCollector(cluster))
        renders = []
        for _ in range(3):
            before = time.perf_counter()
            generate_latest(registry)
            renders.append(time.perf_counter() - before)
        old_port, new_port = pick_ports(2)
        started = start_http_server(old_port, addr=LOOPBACK, registry=registry)
        say(f"anchor window: prometheus_client's server, {args.seconds:.0f} s of scrapes")
        scraped = await scrape_window(f"http://{LOOPBACK}:{old_port}/metrics", args.seconds, args.pause)
        result["anchor"] = {
            "render": {"p50": percentile(renders, 50), "max": max(renders)},
            "scrape": scrape_figures(scraped),
            "loop_lag": lag_figures(lags, scraped["start"], scraped["end"]),
        }
        if isinstance(started, tuple):  # prometheus_client >= 0.17 returns (server, thread)
            started[0].shutdown()
            started[0].server_close()

        say(
            f"cached window: serve_metrics, render every {args.interval:g} s, {args.seconds:.0f} s of scrapes"
        )
        rendered, scraped = await served_and_scraped(cluster, args, new_port, args.seconds, args.pause)
        result["cached"] = {
            "render": {"renders": len(rendered), "p50": percentile(rendered, 50), "max": max(rendered)},
            "scrape": scrape_figures(scraped),
            "loop_lag": lag_figures(lags, scraped["start"], scraped["end"]),
        }
        if args.cadence:
            seconds = max(args.seconds, 4 * args.cadence)
            for name, anchor_rule in (("every_interval", True), ("per_scrape", False)):
                say(f"cadence window ({name}): a scrape every {args.cadence:g} s for {seconds:.0f} s")
                result[name] = await cadence_window(cluster, args, seconds, anchor_rule)
    finally:
        stop.set()
        await asyncio.gather(*tasks, return_exceptions=True)
    return result


async def cadence_window(
    cluster: Cluster, args: argparse.Namespace, seconds: float, anchor_rule: bool
) -> dict[str, Any]:
    """Scrapes every `args.cadence` s; the renders counted from the scraper's first scrape."""
    (port,) = pick_ports(1)
    rendered, scraped = await served_and_scraped(cluster, args, port, seconds, args.cadence, anchor_rule)
    return {
        "renders": len(rendered),
        "render_seconds": sum(rendered),
        "seconds": seconds,
        "scrape": scrape_figures(scraped),
    }


async def served_and_scraped(
    cluster: Cluster,
    args: argparse.Namespace,
    port: int,
    seconds: float,
    pause: float,
    anchor_rule: bool = False,
) -> tuple[list[float], dict[str, Any]]:
    """`serve_metrics` on `port` (with the anchor's render rule if asked), scraped for
    `seconds`: each render's seconds, and what the scraper measured."""
    endpoint = serve_metrics(cluster, LOOPBACK, port, interval=args.interval)
    if anchor_rule:
        every_interval(endpoint.exposition)
    rendered: list[float] = []
    stop = asyncio.Event()
    watcher = asyncio.create_task(watch_renders(endpoint, rendered, stop))
    try:
        scraped = await scrape_window(f"http://{LOOPBACK}:{port}/metrics", seconds, pause)
    finally:
        stop.set()
        await watcher
        await asyncio.to_thread(endpoint.close)
    return rendered, scraped


def every_interval(exposition: MetricsExposition) -> None:
    """The anchor: the rule before cadences were kept. A render `_pause` (at least
    `interval`) after the last, while anyone scraped in the last `idle_after` seconds."""

    def due_in() -> float | None:
        now = time.monotonic()
        if not exposition._scrapes or now - exposition._scrapes[-1] > exposition.idle_after:
            return None
        last = exposition.latest()
        return 0.0 if last is None else max(0.0, last.rendered_at + exposition._pause - now)

    exposition._next_render_in = due_in  # type: ignore[method-assign]


async def watch_renders(endpoint: MetricsEndpoint, rendered: list[float], stop: asyncio.Event) -> None:
    seen = None
    while not stop.is_set():
        latest = endpoint.exposition.latest()
        if latest is not None and latest is not seen:
            rendered.append(latest.seconds)
            seen = latest
        await asyncio.sleep(0.05)


def run(args: argparse.Namespace) -> dict[str, Any]:
    with bench_workspace("metrics") as (root, _processes):
        say(f"building a cluster of {args.nodes} nodes with one sample each")
        result = asyncio.run(built_and_measured(root, args))
    result.update(
        nodes=args.nodes, seconds=args.seconds, interval=args.interval, pause=args.pause, cadence=args.cadence
    )
    return result


async def built_and_measured(root: Path, args: argparse.Namespace) -> dict[str, Any]:
    store = Store(root / "state.db")
    try:
        return await windows(await build_cluster(store, args.nodes), args)
    finally:
        store.close()


def say(text: str) -> None:
    """Progress goes to stderr, figures to stdout."""
    print(text, file=sys.stderr, flush=True)


def ms(value: float) -> str:
    return f"{1000 * value:.1f} ms"


def report(result: dict[str, Any]) -> bool:
    idle, anchor, cached = result["idle"], result["anchor"], result["cached"]
    print(
        f"\npicoord /metrics: {result['nodes']} nodes, one Pi-sized sample/s each, "
        f"{result['seconds']:.0f} s per window, a scrape every {result['pause']:g} s after the last one "
        f"(from another process, loopback); {result['cached']['scrape']['series']} series"
    )
    rows = [
        [
            "anchor: prometheus_client, render per scrape",
            ms(anchor["scrape"]["p50"]),
            ms(anchor["scrape"]["p99"]),
            ms(anchor["scrape"]["max"]),
            str(anchor["scrape"]["scrapes"]),
            f"{anchor['scrape']['bytes'] / 2**20:.1f} MiB",
        ],
        [
            f"cached: serve_metrics (render every {result['interval']:g} s)",
            ms(cached["scrape"]["p50"]),
            ms(cached["scrape"]["p99"]),
            ms(cached["scrape"]["max"]),
            str(cached["scrape"]["scrapes"]),
            f"{cached['scrape']['bytes'] / 2**20:.1f} MiB",
        ],
    ]
    print("\nscrape latency through HTTP")
    print(table(["endpoint", "p50", "p99", "max", "scrapes", "body"], rows))
    print(
        f"\nrender of all series: prometheus_client {ms(anchor['render']['p50'])} (p50 of 3); "
        f"cached exposition's background render {ms(cached['render']['p50'])} p50, "
        f"{ms(cached['render']['max'])} max over {cached['render']['renders']} renders"
    )
    print("\nevent-loop lag (a 10 ms sleep woken late by)")
    print(
        table(
            ["window", "p50", "p99", "max", "ticks"],
            [
                [
                    name,
                    ms(w["loop_lag"]["p50"]),
                    ms(w["loop_lag"]["p99"]),
                    ms(w["loop_lag"]["max"]),
                    str(w["loop_lag"]["ticks"]),
                ]
                for name, w in (("idle (no scrapes)", idle), ("anchor", anchor), ("cached", cached))
            ],
        )
    )
    speedup = anchor["scrape"]["p50"] / cached["scrape"]["p50"]
    print(
        f"\nratios anchor/cached: scrape p50 {speedup:.0f}x, scrape p99 "
        f"{anchor['scrape']['p99'] / cached['scrape']['p99']:.0f}x, loop lag max "
        f"{anchor['loop_lag']['max'] / cached['loop_lag']['max']:.1f}x"
    )
    scrape_ok = cached["scrape"]["p99"] <= SCRAPE_P99_TARGET and cached["scrape"]["errors"] == 0
    lag_ok = cached["loop_lag"]["max"] <= LOOP_LAG_TARGET
    cadence_ok = report_cadence(result) if result["cadence"] else True
    print(
        f"\n{verdict(scrape_ok)}  cached scrape p99 {ms(cached['scrape']['p99'])} "
        f"<= {ms(SCRAPE_P99_TARGET)}, no error"
    )
    print(
        f"{verdict(lag_ok)}  loop lag max while scraped {ms(cached['loop_lag']['max'])} "
        f"<= {ms(LOOP_LAG_TARGET)}"
    )
    return scrape_ok and lag_ok and cadence_ok


def report_cadence(result: dict[str, Any]) -> bool:
    """The two windows at Prometheus's cadence: renders against freshness."""
    anchor, ours = result["every_interval"], result["per_scrape"]
    print(f"\nat Prometheus's cadence, a scrape every {result['cadence']:g} s for {ours['seconds']:.0f} s")
    print(
        table(
            [
                "rule",
                "renders",
                "render seconds",
                "scrapes",
                "scrape p50",
                "scrape p99",
                "oldest bytes served",
                "after the first two",
            ],
            [
                [
                    name,
                    str(w["renders"]),
                    f"{w['render_seconds']:.2f} s",
                    str(w["scrape"]["scrapes"]),
                    ms(w["scrape"]["p50"]),
                    ms(w["scrape"]["p99"]),
                    f"{w['scrape']['age_max']} s",
                    f"{w['scrape']['age_max_after_two']} s",
                ]
                for name, w in (
                    (f"anchor: every {result['interval']:g} s while scraped", anchor),
                    ("per scrape (serve_metrics)", ours),
                )
            ],
        )
    )
    ratio = ours["render_seconds"] / anchor["render_seconds"] if anchor["render_seconds"] else float("nan")
    renders = ours["renders"] / max(1, anchor["renders"])
    print(f"ratio per scrape / anchor: renders {renders:.2f}x, render seconds {ratio:.2f}x")
    fewer = ours["renders"] <= anchor["renders"]
    ours_age, anchor_age = ours["scrape"]["age_max_after_two"], anchor["scrape"]["age_max_after_two"]
    fresh = ours_age <= anchor_age + 1 and ours["scrape"]["errors"] == 0
    print(
        f"{verdict(fewer and fresh)}  at the cadence: {ours['renders']} renders <= the anchor's "
        f"{anchor['renders']}, bytes after the first two scrapes at most {ours_age} s old <= "
        f"{anchor_age} + 1 s, no error"
    )
    return fewer and fresh


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--nodes", type=int, default=1000, help="nodes in the cluster (default 1000)")
    parser.add_argument("--seconds", type=float, default=20.0, help="length of each window (default 20)")
    parser.add_argument("--pause", type=float, default=0.1, help="seconds between scrapes (default 0.1)")
    parser.add_argument(
        "--interval",
        type=float,
        default=RENDER_INTERVAL,
        help=f"render interval (default {RENDER_INTERVAL:g})",
    )
    parser.add_argument(
        "--cadence",
        type=float,
        default=15.0,
        help="seconds between scrapes in the two Prometheus-cadence windows (default 15; 0: skip them)",
    )
    parser.add_argument("--strict", action="store_true", help="exit 1 when a target is missed")
    parser.add_argument("--json", type=Path, help="also write the results to this file")
    args = parser.parse_args(argv)
    if args.nodes < 1 or args.seconds <= 0 or args.pause < 0 or args.interval <= 0 or args.cadence < 0:
        parser.error("need --nodes >= 1, --seconds > 0, --pause >= 0, --interval > 0, --cadence >= 0")
    try:
        result = run(args)
    except BenchError as error:
        print(f"metrics_scrape: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("metrics_scrape: interrupted, cleaned up", file=sys.stderr)
        return 130
    met = report(result)
    result["targets_met"] = met
    if args.json:
        args.json.write_text(json.dumps(result, indent=2, default=str) + "\n")
    return 1 if args.strict and not met else 0


if __name__ == "__main__":
    sys.exit(main())

"""A rolling update with picoord against the same update on Docker Swarm, on the same lab Pis.

One run brings up a lab (`picoord.lab.cluster.Lab` with sandboxes, a dockerd in every Pi
and the lab registry: traffic stays inside the lab's namespaces), forms a real Docker
Swarm of the same three Pis with picoord's own `coordctl apply` of a ClusterMembership,
and pre-pulls both images on every Pi, so neither system pulls during the measurement.
Then, `--rounds` times (alternating mcp:1 -> mcp:2 and mcp:2 -> mcp:1, and which system
goes first), each system in turn, never both at once (both publish port 8080):

* picoord: `coordctl apply` of the service at the old image and `coordctl rollout mcp`
  (not timed), then timed: `coordctl rollout mcp --image REGISTRY/mcp:NEW`, from the
  command's start until it exits 0, which it does only when every replica runs the new
  revision and has been healthy for the monitor window. Then the service is scaled to 0.
* Swarm: `docker service create` at the old image (not timed), then timed:
  `docker service update --detach --image REGISTRY/mcp:NEW mcp` from its start until
  `docker service inspect` says UpdateStatus completed (Swarm sets it one monitor window
  after the last task is up) and all 3 tasks run the new image with healthy containers.
  Then `docker service rm`.

Both get the same work, written once in `Workload`: 3 replicas, at most one per Pi, port
8080 published on the Pi, parallelism 1, no delay, stop-first, monitor 5 s, failure
action rollback, stop grace 10 s, restart always after 5 s, and a health check of GET
/health on 8080 every 1 s (timeout 1 s, 3 retries). picoord's agent sends the GET itself;
Swarm runs `wget` inside the container (the stand-in images have no other client).

    .venv/bin/python bench/rollout_vs_swarm.py [--rounds 3] [--strict] [--json out.json]

Prints each round, the medians, the ratio picoord/Swarm (target <= 1.0), and for picoord a
per-replica timeline from the coordinator's and agents' logs: stop asked, old container
gone, new container started, first healthy probe, next replica. Exit status as in
bench/README.md: 0 ran, 1 with --strict and the target missed, 2 could not run, 130
interrupted. Run as root.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import shutil
import statistics
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

from _common import BenchError, bench_workspace, table, verdict

from picoord.lab.cluster import Lab
from picoord.lab.netns import LabError

SERVICE = "mcp"
TARGET_RATIO = 1.0
POLL = 0.2  # seconds between two looks at Swarm's state
ROLLOUT_TIMEOUT = 300.0
LAB_TIMEOUT = 300.0


# --- the one workload both systems get -------------------------------------------------------


@dataclass(frozen=True)
class Workload:
    replicas: int = 3
    port: int = 8080
    parallelism: int = 1
    order: str = "stop-first"
    monitor: float = 5.0
    failure_action: str = "rollback"
    stop_grace: float = 10.0
    restart_delay: float = 5.0
    health_path: str = "/health"
    health_interval: float = 1.0
    health_timeout: float = 1.0
    health_retries: int = 3
    publish: bool = True  # the port published at the same number on the Pi (else only exposed)
    max_per_node: int = 1  # 0: no limit

    def picoord_spec(self, image: str, replicas: int | None = None) -> str:
        """picoord's `kind: Service` for this workload (written to the bench's temp dir)."""
        count = self.replicas if replicas is None else replicas
        published = f", published: {self.port}" if self.publish else ""
        ports = f"ports:\n  - {{target: {self.port}{published}}}\n"
        limit = f"placement:\n  max_per_node: {self.max_per_node}\n" if self.max_per_node else ""
        return f"""\
kind: Service
name: {SERVICE}
image: {image}
replicas: {count}
{ports}{limit}restart: {{condition: always, delay: {self.restart_delay:g}s}}
stop_grace_period: {self.stop_grace:g}s
health:
  http: {{path: {self.health_path}, port: {self.port}}}
  interval: {self.health_interval:g}s
  timeout: {self.health_timeout:g}s
  retries: {self.health_retries}
update:
  parallelism: {self.parallelism}
  delay: 0s
  order: {self.order}
  monitor: {self.monitor:g}s
  failure_action: {self.failure_action}
"""

    def swarm_create_args(self, image: str, replicas: int | None = None) -> list[str]:
        """`docker service create` arguments for the same workload."""
        count = self.replicas if replicas is None else replicas
        return [
            "service",
            "create",
            "--detach",
            "--name",
            SERVICE,
            "--replicas",
            str(count),
            *(["--replicas-max-per-node", str(self.max_per_node)] if self.max_per_node else []),
            *(["--publish", f"mode=host,target={self.port},published={self.port}"] if self.publish else []),
            "--restart-condition",
            "any",
            "--restart-delay",
            f"{self.restart_delay:g}s",
            "--stop-grace-period",
            f"{self.stop_grace:g}s",
            "--health-cmd",
            f"wget -q -O- http://127.0.0.1:{self.port}{self.health_path}",
            "--health-interval",
            f"{self.health_interval:g}s",
            "--health-timeout",
            f"{self.health_timeout:g}s",
            "--health-retries",
            str(self.health_retries),
            "--update-parallelism",
            str(self.parallelism),
            "--update-delay",
            "0s",
            "--update-order",
            self.order,
            "--update-monitor",
            f"{self.monitor:g}s",
            "--update-failure-action",
            self.failure_action,
            image,
        ]


def image_ref(lab: Lab, version: int) -> str:
    return f"{lab.registry_address}/mcp:{version}"


# --- the lab and its swarm ---------------------------------------------------------------------


@contextlib.contextmanager
def lab_up(nodes: int = 3, keep_logs: bool = False, **lab_args: Any) -> Iterator[Lab]:
    """A lab with a dockerd in every Pi and the registry; always brought down, and its work
    dir (logs included) removed unless `keep_logs`."""
    lab = Lab(sandboxes=True, services=["dockerd"], registry=True, **lab_args)
    try:
        try:
            lab.up(nodes)
        except LabError as error:
            raise BenchError(f"the lab did not come up: {error}") from None
        yield lab
    finally:
        lab.down()
        if not keep_logs:
            shutil.rmtree(lab.work_dir, ignore_errors=True)


def coordctl(lab: Lab, *args: str, timeout: float = 120.0) -> str:
    done = lab.coordctl(*args, timeout=timeout)
    if done.returncode != 0:
        raise BenchError(
            f"coordctl {' '.join(args)} exited {done.returncode}: {(done.stderr or done.stdout)[-1500:]}"
        )
    return done.stdout


def docker(lab: Lab, node: str, *args: str, timeout: float = 60.0, check: bool = True) -> str:
    """The docker CLI inside a Pi, against that Pi's own dockerd."""
    sandbox = lab.sandbox(node)
    done = sandbox.run(["docker", "-H", f"unix://{sandbox.docker_socket}", *args], timeout=timeout)
    if check and done.returncode != 0:
        raise BenchError(
            f"docker {' '.join(args[:3])} on {node} exited {done.returncode}: {done.stderr[-800:]}"
        )
    return done.stdout


def engine(lab: Lab, node: str) -> Any:
    """docker-py's low-level client on a Pi's dockerd, dialled from the host (cheap polling)."""
    import docker as docker_sdk

    path = lab.sandbox(node).host_path(lab.sandbox(node).docker_socket)
    return docker_sdk.APIClient(base_url=f"unix://{path}", version="auto", timeout=30)


def form_swarm(lab: Lab, root: Path) -> None:
    """pi1 manages, the others join: through picoord's own ClusterMembership apply (the join
    token never appears on a command line)."""
    workers = ", ".join(lab.nodes[1:])
    spec = root / "swarm.yaml"
    spec.write_text(
        f"kind: ClusterMembership\nname: swarm\nengine: swarm\n"
        f"manager: {lab.nodes[0]}\nworkers: [{workers}]\n"
    )
    coordctl(lab, "apply", "-f", str(spec), timeout=300)
    client = engine(lab, lab.nodes[0])
    deadline = time.monotonic() + 60
    while True:
        ready = [n for n in client.nodes() if n["Status"]["State"] == "ready"]
        if len(ready) == len(lab.nodes):
            return
        if time.monotonic() > deadline:
            raise BenchError(f"swarm nodes not ready after 60 s: {[n['Status'] for n in client.nodes()]}")
        time.sleep(0.5)


def prepull(lab: Lab, images: list[str]) -> None:
    """Every image on every Pi before anything is timed: neither system pulls in the window."""
    for node in lab.nodes:
        for image in images:
            docker(lab, node, "pull", "-q", image, timeout=120)


def wait_until(what: str, check: Callable[[], bool], timeout: float, every: float = POLL) -> float:
    """Poll `check` until true; return the monotonic time it first was."""
    deadline = time.monotonic() + timeout
    last_error = ""
    while True:
        try:
            if check():
                return time.monotonic()
        except Exception as error:  # a poll that fails (a task being replaced) is retried
            last_error = str(error)[:300]
        if time.monotonic() > deadline:
            raise BenchError(
                f"timed out after {timeout:g} s waiting for {what}"
                + (f" ({last_error})" if last_error else "")
            )
        time.sleep(every)


class SwarmView:
    """What the swarm manager says about a service, read through the Engine API."""

    def __init__(self, lab: Lab) -> None:
        self.lab = lab
        self.manager = engine(lab, lab.nodes[0])
        self.engines = {node: engine(lab, node) for node in lab.nodes}
        self.hostnames = {n["ID"]: n["Description"]["Hostname"] for n in self.manager.nodes()}

    def running_tasks(self, service: str) -> list[dict[str, Any]]:
        tasks = self.manager.tasks(filters={"service": service, "desired-state": "running"})
        return [t for t in tasks if t["Status"]["State"] == "running"]

    def healthy(self, task: dict[str, Any]) -> bool:
        node = self.hostnames.get(task["NodeID"])
        container = task["Status"].get("ContainerStatus", {}).get("ContainerID")
        if node not in self.engines or not container:
            return False
        state = self.engines[node].inspect_container(container)["State"]
        return state.get("Health", {}).get("Status") == "healthy"

    def healthy_on(self, service: str, image: str) -> dict[str, str]:
        """node -> task id for running tasks of `image` whose container is healthy."""
        found = {}
        for task in self.running_tasks(service):
            if task["Spec"]["ContainerSpec"]["Image"].split("@")[0] != image:
                continue
            if self.healthy(task):
                found[self.hostnames.get(task["NodeID"], task["NodeID"])] = task["ID"]
        return found

    def update_state(self, service: str) -> str:
        status = self.manager.inspect_service(service).get("UpdateStatus") or {}
        return str(status.get("State", ""))

    def containers(self, label: str) -> int:
        return sum(
            len(client.containers(all=True, filters={"label": label})) for client in self.engines.values()
        )

    def close(self) -> None:
        for client in [self.manager, *self.engines.values()]:
            client.close()


# --- the two timed updates -----------------------------------------------------------------------


def _docker_time(text: str) -> float:
    """An RFC 3339 time from the Engine API (nanoseconds) as a POSIX timestamp."""
    head, _, fraction = text.rstrip("Z").partition(".")
    return datetime.fromisoformat(head + "+00:00").timestamp() + float("0." + (fraction or "0"))


def swarm_timeline(view: SwarmView, since: float) -> list[tuple[float, str, str]]:
    """(seconds after `since`, node, what) for each task of the service: created, and its
    last state (running = healthy, for a service with a health check; shutdown = stopped)."""
    lines = []
    for task in view.manager.tasks(filters={"service": SERVICE}):
        node = view.hostnames.get(task["NodeID"], "?")
        image = task["Spec"]["ContainerSpec"]["Image"].split("@")[0].rsplit("/", 1)[-1]
        name = f"task {task['ID'][:6]} slot {task.get('Slot', '?')} {image}"
        created = _docker_time(task["CreatedAt"])
        if created >= since:
            lines.append((created - since, node, f"{name} created"))
        changed = _docker_time(task["Status"]["Timestamp"])
        if changed >= since:
            lines.append((changed - since, node, f"{name} {task['Status']['State']}"))
    return sorted(lines)


def swarm_round(
    lab: Lab, view: SwarmView, work: Workload, old: str, new: str
) -> tuple[float, list[tuple[float, str, str]]]:
    """Create at `old` (untimed), time the update to `new`, remove the service. Returns the
    seconds and the tasks' timeline."""
    docker(lab, lab.nodes[0], *work.swarm_create_args(old))
    try:
        wait_until(
            "the swarm service at the old image",
            lambda: len(view.healthy_on(SERVICE, old)) == work.replicas,
            180,
        )
        wall, started = time.time(), time.monotonic()
        docker(lab, lab.nodes[0], "service", "update", "--detach", "--image", new, SERVICE)
        done = wait_until(
            "swarm's update to complete",
            lambda: (
                view.update_state(SERVICE) == "completed"
                and len(view.healthy_on(SERVICE, new)) == work.replicas
            ),
            ROLLOUT_TIMEOUT,
        )
        return done - started, swarm_timeline(view, wall)
    finally:
        docker(lab, lab.nodes[0], "service", "rm", SERVICE, check=False)
        wait_until(
            "swarm's containers to go",
            lambda: view.containers(f"com.docker.swarm.service.name={SERVICE}") == 0,
            120,
        )


def picoord_ps(lab: Lab) -> list[dict[str, Any]]:
    listing = lab.coordctl_json("ps", SERVICE)
    if not isinstance(listing, list):
        raise BenchError(f"`coordctl ps {SERVICE} -o json` printed {listing!r}")
    return listing


def healthy_replicas(listing: list[dict[str, Any]], image: str | None = None) -> list[dict[str, Any]]:
    """Replicas that run, are healthy, are meant to run (and have `image`, if given)."""
    return [
        r
        for r in listing
        if r.get("state") == "running"
        and r.get("health") == "healthy"
        and r.get("desired") == "running"
        and (image is None or r.get("image") == image)
    ]


def picoord_round(lab: Lab, root: Path, work: Workload, old: str, new: str) -> tuple[float, float]:
    """Apply and roll out at `old` (untimed), time `coordctl rollout --image new`, scale to 0.
    Returns the seconds and the wall-clock time the timed command started."""
    spec = root / "mcp.yaml"
    spec.write_text(work.picoord_spec(old))
    coordctl(lab, "apply", "-f", str(spec))
    coordctl(lab, "rollout", SERVICE, timeout=ROLLOUT_TIMEOUT)
    try:
        wall, started = time.time(), time.monotonic()
        done = lab.coordctl("rollout", SERVICE, "--image", new, timeout=ROLLOUT_TIMEOUT)
        elapsed = time.monotonic() - started
        if done.returncode != 0:
            raise BenchError(
                f"coordctl rollout --image {new} exited {done.returncode}:\n{done.stdout}{done.stderr}"
            )
        healthy = healthy_replicas(picoord_ps(lab), new)
        if len(healthy) != work.replicas:
            raise BenchError(
                f"the rollout exited 0 but `coordctl ps` shows {len(healthy)} healthy replicas of {new}"
            )
        return elapsed, wall
    finally:
        spec.write_text(work.picoord_spec(new, replicas=0))
        coordctl(lab, "apply", "-f", str(spec))
        coordctl(lab, "rollout", SERVICE, timeout=ROLLOUT_TIMEOUT)
        view = SwarmView(lab)
        try:
            wait_until("picoord's containers to go", lambda: view.containers("org.picoord.service") == 0, 120)
        finally:
            view.close()


# --- where picoord's time goes ---------------------------------------------------------------------


def _log_events(path: Path, since: float) -> list[dict[str, Any]]:
    events = []
    with contextlib.suppress(OSError):
        for line in path.read_text(errors="replace").splitlines():
            with contextlib.suppress(ValueError, KeyError, TypeError):
                event = json.loads(line)
                at = datetime.fromisoformat(event["timestamp"].replace("Z", "+00:00")).timestamp()
                if at >= since:
                    event["at"] = at
                    events.append(event)
    return events


def picoord_timeline(lab: Lab, since: float, seconds: float) -> list[tuple[float, str, str]]:
    """(seconds after `since`, where, what) for the rollout that ran from wall time `since`
    for `seconds`."""
    lines: list[tuple[float, str, str]] = []
    for event in _log_events(lab.log_path("coordinator"), since):
        if event.get("event") == "workload":
            lines.append((event["at"] - since, "coordinator", str(event.get("change", ""))[:90]))
    for node in lab.nodes:
        for event in _log_events(lab.log_path(node), since):
            name = event.get("event", "")
            if name in ("stopping replica", "started replica", "replica health", "replica stopped"):
                detail = " ".join(f"{k}={event[k]}" for k in ("replica", "revision", "health") if k in event)
                lines.append((event["at"] - since, node, f"{name} {detail}"))
    return sorted(line for line in lines if line[0] <= seconds)


# --- run and report ----------------------------------------------------------------------------------


@dataclass
class Result:
    workload: dict[str, Any]
    rounds: list[dict[str, Any]] = field(default_factory=list)
    picoord_median: float = 0.0
    swarm_median: float = 0.0
    ratio: float = 0.0
    timeline: list[tuple[float, str, str]] = field(default_factory=list)
    swarm_timeline: list[tuple[float, str, str]] = field(default_factory=list)


def run(args: argparse.Namespace) -> Result:
    work = Workload(monitor=args.monitor, stop_grace=args.stop_grace)
    result = Result(asdict(work))
    with bench_workspace("rollout") as (root, _processes), lab_up(keep_logs=args.keep_logs) as lab:
        print(f"lab {lab.lab_id} up: {', '.join(lab.nodes)}; registry {lab.registry_address}", flush=True)
        images = {1: image_ref(lab, 1), 2: image_ref(lab, 2)}
        (root / "mcp.yaml").write_text(work.picoord_spec(images[1]))
        form_swarm(lab, root)
        prepull(lab, list(images.values()))
        view = SwarmView(lab)
        try:
            for number in range(1, args.rounds + 1):
                old, new = (images[1], images[2]) if number % 2 else (images[2], images[1])
                order = ("picoord", "swarm") if number % 2 else ("swarm", "picoord")
                row: dict[str, Any] = {
                    "round": number,
                    "from": old.rsplit("/", 1)[1],
                    "to": new.rsplit("/", 1)[1],
                }
                for system in order:
                    if system == "picoord":
                        row["picoord"], wall = picoord_round(lab, root, work, old, new)
                        if number == 1:
                            result.timeline = picoord_timeline(lab, wall, row["picoord"])
                    else:
                        row["swarm"], timeline = swarm_round(lab, view, work, old, new)
                        if number == 1:
                            result.swarm_timeline = timeline
                print(
                    f"round {number} ({row['from']} -> {row['to']}, {order[0]} first): "
                    f"picoord {row['picoord']:.1f} s, swarm {row['swarm']:.1f} s",
                    flush=True,
                )
                result.rounds.append(row)
        finally:
            view.close()
    result.picoord_median = statistics.median(r["picoord"] for r in result.rounds)
    result.swarm_median = statistics.median(r["swarm"] for r in result.rounds)
    result.ratio = result.picoord_median / result.swarm_median
    return result


def report(result: Result) -> bool:
    work = Workload(**result.workload)
    print()
    print(
        f"workload: {work.replicas} replicas of mcp, parallelism {work.parallelism}, {work.order}, "
        f"monitor {work.monitor:g} s, stop grace {work.stop_grace:g} s, health GET {work.health_path} "
        f"every {work.health_interval:g} s"
    )
    rows = [
        [
            str(r["round"]),
            f"{r['from']} -> {r['to']}",
            f"{r['picoord']:.1f} s",
            f"{r['swarm']:.1f} s",
            f"{r['picoord'] / r['swarm']:.2f}",
        ]
        for r in result.rounds
    ]
    rows.append(
        [
            "median",
            "",
            f"{result.picoord_median:.1f} s",
            f"{result.swarm_median:.1f} s",
            f"{result.ratio:.2f}",
        ]
    )
    print(table(["round", "image", "picoord rollout", "swarm update", "picoord/swarm"], rows))
    if result.timeline:
        print("\npicoord, round 1, where the time goes (s after `coordctl rollout` started):")
        for at, where, what in result.timeline:
            print(f"  {at:6.2f}  {where:<11}  {what}")
    if result.swarm_timeline:
        print("\nswarm, round 1, its tasks (s after `docker service update` started):")
        for at, where, what in result.swarm_timeline:
            print(f"  {at:6.2f}  {where:<11}  {what}")
    met = result.ratio <= TARGET_RATIO
    print(f"\ntarget picoord/swarm <= {TARGET_RATIO:g}: {result.ratio:.2f} {verdict(met)}")
    return met


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--rounds", type=int, default=3, help="updates per system (default 3)")
    parser.add_argument("--monitor", type=float, default=5.0, help="monitor window of both, s (default 5)")
    parser.add_argument(
        "--stop-grace", type=float, default=10.0, help="stop grace period of both, s (default 10)"
    )
    parser.add_argument("--keep-logs", action="store_true", help="keep the lab's logs (its work dir)")
    parser.add_argument("--strict", action="store_true", help="exit 1 when the target is missed")
    parser.add_argument("--json", type=Path, help="also write the results to this file")
    args = parser.parse_args(argv)
    if args.rounds < 1:
        parser.error("--rounds must be at least 1")
    try:
        result = run(args)
    except BenchError as error:
        print(f"rollout_vs_swarm: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("rollout_vs_swarm: interrupted, cleaned up", file=sys.stderr)
        return 130
    met = report(result)
    if args.json:
        args.json.write_text(json.dumps({**asdict(result), "target_met": met}, indent=2) + "\n")
    return 1 if args.strict and not met else 0


if __name__ == "__main__":
    sys.exit(main())

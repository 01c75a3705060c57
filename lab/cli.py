"""`picoord-lab`: bring a namespaced cluster up, look at it, tear it down, or run a demo.

Why a CLI besides the pytest fixtures: an operator (or a developer) wants to poke at a live
cluster with `coordctl` by hand; `up` leaves it running detached and prints the line that
points `coordctl` at it, and `down` cleans up from any shell, even after a crash.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import socket
import sys
import tempfile
import time
import urllib.request
from collections import Counter
from collections.abc import Callable, Sequence
from pathlib import Path

from picoord.agent.runtime.model import LABEL_SERVICE
from picoord.lab import arm64, netns
from picoord.lab.cluster import INDEX_DIR, Lab, known_labs, sweep_orphans
from picoord.lab.images import MCP_PORT, POSTGRES_PORT
from picoord.lab.netns import LabError

DEMO_SAMPLE_WAIT = 3.0


def _lab_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--nodes", type=int, default=3, help="how many Pis (namespaces) to start (default 3)")
    parser.add_argument(
        "--work-dir", type=Path, help="state, logs and admin socket (default /run/picoord-lab/ID)"
    )
    parser.add_argument(
        "--subnet", help="private IPv4 subnet for the lab bridge (default: first free /24 in 10.213.0.0/16)"
    )
    parser.add_argument("--id", dest="lab_id", help="4 hex digits naming the lab (default: random)")
    parser.add_argument(
        "--timeout", type=float, default=60.0, help="seconds to wait for every node to be Ready"
    )
    parser.add_argument("--log-level", default="info", help="log level of the coordinator")
    parser.add_argument("--heartbeat-timeout", type=float, help="passed to picoord-coordinator")
    parser.add_argument(
        "--bin-dir",
        type=Path,
        help="where picoord-coordinator, picoord-agent and coordctl are (default: this venv)",
    )
    parser.add_argument("--down-timeout", type=float, help="passed to picoord-coordinator")
    parser.add_argument(
        "--sandboxes",
        action="store_true",
        help="give each Pi its own mount namespace (own /etc/ufw, /etc/fstab, docker and gluster "
        "state, /mnt, /srv) and run its agent inside it",
    )
    parser.add_argument(
        "--services",
        default="",
        help="comma-separated daemons to run in every Pi: dockerd, glusterd (implies --sandboxes)",
    )
    parser.add_argument(
        "--registry",
        action="store_true",
        help="run a registry on the lab bridge with the stand-in images (mcp:1-3, postgres); "
        "the Pis' dockerd pull from it (needs --services dockerd)",
    )
    parser.add_argument(
        "--node-names", default="", help="comma-separated node names in place of pi1..piN (sets --nodes)"
    )
    parser.add_argument(
        "--arm64-nodes",
        default="",
        help="comma-separated Pis whose agent is the arm64 deb (--agent-deb) in a Debian arm64 root, "
        "run through qemu-user (needs --sandboxes)",
    )
    parser.add_argument("--agent-deb", type=Path, help="the picoord-agent .deb for the arm64 Pis (make deb)")
    parser.add_argument(
        "--debian-mirror",
        default="http://deb.debian.org/debian",
        help="where debootstrap gets the arm64 root from (cached in /var/cache/picoord-test)",
    )


def _select_options(parser: argparse.ArgumentParser, allow_all: bool) -> None:
    parser.add_argument("--work-dir", type=Path, help="the lab's work dir")
    parser.add_argument("--id", dest="lab_id", help="the lab's id")
    if allow_all:
        parser.add_argument(
            "--all", action="store_true", help="every lab on this host, and sweep leftovers of crashed ones"
        )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="picoord-lab",
        description="Stand in for a rack of Raspberry Pis with network namespaces (needs root).",
    )
    commands = parser.add_subparsers(dest="command", required=True)
    up = commands.add_parser("up", help="create the lab and leave it running")
    _lab_options(up)
    down = commands.add_parser("down", help="stop every process of a lab and remove its network")
    _select_options(down, allow_all=True)
    down.add_argument("--purge", action="store_true", help="also delete the work dir (logs included)")
    status = commands.add_parser("status", help="show labs, their processes and their nodes")
    _select_options(status, allow_all=False)
    status.add_argument("-o", "--output", choices=("table", "json"), default="table")
    demo = commands.add_parser(
        "demo",
        help="the seed's layout (arm64 pi1..pi3, amd64 ubuntu-desktop): nodes and top, a cluster "
        "spec, the seed's docker-stack.yml rolled out, updated and rolled back, then down",
    )
    _lab_options(demo)
    demo.add_argument(
        "--amd64",
        action="store_true",
        help="the quick demo instead: --nodes amd64 Pis with dockerd and glusterd, lab/demo-cluster.yaml "
        "(Swarm, Gluster, nftables) and lab/demo-mcp.yaml",
    )
    return parser


def _make_lab(args: argparse.Namespace) -> Lab:
    return Lab(
        args.work_dir,
        subnet=args.subnet,
        lab_id=args.lab_id,
        log_level=args.log_level,
        heartbeat_timeout=args.heartbeat_timeout,
        down_timeout=args.down_timeout,
        **_timeouts(args),
        bin_dir=args.bin_dir,
        sandboxes=args.sandboxes or bool(_services(args)),
        services=_services(args),
        registry=args.registry,
        node_names=_words(args.node_names),
        arm64_nodes=_words(args.arm64_nodes),
        arm64_root=_arm64_root(args),
    )


def _timeouts(args: argparse.Namespace) -> dict[str, float]:
    """--timeout, and at least the waits an emulated (arm64) agent needs to start and enroll."""
    if not _words(args.arm64_nodes):
        return {"ready_timeout": args.timeout}
    return {"ready_timeout": max(args.timeout, arm64.READY_TIMEOUT), "start_timeout": arm64.START_TIMEOUT}


def _words(text: str) -> list[str]:
    return [word.strip() for word in text.split(",") if word.strip()]


def _arm64_root(args: argparse.Namespace) -> list[Path]:
    """The arm64 root's layers (built and cached on first use) when arm64 Pis are asked for;
    says so first when building them, since that takes minutes."""
    if not _words(args.arm64_nodes):
        return []
    if args.agent_deb is None or not args.agent_deb.is_file():
        raise LabError(f"--arm64-nodes needs --agent-deb FILE (make deb), got {args.agent_deb}")
    base = arm64.base_root_path(args.debian_mirror)
    if not arm64.agent_root_cached(args.debian_mirror, args.agent_deb):
        if (base / "etc" / "debian_version").is_file():
            what = (
                f"installing {args.agent_deb.name} into the cached arm64 root under qemu-user (a few minutes)"
            )
        else:
            what = (
                f"building the arm64 Pis' root: debootstrap of Debian 12 arm64 from {args.debian_mirror}, "
                "then the agent deb installed under qemu-user. The first run takes several minutes (about 7 "
                "on 2 cores)"
            )
        print(f"picoord-lab: {what}; cached in {arm64.CACHE_DIR} for the next runs ...", flush=True)
    return arm64.agent_root(args.debian_mirror, args.agent_deb)


def _services(args: argparse.Namespace) -> list[str]:
    return [name.strip() for name in args.services.split(",") if name.strip()]


def _work_dir_of(lab_id: str) -> Path:
    index = netns.LAB_ROOT / INDEX_DIR / lab_id
    if index.exists():
        return Path(index.read_text().strip())
    return netns.LAB_ROOT / lab_id


def _selected(args: argparse.Namespace) -> list[Path]:
    if args.work_dir:
        return [args.work_dir]
    if args.lab_id:
        return [_work_dir_of(args.lab_id)]
    labs = list(known_labs())
    if getattr(args, "all", False) or len(labs) <= 1 or args.command == "status":
        return labs
    raise LabError(
        f"{len(labs)} labs are up ({', '.join(str(p) for p in labs)}); "
        "pick one with --id or --work-dir, or use --all"
    )


def cmd_up(args: argparse.Namespace) -> int:
    lab = _make_lab(args)
    nodes = len(lab.config.node_names) or args.nodes
    print(f"picoord-lab: starting lab {lab.lab_id} with {nodes} Pis in {lab.work_dir} ...", flush=True)
    lab.up(nodes)
    net = lab.network
    assert net is not None
    print(f"lab {lab.lab_id} is up: {len(lab.nodes)} Pis Ready on {net.subnet} (bridge {net.bridge})")
    for pi in net.pis:
        if lab.rack is not None:
            enter = " ".join(lab.sandbox(pi.node).argv(["..."]))
            print(f"  {pi.node:6} {pi.address:15} namespace {pi.netns}   {enter}")
        else:
            print(f"  {pi.node:6} {pi.address:15} namespace {pi.netns}   ip netns exec {pi.netns} ...")
    if lab.rack is not None and lab.rack.services:
        print(f"  services      {', '.join(lab.rack.services)} in every Pi (logs: {lab.logs_dir})")
    print(f"  coordinator   {lab.coordinator_address} (agents), metrics {lab.metrics_url}")
    print(f"  admin socket  {lab.admin_socket}")
    print(f"  logs          {lab.logs_dir}")
    print(f"  tear down     picoord-lab down --id {lab.lab_id}")
    print(f"export COORDCTL_ADMIN_SOCKET={lab.admin_socket}")
    return 0


def cmd_down(args: argparse.Namespace) -> int:
    netns.require_root()
    failures = 0
    work_dirs = _selected(args)
    if not work_dirs and not args.all:
        print("picoord-lab: no lab is up")
    for work_dir in work_dirs:
        try:
            lab = Lab.load(work_dir)
        except LabError as error:
            # The work dir is gone (e.g. a cleaned tmp dir): forget the lab; --all sweeps its network.
            print(f"picoord-lab: {error}; forgetting it", file=sys.stderr)
            _forget(work_dir)
            continue
        try:
            lab.down(remove_work_dir=args.purge)
            print(f"lab {lab.lab_id} is down ({work_dir})")
        except LabError as error:
            failures += 1
            print(f"picoord-lab: {error}", file=sys.stderr)
    if args.all:
        swept = sweep_orphans()
        if swept:
            print(f"swept leftovers of crashed labs: {', '.join(swept)}")
    return 1 if failures else 0


def _forget(work_dir: Path) -> None:
    index = netns.LAB_ROOT / INDEX_DIR
    with contextlib.suppress(FileNotFoundError):
        for entry in index.iterdir():
            if Path(entry.read_text().strip()) == Path(work_dir):
                entry.unlink()


def cmd_status(args: argparse.Namespace) -> int:
    described = []
    for work_dir in _selected(args):
        try:
            lab = Lab.load(work_dir)
        except LabError as error:
            described.append({"work_dir": str(work_dir), "error": str(error)})
            continue
        state = lab.describe()
        if lab.is_running("coordinator"):
            try:
                state["nodes"] = lab.node_statuses()
            except LabError as error:
                state["nodes_error"] = str(error)
        described.append(state)
    if args.output == "json":
        print(json.dumps(described, indent=2, sort_keys=True))
        return 0
    if not described:
        print("no lab is up")
    for state in described:
        if "error" in state:
            print(f"{state['work_dir']}: {state['error']}")
            continue
        network = state["network"] or {}
        subnet = network.get("subnet", "-")
        print(f"lab {state['lab_id']}: {state['status']}, subnet {subnet}, {state['work_dir']}")
        print(
            f"  admin socket {state['admin_socket']}  (export COORDCTL_ADMIN_SOCKET={state['admin_socket']})"
        )
        for name, running in sorted(state["running"].items()):
            pid = state["pids"][name]
            node_status = state.get("nodes", {}).get(name, "")
            print(f"  {name:12} pid {pid:<8} {'running' if running else 'stopped':8} {node_status}")
        if "nodes_error" in state:
            print(f"  coordctl nodes failed: {state['nodes_error']}")
    return 0


def _metrics_lines(url: str, needle: str, count: int) -> list[str]:
    with urllib.request.urlopen(url, timeout=10) as reply:
        lines = [line for line in reply.read().decode().splitlines() if needle in line]
    return lines[:count]


LAB_DIR = Path(__file__).resolve().parent
DEMO_SPEC = LAB_DIR / "demo-cluster.yaml"
DEMO_WORKLOADS = LAB_DIR / "demo-mcp.yaml"
SEED_CLUSTER = LAB_DIR / "demo-seed-cluster.yaml"
SEED_STACK = arm64.REPO_ROOT / "examples" / "seed-docker-stack.yml"  # the seed's own, unchanged
SEED_PIS = ("pi1", "pi2", "pi3")  # arm64, as the seed's Pis
SEED_DESKTOP = "ubuntu-desktop"  # amd64, where the seed keeps postgres
SEED_SERVICE = "mcp-server"
SEED_STACK_NAME = "mcp"  # as the seed deploys it: docker stack deploy -c docker-stack.yml mcp
STACK_GONE_WAIT = 120.0  # seconds for every node to stop and remove the stack's containers
SEED_SERVICE_LABEL = f"label=org.picoord.service={SEED_SERVICE}"


class _Demo:
    """Prints each step as the command an operator would type, then its output; remembers
    whether any step ended otherwise than expected."""

    def __init__(self, lab: Lab) -> None:
        self.lab = lab
        self.failed = False

    def show(self, *command: str, timeout: float = 60, expect: int = 0) -> None:
        shown = (arg.removeprefix(f"{arm64.REPO_ROOT}/") for arg in command)  # as typed in the checkout
        print(f"\n$ coordctl {' '.join(shown)}", flush=True)
        done = self.lab.coordctl(*command, timeout=timeout)
        print(done.stdout.rstrip())
        if done.stderr.strip():
            print(done.stderr.rstrip())
        if done.returncode != expect:
            self.failed = True
            print(f"(exit {done.returncode}, expected {expect})", file=sys.stderr)
        elif expect:
            print(f"(exit {done.returncode}, as expected)")

    def on_node(self, node: str, argv: list[str], comment: str) -> str:
        """Run argv in a Pi (its namespaces), print it and its output; failures count."""
        print(f"\n$ {' '.join(argv)}   # {comment}", flush=True)
        done = self.lab.sandbox(node).run(argv, timeout=120)
        print(done.stdout.rstrip() or done.stderr.rstrip())
        if done.returncode != 0:
            self.failed = True
            print(f"(exit {done.returncode})", file=sys.stderr)
        return done.stdout

    def versions(self, nodes: Sequence[str]) -> None:
        print("\n$ curl -s http://<pi>:8080/version   # from the host, on each Pi")
        for node in nodes:
            print(f"{node}: {_http_text(f'http://{self.lab.address(node)}:8080/version')}")

    def in_replica(self, node: str, busybox_argv: list[str], comment: str) -> str:
        """Run a busybox applet in the node's mcp-server replica (docker exec), as on_node;
        no replica there fails the step."""
        ids = self.lab.sandbox(node).run(["docker", "ps", "-q", "--filter", SEED_SERVICE_LABEL], timeout=60)
        if not ids.stdout.split():
            self.failed = True
            print(f"no {SEED_SERVICE} container runs on {node}: {ids.stderr.strip()}", file=sys.stderr)
            return ""
        container = ids.stdout.split()[0]
        return self.on_node(node, ["docker", "exec", container, "busybox", *busybox_argv], comment)

    def answered_by(self, address: str, replicas: int, requests: int = 30) -> None:
        """GET /cgi-bin/db on `address`:8080 `requests` times from the host and say which
        replicas answered (each names its container); fewer than `replicas` fails the step."""
        url = f"http://{address}:{MCP_PORT}/cgi-bin/db"
        print(f"\n$ for i in $(seq {requests}); do curl -s {url}; done | sort | uniq -c   # the stack's VIP")
        answers = Counter(_http_text(url) for _ in range(requests))
        for text, count in sorted(answers.items()):
            print(f"{count:7} {text}")
        answered = {text for text in answers if text.startswith("db: reached postgres:5432 from ")}
        if len(answered) < replicas:
            self.failed = True
            print(f"({len(answered)} replicas answered, expected {replicas})", file=sys.stderr)

    def closed(self, nodes: Sequence[str], port: int) -> None:
        """Say, for each node's address, that `port` is closed there (open: the step fails)."""
        print(f"\n$ nc -w 3 <node> {port}   # from the host, each node's own address")
        for node in nodes:
            address = self.lab.address(node)
            try:
                with socket.create_connection((address, port), timeout=3):
                    opened = True
            except OSError:
                opened = False
            self.failed = self.failed or opened
            print(f"{node} ({address}): {port} {'OPEN' if opened else 'closed'}")

    def gone(self, stack: str, nodes: Sequence[str]) -> None:
        """Wait until no node has a replica container left (the demo runs only this stack's
        services); say what is left when the wait ends first."""
        print(
            f"\n$ docker ps -a --filter label={LABEL_SERVICE}   # on each node, until stack {stack} is gone"
        )
        deadline = time.monotonic() + STACK_GONE_WAIT
        while True:
            left = {node: names for node in nodes if (names := self._replica_containers(node))}
            if not left or time.monotonic() > deadline:
                break
            time.sleep(2.0)
        if left:
            self.failed = True
            print(f"containers of stack {stack} still there: {left}", file=sys.stderr)
        else:
            print(f"no container of stack {stack} on {', '.join(nodes)}")

    def _replica_containers(self, node: str) -> list[str]:
        listed = self.lab.sandbox(node).run(
            ["docker", "ps", "-a", "--filter", f"label={LABEL_SERVICE}", "--format", "{{.Names}}"],
            timeout=60,
        )
        return listed.stdout.split()

    def metrics(self, node: str) -> None:
        print(f"\n$ curl -s {self.lab.metrics_url} | grep 'instance=\"{node}\"' | head -5")
        print("\n".join(_metrics_lines(self.lab.metrics_url, f'instance="{node}"', 5)))

    def apply_cluster(self, spec: Path, manager: str, log_node: str) -> None:
        """A dry run, the real run and a second run that changes nothing; then what one
        node ran and the Swarm as its manager sees it."""
        for extra in (("--dry-run",), (), ()):
            self.show("apply", "-f", str(spec), *extra, timeout=600)
        self.show("actions", log_node, "--limit", "8")
        self.on_node(manager, ["docker", "node", "ls"], f"on {manager}, the Swarm manager")


def cmd_demo(args: argparse.Namespace) -> int:
    """The quick start's main job. By default the seed's own layout: pi1..pi3 arm64 (the
    agent deb in a Debian arm64 root, through qemu-user) and an amd64 ubuntu-desktop, the
    inventory and live metrics, a cluster spec, then the seed's docker-stack.yml rolled
    out unchanged, updated, and a broken update rolled back by itself. --amd64: the older,
    quicker demo on amd64 Pis, with Gluster and nftables on every Pi."""
    if args.amd64:
        return _demo_amd64(args)
    if args.node_names or args.arm64_nodes or args.nodes != 3:
        raise LabError(
            "the demo's layout is the seed's (pi1..pi3 arm64, ubuntu-desktop amd64); "
            "for other layouts use --amd64 --nodes N, or picoord-lab up"
        )
    args.services = args.services or "dockerd"
    args.registry = True
    args.node_names = ",".join((*SEED_PIS, SEED_DESKTOP))
    args.arm64_nodes = ",".join(SEED_PIS)
    with tempfile.TemporaryDirectory(prefix="picoord-debs-") as debs:
        if args.agent_deb is None:
            print("picoord-lab demo: building the agent deb (make deb) for the arm64 Pis ...", flush=True)
            args.agent_deb = arm64.build_debs(Path(debs))[arm64.AGENT_PACKAGE]
        lab = _make_lab(args)  # builds or finds the cached arm64 root
    return _run_demo(lab, lambda demo: _seed_steps(demo, args))


def _seed_steps(demo: _Demo, args: argparse.Namespace) -> None:
    lab = demo.lab
    print(
        f"picoord-lab demo: starting {', '.join(SEED_PIS)} (arm64: Debian's arm64 python3 with "
        f"{args.agent_deb.name}, under qemu-user) and {SEED_DESKTOP} (amd64), lab {lab.lab_id} ...",
        flush=True,
    )
    lab.up(len(SEED_PIS) + 1)
    time.sleep(DEMO_SAMPLE_WAIT)  # a few metric samples, so `top` shows rates, not zeros
    demo.show("nodes")
    demo.show("top", "--once")
    demo.show("node", "label", "pi1", "role=storage")
    demo.apply_cluster(SEED_CLUSTER, SEED_DESKTOP, "pi2")
    demo.metrics("pi1")
    vip = lab.spare_address()  # the stack's LoadBalancer address, held by a Pi with a replica
    demo.show("stack", "deploy", "-c", str(SEED_STACK), "--address", vip, SEED_STACK_NAME, timeout=120)
    demo.show("rollout", SEED_STACK_NAME, timeout=1500)  # postgres first, then mcp-server
    demo.show("ps", SEED_SERVICE)
    demo.show("ps", "postgres")
    local = f"http://127.0.0.1:{MCP_PORT}"
    for node in SEED_PIS:
        demo.in_replica(node, ["uname", "-m"], f"the {SEED_SERVICE} replica on {node}")
        said = demo.in_replica(
            node,
            ["wget", "-qO-", f"{local}/cgi-bin/db"],
            f"the {SEED_SERVICE} replica on {node} opens DATABASE_URL's postgres:5432, by name",
        )
        if not said.startswith("db: reached postgres:5432"):
            demo.failed = True
    demo.closed((*SEED_PIS, SEED_DESKTOP), POSTGRES_PORT)  # the overlay carries it; no node publishes it
    demo.answered_by(vip, len(SEED_PIS))  # one address, every replica behind it
    demo.versions(SEED_PIS)
    demo.show("rollout", SEED_SERVICE, "--image", "mcp:2", timeout=900)
    demo.versions(SEED_PIS)
    demo.answered_by(vip, len(SEED_PIS))  # the new replicas behind the VIP
    for node in SEED_PIS:  # each replica asked on its own loopback: a request line each to log
        demo.in_replica(node, ["wget", "-qO-", f"{local}/version"], f"the {SEED_SERVICE} replica on {node}")
    demo.show("logs", SEED_SERVICE, "--tail", "1", timeout=120)  # each replica's last line
    demo.show("rollout", SEED_SERVICE, "--image", "mcp:4", timeout=900, expect=1)  # it exits at start
    demo.show("ps", SEED_SERVICE)
    demo.versions(SEED_PIS)
    demo.show("rollout", "history", SEED_SERVICE)
    demo.show("scale", f"{SEED_SERVICE}=2", timeout=300)
    demo.show("services")
    demo.show("rm", "stack", SEED_STACK_NAME)
    demo.gone(SEED_STACK_NAME, (*SEED_PIS, SEED_DESKTOP))
    demo.show("node", "remove", SEED_PIS[-1])
    demo.show("nodes")


def _demo_amd64(args: argparse.Namespace) -> int:
    if not args.services:
        args.services = "dockerd,glusterd"
    args.registry = True
    if args.nodes < 3:
        raise LabError("the demo needs at least 3 Pis (its Gluster volume is replicated 3 ways)")
    lab = _make_lab(args)
    return _run_demo(lab, lambda demo: _amd64_steps(demo, args.nodes))


def _amd64_steps(demo: _Demo, nodes: int) -> None:
    lab = demo.lab
    print(f"picoord-lab demo: starting {nodes} Pis (lab {lab.lab_id}) ...", flush=True)
    lab.up(nodes)
    time.sleep(DEMO_SAMPLE_WAIT)  # a few metric samples, so `top` shows rates, not zeros
    demo.show("nodes")
    demo.show("top", "--once")
    demo.show("node", "label", "pi1", "role=storage")
    demo.apply_cluster(DEMO_SPEC, "pi1", "pi2")
    demo.metrics("pi1")
    secret = lab.work_dir / "database-url"
    secret.write_text("postgresql://mcp:lab-password@postgres:5432/mcp_db")
    secret.chmod(0o600)
    demo.show("secret", "create", "mcp-secrets", "database-url", "--from-file", str(secret))
    demo.show("apply", "-f", str(DEMO_WORKLOADS))
    demo.show("rollout", "mcp", timeout=600)  # postgres, which it depends on, comes first
    demo.show("ps", "mcp")
    demo.versions(lab.nodes)
    demo.show("rollout", "mcp", "--image", "mcp:2", timeout=600)
    demo.versions(lab.nodes)
    demo.show("rollout", "mcp", "--image", "mcp:3", timeout=600, expect=1)  # its health check fails
    demo.show("ps", "mcp")
    demo.versions(lab.nodes)
    demo.show("rollout", "history", "mcp")
    demo.show("services")
    demo.show("node", "remove", lab.nodes[-1])
    demo.show("nodes")


def _run_demo(lab: Lab, steps: Callable[[_Demo], None]) -> int:
    """Run the steps on the lab, then tear it down whatever happened (logs kept on failure)."""
    demo = _Demo(lab)
    try:
        steps(demo)
    except BaseException:
        demo.failed = True
        raise
    finally:
        print(f"\npicoord-lab demo: tearing lab {lab.lab_id} down", flush=True)
        lab.down(remove_work_dir=not demo.failed)
        if demo.failed:
            print(f"picoord-lab demo: logs kept in {lab.logs_dir}", file=sys.stderr)
    return 1 if demo.failed else 0


def _http_text(url: str) -> str:
    try:
        with urllib.request.urlopen(url, timeout=5) as reply:
            return reply.read().decode(errors="replace").strip()
    except OSError as error:
        return f"({error})"


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    handlers = {"up": cmd_up, "down": cmd_down, "status": cmd_status, "demo": cmd_demo}
    try:
        return handlers[args.command](args)
    except LabError as error:
        print(f"picoord-lab: error: {error}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())

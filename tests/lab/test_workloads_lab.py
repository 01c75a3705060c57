"""Workloads end to end: a real coordinator, three agents, each Pi's own dockerd pulling the
lab registry's stand-in images, driven only through `coordctl` as a user would.

For each case the test asserts what the user sees (coordctl's exit code and its words) and
what runs afterwards (`coordctl ps -o json`, `docker ps` inside the Pis, and an HTTP GET of
http://<pi>:8080/version from the host). One lab serves the whole module (a Pi with dockerd
takes ~10 s to start); every test adds or rolls only its own services, under its own name,
and restores any node, link, process or registry it takes away. The order matters where
noted: the drain runs first, while only movable services exist, and the bad-input tests
check that the demo's mcp, rolled out by the happy path, keeps serving.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import subprocess
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest

from picoord.agent.runtime.engine import Engine
from picoord.agent.runtime.model import LABEL_REPLICA, LABEL_REVISION, LABEL_SERVICE
from picoord.lab.cluster import COORDINATOR, REGISTRY, Lab, executable
from picoord.lab.images import MCP_PORT
from picoord.lab.sandbox import DOCKER_SOCKET
from tests.conftest import require_root_or_fail

pytestmark = pytest.mark.lab

REPO_ROOT = Path(__file__).resolve().parent.parent.parent
DEMO = REPO_ROOT / "lab" / "demo-mcp.yaml"
SECRET_VALUE = "postgresql://mcp:Lab-Only-7qZ3xV@postgres:5432/mcp_db"
SECRET_MARK = "Lab-Only-7qZ3xV"  # the part of the secret that must never show outside the container
ROLLOUT_TIMEOUT = 180.0


# --------------------------------------------------------------------------- helpers


def ctl(lab: Lab, *args: str, timeout: float = ROLLOUT_TIMEOUT) -> subprocess.CompletedProcess[str]:
    return lab.coordctl(*args, timeout=timeout)


def lab_coordctl_argv(lab: Lab) -> list[str]:
    """coordctl for this lab, to run it in the background (Popen)."""
    return [str(executable("coordctl", lab.bin_dir)), "--admin-socket", str(lab.admin_socket)]


def words(done: subprocess.CompletedProcess[str]) -> str:
    """Everything coordctl said, for assertions and failure messages."""
    return f"{done.stdout}{done.stderr}"


def ok(lab: Lab, *args: str, timeout: float = ROLLOUT_TIMEOUT) -> str:
    done = ctl(lab, *args, timeout=timeout)
    assert done.returncode == 0, f"`coordctl {' '.join(args)}` exited {done.returncode}:\n{words(done)}"
    return words(done)


def docker(lab: Lab, node: str, *args: str) -> str:
    done = lab.sandbox(node).run(["docker", *args], 30)
    assert done.returncode == 0, f"docker {' '.join(args)} on {node}: {done.stderr}"
    return done.stdout


def _node_containers(lab: Lab, node: str, service: str, every: bool) -> list[dict[str, str]]:
    listing = ["ps", *(["-a"] if every else []), "--no-trunc", "--filter", f"label={LABEL_SERVICE}={service}"]
    found = []
    for line in docker(lab, node, *listing, "--format", "{{json .}}").splitlines():
        if line.strip():
            item = json.loads(line)
            labels = dict(pair.partition("=")[::2] for pair in item["Labels"].split(",") if pair)
            found.append(
                {
                    "id": item["ID"],
                    "replica": labels.get(LABEL_REPLICA, ""),
                    "revision": labels.get(LABEL_REVISION, ""),
                    "state": item["State"],
                }
            )
    return found


def containers(lab: Lab, service: str, every: bool = False) -> dict[str, list[dict[str, str]]]:
    """node -> the service's containers in that Pi's dockerd (running ones, or all): id,
    replica, revision, state. The Pis are asked at the same moment, so a count over them
    is a snapshot (a stop and a start of a rollout step are a report apart, about 1 s)."""
    with ThreadPoolExecutor(len(lab.nodes)) as pool:
        asked = {node: pool.submit(_node_containers, lab, node, service, every) for node in lab.nodes}
        return {node: future.result() for node, future in asked.items()}


def running_count(lab: Lab, service: str) -> int:
    return sum(len(items) for items in containers(lab, service).values())


def version(lab: Lab, node: str) -> str:
    """GET http://<pi>:8080/version from the host, as a client on the LAN would."""
    url = f"http://{lab.address(node)}:{MCP_PORT}/version"
    try:
        with urllib.request.urlopen(url, timeout=3) as reply:
            return reply.read().decode().strip()
    except (urllib.error.URLError, OSError) as error:
        return f"unreachable: {error}"


def replicas(lab: Lab, service: str) -> list[dict[str, Any]]:
    listing = lab.coordctl_json("ps", service)
    assert isinstance(listing, list), listing
    return listing


def running_replicas(lab: Lab, service: str) -> list[dict[str, Any]]:
    return [r for r in replicas(lab, service) if r["desired"] == "running"]


def services(lab: Lab) -> dict[str, dict[str, Any]]:
    return {view["name"]: view for view in lab.coordctl_json("services")}


def wait_until(
    what: str,
    check: Callable[[], Any],
    timeout: float = 60.0,
    every: float = 0.5,
    explain: Callable[[], Any] | None = None,
) -> Any:
    deadline = time.monotonic() + timeout
    last: Any = None
    while time.monotonic() < deadline:
        last = check()
        if last:
            return last
        time.sleep(every)
    seen = f"; seen: {explain()!r}" if explain else ""
    pytest.fail(f"{what}: not within {timeout:g} s (last: {last!r}){seen}")


def settled(lab: Lab, service: str, count: int, revision: int | None = None) -> list[dict[str, Any]] | None:
    """The service's replicas once exactly `count` run healthy (at `revision`) and no other
    container of it runs anywhere; None until then."""
    listed = running_replicas(lab, service)
    healthy = [r for r in listed if r["health"] in ("healthy", "no check") and r["state"] == "running"]
    if revision is not None:
        healthy = [r for r in healthy if r["revision"] == revision]
    if len(listed) != count or len(healthy) != count or running_count(lab, service) != count:
        return None
    return healthy


def settle(
    lab: Lab, what: str, service: str, count: int, revision: int | None = None, timeout: float = 30
) -> list[dict[str, Any]]:
    """Wait for `settled`; on a timeout the failure shows the replicas and the containers seen."""

    def check() -> tuple[list[dict[str, Any]]] | None:
        listing = settled(lab, service, count, revision)
        return None if listing is None else (listing,)  # truthy even when settled on none

    found = wait_until(
        what,
        check,
        timeout,
        explain=lambda: {"replicas": replicas(lab, service), "containers": containers(lab, service)},
    )
    return found[0]


def spec_file(tmp_path: Path, name: str, text: str) -> Path:
    path = tmp_path / f"{name}.yaml"
    path.write_text(text)
    return path


def service_doc(
    name: str,
    image: str = "mcp:1",
    replicas: int = 2,
    update: str = "{parallelism: 1, monitor: 1s}",
    extra: str = "",
) -> str:
    """A small picoord Service of the mcp stand-in: health-checked, port 8080 not published
    (no other service names it), so several can share a Pi beside the demo's mcp."""
    return (
        f"kind: Service\nname: {name}\nimage: {image}\nreplicas: {replicas}\n"
        f"ports: [{{target: {MCP_PORT}}}]\n"
        "resources: {requests: {memory: 16Mi}}\n"
        f"health: {{http: {{path: /health, port: {MCP_PORT}}}, interval: 1s, timeout: 1s, retries: 2}}\n"
        f"update: {update}\n{extra}"
    )


def deploy(lab: Lab, tmp_path: Path, name: str, count: int = 2, **doc: Any) -> list[dict[str, Any]]:
    """Apply and roll out a service, and wait until it is settled."""
    ok(lab, "apply", "-f", str(spec_file(tmp_path, name, service_doc(name, replicas=count, **doc))))
    ok(lab, "rollout", name)
    return settle(lab, f"{name} settled", name, count)


def serving(lab: Lab) -> dict[str, str]:
    """What /version says on each Pi (the demo's mcp publishes 8080 on all three)."""
    return {node: version(lab, node) for node in lab.nodes}


class ContainerCounter:
    """Polls `docker ps` on every Pi in a thread and keeps the largest and smallest count of
    a service's running containers seen at once: what the rollout bounds are about."""

    def __init__(self, lab: Lab, service: str) -> None:
        self.lab, self.service = lab, service
        self.peak = 0
        self.lowest: int | None = None
        self.samples = 0
        self.errors: list[str] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                count = running_count(self.lab, self.service)
            except (AssertionError, subprocess.SubprocessError, OSError) as error:
                self.errors.append(str(error)[:200])
                time.sleep(0.2)
                continue
            self.peak = max(self.peak, count)
            self.lowest = count if self.lowest is None else min(self.lowest, count)
            self.samples += 1

    def __enter__(self) -> ContainerCounter:
        self._thread.start()
        return self

    def __exit__(self, *_exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=60)


def stop_process(lab: Lab, name: str) -> None:
    """SIGTERM a process this lab started (its whole group) and wait until it is gone."""
    record = lab.processes[name]
    with contextlib.suppress(ProcessLookupError):
        os.killpg(record.pid, signal.SIGTERM)
    wait_until(f"{name} gone", lambda: not lab.is_running(name), 15, 0.1)


def set_link(lab: Lab, node: str, up: bool) -> None:
    """Take the Pi's cable out (or put it back): its host-side veth on the lab bridge."""
    assert lab.network is not None
    veth = lab.network.pi(node).veth_host
    subprocess.run(["ip", "link", "set", "dev", veth, "up" if up else "down"], check=True, timeout=10)


# --------------------------------------------------------------------------- the lab


@pytest.fixture(scope="module")
def lab(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Lab]:
    """Three Pis with dockerd and the lab registry, the demo's secret stored, the demo file
    applied and postgres rolled out (mcp is left to the tests)."""
    require_root_or_fail()
    work = tmp_path_factory.mktemp("workloads")
    lab = Lab(work, sandboxes=True, services=["dockerd"], registry=True)
    try:
        lab.up(3)
        secret = work / "database-url"
        secret.write_text(SECRET_VALUE)
        secret.chmod(0o600)
        ok(lab, "secret", "create", "mcp-secrets", "database-url", "--from-file", str(secret))
        secret.unlink()
        ok(lab, "apply", "-f", str(DEMO))
        ok(lab, "rollout", "postgres")
        yield lab
    finally:
        lab.down()


# --------------------------------------------------------------------------- 4. drain (first: mcp,
# with one replica per node on all three Pis, could not leave a drained Pi)


def test_drain_moves_replicas_elsewhere_first_and_none_remain(lab: Lab, tmp_path: Path) -> None:
    # pi1 excluded: the two replicas spread over pi2 and pi3, and pi3's can only go to pi2.
    deploy(
        lab,
        tmp_path,
        "drainme",
        update="{parallelism: 1, monitor: 1s, order: start-first, max_surge: 1, max_unavailable: 0}",
        extra='placement: {constraints: ["node.hostname != pi1"]}\n',
    )
    assert {r["node"] for r in running_replicas(lab, "drainme")} == {"pi2", "pi3"}
    try:
        with ContainerCounter(lab, "drainme") as counter:
            said = ok(lab, "node", "drain", "pi3", timeout=120)
        assert "0 replica(s) left on pi3" in said, said
        assert containers(lab, "drainme", every=True)["pi3"] == []
        assert containers(lab, "postgres", every=True)["pi3"] == []
        placed = settle(lab, "drainme settled on pi2", "drainme", 2)
        assert {r["node"] for r in placed} == {"pi2"}
        # Moved elsewhere first: start-first with max_unavailable 0 never left fewer running.
        assert counter.samples > 3, counter.errors
        assert counter.lowest == 2, f"only {counter.lowest} drainme container(s) ran at one point"
        assert counter.peak <= 3, f"{counter.peak} drainme containers ran at once (bound: 2 + max_surge 1)"
    finally:
        ok(lab, "node", "undrain", "pi3", timeout=30)


# --------------------------------------------------------------------------- 1. the happy path


def test_mcp_rollout_update_failed_update_history_undo(lab: Lab) -> None:
    said = ok(lab, "rollout", "mcp")
    assert "service/mcp revision 1: 3/3 healthy" in said, said
    placed = running_replicas(lab, "mcp")
    assert len(placed) == 3 and {r["node"] for r in placed} == set(lab.nodes), placed
    assert {(r["revision"], r["health"]) for r in placed} == {(1, "healthy")}
    assert serving(lab) == dict.fromkeys(lab.nodes, "mcp 1")

    said = ok(lab, "rollout", "mcp", "--image", "mcp:2")
    assert "service/mcp revision 2: 3/3 healthy" in said, said
    assert serving(lab) == dict.fromkeys(lab.nodes, "mcp 2")

    failed = ctl(lab, "rollout", "mcp", "--image", "mcp:3")
    said = words(failed)
    assert failed.returncode == 1, said
    named = re.search(r"replica (\S+) on (pi\d) \(revision 3\) failed its health check", said)
    assert named, said
    assert "404" in said, said
    assert "rolled back" in said, said
    replica, node = named.groups()
    assert replica.startswith("mcp") and node in lab.nodes
    settle(lab, "mcp back on revision 2", "mcp", 3, revision=2)
    assert serving(lab) == dict.fromkeys(lab.nodes, "mcp 2")
    assert containers(lab, "mcp", every=True) == {
        n: [c for c in cs if c["revision"] == "2"] for n, cs in containers(lab, "mcp", every=True).items()
    }, "a revision-3 container was left behind"

    history = lab.coordctl_json("rollout", "history", "mcp")
    assert [(h["revision"], h["image"]) for h in history] == [(1, "mcp:1"), (2, "mcp:2"), (3, "mcp:3")]
    assert [h["revision"] for h in history if h["current"]] == [2]

    said = ok(lab, "rollout", "undo", "mcp")
    assert "3/3 healthy" in said, said
    settle(lab, "mcp serving revision 1's image", "mcp", 3)
    assert {r["image"] for r in running_replicas(lab, "mcp")} == {"mcp:1"}
    assert serving(lab) == dict.fromkeys(lab.nodes, "mcp 1")


def test_mcp_reaches_postgres_by_name_and_keeps_its_secret(lab: Lab) -> None:
    node = running_replicas(lab, "mcp")[0]["node"]
    [container] = containers(lab, "mcp")[node]
    reply = docker(lab, node, "exec", container["id"], "wget", "-q", "-O-", "http://postgres:5432/health")
    assert reply.strip() == "ok"

    env = json.loads(docker(lab, node, "inspect", "--format", "{{json .Config.Env}}", container["id"]))
    assert f"DATABASE_URL={SECRET_VALUE}" in env

    for name in (COORDINATOR, *lab.nodes):
        text = lab.log_path(name).read_text(errors="replace")
        assert SECRET_MARK not in text, f"the secret is in {lab.log_path(name)}"
    agents = [str(lab.processes[n].pid) for n in lab.nodes]
    listing = subprocess.run(["ps", "-eww", "-o", "pid,args"], capture_output=True, text=True, timeout=10)
    assert agents and all(pid in listing.stdout for pid in agents)
    assert SECRET_MARK not in listing.stdout, "the secret shows in ps"


# --------------------------------------------------------------------------- 2. bad input


def _mcp_variant(change: str) -> str:
    """The demo's mcp document with one line changed, postgres unchanged."""
    text = DEMO.read_text()
    old, new = change.split(" => ")
    assert old in text, old
    return text.replace(old, new, 1)


BAD_FILES = {
    "replicas -1": (_mcp_variant("replicas: 3 => replicas: -1"), ["Service/mcp.replicas", "-1"]),
    "memory 12XB": (
        _mcp_variant("requests: {memory: 64Mi, cpu: 100m} => requests: {memory: 12XB, cpu: 100m}"),
        ["Service/mcp.resources.requests.memory", "12XB"],
    ),
    "unknown constraint key": (
        _mcp_variant("max_per_node: 1 => {max_per_node: 1, constraints: ['node.colour == blue']}"),
        ["Service/mcp.placement.constraints[0]", "node.colour"],
    ),
    "health port not exposed": (
        _mcp_variant("http: {path: /health, port: 8080} => http: {path: /health, port: 9090}"),
        ["Service/mcp.health.http.port", "9090"],
    ),
    "image with spaces": (
        _mcp_variant("image: mcp:1 => image: 'mcp: 1 latest'"),
        ["Service/mcp.image", "mcp: 1 latest"],
    ),
    "replicated-job": (
        "services:\n  mcp:\n    image: mcp:1\n    deploy:\n      mode: replicated-job\n",
        ["services.mcp.deploy.mode", "replicated-job"],
    ),
}


@pytest.mark.parametrize("case", list(BAD_FILES))
def test_bad_file_is_refused_naming_document_and_field(lab: Lab, tmp_path: Path, case: str) -> None:
    text, expected = BAD_FILES[case]
    before = services(lab)
    serves = serving(lab)
    path = spec_file(tmp_path, "bad", text)
    done = ctl(lab, "apply", "-f", str(path), timeout=30)
    said = words(done)
    assert done.returncode != 0, said
    assert str(path) in said, said
    for part in expected:
        assert part in said, f"{part!r} not in:\n{said}"
    assert services(lab) == before
    assert serving(lab) == serves
    assert all(not v.startswith("unreachable") for v in serves.values()), serves


def test_rollout_with_a_secret_that_does_not_exist_starts_nothing(lab: Lab, tmp_path: Path) -> None:
    extra = "secrets: [{env: API_TOKEN, secret: nowhere, key: token}]\n"
    path = spec_file(tmp_path, "nosecret", service_doc("nosecret", extra=extra))
    ok(lab, "apply", "-f", str(path))
    done = ctl(lab, "rollout", "nosecret", timeout=30)
    said = words(done)
    assert done.returncode == 1, said
    assert f"{path}: service/nosecret.secrets[0]: secret nowhere/token (for API_TOKEN) does not exist" in said
    assert "coordctl secret create nowhere token" in said, said
    assert replicas(lab, "nosecret") == []
    assert running_count(lab, "nosecret") == 0
    assert services(lab)["nosecret"]["revision"] == 0


def test_more_replicas_than_nodes_one_per_node_starts_nothing(lab: Lab, tmp_path: Path) -> None:
    extra = "placement: {max_per_node: 1}\n"
    path = spec_file(tmp_path, "crowded", service_doc("crowded", replicas=4, extra=extra))
    ok(lab, "apply", "-f", str(path))
    done = ctl(lab, "rollout", "crowded", timeout=30)
    said = words(done)
    assert done.returncode == 1, said
    assert f"{path}: service/crowded.placement: 4 replicas with at most 1 per node need 4 nodes, " in said
    assert "but only 3 match" in said, said
    assert replicas(lab, "crowded") == []
    assert running_count(lab, "crowded") == 0


def test_rollout_of_an_unknown_service(lab: Lab) -> None:
    done = ctl(lab, "rollout", "nosuch", timeout=30)
    said = words(done)
    assert done.returncode == 1, said
    assert "no service 'nosuch'" in said and "coordctl apply -f" in said, said


# --------------------------------------------------------------------------- 3. faults


def test_out_of_memory_for_the_request_is_refused_before_anything_starts(lab: Lab, tmp_path: Path) -> None:
    text = service_doc("hungry").replace("requests: {memory: 16Mi}", "requests: {memory: 512Gi}")
    ok(lab, "apply", "-f", str(spec_file(tmp_path, "hungry", text)))
    done = ctl(lab, "rollout", "hungry", timeout=30)
    said = words(done)
    assert done.returncode == 1, said
    assert re.search(
        r"0/3 nodes available: 3 insufficient memory \(524288 MiB requested, at most \d+ MiB allocatable\)",
        said,
    ), said
    assert replicas(lab, "hungry") == []
    assert running_count(lab, "hungry") == 0


def test_container_that_exits_at_once_is_rolled_back_naming_the_exit_code(lab: Lab, tmp_path: Path) -> None:
    deploy(lab, tmp_path, "crashy")
    crashing = service_doc("crashy", extra='command: ["/bin/sh", "-c", "exit 3"]\n')
    ok(lab, "apply", "-f", str(spec_file(tmp_path, "crashy2", crashing)))
    done = ctl(lab, "rollout", "crashy")
    said = words(done)
    assert done.returncode == 1, said
    assert re.search(r"replica crashy\S* on pi\d \(revision 2\)", said), said
    assert "exit code 3" in said, said
    assert "rolled back" in said, said
    placed = settle(lab, "crashy back on revision 1", "crashy", 2, revision=1)
    assert len(placed) == 2


def test_the_agent_finds_the_exit_code_a_restart_cleared(lab: Lab) -> None:
    """What names a crash loop: once dockerd has started a container again by its restart
    policy, inspect says exit code 0, and the agent reads the code from dockerd's events."""
    node = "pi1"
    script = "sleep 0.5; exit 3"
    container = docker(lab, node, "run", "-d", "--restart", "always", "mcp:1", "sh", "-c", script).strip()
    engine = Engine(str(lab.sandbox(node).host_path(DOCKER_SOCKET)))
    try:
        restarts = ["inspect", "--format", "{{.RestartCount}}", container]
        wait_until("a restart", lambda: int(docker(lab, node, *restarts)) >= 1, 20, 0.2)
        assert engine.last_exit_code(container) == 3
    finally:
        engine.close()
        docker(lab, node, "rm", "-f", container)


def test_image_that_does_not_exist_is_rolled_back_naming_the_pull_error(lab: Lab, tmp_path: Path) -> None:
    deploy(lab, tmp_path, "missing")
    # Qualified with the lab registry, so no Pi ever looks past it for the name.
    image = f"{lab.registry_address}/mcp:404"
    done = ctl(lab, "rollout", "missing", "--image", image)
    said = words(done)
    assert done.returncode == 1, said
    assert re.search(rf"replica missing\S* on pi\d \(revision 2\) .*cannot pull {re.escape(image)}", said), (
        said
    )
    assert re.search(r"not found|manifest unknown", said), said
    assert "rolled back" in said, said
    settle(lab, "missing back on revision 1", "missing", 2, revision=1)


def test_registry_down_fails_the_update_names_the_pull_error_and_old_revision_serves(
    lab: Lab, tmp_path: Path
) -> None:
    deploy(lab, tmp_path, "offline")
    # A reference no Pi has pulled yet (mcp:2 by its short name is already in every Pi's dockerd).
    image = f"{lab.registry_address}/mcp:2"
    stop_process(lab, REGISTRY)
    try:
        done = ctl(lab, "rollout", "offline", "--image", image)
    finally:
        lab.start_registry()
    said = words(done)
    assert done.returncode == 1, said
    assert re.search(rf"replica offline\S* on pi\d \(revision 2\) .*cannot pull {re.escape(image)}", said), (
        said
    )
    assert "connection refused" in said, said
    assert "rolled back" in said, said
    placed = settle(lab, "offline back on revision 1", "offline", 2, revision=1)
    for replica in placed:
        [container] = containers(lab, "offline")[replica["node"]]
        assert container["revision"] == "1"


def test_agent_killed_while_it_pulls_converges_without_duplicates(lab: Lab, tmp_path: Path) -> None:
    name = "pulled"
    image = f"{lab.registry_address}/mcp:1"  # not yet pulled under this name by any Pi
    ok(lab, "apply", "-f", str(spec_file(tmp_path, name, service_doc(name, image=image, replicas=3))))
    victim = "pi2"
    started = subprocess.Popen(
        [*lab_coordctl_argv(lab), "rollout", name],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        assert started.stdout is not None
        first = started.stdout.readline()  # the rollout is recorded: assignments are on their way
        lab.kill_agent(victim)
        time.sleep(1.0)
        lab.start_agent(victim)
        rest, _ = started.communicate(timeout=ROLLOUT_TIMEOUT)
        out = first + rest
    finally:
        if started.poll() is None:
            started.kill()
            started.wait(10)
        if not lab.is_running(victim):
            lab.start_agent(victim)
    assert started.returncode == 0, out
    assert f"service/{name} revision 1: 3/3 healthy" in out, out
    lab.wait_ready()
    placed = settle(lab, f"{name} settled", name, 3)
    every = containers(lab, name, every=True)
    slots = [c["replica"] for cs in every.values() for c in cs]
    assert sorted(slots) == sorted(r["replica"] for r in placed), every
    assert len(slots) == len(set(slots)) == 3, f"duplicate containers: {every}"


def test_coordinator_killed_mid_rollout_resumes_within_the_bounds(lab: Lab, tmp_path: Path) -> None:
    name = "bounded"
    policy = "{parallelism: 1, monitor: 2s, order: start-first, max_surge: 1, max_unavailable: 0}"
    deploy(lab, tmp_path, name, count=3, update=policy)
    with ContainerCounter(lab, name) as counter:
        ok(lab, "rollout", name, "--image", "mcp:2", "--detach", timeout=30)
        wait_until(
            "the first revision-2 replica",
            lambda: any(r["revision"] == 2 for r in running_replicas(lab, name)),
            30,
            0.2,
        )
        lab.stop_coordinator(graceful=False)
        time.sleep(1.0)
        lab.start_coordinator()
        lab.wait_ready()
        said = ok(lab, "rollout", "status", name, "--watch")
        assert f"service/{name} revision 2: 3/3 healthy" in said, said
        settle(lab, f"{name} settled on revision 2", name, 3, revision=2)
    assert counter.samples > 10, counter.errors
    assert counter.peak <= 3 + 1, f"{counter.peak} containers of {name} ran at once (bound: 3 + max_surge 1)"
    every = containers(lab, name, every=True)
    assert sum(len(cs) for cs in every.values()) == 3, every


def test_node_lost_mid_rollout_completes_on_the_others_and_stale_replicas_go(
    lab: Lab, tmp_path: Path
) -> None:
    name = "lost"
    mcp_count = len(running_replicas(lab, "mcp"))
    deploy(lab, tmp_path, name, count=3)
    victim = "pi3"
    assert any(r["node"] == victim for r in running_replicas(lab, name))
    with ThreadPoolExecutor(1) as pool:
        rolling: Future[subprocess.CompletedProcess[str]] = pool.submit(
            ctl, lab, "rollout", name, "--image", "mcp:2"
        )
        try:
            time.sleep(1.0)
            lab.kill_agent(victim)
            set_link(lab, victim, up=False)
            done = rolling.result(timeout=ROLLOUT_TIMEOUT)
            said = words(done)
            assert done.returncode == 0, said
            assert f"service/{name} revision 2: 3/3 healthy" in said, said
            placed = running_replicas(lab, name)
            assert len(placed) == 3 and {r["node"] for r in placed} <= {"pi1", "pi2"}, placed
            assert {r["revision"] for r in placed} == {2}
            # What the lost Pi ran is written off (replaced), or was being stopped by the
            # rollout when the Pi went: shown as such, not as running, until it returns.
            left = [r for r in replicas(lab, name) if r["node"] == victim]
            assert left and {r["desired"] for r in left} <= {"replaced", "stopping"}, left
            assert all("(node unreachable)" in r["state"] for r in left), left
        finally:
            set_link(lab, victim, up=True)
            if not lab.is_running(victim):
                lab.start_agent(victim)
    lab.wait_ready()
    # Back again: what it still ran of the service is stopped, never left beside its replacement.
    # The agent restarts, reconnects and stops its stale container with its grace period
    # first: on a loaded 2-core CI machine that alone can take tens of seconds.
    settle(lab, f"{name} settled after {victim} returned", name, 3, revision=2, timeout=60)
    assert containers(lab, name)[victim] == []
    # The demo's mcp could not move (one per node) and is whole again on all three.
    settle(lab, "mcp whole again", "mcp", mcp_count)

"""Published ports answered on every node, forwarded in the kernel to healthy replicas only
(docs/service-ports.md), on one shared lab of three Pis with their own dockerd.

The service `web` (the mcp stand-in) runs two replicas on pi1 and pi2 and publishes 8080;
pi3 runs none. A client on the host (the LAN) asks every Pi's address; each Pi's
`picoord_ports` table answers and picks a replica; which one served is read from the
replicas' own request logs (busybox httpd -v). The tests run in file order and each leaves
`web` settled at two healthy replicas.
"""

from __future__ import annotations

import functools
import re
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator

import pytest

from picoord.lab.cluster import Lab
from picoord.lab.images import MCP_PORT
from tests.conftest import _module_lab
from tests.lab.test_workloads_lab import (
    containers,
    docker,
    ok,
    running_replicas,
    settle,
    spec_file,
    wait_until,
)

pytestmark = pytest.mark.lab

SERVICE = "web"
WEB = f"""kind: Service
name: {SERVICE}
image: mcp:1
replicas: 2
ports: [{{target: {MCP_PORT}, published: {MCP_PORT}}}]
resources: {{requests: {{memory: 16Mi}}}}
health: {{http: {{path: /health, port: {MCP_PORT}}}, interval: 1s, timeout: 1s, retries: 2}}
update: {{parallelism: 1, monitor: 2s, order: stop-first, failure_action: rollback}}
placement: {{max_per_node: 1, constraints: ["node.hostname != pi3"]}}
"""
# Kept inside: its container port is not published, so no node may answer it.
INTERNAL = f"""kind: Service
name: inside
image: mcp:1
replicas: 1
ports: [{{target: {MCP_PORT}}}]
resources: {{requests: {{memory: 16Mi}}}}
placement: {{constraints: ["node.hostname == pi3"]}}
"""


@pytest.fixture(scope="module")
def lab(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Lab]:
    for lab in _module_lab(tmp_path_factory, 3, "ports", sandboxes=True, services=["dockerd"], registry=True):
        work = tmp_path_factory.mktemp("ports-specs")
        ok(lab, "apply", "-f", str(spec_file(work, SERVICE, WEB)))
        ok(lab, "apply", "-f", str(spec_file(work, "inside", INTERNAL)))
        ok(lab, "rollout", SERVICE)
        ok(lab, "rollout", "inside")
        settle(lab, "web settled", SERVICE, 2)
        wait_until("every node forwards 8080 to both replicas", functools.partial(all_forward_to, lab, 2), 30)
        yield lab


# --------------------------------------------------------------------------- helpers


def get(address: str, path: str = "/version", timeout: float = 3.0) -> str:
    """GET from the host, as a client on the LAN; the error's words when it fails."""
    try:
        with urllib.request.urlopen(f"http://{address}:{MCP_PORT}{path}", timeout=timeout) as reply:
            return reply.read().decode().strip()
    except (urllib.error.URLError, OSError) as error:
        return f"failed: {error}"


def table(lab: Lab, node: str) -> str:
    done = lab.sandbox(node).run(["nft", "list", "table", "ip", "picoord_ports"], 10)
    return done.stdout if done.returncode == 0 else ""


def forwarded(lab: Lab, node: str) -> set[str]:
    """The endpoints (address:port) node's table forwards 8080 to."""
    return set(re.findall(r"dnat to ([0-9.]+:[0-9]+)", table(lab, node)))


def all_forward_to(lab: Lab, count: int) -> bool:
    return all(len(forwarded(lab, node)) == count for node in lab.nodes)


def web_containers(lab: Lab) -> dict[str, str]:
    """replica -> node, of web's running containers."""
    return {item["replica"]: node for node, items in containers(lab, SERVICE).items() for item in items}


CLIENT = re.compile(r"\[?(?:::ffff:)?(\d+\.\d+\.\d+\.\d+)\]?:\d+: response:")


def served(lab: Lab, replica: str, node: str) -> int:
    """How many requests from outside its node the replica's httpd answered so far (httpd -v
    logs `[::ffff:ADDRESS]:PORT: response:CODE`; the health probes come from Docker's bridge, 172.x)."""
    [item] = [c for c in containers(lab, SERVICE)[node] if c["replica"] == replica]
    done = lab.sandbox(node).run(["docker", "logs", item["id"]], 30)
    assert done.returncode == 0, f"docker logs {replica} on {node}: {done.stderr}"
    sources = CLIENT.findall(done.stdout + done.stderr)
    return sum(not source.startswith("172.") for source in sources)


def listening(lab: Lab, node: str) -> set[tuple[str, int]]:
    """(address, port) of every TCP socket listening in the Pi, loopback left out."""
    done = lab.sandbox(node).run(["ss", "-Hltn"], 10, check=True)
    found = set()
    for line in done.stdout.splitlines():
        local = line.split()[3]
        address, _, port = local.rpartition(":")
        if not address.startswith(("127.", "[::1]")):
            found.add((address.strip("[]"), int(port)))
    return found


class SteadyClient:
    """Requests at a steady rate from the host, round robin over the Pis' addresses."""

    def __init__(self, addresses: list[str], rate: float) -> None:
        self.addresses, self.every = addresses, 1.0 / rate
        self.sent = 0
        self.answers: dict[str, int] = {}
        self.failures: list[str] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        next_at = time.monotonic()
        while not self._stop.is_set():
            address = self.addresses[self.sent % len(self.addresses)]
            answer = get(address)
            self.sent += 1
            if answer.startswith("mcp "):
                self.answers[answer] = self.answers.get(answer, 0) + 1
            else:
                self.failures.append(f"{address}: {answer}")
            next_at += self.every
            self._stop.wait(max(0.0, next_at - time.monotonic()))

    def __enter__(self) -> SteadyClient:
        self._thread.start()
        return self

    def __exit__(self, *_exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=30)


# --------------------------------------------------------------------------- tests


def test_every_node_answers_the_published_port_with_both_replicas(lab: Lab) -> None:
    placed = web_containers(lab)
    assert sorted(placed.values()) == ["pi1", "pi2"], placed
    for node in lab.nodes:  # pi3 runs no replica: it forwards both ways
        before = {replica: served(lab, replica, host) for replica, host in placed.items()}
        answers = [get(lab.address(node)) for _ in range(30)]
        assert answers == ["mcp 1"] * 30, answers
        after = {replica: served(lab, replica, host) for replica, host in placed.items()}
        gained = {replica: after[replica] - before[replica] for replica in placed}
        assert sum(gained.values()) == 30 and all(gained.values()), f"{node}: {gained}"
    # The node's own connections too (the output hook), from the Pi with no replica.
    url = f"http://{lab.address('pi3')}:{MCP_PORT}/version"
    script = f"import urllib.request as u; print(u.urlopen({url!r}, timeout=3).read().decode())"
    mine = lab.sandbox("pi3").run(["python3", "-c", script], 20)
    assert mine.stdout.strip() == "mcp 1", mine.stderr


def test_nothing_listens_for_a_port_the_stack_does_not_publish(lab: Lab) -> None:
    bound = {}
    endpoints = forwarded(lab, "pi3")  # pi3 runs no replica: it reaches both at their endpoint ports
    for node in lab.nodes:
        ports = {port for _, port in listening(lab, node)}
        sockets = listening(lab, node)
        # Only the endpoint ports of the node's own web replicas, on its own address.
        expected = {
            (lab.address(node), int(e.split(":")[1]))
            for e in endpoints
            if e.startswith(f"{lab.address(node)}:")
        }
        assert sockets == expected, f"{node} listens on {sockets}, expected {expected}"
        assert MCP_PORT not in ports  # 8080 is answered by the kernel's rules, not a socket
        bound[node] = expected
    assert bound["pi3"] == set() and all(bound[n] for n in ("pi1", "pi2")), bound
    # The endpoint ports are the mesh's: a client that is not a node gets no answer there.
    for node in ("pi1", "pi2"):
        for address, port in bound[node]:
            with pytest.raises(OSError):
                urllib.request.urlopen(f"http://{address}:{port}/version", timeout=2)
    # The service kept inside runs on pi3, which listens on nothing at all (checked above).
    assert [item["state"] for item in containers(lab, "inside")["pi3"]] == ["running"]


def test_an_unhealthy_replica_is_out_of_the_rotation(lab: Lab) -> None:
    placed = web_containers(lab)
    sick = sorted(placed)[0]
    node = placed[sick]
    [item] = [c for c in containers(lab, SERVICE)[node] if c["replica"] == sick]
    # It fails its health check and answers 404 to everything from now on.
    docker(lab, node, "exec", item["id"], "busybox", "rm", "-f", "/www/health", "/www/version")
    left = wait_until(
        f"{sick} leaves every node's rules",
        lambda: all(len(forwarded(lab, n)) == 1 for n in lab.nodes),
        30,
        0.2,
        explain=lambda: {n: forwarded(lab, n) for n in lab.nodes},
    )
    assert left
    answers = [get(lab.address(n)) for n in lab.nodes for _ in range(20)]
    assert answers == ["mcp 1"] * 60, [a for a in answers if a != "mcp 1"]
    # It is replaced, and the replacement joins once its health check passes.
    settle(lab, "web settled again", SERVICE, 2, timeout=60)
    wait_until("both replicas forwarded again", lambda: all_forward_to(lab, 2), 30)
    assert sick not in web_containers(lab)


def test_a_rollout_under_a_steady_client_fails_no_request(lab: Lab) -> None:
    addresses = [lab.address(node) for node in lab.nodes]
    with SteadyClient(addresses, rate=20) as client:
        time.sleep(2)
        ok(lab, "rollout", SERVICE, "--image", "mcp:2")
        settle(lab, "web on mcp:2", SERVICE, 2, revision=2, timeout=90)
        wait_until("both new replicas forwarded", lambda: all_forward_to(lab, 2), 30)
        time.sleep(2)
    assert client.sent >= 100, client.sent
    assert client.failures == [], f"{len(client.failures)} of {client.sent} failed: {client.failures[:5]}"
    assert set(client.answers) == {"mcp 1", "mcp 2"}, client.answers
    assert {r["revision"] for r in running_replicas(lab, SERVICE)} == {2}
    print(
        f"rollout under load: {client.sent} requests at 20/s, {len(client.failures)} failed, {client.answers}"
    )

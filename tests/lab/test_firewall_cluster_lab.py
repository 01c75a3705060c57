"""A default-deny firewall on a lab Swarm, through `coordctl apply` only: it keeps the
cluster's own ports and the operator's SSH, or it is refused.

One lab for the module: three Pis with dockerd and the lab registry. pi1 becomes the
Swarm manager and pi2 its worker; pi3 stands for the operator's laptop, with a live
"SSH session" to pi1 (a TCP connection from pi3 to a listener on pi1's port 22, opened
before any firewall is up, as an operator logged in over SSH would have). The tests run
in file order:

1. a policy for pi1 and pi2 without Swarm's ports is refused, naming each missing rule
   and the line to add, and nothing changes (no swarm, no firewall);
2. the same file with the lines the refusal gave goes through: the Swarm forms behind a
   default-deny nftables policy, a container on pi2 reaches a name on pi1 over an
   attachable overlay (and, with the VXLAN rules deleted by hand, cannot: the policy is
   on the data path), and pi3 (no Swarm member) cannot reach pi1's gossip port;
3. the SSH session's source can still connect anew to pi1's port 22 (pi2, without a
   session, cannot); with `keep_ssh: false` the same policy shuts pi3 out too.
4. `cluster_ports: allow` writes Swarm's rules from the nodes' addresses itself.
"""

from __future__ import annotations

import contextlib
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from picoord.lab.cluster import Lab
from picoord.lab.images import MCP_PORT
from tests.conftest import _module_lab
from tests.lab.test_workloads_lab import ctl, docker, ok, spec_file, words

pytestmark = pytest.mark.lab

SSH_PORT = 22
GOSSIP_PORT = 7946
APPLY_TIMEOUT = 300.0
NETWORK = "fw-overlay"

# A stand-in sshd: greets each connection and keeps it open (a session stays established).
_SSHD = r"""
import socket, sys, threading
server = socket.socket()
server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
server.bind(("0.0.0.0", int(sys.argv[1])))
server.listen(16)
print("LISTEN" + "ING", flush=True)
held = []
while True:
    connection, _ = server.accept()
    connection.sendall(b"SSH-2.0-stand-in\r\n")
    held.append(connection)
"""

# The operator's session: connects, reads the greeting, and stays connected.
_SESSION = r"""
import socket, sys, time
session = socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=10)
print("SESSION " + session.recv(64).decode().strip(), flush=True)
while True:
    time.sleep(60)
"""

_CONNECT = r"""
import socket, sys
try:
    with socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=float(sys.argv[3])) as s:
        s.settimeout(float(sys.argv[3]))
        print("connected")
except socket.timeout:
    print("timeout")
except ConnectionRefusedError:
    print("refused")
except OSError as error:
    print(f"error {error}")
"""

MEMBERSHIP = """
kind: ClusterMembership
name: swarm
engine: swarm
manager: pi1
workers: [pi2]
"""
POLICY = """
kind: FirewallPolicy
name: cluster
nodes: {nodes}
backend: nftables
default_incoming: deny
{extra}rules:
  - {{action: allow, port: {mcp}, protocol: tcp, comment: the app}}
{rules}"""


@pytest.fixture(scope="module")
def lab(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Lab]:
    yield from _module_lab(
        tmp_path_factory, 3, "fwcluster", sandboxes=True, services=["dockerd"], registry=True
    )


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return Path(tmp_path_factory.mktemp("fwfiles"))


@pytest.fixture(scope="module")
def refusal_lines() -> list[str]:
    """The rules the refusal in test 1 said to add (filled in there, used by test 2 and 3)."""
    return []


def _wait_for_line(log: Path, prefix: str, process: subprocess.Popen[bytes], seconds: float = 15) -> str:
    deadline = time.monotonic() + seconds
    while True:
        for line in log.read_text().splitlines() if log.exists() else []:
            if line.startswith(prefix):
                return line
        assert process.poll() is None and time.monotonic() < deadline, log.read_text() if log.exists() else ""
        time.sleep(0.05)


@pytest.fixture(scope="module")
def ssh_session(lab: Lab, files: Path) -> Iterator[str]:
    """pi1's stand-in sshd on 22 and pi3's session to it, up before any firewall; pi3's
    address (the session's source). Both processes end with the module."""
    started: list[subprocess.Popen[bytes]] = []
    try:
        sshd_log = files / "sshd.log"
        sshd = lab.sandbox("pi1").popen([sys.executable, "-c", _SSHD, str(SSH_PORT)], sshd_log)
        started.append(sshd)
        _wait_for_line(sshd_log, "LISTENING", sshd)
        session_log = files / "session.log"
        session = lab.sandbox("pi3").popen(
            [sys.executable, "-c", _SESSION, lab.address("pi1"), str(SSH_PORT)], session_log
        )
        started.append(session)
        assert "SSH-2.0-stand-in" in _wait_for_line(session_log, "SESSION", session)
        yield lab.address("pi3")
    finally:
        for process in started:
            process.terminate()
            try:
                process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(timeout=10)


def connect(lab: Lab, source: str, target: str, port: int, timeout: float = 2.0) -> str:
    """A NEW TCP connection from one Pi to another: connected, timeout (dropped) or refused."""
    done = lab.sandbox(source).run(
        [sys.executable, "-c", _CONNECT, lab.address(target), str(port), str(timeout)], timeout=timeout + 20
    )
    return done.stdout.strip() or done.stderr.strip()[-300:]


def policy(nodes: str, rules: list[str], extra: str = "") -> str:
    return POLICY.format(nodes=nodes, extra=extra, mcp=MCP_PORT, rules="".join(f"  {r}\n" for r in rules))


def swarm_state(lab: Lab, node: str) -> str:
    return docker(lab, node, "info", "--format", "{{.Swarm.LocalNodeState}}").strip()


def picoord_table(lab: Lab, node: str) -> str:
    done = lab.sandbox(node).run(["nft", "list", "table", "inet", "picoord"])
    return done.stdout if done.returncode == 0 else ""


def fetch_over_overlay(lab: Lab) -> str:
    """From a container on pi2, GET /version from `web` over the overlay (3 s at most)."""
    done = lab.sandbox("pi2").run(
        [
            "docker", "run", "--rm", "--network", NETWORK, "mcp:1", "sh", "-c",
            f"printf 'GET /version HTTP/1.0\\r\\n\\r\\n' | nc -w 3 web {MCP_PORT}",
        ],
        timeout=60,
    )  # fmt: skip
    return done.stdout + done.stderr


def drop_rules(lab: Lab, node: str, match: str) -> None:
    """Delete the picoord table's rules whose listing contains `match` (by handle)."""
    sandbox = lab.sandbox(node)
    listing = sandbox.run(["nft", "-a", "list", "chain", "inet", "picoord", "input"], check=True).stdout
    handles = [line.rsplit("# handle", 1)[1].strip() for line in listing.splitlines() if match in line]
    assert handles, listing
    for handle in handles:
        sandbox.run(["nft", "delete", "rule", "inet", "picoord", "input", "handle", handle], check=True)


def test_a_policy_without_the_swarm_ports_is_refused_naming_them_and_changes_nothing(
    lab: Lab, files: Path, ssh_session: str, refusal_lines: list[str]
) -> None:
    path = spec_file(files, "refused", MEMBERSHIP + "---" + policy("[pi1, pi2]", []))
    done = ctl(lab, "apply", "-f", str(path), timeout=APPLY_TIMEOUT)
    said = words(done)
    assert done.returncode != 0, said
    assert "nothing was changed" in said, said
    pi1, pi2 = lab.address("pi1"), lab.address("pi2")
    assert f"FirewallPolicy/cluster on pi1 (swarm manager): 2377/tcp from pi2 ({pi2})" in said, said
    for port in ("7946/tcp", "7946/udp", "4789/udp"):
        assert f"FirewallPolicy/cluster on pi1 (swarm manager): {port} from pi2 ({pi2})" in said, said
        assert f"FirewallPolicy/cluster on pi2 (swarm worker): {port} from pi1 ({pi1})" in said, said
    assert "pi3" not in said  # not a Swarm member: nothing is needed from it or on it
    refusal_lines += [line.strip() for line in said.splitlines() if line.strip().startswith("- {action")]
    assert len(refusal_lines) == 7, said  # 4 from pi2 (to the manager), 3 from pi1
    # nothing changed: no swarm, no firewall, and pi2 still reaches pi1's sshd
    assert (swarm_state(lab, "pi1"), swarm_state(lab, "pi2")) == ("inactive", "inactive")
    assert picoord_table(lab, "pi1") == picoord_table(lab, "pi2") == ""
    assert connect(lab, "pi2", "pi1", SSH_PORT) == "connected"


def test_with_the_swarm_ports_a_default_deny_swarm_keeps_its_overlay_working(
    lab: Lab, files: Path, ssh_session: str, refusal_lines: list[str]
) -> None:
    assert refusal_lines, "test 1 did not run first"
    path = spec_file(files, "cluster", MEMBERSHIP + "---" + policy("[pi1, pi2]", refusal_lines))
    planned = ok(lab, "apply", "-f", str(path), "--dry-run", timeout=APPLY_TIMEOUT)
    # the dry run on pi1 shows the SSH session's source kept open
    assert f"keeping 22/tcp open for the source of each live SSH session: {ssh_session}" in planned, planned
    assert picoord_table(lab, "pi1") == ""
    said = ok(lab, "apply", "-f", str(path), timeout=APPLY_TIMEOUT)
    assert "policy drop;" in picoord_table(lab, "pi1") and "policy drop;" in picoord_table(lab, "pi2")
    assert f'ip saddr {ssh_session} tcp dport 22 accept comment "picoord ssh session"' in picoord_table(
        lab, "pi1"
    ), said
    assert swarm_state(lab, "pi2") == "active"

    # an attachable overlay: a container on pi2 reaches a name on pi1
    docker(lab, "pi1", "network", "create", "-d", "overlay", "--attachable", NETWORK)
    try:
        docker(
            lab,
            "pi1",
            "run",
            "-d",
            "--name",
            "fw-web",
            "--network",
            NETWORK,
            "--network-alias",
            "web",
            "mcp:1",
        )
        reply = ""
        deadline = time.monotonic() + 60  # the worker learns the network and the name by gossip
        while "mcp 1" not in reply and time.monotonic() < deadline:
            reply = fetch_over_overlay(lab)
        assert "200 OK" in reply and "mcp 1" in reply, reply
        # The rules are on the data path: without the VXLAN ones the same request fails.
        for node in ("pi1", "pi2"):
            drop_rules(lab, node, "udp dport 4789")
        reply = fetch_over_overlay(lab)
        assert "mcp 1" not in reply and "timed out" in reply, reply
    finally:
        with contextlib.suppress(AssertionError):
            docker(lab, "pi1", "rm", "-f", "fw-web")
        with contextlib.suppress(AssertionError):
            docker(lab, "pi1", "network", "rm", NETWORK)
    # the policy is in force: Swarm's gossip port is open to pi2, not to pi3
    assert connect(lab, "pi2", "pi1", GOSSIP_PORT) == "connected"
    assert connect(lab, "pi3", "pi1", GOSSIP_PORT) == "timeout"


def test_the_ssh_sessions_source_connects_anew_unless_keep_ssh_is_false(
    lab: Lab, files: Path, ssh_session: str, refusal_lines: list[str]
) -> None:
    assert picoord_table(lab, "pi1"), "test 2 did not apply the policy"
    assert connect(lab, "pi3", "pi1", SSH_PORT) == "connected"  # kept: the session's source
    assert connect(lab, "pi2", "pi1", SSH_PORT) == "timeout"  # no session, no rule for 22
    # pi1 is a Swarm manager by the coordinator's record now: a policy-only file is checked too
    bare = spec_file(files, "bare", policy("[pi1]", []))
    refused = ctl(lab, "apply", "-f", str(bare), timeout=APPLY_TIMEOUT)
    assert refused.returncode != 0 and "on pi1 (swarm manager): 2377/tcp from pi2" in words(refused)
    closed = spec_file(files, "closed", policy("[pi1]", refusal_lines, extra="keep_ssh: false\n"))
    said = ok(lab, "apply", "-f", str(closed), timeout=APPLY_TIMEOUT)
    assert "keep_ssh: false" in said, said
    assert "picoord ssh session" not in picoord_table(lab, "pi1")
    assert connect(lab, "pi3", "pi1", SSH_PORT) == "timeout"


def test_cluster_ports_allow_writes_the_swarm_rules_from_the_nodes_addresses(lab: Lab, files: Path) -> None:
    path = spec_file(files, "added", policy("[pi1, pi2]", [], extra="cluster_ports: allow\n"))
    said = ok(lab, "apply", "-f", str(path), timeout=APPLY_TIMEOUT)
    table = picoord_table(lab, "pi1")
    pi2 = lab.address("pi2")
    for match in (
        "tcp dport 2377",
        f"tcp dport {GOSSIP_PORT}",
        f"udp dport {GOSSIP_PORT}",
        "udp dport 4789",
    ):
        assert f'ip saddr {pi2} {match} accept comment "picoord cluster ports"' in table, (table, said)
    assert "2377" not in picoord_table(lab, "pi2")  # a worker: gossip and VXLAN only
    assert connect(lab, "pi2", "pi1", GOSSIP_PORT) == "connected"
    assert connect(lab, "pi3", "pi1", GOSSIP_PORT) == "timeout"

"""The lab's network and process lifecycle, without the real coordinator or agent.

Why: every end-to-end test stands on these namespaces; if an address, a route or the
teardown were wrong, those tests would fail for reasons that have nothing to do with
picoord, or leave the host littered. Lifecycle tests drive `Lab` with tiny stand-in
executables that honour the CLI contracts, so the lab is checked on its own.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from picoord.lab import cli as lab_cli
from picoord.lab import netns
from picoord.lab.cluster import Lab, known_labs
from picoord.lab.netns import LabError, LabNetwork

pytestmark = pytest.mark.lab

VENV_BIN = Path(sys.executable).parent
NOBODY = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups"]

# A TCP client run inside a namespace: connect (retrying while the server starts), say
# hello, print the reply. argv: host port.
CLIENT = """
import socket, sys, time
deadline = time.monotonic() + 10
while True:
    try:
        s = socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=5)
        break
    except OSError as error:
        if time.monotonic() > deadline or error.errno == 101:  # 101: network unreachable
            print("ERROR", error.errno, error)
            sys.exit(2)
        time.sleep(0.1)
s.sendall(b"hello")
print(s.recv(200).decode())
"""

# A TCP server run inside a namespace: answer one client with the address it came from.
SERVER = """
import socket, sys
srv = socket.create_server((sys.argv[1], int(sys.argv[2])))
conn, peer = srv.accept()
conn.recv(100)
conn.sendall(("from " + peer[0]).encode())
conn.close()
"""


def ip_json(*args: str) -> list[dict]:
    done = subprocess.run(["ip", "-j", *args], capture_output=True, text=True, timeout=10, check=True)
    return json.loads(done.stdout or "[]")


def host_names() -> set[str]:
    """What `ip netns list` and `ip link` show on the host, as the brief's check."""
    names = {line.split()[0] for line in _ip_lines("netns", "list")}
    names |= {link["ifname"] for link in ip_json("link", "show")}
    return names


def _ip_lines(*args: str) -> list[str]:
    done = subprocess.run(["ip", *args], capture_output=True, text=True, timeout=10, check=True)
    return [line for line in done.stdout.splitlines() if line.strip()]


def names_of(net: LabNetwork) -> set[str]:
    return {net.bridge, *(pi.netns for pi in net.pis), *(pi.veth_host for pi in net.pis)}


def wait_until(predicate: Callable[[], bool], timeout: float = 5.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.05)
    return predicate()


# --------------------------------------------------------------------------- pure planning


def test_plan_names_fit_interfaces_and_carry_the_lab_id() -> None:
    net = netns.plan_network("0a1b", "10.213.9.0/24", 12)
    assert net.bridge == "pcl0a1bbr"
    assert net.gateway == "10.213.9.1"
    assert [pi.node for pi in net.pis][:2] == ["pi1", "pi2"]
    assert net.pi("pi1").netns == "pcl0a1b-pi1"
    assert net.pi("pi12").veth_host == "pcl0a1bh12"
    assert net.pi("pi1").address == "10.213.9.11"
    assert all(len(name) <= netns.IFNAMSIZ for name in (net.bridge, *(pi.veth_host for pi in net.pis)))
    assert LabNetwork.from_dict(json.loads(json.dumps(net.to_dict()))) == net


@pytest.mark.parametrize(
    "subnet", ["8.8.8.0/24", "127.0.5.0/24", "169.254.3.0/24", "10.0.0.0/8", "10.213.1.5/24"]
)
def test_subnets_outside_private_ranges_or_malformed_are_refused(subnet: str) -> None:
    with pytest.raises(LabError, match="subnet"):
        netns.validate_subnet(subnet)


def test_plan_refuses_a_subnet_too_small_for_the_pis() -> None:
    with pytest.raises(LabError, match="too small"):
        netns.plan_network("0a1b", "10.213.9.0/28", 5)


# --------------------------------------------------------------------------- the network


def test_pis_get_their_addresses_and_no_way_out(network_factory: Callable[..., LabNetwork]) -> None:
    forwarding_before = Path("/proc/sys/net/ipv4/ip_forward").read_text()
    net = network_factory(3)

    bridge = ip_json("addr", "show", "dev", net.bridge)[0]
    assert [(a["local"], a["prefixlen"]) for a in bridge["addr_info"] if a["family"] == "inet"] == [
        (net.gateway, 24)
    ]
    for pi in net.pis:
        links = {link["ifname"]: link for link in ip_json("-n", pi.netns, "addr", "show")}
        assert set(links) == {"lo", "eth0"}
        assert "UP" in links["lo"]["flags"]
        assert "UP" in links["eth0"]["flags"]
        inet = [(a["local"], a["prefixlen"]) for a in links["eth0"]["addr_info"] if a["family"] == "inet"]
        assert inet == [(pi.address, 24)]
        # The only route is the lab subnet: nothing can leave the lab from a Pi.
        routes = ip_json("-n", pi.netns, "-4", "route", "show", "table", "all")
        assert not [r for r in routes if r["dst"] == "default"], routes
        assert [r["dst"] for r in routes if r.get("table", "main") == "main"] == [net.subnet]
        master = ip_json("link", "show", "dev", pi.veth_host)[0].get("master")
        assert master == net.bridge
    assert Path("/proc/sys/net/ipv4/ip_forward").read_text() == forwarding_before


def test_gateway_is_reachable_from_inside_a_namespace(network_factory: Callable[..., LabNetwork]) -> None:
    net = network_factory(2)
    peers: list[str] = []
    with socket.create_server((net.gateway, 0)) as server:
        server.settimeout(15)
        port = server.getsockname()[1]

        def answer() -> None:
            conn, peer = server.accept()
            with conn:
                peers.append(peer[0])
                conn.recv(100)
                conn.sendall(b"welcome " + peer[0].encode())

        thread = threading.Thread(target=answer, daemon=True)
        thread.start()
        pi = net.pis[1]
        done = netns.run_in_netns(
            pi.netns, [sys.executable, "-c", CLIENT, net.gateway, str(port)], timeout=20
        )
        thread.join(timeout=15)
    assert done.returncode == 0, done.stdout + done.stderr
    assert done.stdout.strip() == f"welcome {pi.address}"
    assert peers == [pi.address]  # it really came from the namespace's own address


def test_a_namespace_reaches_another_namespace(
    network_factory: Callable[..., LabNetwork], tmp_path: Path
) -> None:
    net = network_factory(2)
    pi1, pi2 = net.pis
    server = netns.popen_in_netns(
        pi2.netns, [sys.executable, "-c", SERVER, pi2.address, "47001"], tmp_path / "s.log"
    )
    try:
        done = netns.run_in_netns(pi1.netns, [sys.executable, "-c", CLIENT, pi2.address, "47001"], timeout=20)
        assert server.wait(timeout=15) == 0, netns.tail(tmp_path / "s.log")
    finally:
        if server.poll() is None:
            server.kill()
            server.wait(timeout=5)
    # If this fails with a timeout while the gateway test passes, suspect br_netfilter with a
    # FORWARD policy of DROP (e.g. set by dockerd): bridged frames then traverse iptables.
    assert done.returncode == 0, done.stdout + done.stderr
    assert done.stdout.strip() == f"from {pi1.address}"


def test_two_labs_at_once_do_not_collide(network_factory: Callable[..., LabNetwork]) -> None:
    made: list[LabNetwork] = []
    errors: list[BaseException] = []

    def create() -> None:
        try:
            made.append(network_factory(2))
        except BaseException as error:
            errors.append(error)

    threads = [threading.Thread(target=create) for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    assert not errors, errors
    a, b = made
    assert a.lab_id != b.lab_id
    assert a.subnet != b.subnet
    assert not names_of(a) & names_of(b)
    assert names_of(a) | names_of(b) <= host_names()
    # Each Pi reaches its own gateway; the other lab's subnet is unreachable (no route).
    with socket.create_server((a.gateway, 0)) as server:
        server.settimeout(15)
        port = server.getsockname()[1]
        thread = threading.Thread(target=lambda: server.accept()[0].sendall(b"ok"), daemon=True)
        thread.start()
        own = netns.run_in_netns(
            a.pis[0].netns, [sys.executable, "-c", CLIENT, a.gateway, str(port)], timeout=20
        )
        thread.join(timeout=15)
        other = netns.run_in_netns(
            b.pis[0].netns, [sys.executable, "-c", CLIENT, a.gateway, str(port)], timeout=20
        )
    assert own.returncode == 0 and own.stdout.strip() == "ok", own.stdout + own.stderr
    assert other.returncode == 2 and "ERROR 101" in other.stdout, other.stdout + other.stderr


def test_a_taken_subnet_is_refused(network_factory: Callable[..., LabNetwork]) -> None:
    net = network_factory(1)
    with pytest.raises(LabError, match="collides"):
        netns.check_subnet_free(net.subnet)
    with pytest.raises(LabError, match="claimed"):
        netns.check_subnet_free("10.213.250.0/24", claimed=["10.213.250.0/23"])
    assert netns.choose_subnet() != net.subnet


# --------------------------------------------------------------------------- teardown


def _fresh_plan(nodes: int) -> LabNetwork:
    """A plan for a new lab (call under host_lock, with the creation, so no lab races it)."""
    return netns.plan_network(netns.new_lab_id(), netns.choose_subnet(), nodes)


@pytest.mark.usefixtures("root")
def test_teardown_removes_everything_and_is_idempotent(tmp_path: Path) -> None:
    with netns.host_lock():
        net = _fresh_plan(3)
        try:
            netns.create_network(net)
        except BaseException:
            netns.teardown_network(net)
            raise
    # A process left inside a namespace would keep it alive: teardown must end it.
    sleeper = netns.popen_in_netns(net.pis[0].netns, ["sleep", "300"], tmp_path / "sleep.log")
    try:
        assert names_of(net) <= host_names()
        # Only once it is inside: until `ip netns exec` has joined, it is not in the namespace.
        assert wait_until(lambda: sleeper.pid in netns.namespace_pids(net.pis[0].netns))
        netns.teardown_network(net)
        assert sleeper.wait(timeout=10) is not None
        assert not names_of(net) & host_names()
        assert netns.remaining(net) == []
        netns.teardown_network(net)  # a second time: nothing to do, no error
        assert not names_of(net) & host_names()
    finally:
        if sleeper.poll() is None:
            sleeper.kill()
            sleeper.wait(timeout=10)
        netns.teardown_network(net)


@pytest.mark.usefixtures("root")
def test_teardown_after_a_half_way_failure() -> None:
    with netns.host_lock():
        net = _fresh_plan(3)
        try:
            # A stray interface with pi3's veth name makes creation fail after pi1 and pi2 exist.
            subprocess.run(
                ["ip", "link", "add", net.pis[2].veth_host, "type", "bridge"], check=True, timeout=10
            )
            with pytest.raises(LabError, match=net.pis[2].veth_host):
                netns.create_network(net)
        except BaseException:
            netns.teardown_network(net)
            raise
    try:
        assert {net.bridge, net.pis[0].netns, net.pis[1].netns, net.pis[2].netns} <= host_names()
        netns.teardown_network(net)
        assert not names_of(net) & host_names()
    finally:
        netns.teardown_network(net)


# --------------------------------------------------------------------------- Lab lifecycle

# Stand-ins for the three executables, honouring the CLI contracts the lab codes against.
# MODE: "ok" | "coordinator-crashes" | "admin-never-answers" | "stubborn-coordinator".
FAKE = r"""#!{python}
import json, os, signal, socket, sys, threading, time
from pathlib import Path

MODE = {mode!r}
prog, args = Path(sys.argv[0]).name, sys.argv[1:]


def opt(name):  # `--name value` or `--name=value`, as argparse takes either
    for index, word in enumerate(args):
        if word == name and index + 1 < len(args):
            return args[index + 1]
        if word.startswith(name + "="):
            return word.partition("=")[2]
    return None


def alive(pid):
    try:
        return Path(f"/proc/{{pid}}/stat").read_text().rpartition(")")[2].split()[0] not in "ZX"
    except OSError:
        return False


if prog == "picoord-coordinator":
    if MODE == "coordinator-crashes":
        print("boom: cannot bind", opt("--listen"), flush=True)
        sys.exit(3)
    stubborn = MODE == "stubborn-coordinator"
    signal.signal(signal.SIGTERM, signal.SIG_IGN if stubborn else lambda *_: sys.exit(0))
    host, port = opt("--listen").rsplit(":", 1)
    tcp = socket.create_server((host, int(port)))
    admin = socket.socket(socket.AF_UNIX)
    admin.bind(opt("--admin-socket"))
    admin.listen()
    print("fake coordinator listening on", opt("--listen"), "argv", args, flush=True)
    while True:
        conn, peer = tcp.accept()
        print("hello from", peer[0], conn.recv(100).decode(), flush=True)
        conn.close()

if prog == "coordctl":
    sock = Path(opt("--admin-socket"))
    if MODE in ("admin-never-answers", "stubborn-coordinator") or not sock.exists():
        print("coordctl: cannot reach", sock, file=sys.stderr)
        sys.exit(1)
    if "token" in args:
        print(json.dumps({{"token": "abcdef.0123456789abcdef", "ca_cert_hash": "sha256:" + "0" * 64,
                          "join_command": "picoord-agent join ...", "expires_at": "2099-01-01T00:00:00Z"}}))
    elif "nodes" in args:
        pis = sock.parent / "pis"
        nodes = []
        for d in sorted(pis.iterdir()) if pis.exists() else []:
            pid = d / "run.pid"
            ready = pid.exists() and alive(int(pid.read_text()))
            nodes.append({{"name": d.name, "status": "Ready" if ready else "NotReady"}})
        print(json.dumps(nodes))
    sys.exit(0)

if prog == "picoord-agent":
    if args[0] == "--config":
        assert Path(args[1]).exists(), args
        args = args[2:]
    state = Path(opt("--state-dir"))
    if args[0] == "join":
        host, port = args[1].rsplit(":", 1)
        with socket.create_connection((host, int(port)), timeout=5) as conn:
            conn.sendall(opt("--node-name").encode())
        info = {{"node": opt("--node-name"), "netns": os.stat("/proc/self/ns/net").st_ino, "argv": args}}
        (state / "joined.json").write_text(json.dumps(info))
        sys.exit(0)
    if args[0] == "run":
        signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
        (state / "run.pid").write_text(str(os.getpid()))
        while True:
            time.sleep(1)
"""


def fake_bin(tmp_path: Path, mode: str = "ok") -> Path:
    bin_dir = tmp_path / f"bin-{mode}"
    bin_dir.mkdir()
    for name in ("picoord-coordinator", "coordctl", "picoord-agent"):
        path = bin_dir / name
        path.write_text(FAKE.format(python=sys.executable, mode=mode))
        path.chmod(0o755)
    return bin_dir


def lab_leftovers(lab: Lab) -> list[str]:
    names = [n for n in host_names() if n.startswith(f"pcl{lab.lab_id}")]
    running = [f"{name} pid {rec.pid}" for name, rec in lab.processes.items() if lab.is_running(name)]
    return names + running


def test_lab_up_runs_every_agent_in_its_namespace_then_down_from_another_process(
    lab_factory: Callable[..., Lab], tmp_path: Path
) -> None:
    lab = lab_factory(work_dir=tmp_path / "lab", bin_dir=fake_bin(tmp_path), ready_timeout=20)
    lab.up(3, labels={"pi2": {"arch": "arm64"}})
    assert lab.node_statuses() == {"pi1": "Ready", "pi2": "Ready", "pi3": "Ready"}
    for node in lab.nodes:
        joined = json.loads((lab.agent_state_dir(node) / "joined.json").read_text())
        assert joined["netns"] == os.stat(f"/run/netns/{lab.namespace(node)}").st_ino
        assert joined["argv"][:2] == ["join", lab.coordinator_address]
        done = subprocess.run(
            ["ip", "netns", "identify", str(lab.processes[node].pid)],
            capture_output=True,
            text=True,
            timeout=10,
        )
        assert done.stdout.strip() == lab.namespace(node)
    assert json.loads((lab.agent_state_dir("pi2") / "joined.json").read_text())["argv"][-2:] == [
        "--label",
        "arch=arm64",
    ]
    log = lab.log_path("coordinator").read_text()
    assert all(f"hello from {lab.address(node)} {node}" in log for node in lab.nodes), log

    state = json.loads(lab.state_path.read_text())
    assert state["lab_id"] == lab.lab_id and state["status"] == "up"
    assert state["namespaces"] == [lab.namespace(node) for node in lab.nodes]
    assert set(state["pids"]) == {"coordinator", "pi1", "pi2", "pi3"}
    assert lab.work_dir in list(known_labs())

    # Take a node away and bring it back, then restart the coordinator.
    lab.kill_agent("pi2")
    assert not lab.is_running("pi2")
    assert lab.wait_for_status("NotReady", ["pi2"], timeout=5)["pi2"] == "NotReady"
    lab.start_agent("pi2")
    lab.wait_ready(timeout=10)
    old = lab.processes["coordinator"].pid
    lab.restart_coordinator()
    assert lab.processes["coordinator"].pid != old and lab.is_running("coordinator")
    assert lab.exec_in("pi1", "ip", "-br", "addr", "show", "dev", "eth0").stdout.split()[2].startswith("10.")

    # `picoord-lab status` and `down` from another process, by work dir.
    cli = [str(VENV_BIN / "picoord-lab")]
    status = subprocess.run(
        [*cli, "status", "--work-dir", str(lab.work_dir)], capture_output=True, text=True, timeout=60
    )
    assert status.returncode == 0 and "pi3" in status.stdout and "Ready" in status.stdout, status
    pids = [rec.pid for rec in lab.processes.values()]
    down = subprocess.run(
        [*cli, "down", "--work-dir", str(lab.work_dir)], capture_output=True, text=True, timeout=120
    )
    assert down.returncode == 0, down.stdout + down.stderr
    for pid in pids:
        lab._popens.get(pid) and lab._popens[pid].wait(timeout=10)  # reap our children
    assert lab_leftovers(lab) == []
    assert lab.work_dir not in list(known_labs())
    assert json.loads(lab.state_path.read_text())["status"] == "down"


@pytest.mark.parametrize(
    ("mode", "expected"),
    [("coordinator-crashes", "boom: cannot bind"), ("admin-never-answers", "did not answer")],
)
def test_a_failed_up_cleans_up_after_itself(
    lab_factory: Callable[..., Lab], tmp_path: Path, mode: str, expected: str
) -> None:
    lab = lab_factory(work_dir=tmp_path / "lab", bin_dir=fake_bin(tmp_path, mode), start_timeout=3)
    with pytest.raises(LabError, match=expected):
        lab.up(2)
    assert lab_leftovers(lab) == []
    assert lab.status == "down"
    assert lab.work_dir not in list(known_labs())
    Lab.load(lab.work_dir).down()  # and again from the state file: still fine


def test_down_escalates_to_sigkill(lab_factory: Callable[..., Lab], tmp_path: Path) -> None:
    lab = lab_factory(
        work_dir=tmp_path / "lab",
        bin_dir=fake_bin(tmp_path, "stubborn-coordinator"),
        start_timeout=2,
        stop_timeout=1,
    )
    started = time.monotonic()
    with pytest.raises(LabError, match="did not answer"):
        lab.up(1)
    assert lab.exit_code("coordinator") is None or lab.exit_code("coordinator") == -signal.SIGKILL
    assert lab_leftovers(lab) == []
    assert time.monotonic() - started < 30


def test_state_is_written_before_the_network_exists(
    lab_factory: Callable[..., Lab], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A crash half-way must leave enough behind for `picoord-lab down` to find everything."""
    lab = lab_factory(work_dir=tmp_path / "lab", bin_dir=fake_bin(tmp_path, "coordinator-crashes"))
    seen: list[dict] = []
    real_create = netns.create_network

    def spy(net: LabNetwork) -> None:
        seen.append(json.loads(lab.state_path.read_text()))
        real_create(net)

    monkeypatch.setattr(netns, "create_network", spy)
    with pytest.raises(LabError):
        lab.up(2)
    assert seen and seen[0]["status"] == "creating"
    assert seen[0]["namespaces"] == [f"pcl{lab.lab_id}-pi1", f"pcl{lab.lab_id}-pi2"]
    assert seen[0]["bridge"] == f"pcl{lab.lab_id}br"


# --------------------------------------------------------------------------- without root


def test_the_lab_refuses_to_run_without_root(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """Without root, the API and the CLI say why they refuse, and create nothing."""
    before = netns.lab_names_in_use()
    monkeypatch.setattr(os, "geteuid", lambda: 1000)
    with pytest.raises(netns.LabNeedsRoot, match="the lab needs root: it creates network namespaces"):
        Lab().up(1)
    assert lab_cli.main(["up", "--nodes", "1"]) == 1
    assert "picoord-lab: error: the lab needs root: it creates network namespaces" in capsys.readouterr().err
    assert netns.lab_names_in_use() == before


@pytest.mark.usefixtures("root")
def test_the_cli_refuses_when_really_run_as_nobody() -> None:
    """The same for a real unprivileged process (needs root to become nobody)."""
    lab_id = netns.new_lab_id()  # its own id: other tests may add labs meanwhile
    done = subprocess.run(
        [*NOBODY, sys.executable, "-m", "picoord.lab.cli", "up", "--nodes", "1", "--id", lab_id],
        capture_output=True,
        text=True,
        timeout=60,
        cwd="/",
        env={"PATH": os.environ["PATH"], "HOME": "/nonexistent"},
    )
    assert done.returncode == 1
    assert "the lab needs root: it creates network namespaces" in done.stderr, done.stderr
    assert "effective uid is 65534" in done.stderr
    assert lab_id not in netns.lab_names_in_use()


@pytest.mark.usefixtures("root")
def test_cli_up_returns_leaving_the_lab_running_and_down_removes_it(tmp_path: Path) -> None:
    """`up` must detach: with its output captured, it returns only if no child holds the pipe."""
    cli = [str(VENV_BIN / "picoord-lab")]
    work_dir = tmp_path / "cli-lab"
    up = subprocess.run(
        [*cli, "up", "--nodes", "2", "--work-dir", str(work_dir), "--bin-dir", str(fake_bin(tmp_path))],
        capture_output=True,
        text=True,
        timeout=60,
    )
    lab: Lab | None = None
    try:
        assert up.returncode == 0, up.stdout + up.stderr
        lab = Lab.load(work_dir)
        assert f"export COORDCTL_ADMIN_SOCKET={lab.admin_socket}\n" in up.stdout
        assert all(lab.is_running(name) for name in ("coordinator", "pi1", "pi2"))
        status = subprocess.run([*cli, "status", "-o", "json"], capture_output=True, text=True, timeout=60)
        mine = [s for s in json.loads(status.stdout) if s.get("lab_id") == lab.lab_id]
        assert mine and mine[0]["nodes"] == {"pi1": "Ready", "pi2": "Ready"}, status.stdout
        down = subprocess.run([*cli, "down", "--id", lab.lab_id], capture_output=True, text=True, timeout=120)
        assert down.returncode == 0, down.stdout + down.stderr
        assert lab_leftovers(lab) == []
    finally:
        if work_dir.joinpath("lab.json").exists():
            Lab.load(work_dir).down()


# --------------------------------------------------------------------------- the real programs


def test_the_real_cluster_comes_up_with_each_agent_on_its_own_address(lab3: Lab) -> None:
    """Smoke test of the fixture other tests stand on: real coordinator, real agents."""
    nodes = {node["name"]: node for node in lab3.coordctl_json("nodes")}
    assert {name: node["status"] for name, node in nodes.items()} == dict.fromkeys(lab3.nodes, "Ready")
    for name in lab3.nodes:
        shown = lab3.coordctl_json("node", "show", name)
        addresses = [a for i in shown["hardware"]["interfaces"] for a in i["addresses"]]
        assert f"{lab3.address(name)}/24" in addresses, shown["hardware"]["interfaces"]

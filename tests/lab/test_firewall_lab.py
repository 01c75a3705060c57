"""The firewall executor against the real ufw and nft, inside lab Pis.

Each Pi is a network namespace (its own iptables/nftables rules) plus a PiSandbox mount
namespace (its own /etc/ufw, and here its own /etc/default/ufw, see
`private_default_ufw`). The executor runs inside the Pi through tests/actions/runner.py,
exactly as the agent would run it. The "coordinator" is a TCP listener the test runs on
the lab bridge's host address, where a lab agent's coordinator would be.

What is proven here, for ufw and for nftables:
- the seed-like policy lets an allowed Pi connect and not another one (connect times out);
- a dry run plans and changes nothing; a re-apply is UNCHANGED and runs nothing;
- when the coordinator cannot be reached after the change, the agent restores the
  previous rules itself: the new rules were live during the confirm window (seen from
  outside), and afterwards the live ruleset and ufw's files are what they were;
- bad input is REJECTED naming the field, with the live ruleset untouched;
- ufw itself writes the same rule lines our renderer produces (golden check).
"""

from __future__ import annotations

import base64
import contextlib
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from picoord.agent.actions.firewall import guard, nftables, ufw, watchdog
from picoord.common.checks.firewall import Rule, policy_spec
from picoord.lab.netns import LabNetwork
from picoord.lab.sandbox import PiSandbox
from picoord.v1 import actions_pb2 as pb
from tests.actions.runner import argvs, run_executor

KIND = "picoord.agent.actions.firewall:firewall"
ALLOW, DENY, TCP, UDP = pb.FIREWALL_VERDICT_ALLOW, pb.FIREWALL_VERDICT_DENY, pb.PROTOCOL_TCP, pb.PROTOCOL_UDP
BACKENDS = {"ufw": pb.FIREWALL_BACKEND_UFW, "nftables": pb.FIREWALL_BACKEND_NFTABLES}
SERVICE_PORT = 18080  # the "service" on pi1 the policy guards
ACTION_TIMEOUT = 60.0

_SERVER = r"""
import socket, sys
server = socket.socket()
server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
server.bind(("0.0.0.0", int(sys.argv[1])))
server.listen(16)
print("LISTEN" + "ING", flush=True)  # split: the log header quotes this script
while True:
    connection, _ = server.accept()
    connection.sendall(b"hello\n")
    connection.close()
"""

_CLIENT = r"""
import socket, sys
try:
    with socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=float(sys.argv[3])) as s:
        print("connected" if s.recv(16) == b"hello\n" else "no greeting")
except socket.timeout:
    print("timeout")
except ConnectionRefusedError:
    print("refused")
except OSError as error:
    print(f"error {error}")
"""


def private_default_ufw(sb: PiSandbox) -> None:
    """/etc/default/ufw (DEFAULT_INPUT_POLICY) must be the Pi's own, or a policy applied in
    the lab would rewrite the host's file. PiSandbox keeps /etc/ufw private but not this
    file (yet): bind-mount a per-Pi copy inside the Pi's mount namespace, which is a slave
    of the host's, so nothing leaks out and destroy() drops it."""
    if "/etc/default/ufw" in sb.mounts():
        return
    mine = sb.root / "default-ufw"
    shutil.copyfile("/etc/default/ufw", mine)
    sb.run(["mount", "--bind", str(mine), "/etc/default/ufw"], check=True)


@dataclass
class Pis:
    net: LabNetwork
    boxes: dict[str, PiSandbox]
    logs: Path
    processes: list[subprocess.Popen[bytes]] = field(default_factory=list)

    def __getitem__(self, node: str) -> PiSandbox:
        return self.boxes[node]

    def address(self, node: str) -> str:
        return self.net.pi(node).address

    @property
    def state_dir(self) -> Path:
        """pi1's agent state dir (where a pending firewall revert lives)."""
        return self.logs.parent / "pi1-agent-state"


@pytest.fixture
def pis(network_factory: Callable[..., LabNetwork], tmp_path: Path) -> Iterator[Pis]:
    """Three Pis with sandboxes; everything they ran and mounted goes with destroy()."""
    net = network_factory(3)
    boxes: dict[str, PiSandbox] = {}
    made: Pis | None = None
    try:
        for pi in net.pis:
            boxes[pi.node] = PiSandbox(pi.node, pi.netns, tmp_path / pi.node).create()
            private_default_ufw(boxes[pi.node])
        made = Pis(net, boxes, tmp_path / "logs")
        yield made
    finally:
        problems = []
        for process in made.processes if made else ():
            process.terminate()
            try:
                process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(timeout=10)
        for sb in boxes.values():
            try:
                sb.destroy()
            except Exception as error:
                problems.append(str(error))
        assert not problems, problems


class Listener:
    """A TCP listener on the host's lab bridge address: the coordinator, as the Pis see it.
    With `once`, it accepts one connection and then closes: reachable for the guard's
    check before the change, unreachable for the one after it."""

    def __init__(self, address: str, once: bool = False) -> None:
        self.server = socket.socket()
        self.server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.server.bind((address, 0))
        self.server.listen(16)
        self.address, self.port = address, self.server.getsockname()[1]
        self.once, self.accepted = once, 0
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        while True:
            try:
                connection, _ = self.server.accept()
            except OSError:
                return
            self.accepted += 1
            connection.close()
            if self.once:
                self.server.close()
                return

    def close(self) -> None:
        with contextlib.suppress(OSError):  # wakes the accept() below; close() alone would not
            self.server.shutdown(socket.SHUT_RDWR)
        self.server.close()
        self.thread.join(timeout=5)


@pytest.fixture
def coordinator(pis: Pis) -> Iterator[Listener]:
    listener = Listener(pis.net.gateway)
    yield listener
    listener.close()


def start_service(pis: Pis, node: str) -> subprocess.Popen[bytes]:
    process = pis[node].popen(
        [sys.executable, "-c", _SERVER, str(SERVICE_PORT)], pis.logs / f"{node}-service.log"
    )
    pis.processes.append(process)
    deadline = time.monotonic() + 10
    while "LISTENING" not in (pis.logs / f"{node}-service.log").read_text().splitlines():
        assert process.poll() is None and time.monotonic() < deadline, "the test service did not start"
        time.sleep(0.05)
    return process


def connect(pis: Pis, source: str, target: str, timeout: float = 2.0) -> str:
    done = pis[source].run(
        [sys.executable, "-c", _CLIENT, pis.address(target), str(SERVICE_PORT), str(timeout)],
        timeout=timeout + 20,
    )
    return done.stdout.strip() or done.stderr.strip()[-300:]


_COUNTERS = re.compile(r"counter packets \d+ bytes \d+|\[\d+:\d+\]")


def live_state(sb: PiSandbox) -> dict[str, str]:
    """Everything the firewall is made of in a Pi: the kernel's whole nftables ruleset (ufw's
    iptables-nft chains included; packet counters blanked) and ufw's four files."""
    done = sb.run(["nft", "list", "ruleset"], check=True)
    state = {"ruleset": _COUNTERS.sub("counter", done.stdout)}
    for path in ufw.FILES:
        state[path] = sb.run(["cat", path], check=True).stdout
    return state


def verdicts(ruleset: str) -> list[str]:
    """Every verdict in a ruleset that could let a packet through or stop it, chain
    policies included, except the kernel's default `policy accept`."""
    return re.findall(r"(?<![\w-])(?:accept|drop|reject)(?![\w-])", ruleset.replace("policy accept;", ""))


def policy(backend: str, *rules: pb.FirewallRule, **fields: Any) -> pb.FirewallPolicy:
    return pb.FirewallPolicy(backend=BACKENDS[backend], default_incoming=DENY, rules=list(rules), **fields)


def allow_service(source: str) -> pb.FirewallRule:
    return pb.FirewallRule(verdict=ALLOW, from_cidr=source, port_from=SERVICE_PORT, protocol=TCP)


def seed_rules(allowed: str) -> list[pb.FirewallRule]:
    """The seed's ufw commands, plus the one rule the test can observe: `allowed` (pi2's
    address) may reach the service port."""
    return [
        pb.FirewallRule(verdict=ALLOW, from_cidr="192.168.10.0/24", comment="Services VLAN"),
        pb.FirewallRule(verdict=ALLOW, from_cidr="192.168.20.0/24", comment="Compute VLAN"),
        pb.FirewallRule(verdict=ALLOW, port_from=6443, protocol=TCP, comment="API server"),
        pb.FirewallRule(verdict=ALLOW, port_from=2379, port_to=2380, protocol=TCP, comment="etcd"),
        pb.FirewallRule(verdict=ALLOW, port_from=10250, protocol=TCP),
        pb.FirewallRule(verdict=ALLOW, port_from=10251, protocol=TCP),
        pb.FirewallRule(verdict=ALLOW, port_from=10252, protocol=TCP),
        allow_service(f"{allowed}/32"),
    ]


def apply(
    pis: Pis, request: pb.FirewallPolicy, coordinator: tuple[str, int], dry_run: bool = False
) -> dict[str, Any]:
    return run_executor(
        pis["pi1"],
        KIND,
        request,
        dry_run=dry_run,
        timeout=ACTION_TIMEOUT,
        coordinator=coordinator,
        state_dir=str(pis.state_dir),
    )


@pytest.mark.parametrize("backend", ["ufw", "nftables"])
def test_seed_policy_lets_the_allowed_pi_in_and_not_the_other(
    pis: Pis, coordinator: Listener, backend: str
) -> None:
    start_service(pis, "pi1")
    assert (connect(pis, "pi2", "pi1"), connect(pis, "pi3", "pi1")) == ("connected", "connected")
    where = (coordinator.address, coordinator.port)
    # An earlier policy lets pi3 in (and so, by default deny, not pi2)...
    old = policy(backend, allow_service(pis.address("pi3")))
    assert apply(pis, old, where)["outcome"] == "SUCCEEDED"
    assert (connect(pis, "pi2", "pi1"), connect(pis, "pi3", "pi1")) == ("timeout", "connected")
    # ...and the seed's policy replaces it whole: its pi3 rule must go.
    request = policy(backend, *seed_rules(pis.address("pi2")), confirm_within_seconds=5)
    before = live_state(pis["pi1"])

    planned = apply(pis, request, where, dry_run=True)
    assert planned["outcome"] == "PLANNED", planned
    assert planned["commands"] and not any(command["ran"] for command in planned["commands"])
    assert live_state(pis["pi1"]) == before, "a dry run changed the Pi's firewall"

    started = time.monotonic()
    applied = apply(pis, request, where)
    took = time.monotonic() - started
    assert applied["outcome"] == "SUCCEEDED", applied
    assert argvs(applied) == argvs(planned), "the dry run did not show what the real run ran"
    assert all(command["ran"] and command["exit_code"] == 0 for command in applied["commands"])
    assert "coordinator is reachable" in applied["message"]

    assert connect(pis, "pi2", "pi1") == "connected"
    assert connect(pis, "pi3", "pi1") == "timeout"  # default deny drops the SYN

    again = apply(pis, request, where)
    assert (again["outcome"], again["commands"]) == ("UNCHANGED", []), again
    assert "already in place" in again["message"]

    if backend == "nftables":
        spec = policy_spec(request)
        endpoint = guard.Endpoint(coordinator.address, coordinator.port, (coordinator.address,))
        listed = pis["pi1"].run(["nft", "list", "table", "inet", "picoord"], check=True).stdout
        assert listed == nftables.render_table(
            spec.default_incoming, guard.keep_open_rules([endpoint]), spec.rules
        )
    else:
        status = pis["pi1"].run(["ufw", "status", "verbose"], check=True).stdout
        assert "Status: active" in status and "Default: deny (incoming)" in status
        assert "2379:2380/tcp" in status and "192.168.20.0/24" in status and "# Compute VLAN" in status
    # Default allow with one deny (for ufw: a default change, loaded by `ufw reload`).
    opened = pb.FirewallPolicy(
        backend=BACKENDS[backend],
        default_incoming=ALLOW,
        rules=[
            pb.FirewallRule(verdict=DENY, from_cidr=pis.address("pi3"), port_from=SERVICE_PORT, protocol=TCP)
        ],
    )
    switched = apply(pis, opened, where)
    assert switched["outcome"] == "SUCCEEDED", switched
    if backend == "ufw":
        assert ["ufw", "reload"] in argvs(switched)
    assert (connect(pis, "pi2", "pi1"), connect(pis, "pi3", "pi1")) == ("connected", "timeout")
    print(f"{backend}: apply took {took:.2f} s, re-apply {again['seconds']:.2f} s")


def watch(sb: PiSandbox, needle: str, stop: threading.Event, seen: list[str]) -> None:
    """Poll the Pi's live ruleset until `needle` shows up (or `stop`)."""
    while not stop.is_set():
        ruleset = sb.run(["nft", "list", "ruleset"]).stdout
        if needle in ruleset:
            seen.append(ruleset)
            return
        time.sleep(0.05)


def apply_watching(
    pis: Pis, request: pb.FirewallPolicy, where: tuple[str, int], needle: str
) -> tuple[dict, list]:
    stop, seen, result = threading.Event(), [], {}
    watcher = threading.Thread(target=watch, args=(pis["pi1"], needle, stop, seen), daemon=True)
    watcher.start()
    try:
        result.update(apply(pis, request, where))
    finally:
        stop.set()
        watcher.join(timeout=30)
    return result, seen


@pytest.mark.parametrize(
    ("backend", "start"), [("ufw", "policy"), ("ufw", "fresh"), ("nftables", "policy"), ("nftables", "fresh")]
)
def test_a_change_that_cuts_the_coordinator_is_reverted_by_the_agent(
    pis: Pis, coordinator: Listener, backend: str, start: str
) -> None:
    start_service(pis, "pi1")
    where = (coordinator.address, coordinator.port)
    if start == "policy":  # a policy in force that lets pi3 in
        old = policy(
            backend,
            pb.FirewallRule(
                verdict=ALLOW, from_cidr=pis.address("pi3"), port_from=SERVICE_PORT, protocol=TCP
            ),
        )
        assert apply(pis, old, where)["outcome"] == "SUCCEEDED"
    before = live_state(pis["pi1"])
    before_pi3 = connect(pis, "pi3", "pi1")
    assert before_pi3 == "connected"

    # The new policy would let only pi2 in. The coordinator it must confirm with answers
    # the check before the change and then goes away: the agent cannot reach it after.
    cut = Listener(pis.net.gateway, once=True)
    try:
        request = policy(
            backend,
            pb.FirewallRule(
                verdict=ALLOW, from_cidr=pis.address("pi2"), port_from=SERVICE_PORT, protocol=TCP
            ),
            confirm_within_seconds=2,
        )
        result, seen = apply_watching(pis, request, (cut.address, cut.port), pis.address("pi2"))
    finally:
        cut.close()
    assert result["outcome"] == "REVERTED", result
    assert "restored the previous rules by itself" in result["message"]
    assert cut.accepted == 1, "the guard's check before the change did not reach the coordinator"
    assert seen, "the new rules were never live in the Pi: nothing was really applied"
    after = live_state(pis["pi1"])
    if backend == "ufw" and start == "fresh":
        # `ufw disable` leaves ufw's primary chains behind, empty but for jumps into each
        # other (ufw-init says so: they linger until reboot); nothing in them filters.
        assert {k: v for k, v in after.items() if k != "ruleset"} == {
            k: v for k, v in before.items() if k != "ruleset"
        }
        assert before["ruleset"] == "" and verdicts(after["ruleset"]) == [], after["ruleset"]
        assert "Status: inactive" in pis["pi1"].run(["ufw", "status"], check=True).stdout
    else:
        assert after == before, "the previous rules did not come back exactly"
    assert connect(pis, "pi3", "pi1") == before_pi3
    assert all(command["ran"] and command["exit_code"] == 0 for command in result["commands"]), result
    ran = argvs(result)
    if backend == "nftables":  # one atomic load of the new table, one of the old (or of none)
        assert [argv[:2] for argv in ran] == [["nft", "-f"], ["nft", "-f"]] and ran[0] != ran[1]
    elif start == "fresh":  # enabled for the change, disabled again with every file put back
        assert ["ufw", "--force", "enable"] in ran and ran.index(["ufw", "--force", "disable"]) > ran.index(
            ["ufw", "--force", "enable"]
        )
    else:  # active before: rules swapped in and back out with iptables-restore
        assert ran.count(["iptables-restore", "-n", ufw.USER_RULES]) == 2, ran


def test_a_coordinator_unreachable_before_the_change_means_no_change(pis: Pis) -> None:
    nobody = Listener(pis.net.gateway)
    port = nobody.port
    nobody.close()  # a port where nothing listens: refused
    before = live_state(pis["pi1"])
    result = apply(pis, policy("nftables", *seed_rules(pis.address("pi2"))), (pis.net.gateway, port))
    assert result["outcome"] == "FAILED" and "nothing was changed" in result["message"], result
    assert result["commands"] == [] and live_state(pis["pi1"]) == before


BAD = [
    (pb.FirewallRule(verdict=ALLOW, from_cidr="10.0.0.0/33"), "rules[1].from_cidr"),
    (pb.FirewallRule(verdict=ALLOW, from_cidr="10.0.0.1/24"), "rules[1].from_cidr"),
    (pb.FirewallRule(verdict=ALLOW, port_from=0, port_to=80, protocol=TCP), "rules[1].port_from"),
    (pb.FirewallRule(verdict=ALLOW, port_from=70000, protocol=TCP), "rules[1].port_from"),
    (pb.FirewallRule(verdict=ALLOW, port_from=2380, port_to=2379, protocol=TCP), "rules[1].port_to"),
    (pb.FirewallRule(verdict=ALLOW, port_from=22, protocol=9), "rules[1].protocol"),
    (
        pb.FirewallRule(verdict=ALLOW, port_from=22, protocol=TCP, comment="ssh; ufw disable"),
        "rules[1].comment",
    ),
    (
        pb.FirewallRule(verdict=ALLOW, port_from=22, protocol=TCP, comment='x" accept; flush ruleset; #'),
        "rules[1].comment",
    ),
]


@pytest.mark.parametrize("backend", ["ufw", "nftables"])
def test_bad_input_is_rejected_naming_the_field_and_changes_nothing(
    pis: Pis, coordinator: Listener, backend: str
) -> None:
    where = (coordinator.address, coordinator.port)
    good = pb.FirewallRule(verdict=ALLOW, from_cidr=pis.address("pi3"), port_from=SERVICE_PORT, protocol=TCP)
    assert apply(pis, policy(backend, good), where)["outcome"] == "SUCCEEDED"
    before = live_state(pis["pi1"])
    for bad, name in BAD:
        result = apply(pis, policy(backend, good, bad), where)
        assert result["outcome"] == "REJECTED", result
        assert result["message"].startswith(f"{name}: "), result["message"]
        assert result["commands"] == []
    assert live_state(pis["pi1"]) == before


# The rule shapes the executor writes, as ufw commands an operator would type.
GOLDEN = [
    (
        Rule("allow", "10.213.0.1/32", 0, 0, "tcp", "picoord coordinator", source_port=7443),
        ["allow", "proto", "tcp", "from", "10.213.0.1", "port", "7443", "comment", "picoord coordinator"],
    ),
    (
        guard.keep_open_rules([guard.Endpoint("10.213.0.1", 7443, ("10.213.0.1",))])[1],
        [
            "allow",
            "out",
            "proto",
            "tcp",
            "to",
            "10.213.0.1",
            "port",
            "7443",
            "comment",
            "picoord coordinator",
        ],
    ),
    (
        Rule("allow", "192.168.10.0/24", comment="Services VLAN"),
        ["allow", "from", "192.168.10.0/24", "comment", "Services VLAN"],
    ),
    (Rule("allow", "", 6443, 6443, "tcp"), ["allow", "6443/tcp"]),
    (Rule("allow", "", 2379, 2380, "tcp"), ["allow", "2379:2380/tcp"]),
    (Rule("allow", "", 5000, 5010, "udp"), ["allow", "5000:5010/udp"]),
    (
        Rule("deny", "10.0.0.0/8", 53, 53, "udp"),
        ["deny", "proto", "udp", "from", "10.0.0.0/8", "to", "any", "port", "53"],
    ),
    (Rule("allow", "", 80, 80, "any"), ["allow", "80"]),
    (Rule("allow", "", 0, 0, "tcp"), ["allow", "proto", "tcp", "from", "any"]),
    (Rule("allow", "10.0.0.5/32", 0, 0, "udp"), ["allow", "proto", "udp", "from", "10.0.0.5"]),
    (
        Rule("deny", "2001:db8::/32", 22, 22, "tcp"),
        ["deny", "from", "2001:db8::/32", "to", "any", "port", "22", "proto", "tcp"],
    ),
    (Rule("allow", "fd00::1/128"), ["allow", "from", "fd00::1"]),
    (
        Rule("deny", "10.9.0.0/16", 8000, 8100, "tcp"),
        ["deny", "proto", "tcp", "from", "10.9.0.0/16", "to", "any", "port", "8000:8100"],
    ),
    # what a live SSH session's source gets, and VRRP for virtual addresses
    (
        Rule("allow", "10.213.0.7/32", 22, 22, "tcp", "picoord ssh session"),
        [
            "allow",
            "proto",
            "tcp",
            "from",
            "10.213.0.7",
            "to",
            "any",
            "port",
            "22",
            "comment",
            "picoord ssh session",
        ],
    ),
    (
        Rule("allow", "10.213.0.0/24", protocol="vrrp", comment="vrrp"),
        ["allow", "proto", "vrrp", "from", "10.213.0.0/24", "comment", "vrrp"],
    ),
    (Rule("allow", "fd00::/8", protocol="vrrp"), ["allow", "proto", "vrrp", "from", "fd00::/8"]),
]


def _section(text: str) -> str:
    start = text.index(ufw.RULES_MARK) + len(ufw.RULES_MARK)
    return text[start : text.index(ufw.END_MARK) + len(ufw.END_MARK)]


def test_ufw_itself_writes_the_rules_exactly_as_the_executor_renders_them(pis: Pis) -> None:
    sb = pis["pi1"]
    assert (
        "Status: inactive" in sb.run(["ufw", "status"], check=True).stdout
    )  # rule commands only write files
    for _, words in GOLDEN:
        sb.run(["ufw", *words], check=True)
    rules = [rule for rule, _ in GOLDEN]
    for path, family in ((ufw.USER_RULES, 4), (ufw.USER6_RULES, 6)):
        written = sb.run(["cat", path], check=True).stdout
        assert _section(written) == ufw.render_rules_section(rules, family), path
        assert ufw.parse_tuples(written) == ufw.wanted_tuples(rules, family)


def test_nft_lists_the_vrrp_and_ssh_session_rules_as_rendered(pis: Pis) -> None:
    """A re-apply of such a policy is UNCHANGED only if nft lists them back as planned."""
    keep = guard.keep_open_rules([guard.Endpoint("10.213.0.1", 7443, ("10.213.0.1",))])
    session = Rule("allow", "10.213.0.7/32", 22, 22, "tcp", "picoord ssh session")
    rules = (
        Rule("allow", "10.213.0.0/24", protocol="vrrp", comment="vrrp"),
        Rule("allow", "fd00::/8", protocol="vrrp"),
    )
    table = nftables.render_table("deny", (*keep, session), rules)
    sb = pis["pi1"]
    sb.run(["nft", "-f", "-"], input=nftables.load_file(table), check=True)
    assert sb.run(["nft", "list", "table", "inet", "picoord"], check=True).stdout == table
    listed = sb.run(["nft", "-j", "list", "table", "inet", "picoord"], check=True).stdout
    assert nftables.parse_listing(listed) == nftables.desired_table("deny", (*keep, session), rules)


# ---------------------------------------------------------------- the revert outlives the agent

# The agent's side of one firewall action, as a process the test can SIGKILL.
_AGENT = r"""
import base64, sys, time
from pathlib import Path
from picoord.agent.actions.base import ActionContext
from picoord.agent.actions.firewall import firewall
from picoord.v1 import actions_pb2
request = actions_pb2.FirewallPolicy.FromString(base64.b64decode(sys.argv[1]))
context = ActionContext(dry_run=False, deadline=time.monotonic() + 60, coordinator_host=sys.argv[2],
                        coordinator_port=int(sys.argv[3]), state_dir=Path(sys.argv[4]))
print("OUTCOME", firewall(request, context), flush=True)
"""


def watchdog_pids(state_dir: Path) -> list[int]:
    """Every watchdog process (anywhere on this machine) working on this state dir."""
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            words = (entry / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if watchdog.MODULE.encode() in words and any(str(state_dir).encode() in w for w in words):
            pids.append(int(entry.name))
    return pids


def wait_for(condition: Callable[[], bool], seconds: float, pause: float = 0.1) -> float:
    """Poll until `condition` holds; how long it took. AssertionError after `seconds`."""
    started = time.monotonic()
    while not condition():
        assert time.monotonic() - started < seconds, f"still not true after {seconds} s"
        time.sleep(pause)
    return time.monotonic() - started


def old_policy(pis: Pis, backend: str) -> pb.FirewallPolicy:
    return policy(backend, allow_service(pis.address("pi3")))


def cutting_policy(pis: Pis, backend: str, window: float) -> pb.FirewallPolicy:
    """Lets only pi2 in; applied against a coordinator that goes away after the check
    before the change, so nothing can ever confirm it."""
    return policy(backend, allow_service(pis.address("pi2")), confirm_within_seconds=window)


def start_agent_and_kill_it_in_the_window(
    pis: Pis, request: pb.FirewallPolicy, where: tuple[str, int]
) -> watchdog.PendingRevert:
    """Run the action in pi1 as the agent would, SIGKILL it as soon as the new rules are
    live (so inside the confirm window), and return the pending revert it left."""
    payload = base64.b64encode(request.SerializeToString()).decode()
    argv = [sys.executable, "-c", _AGENT, payload, where[0], str(where[1]), str(pis.state_dir)]
    agent = pis["pi1"].popen(argv, pis.logs / "agent.log")
    pis.processes.append(agent)
    needle = pis.address("pi2")
    wait_for(lambda: needle in pis["pi1"].run(["nft", "list", "ruleset"]).stdout, 30, 0.05)
    pending = watchdog.read_pending(watchdog.pending_path(pis.state_dir))
    assert agent.poll() is None, (pis.logs / "agent.log").read_text()
    agent.kill()
    agent.wait(timeout=10)
    assert pending is not None, "no pending revert on disk while the change was unconfirmed"
    return pending


@pytest.mark.parametrize("backend", ["ufw", "nftables"])
def test_an_agent_killed_in_the_window_has_its_change_reverted_by_the_watchdog(
    pis: Pis, coordinator: Listener, backend: str
) -> None:
    start_service(pis, "pi1")
    assert apply(pis, old_policy(pis, backend), (coordinator.address, coordinator.port))["outcome"] == (
        "SUCCEEDED"
    )
    before = live_state(pis["pi1"])
    cut = Listener(pis.net.gateway, once=True)
    try:
        pending = start_agent_and_kill_it_in_the_window(
            pis, cutting_policy(pis, backend, 3), (cut.address, cut.port)
        )
    finally:
        cut.close()
    assert pending.backend == backend
    assert live_state(pis["pi1"]) != before, "the new rules were not live when the agent died"
    assert len(watchdog_pids(pis.state_dir)) == 1, "the watchdog did not outlive the agent"
    # The watchdog restores at the deadline (the agent's own window + its margins), not later.
    wait_for(lambda: live_state(pis["pi1"]) == before, 3 + guard.APPLY_MARGIN + watchdog.GRACE + 10, 0.25)
    restored_at = time.time()
    assert restored_at >= pending.deadline - 0.5, "restored before its deadline"
    assert restored_at <= pending.deadline + 5, f"restored {restored_at - pending.deadline:.1f} s late"
    record = watchdog.last_record(pis.state_dir, pending.id)
    assert record is not None and record["ok"], record
    assert record["commands"] and all(c["exit_code"] == 0 for c in record["commands"]), record
    assert not watchdog.pending_path(pis.state_dir).exists()
    wait_for(lambda: not watchdog_pids(pis.state_dir), 5)
    assert connect(pis, "pi3", "pi1") == "connected"  # the old policy's pi3 rule is back
    print(f"{backend}: restored {restored_at - pending.deadline:+.2f} s from the deadline")


@pytest.mark.parametrize("backend", ["ufw", "nftables"])
def test_a_confirmed_change_stands_with_no_watchdog_left_and_no_source_port_hole(
    pis: Pis, coordinator: Listener, backend: str
) -> None:
    start_service(pis, "pi1")
    where = (coordinator.address, coordinator.port)
    started = time.time()
    result = apply(pis, policy(backend, allow_service(pis.address("pi2")), confirm_within_seconds=2), where)
    assert result["outcome"] == "SUCCEEDED", result
    assert not watchdog.pending_path(pis.state_dir).exists()
    assert watchdog_pids(pis.state_dir) == [], "a watchdog outlived the confirmed change"
    after = live_state(pis["pi1"])
    # Past the moment the watchdog would have fired: nothing changed back.
    time.sleep(max(0.0, started + 2 + guard.APPLY_MARGIN + watchdog.GRACE + 1 - time.time()))
    assert live_state(pis["pi1"]) == after
    assert connect(pis, "pi2", "pi1") == "connected"
    # A NEW connection from the coordinator's address and port is no reply on the agent's
    # session: the policy (default deny) drops it, keep-open rule or not.
    coordinator.close()
    with socket.socket() as spoof:
        spoof.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        spoof.bind((coordinator.address, coordinator.port))
        spoof.settimeout(2)
        with pytest.raises(TimeoutError):
            spoof.connect((pis.address("pi1"), SERVICE_PORT))
    # ...while the same from another source port is dropped too, and pi2 still gets in.
    assert connect(pis, "pi2", "pi1") == "connected"


@pytest.mark.parametrize("when", ["inside the window", "after the deadline"])
def test_an_agent_restarted_with_a_pending_revert_on_disk_rearms_or_restores_it(
    pis: Pis, coordinator: Listener, when: str
) -> None:
    """The agent and its watchdog both died (a reboot, an OOM kill of the whole unit):
    the agent's start finds the pending file and never leaves the change unconfirmed."""
    backend = "nftables"
    assert apply(pis, old_policy(pis, backend), (coordinator.address, coordinator.port))["outcome"] == (
        "SUCCEEDED"
    )
    before = live_state(pis["pi1"])
    cut = Listener(pis.net.gateway, once=True)
    try:
        pending = start_agent_and_kill_it_in_the_window(
            pis, cutting_policy(pis, backend, 3), (cut.address, cut.port)
        )
    finally:
        cut.close()
    for pid in watchdog_pids(pis.state_dir):
        os.kill(pid, signal.SIGKILL)
    wait_for(lambda: not watchdog_pids(pis.state_dir), 5)
    if when == "after the deadline":
        time.sleep(max(0.0, pending.deadline + 0.5 - time.time()))
    assert live_state(pis["pi1"]) != before, "nothing restored the rules while no watchdog ran"
    started = (
        pis["pi1"]
        .run(
            [
                sys.executable,
                "-c",
                "import sys; from pathlib import Path; from picoord.agent.actions.firewall import watchdog; "
                "print(watchdog.rearm_on_start(Path(sys.argv[1])))",
                str(pis.state_dir),
            ],
            check=True,
        )
        .stdout
    )
    if when == "after the deadline":
        assert f"restored the firewall rules from before unconfirmed change {pending.id}" in started
        assert live_state(pis["pi1"]) == before
    else:
        assert f"re-armed the revert of unconfirmed change {pending.id}" in started, started
        assert len(watchdog_pids(pis.state_dir)) == 1
        assert live_state(pis["pi1"]) != before
        left = watchdog.seconds_left(pending, time.time())
        wait_for(lambda: live_state(pis["pi1"]) == before, left + 5, 0.25)
        assert time.time() >= pending.deadline - 0.5
    assert not watchdog.pending_path(pis.state_dir).exists()
    record = watchdog.last_record(pis.state_dir, pending.id)
    assert record is not None and record["ok"], record
    wait_for(lambda: not watchdog_pids(pis.state_dir), 5)


# ---------------------------------------------------------------- the operator's SSH session

# A stand-in sshd that greets and keeps each connection open, and a session that stays.
_SSHD = r"""
import socket, sys
server = socket.socket()
server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
server.bind(("0.0.0.0", 22))
server.listen(16)
print("LISTEN" + "ING", flush=True)
held = []
while True:
    connection, _ = server.accept()
    connection.sendall(b"hello\n")
    held.append(connection)
"""
_SESSION = r"""
import socket, sys, time
session = socket.create_connection((sys.argv[1], 22), timeout=10)
print("SESSION", session.recv(16).decode().strip(), flush=True)
time.sleep(3600)
"""


def start_logged(pis: Pis, node: str, argv: list[str], name: str, ready: str) -> None:
    log = pis.logs / f"{node}-{name}.log"
    process = pis[node].popen(argv, log)
    pis.processes.append(process)
    wait_for(lambda: ready in (log.read_text() if log.exists() else ""), 10, 0.05)
    assert process.poll() is None, log.read_text()


@pytest.mark.parametrize("backend", ["ufw", "nftables"])
def test_a_default_deny_policy_keeps_a_live_ssh_sessions_source_able_to_connect_anew(
    pis: Pis, coordinator: Listener, backend: str
) -> None:
    """Applied while pi3 has an SSH session to pi1 (established before any firewall): pi3
    may still open new connections to pi1's 22, pi2 (no session) may not; with
    no_keep_ssh (the document's keep_ssh: false) pi3 is shut out as well."""
    start_logged(pis, "pi1", [sys.executable, "-c", _SSHD], "sshd", "LISTENING")
    start_logged(pis, "pi3", [sys.executable, "-c", _SESSION, pis.address("pi1")], "session", "SESSION hello")
    where = (coordinator.address, coordinator.port)
    request = policy(backend, allow_service(pis.address("pi2")), confirm_within_seconds=3)

    def ssh_from(node: str) -> str:
        done = pis[node].run([sys.executable, "-c", _CLIENT, pis.address("pi1"), "22", "2"], timeout=30)
        return done.stdout.strip() or done.stderr.strip()[-300:]

    planned = apply(pis, request, where, dry_run=True)
    assert (
        f"keeping 22/tcp open for the source of each live SSH session: {pis.address('pi3')}"
        in (planned["message"])
    ), planned
    applied = apply(pis, request, where)
    assert applied["outcome"] == "SUCCEEDED", applied
    assert argvs(applied) == argvs(planned)
    assert {f["key"]: f["value"] for f in applied["facts"]}[
        "firewall.ssh_kept_open"
    ] == f"{pis.address('pi3')}/32"
    assert (ssh_from("pi3"), ssh_from("pi2")) == ("connected", "timeout")

    shut = policy(backend, allow_service(pis.address("pi2")), confirm_within_seconds=3, no_keep_ssh=True)
    closed = apply(pis, shut, where)
    assert closed["outcome"] == "SUCCEEDED" and "keep_ssh: false" in closed["message"], closed
    assert (ssh_from("pi3"), ssh_from("pi2")) == ("timeout", "timeout")

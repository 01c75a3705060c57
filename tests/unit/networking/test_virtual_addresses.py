"""The agent's keepalived.conf, from the assignment's virtual addresses; what an agent
accepts in them; and Debian's keepalived reading the file (`keepalived --config-test`)."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

from picoord.agent.networking.virtual_addresses import (
    HANDOVER_DELAY,
    Keepalived,
    NoInterface,
    hand_overs,
    held,
    keepalived_argv,
    local_interfaces,
    render_config,
)
from picoord.common.checks.workloads import check_assignment
from picoord.common.validation import FieldError
from picoord.v1 import workloads_pb2

INTERFACES = [("lo", ["127.0.0.1/8"]), ("eth0", ["10.213.0.11/24"]), ("docker0", ["172.17.0.1/16"])]


def _vip(**fields: object) -> workloads_pb2.VirtualAddress:
    values: dict[str, object] = {
        "address": "10.213.0.200",
        "prefix_length": 24,
        "router_id": 201,
        "priority": 100,
        "source": "10.213.0.11",
        "peers": ["10.213.0.13", "10.213.0.12"],
        "services": ["mcp-server"],
    }
    values.update(fields)
    return workloads_pb2.VirtualAddress(**values)  # type: ignore[arg-type]


def _instance(text: str, router_id: int) -> list[str]:
    start = text.index(f"vrrp_instance vip_{router_id} {{")
    block = text[start : text.index("\n}\n", start)]
    return [line.strip() for line in block.splitlines()]


def test_one_instance_per_address_on_the_cluster_interface() -> None:
    alone = _vip(address="10.213.0.201", router_id=202, priority=200, peers=[])
    text = render_config([_vip(), alone], INTERFACES)
    first = _instance(text, 201)
    assert "interface eth0" in first
    assert "virtual_router_id 201" in first and "priority 100" in first
    assert "advert_int 1" in first and "nopreempt" in first and "state BACKUP" in first
    assert "unicast_src_ip 10.213.0.11" in first
    peers = first[first.index("unicast_peer {") + 1 : first.index("unicast_peer {") + 3]
    assert peers == ["10.213.0.12", "10.213.0.13"]  # sorted: the same assignment, the same file
    assert "10.213.0.200/24 dev eth0" in first
    second = _instance(text, 202)
    assert "priority 200" in second
    assert not any(line.startswith("unicast") for line in second)  # alone: no peers to name
    assert text.count("vrrp_instance") == 2


def test_the_same_addresses_give_the_same_file() -> None:
    a = render_config([_vip(), _vip(address="10.213.0.201", router_id=5)], INTERFACES)
    b = render_config([_vip(address="10.213.0.201", router_id=5), _vip()], INTERFACES)
    assert a == b


def test_a_source_no_interface_holds_is_refused() -> None:
    with pytest.raises(NoInterface, match=r"10\.9\.9\.9"):
        render_config([_vip(source="10.9.9.9")], INTERFACES)


def test_held_lists_the_assigned_addresses_on_an_interface() -> None:
    interfaces = [*INTERFACES, ("eth1", ["10.213.0.200/24"])]
    assert held(["10.213.0.200", "10.213.0.201"], interfaces) == ["10.213.0.200"]
    assert held(["10.213.0.201"], interfaces) == []


def test_keepalived_runs_vrrp_only_in_the_foreground_with_files_in_the_state_dir() -> None:
    argv = keepalived_argv("/usr/sbin/keepalived", Path("/var/lib/picoord/keepalived"))
    assert argv[:5] == ["/usr/sbin/keepalived", "-n", "-l", "-D", "-P"]
    assert argv[argv.index("-f") + 1] == "/var/lib/picoord/keepalived/keepalived.conf"
    assert argv[argv.index("-p") + 1] == "/var/lib/picoord/keepalived/keepalived.pid"
    assert argv[argv.index("-r") + 1] == "/var/lib/picoord/keepalived/vrrp.pid"


@pytest.mark.parametrize(
    ("fields", "field"),
    [
        ({"address": "10.213.0.200/24"}, "virtual_addresses[0].address"),
        ({"address": "fd00::1"}, "virtual_addresses[0].address"),
        ({"address": "10.213.0.200\n}"}, "virtual_addresses[0].address"),
        ({"source": "eth0"}, "virtual_addresses[0].source"),
        ({"peers": ["10.213.0.12", "x; y"]}, "virtual_addresses[0].peers[1]"),
        ({"router_id": 0}, "virtual_addresses[0].router_id"),
        ({"router_id": 256}, "virtual_addresses[0].router_id"),
        ({"priority": 255}, "virtual_addresses[0].priority"),
        ({"priority": 0}, "virtual_addresses[0].priority"),
        ({"prefix_length": 33}, "virtual_addresses[0].prefix_length"),
        ({"services": ["bad name"]}, "virtual_addresses[0].services[0]"),
    ],
)
def test_an_agent_refuses_addresses_that_could_break_the_file(fields: dict, field: str) -> None:
    assignment = workloads_pb2.NodeAssignment(generation=1, virtual_addresses=[_vip(**fields)])
    with pytest.raises(FieldError) as raised:
        check_assignment(assignment)
    assert raised.value.field == f"assignment.{field}"


def test_an_agent_refuses_one_router_id_twice() -> None:
    assignment = workloads_pb2.NodeAssignment(
        generation=1, virtual_addresses=[_vip(), _vip(address="10.213.0.201")]
    )
    with pytest.raises(FieldError, match="appears twice"):
        check_assignment(assignment)


def test_a_good_assignment_passes() -> None:
    check_assignment(workloads_pb2.NodeAssignment(generation=1, virtual_addresses=[_vip()]))


def test_debians_keepalived_reads_the_file(tmp_path: Path) -> None:
    program = shutil.which("keepalived") or "/usr/sbin/keepalived"
    if not Path(program).exists():
        pytest.fail("keepalived is not installed: run scripts/bootstrap (scripts/system-packages.txt)")
    interfaces = [(name, items) for name, items in local_interfaces() if name != "lo" and items]
    assert interfaces, "this machine has no IPv4 interface but lo (keepalived refuses lo for VRRP)"
    source = interfaces[0][1][0].split("/")[0]
    conf = tmp_path / "keepalived.conf"
    conf.write_text(render_config([_vip(source=source, peers=["192.0.2.7"])], interfaces))
    done = subprocess.run(
        [program, "--config-test", "-f", str(conf), "-l"], capture_output=True, text=True, timeout=30
    )
    assert done.returncode == 0, done.stdout + done.stderr
    broken = tmp_path / "broken.conf"
    broken.write_text(conf.read_text().replace("advert_int 1", "advert_int one"))
    done = subprocess.run(
        [program, "--config-test", "-f", str(broken), "-l"], capture_output=True, text=True, timeout=30
    )
    assert done.returncode != 0, "keepalived's config test accepts anything: it cannot tell a good file"


STAND_IN = """#!/usr/bin/env python3
import signal, sys, time
log = open(sys.argv[sys.argv.index("-f") + 1] + ".events", "a", buffering=1)
log.write("start\\n")
signal.signal(signal.SIGHUP, lambda *_: log.write("reload\\n"))
def stop(*_):
    log.write("stop\\n")
    sys.exit(0)
signal.signal(signal.SIGTERM, stop)
while True:
    time.sleep(0.05)
"""


def _events(directory: Path) -> list[str]:
    path = directory / "keepalived.conf.events"
    return path.read_text().split() if path.exists() else []


def _wait_for(directory: Path, count: int) -> list[str]:
    import time

    deadline = time.monotonic() + 10
    while len(_events(directory)) < count and time.monotonic() < deadline:
        time.sleep(0.05)
    return _events(directory)


def test_one_keepalived_started_reloaded_on_change_and_stopped_without_addresses(tmp_path: Path) -> None:
    """The shell around render_config, with a stand-in for keepalived that records signals."""
    program = tmp_path / "keepalived"
    program.write_text(STAND_IN)
    program.chmod(0o755)
    interfaces = [(name, items) for name, items in local_interfaces() if name != "lo" and items]
    assert interfaces, "this machine has no IPv4 interface but lo"
    source = interfaces[0][1][0].split("/")[0]
    directory = tmp_path / "state" / "keepalived"
    daemon = Keepalived(directory, str(program))
    try:
        daemon.converge([_vip(source=source)])
        assert _wait_for(directory, 1) == ["start"]
        assert (directory / "keepalived.conf").stat().st_mode & 0o777 == 0o600
        daemon.converge([_vip(source=source)])  # unchanged: nothing to do
        daemon.converge([_vip(source=source, priority=200)])
        assert _wait_for(directory, 2) == ["start", "reload"]
        assert "priority 200" in (directory / "keepalived.conf").read_text()
        daemon.converge([])
        assert _wait_for(directory, 3) == ["start", "reload", "stop"]
        assert not daemon.running
        daemon.converge([_vip(source=source)])
        assert _wait_for(directory, 4) == ["start", "reload", "stop", "start"]
        daemon.close()
        assert _wait_for(directory, 5)[-1] == "stop"
        daemon.converge([_vip(source=source)])  # closed: the agent is exiting
        assert not daemon.running and len(_events(directory)) == 5
    finally:
        daemon.close()


def test_a_missing_keepalived_is_said_once_and_replicas_go_on(tmp_path: Path) -> None:
    from structlog.testing import capture_logs

    interfaces = [(name, items) for name, items in local_interfaces() if name != "lo" and items]
    source = interfaces[0][1][0].split("/")[0]
    daemon = Keepalived(tmp_path / "keepalived", str(tmp_path / "no-such-keepalived"))
    with capture_logs() as logs:
        for _ in range(3):
            daemon.converge([_vip(source=source)])  # raises nothing: the supervisor goes on
    assert not daemon.running
    said = [entry["event"] for entry in logs if entry["log_level"] == "error"]
    assert said == ["cannot start keepalived (apt install keepalived)"]


def test_the_supervisor_reports_the_assigned_addresses_this_node_holds(tmp_path: Path) -> None:
    from picoord.agent.runtime.supervisor import Supervisor

    interfaces = [(name, items) for name, items in local_interfaces() if name != "lo" and items]
    mine = interfaces[0][1][0].split("/")[0]  # an address this machine has: "held"
    supervisor = Supervisor(tmp_path, "/nonexistent/docker.sock", lambda _: None)
    held_here = _vip(address=mine, source=mine, router_id=7)
    elsewhere = _vip(address="192.0.2.200", source=mine, router_id=8)
    supervisor.assign(workloads_pb2.NodeAssignment(generation=2, virtual_addresses=[held_here, elsewhere]))
    assert list(supervisor.reports([], []).virtual_addresses_held) == [mine]
    supervisor.assign(workloads_pb2.NodeAssignment(generation=3))
    assert list(supervisor.reports([], []).virtual_addresses_held) == []


@pytest.mark.parametrize(
    ("assigned", "held_now", "expected"),
    [
        # held here, no longer assigned (its replica here leaving, or unhealthy): after the delay
        ([], ["10.213.0.200"], [("10.213.0.200", HANDOVER_DELAY)]),
        # not held here (a backup): nothing to hand over
        ([], [], []),
        # still assigned (another priority): nothing to hand over
        ([_vip(priority=200)], ["10.213.0.200"], []),
    ],
)
def test_hand_overs(assigned: list, held_now: list, expected: list) -> None:
    found = hand_overs([_vip()], assigned, held_now, 100.0)
    assert [(item.address, until - 100.0) for item, until in found] == expected


class _Engine:
    """dockerd as the supervisor sees it: one running container per assigned replica."""

    def __init__(self) -> None:
        from picoord.agent.runtime.model import ReplicaState

        self.running = {"web.1": ReplicaState("web", 1, "web.1", "c1", "running", 0, 0, "", "mcp:1")}
        self.stopped: list[str] = []
        self.started: list[str] = []

    def replicas(self) -> list:
        return list(self.running.values())

    def stop(self, container_id: str, grace: float) -> None:
        self.stopped.append(container_id)
        self.running = {k: v for k, v in self.running.items() if v.container_id != container_id}

    def pull(self, image: str) -> None:
        pass

    def run(self, spec: object) -> None:
        self.started.append(spec.replica)  # type: ignore[attr-defined]


class _Keepalived:
    def __init__(self) -> None:
        self.given: list[list[str]] = []

    def converge(self, addresses: list) -> None:
        self.given.append([item.address for item in addresses])

    def close(self) -> None:
        pass


def test_a_holder_whose_replica_is_stopped_hands_the_address_over_then_stops_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Stop-first on the VIP holder: the address stays HANDOVER_DELAY (the peers the same
    assignment added start their keepalived), is let go (keepalived hands it over in under a
    second), and the old replica stops RELEASE_DRAIN later, then the new one starts."""
    import picoord.agent.runtime.supervisor as supervisor_module
    from picoord.agent.networking.virtual_addresses import HANDOVER_DELAY, RELEASE_DRAIN

    clock = [1000.0]
    monkeypatch.setattr(supervisor_module.time, "monotonic", lambda: clock[0])
    interfaces = [(name, items) for name, items in local_interfaces() if name != "lo" and items]
    mine = interfaces[0][1][0].split("/")[0]  # an address this machine has: "held"
    engine = _Engine()
    supervisor = supervisor_module.Supervisor(tmp_path, "/x.sock", lambda _: None, lambda _: engine)
    keepalived = supervisor.keepalived = _Keepalived()  # type: ignore[assignment]
    old = workloads_pb2.ReplicaSpec(
        service="web", revision=1, replica="web.1", image="mcp:1", restart="always"
    )
    new = workloads_pb2.ReplicaSpec(
        service="web", revision=2, replica="web.1", image="mcp:2", restart="always"
    )
    vip = _vip(address=mine, source=mine, services=["web"])
    supervisor.assign(workloads_pb2.NodeAssignment(generation=1, replicas=[old], virtual_addresses=[vip]))
    supervisor.tick()
    assert engine.stopped == [] and engine.started == [] and keepalived.given[-1] == [mine]
    supervisor.assign(workloads_pb2.NodeAssignment(generation=2, replicas=[new]))  # the rollout's step
    supervisor.tick()
    assert engine.stopped == [] and engine.started == [] and keepalived.given[-1] == [mine]  # still held
    clock[0] += HANDOVER_DELAY + 0.1
    supervisor.tick()
    assert keepalived.given[-1] == [] and engine.stopped == []  # let go; still serving
    clock[0] += RELEASE_DRAIN
    supervisor.tick()
    assert engine.stopped == ["c1"] and engine.started == ["web.1"]


def test_an_address_withdrawn_while_its_replica_still_runs_is_kept_for_the_hand_over(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Its replica turned unhealthy, or is leaving the published ports' rotation before a
    rollout stops it (the replica is still assigned): the address is let go only after
    HANDOVER_DELAY, while this node forwards to the healthy replicas elsewhere; the
    replica itself is not stopped for it."""
    import picoord.agent.runtime.supervisor as supervisor_module
    from picoord.agent.networking.virtual_addresses import HANDOVER_DELAY

    clock = [1000.0]
    monkeypatch.setattr(supervisor_module.time, "monotonic", lambda: clock[0])
    Supervisor = supervisor_module.Supervisor
    interfaces = [(name, items) for name, items in local_interfaces() if name != "lo" and items]
    mine = interfaces[0][1][0].split("/")[0]
    engine = _Engine()
    supervisor = Supervisor(tmp_path, "/x.sock", lambda _: None, lambda _: engine)
    keepalived = supervisor.keepalived = _Keepalived()  # type: ignore[assignment]
    old = workloads_pb2.ReplicaSpec(
        service="web", revision=1, replica="web.1", image="mcp:1", restart="always"
    )
    vip = _vip(address=mine, source=mine, services=["web"])
    supervisor.assign(workloads_pb2.NodeAssignment(generation=1, replicas=[old], virtual_addresses=[vip]))
    supervisor.tick()
    supervisor.assign(workloads_pb2.NodeAssignment(generation=2, replicas=[old]))  # unhealthy: out
    supervisor.tick()
    assert keepalived.given[-1] == [mine] and engine.stopped == []  # still held: the peers get ready
    clock[0] += HANDOVER_DELAY + 0.1
    supervisor.tick()
    assert keepalived.given[-1] == [] and engine.stopped == []


def test_a_replica_stops_at_once_when_this_node_did_not_hold_the_address(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import picoord.agent.runtime.supervisor as supervisor_module

    engine = _Engine()
    supervisor = supervisor_module.Supervisor(tmp_path, "/x.sock", lambda _: None, lambda _: engine)
    supervisor.keepalived = _Keepalived()  # type: ignore[assignment]
    old = workloads_pb2.ReplicaSpec(
        service="web", revision=1, replica="web.1", image="mcp:1", restart="always"
    )
    vip = _vip(address="192.0.2.200", services=["web"])  # a backup here: not on an interface
    supervisor.assign(workloads_pb2.NodeAssignment(generation=1, replicas=[old], virtual_addresses=[vip]))
    supervisor.tick()
    supervisor.assign(workloads_pb2.NodeAssignment(generation=2))
    supervisor.tick()
    assert engine.stopped == ["c1"]

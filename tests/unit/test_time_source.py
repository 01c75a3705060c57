"""The TimeSource document: read, planned, checked, and the chrony executor's decisions.

The executor's shell runs here against files under tmp_path (its paths are module
constants, repointed with monkeypatch); its lab run is tests/lab/test_time_source_lab.py."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from picoord.agent.actions import chrony
from picoord.agent.actions.base import ActionContext, ActionFailed
from picoord.agent.commands import CommandResult
from picoord.common.checks import check_action
from picoord.common.validation import FieldError
from picoord.coordinator.apply.action_planner import NodeView, PlanError, plan
from picoord.coordinator.apply.cluster_spec import NodeSet, SpecError, TimeSource, parse_spec
from picoord.v1 import actions_pb2, agent_pb2

INVENTORY = [
    NodeView("desktop", {}, "x86_64", "192.168.50.10"),
    NodeView("pi1", {"role": "compute"}, "aarch64", "192.168.50.11"),
    NodeView("pi2", {"role": "compute"}, "aarch64", "192.168.50.12"),
    NodeView("pi3", {}, "aarch64", ""),  # enrolled, not connected
]
DOC = """\
kind: TimeSource
name: lab-time
server: desktop
clients: {selector: {role: compute}}
allow: [192.168.50.0/24, 10.20.0.0/16]
"""


# --- the document --------------------------------------------------------------------


def test_a_time_source_reads_with_defaults() -> None:
    (doc,) = parse_spec(DOC)
    assert doc == TimeSource(
        name="lab-time",
        server="desktop",
        clients=NodeSet(selector=(("role", "compute"),)),
        allow=("192.168.50.0/24", "10.20.0.0/16"),
        stratum=10,
        address="",
    )


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (
            ("allow: [192.168.50.0/24, 10.20.0.0/16]", "allow: []"),
            "TimeSource/lab-time.allow: names no network",
        ),
        (("192.168.50.0/24", "192.168.50.1/24"), "allow[0]: '192.168.50.1/24' is not a valid CIDR"),
        (("10.20.0.0/16", "192.168.50.0/24"), "TimeSource/lab-time.allow: names one twice"),
        (("allow: [192.168.50.0/24, 10.20.0.0/16]", "allow: [5]"), "allow[0]: must be a CIDR string"),
        (("server: desktop", "server: desktop\nstratum: 16"), "stratum: 16 is not a stratum (1-15)"),
        (("server: desktop", "server: desktop\nstratum: 0"), "stratum: 0 is not a stratum (1-15)"),
        (
            ("server: desktop", "server: desktop\nstratum: true"),
            "stratum: True is not a stratum (a whole number)",
        ),
        (
            ("server: desktop", "server: desktop\naddress: time.lan"),
            "address: 'time.lan' is not an IP address",
        ),
        (("server: desktop", "server: Desk top"), "TimeSource/lab-time.server"),
        (("server: desktop\n", ""), "TimeSource/lab-time.server: is required"),
        (("server: desktop", "server: desktop\nupstream: pool.ntp.org"), "upstream: unknown field"),
    ],
)
def test_bad_time_sources_name_the_field(change: tuple[str, str], message: str) -> None:
    with pytest.raises(SpecError) as raised:
        parse_spec(DOC.replace(*change))
    assert message in str(raised.value)


# --- the plan ------------------------------------------------------------------------


def test_the_server_serves_then_each_client_points_at_its_address() -> None:
    steps = plan(parse_spec(DOC), INVENTORY)
    assert [(s.id, s.kind) for s in steps] == [
        ("TimeSource/lab-time:serve@desktop", "time_server"),
        ("TimeSource/lab-time:client@pi1", "time_client"),
        ("TimeSource/lab-time:client@pi2", "time_client"),
    ]
    assert list(steps[0].action.time_server.allow) == ["192.168.50.0/24", "10.20.0.0/16"]
    assert steps[0].action.time_server.stratum == 10
    assert [list(s.action.time_client.servers) for s in steps[1:]] == [["192.168.50.10"]] * 2
    assert all(s.after == (steps[0].id,) and not s.requires for s in steps[1:])


def test_an_explicit_address_and_the_server_left_out_of_its_own_clients() -> None:
    text = DOC.replace("clients: {selector: {role: compute}}", "clients: [desktop, pi1, pi3]")
    text += "address: 192.168.50.2\nstratum: 8\n"
    steps = plan(parse_spec(text), INVENTORY)
    assert [s.node for s in steps] == ["desktop", "pi1", "pi3"]  # pi3 offline: no address needed
    assert steps[0].action.time_server.stratum == 8
    assert list(steps[1].action.time_client.servers) == ["192.168.50.2"]


@pytest.mark.parametrize(
    ("text", "message"),
    [
        (
            DOC.replace("server: desktop", "server: pi3"),
            "TimeSource/lab-time.server: node 'pi3' is not connected",
        ),
        (DOC.replace("server: desktop", "server: laptop"), "unknown node 'laptop'"),
        (
            DOC + "---\n" + DOC.replace("lab-time", "other").replace("server: desktop", "server: pi1"),
            "TimeSource/other and TimeSource/lab-time both set the time source of node pi1",
        ),
    ],
)
def test_time_plan_errors(text: str, message: str) -> None:
    with pytest.raises(PlanError) as raised:
        plan(parse_spec(text), INVENTORY)
    assert message in str(raised.value)


# --- the checks (both ends) ----------------------------------------------------------


@pytest.mark.parametrize(
    ("action", "message"),
    [
        (actions_pb2.Action(time_server=actions_pb2.TimeServer(allow=["10.0.0.0/8"], stratum=10)), None),
        (actions_pb2.Action(time_server=actions_pb2.TimeServer(allow=[], stratum=10)), "names no network"),
        (
            actions_pb2.Action(time_server=actions_pb2.TimeServer(allow=["10.0.0.0/8"])),
            "time_server.stratum: 0 is not a stratum (1-15)",
        ),
        (
            actions_pb2.Action(
                time_server=actions_pb2.TimeServer(allow=["10.0.0.0/8\nallow all"], stratum=3)
            ),
            "time_server.allow[0]",
        ),
        (
            actions_pb2.Action(time_server=actions_pb2.TimeServer(allow=["10.0.0.0/8"] * 33, stratum=3)),
            "has more than 32 entries",
        ),
        (actions_pb2.Action(time_client=actions_pb2.TimeClient(servers=["10.0.0.1", "fd00::1"])), None),
        (actions_pb2.Action(time_client=actions_pb2.TimeClient()), "names no server"),
        (
            actions_pb2.Action(time_client=actions_pb2.TimeClient(servers=["pool.ntp.org"])),
            "is not an IP address",
        ),
        (
            actions_pb2.Action(time_client=actions_pb2.TimeClient(servers=["10.0.0.1"] * 2)),
            "time_client.servers: names one twice",
        ),
    ],
)
def test_time_action_checks(action: actions_pb2.Action, message: str | None) -> None:
    if message is None:
        check_action(action)
        return
    with pytest.raises(FieldError) as raised:
        check_action(action)
    assert message in str(raised.value)


# --- the executor's pure decisions ---------------------------------------------------


def test_the_drop_ins_say_exactly_this() -> None:
    assert chrony.server_conf(["10.0.0.0/24", "fd00::/64"], 10).splitlines()[2:] == [
        "allow 10.0.0.0/24",
        "allow fd00::/64",
        "local stratum 10",
    ]
    assert chrony.client_conf(["10.0.0.1"]).splitlines()[2:] == ["server 10.0.0.1 iburst"]
    assert chrony.client_conf(["10.0.0.1"]).splitlines()[0] == chrony.MARKER


WANTED = chrony.client_conf(["10.0.0.1"])


@pytest.mark.parametrize(
    ("existing", "write"),
    [
        (None, True),
        (WANTED, False),
        (chrony.client_conf(["10.0.0.2"]), True),
        (chrony.server_conf(["10.0.0.0/24"], 10), True),  # the node changes role
    ],
)
def test_plan_conf(existing: str | None, write: bool) -> None:
    assert chrony.plan_conf(existing, WANTED) is write


def test_a_drop_in_picoord_did_not_write_is_left_alone() -> None:
    with pytest.raises(chrony.ForeignFile, match="picoord did not write it"):
        chrony.plan_conf("server 10.9.9.9\n", WANTED)


@pytest.mark.parametrize(
    ("text", "reads"),
    [
        ("confdir /etc/chrony/conf.d\npool 2.debian.pool.ntp.org iburst\n", True),
        ("confdir /etc/chrony/conf.d/\n", True),
        ("confdir /usr/lib/chrony/conf.d /etc/chrony/conf.d\n", True),
        ("# confdir /etc/chrony/conf.d\n", False),
        ("sourcedir /etc/chrony/sources.d\n", False),
        ("", False),
    ],
)
def test_reads_conf_dir(text: str, reads: bool) -> None:
    assert chrony.reads_conf_dir(text) is reads


@pytest.mark.parametrize(
    ("systemd", "written", "active", "commands"),
    [
        (False, True, False, []),  # no systemd (container, lab Pi): never started, clock never set
        (True, True, True, [["systemctl", "restart", "chrony"]]),
        (True, False, True, []),
        (True, False, False, [["systemctl", "enable", "--now", "chrony"]]),
        (True, True, False, [["systemctl", "enable", "--now", "chrony"]]),
    ],
)
def test_daemon_commands(systemd: bool, written: bool, active: bool, commands: list[list[str]]) -> None:
    assert chrony.daemon_commands(systemd, written, active) == commands


# --- the executor's shell, on files under tmp_path -----------------------------------


@pytest.fixture
def etc(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    (tmp_path / "conf.d").mkdir()
    (tmp_path / "chrony.conf").write_text("confdir /etc/chrony/conf.d\n")
    monkeypatch.setattr(chrony, "CHRONY_CONF", tmp_path / "chrony.conf")
    monkeypatch.setattr(chrony, "DROP_IN", tmp_path / "conf.d" / "picoord-time.conf")
    monkeypatch.setattr(chrony, "SYSTEMD_RUNNING", tmp_path / "no-systemd")
    return tmp_path


def _context(dry_run: bool, ran: list[list[str]]) -> ActionContext:
    def run(argv, timeout):  # type: ignore[no-untyped-def]
        ran.append(list(argv))
        return CommandResult(tuple(argv), 0, "active\n", "", False)

    return ActionContext(dry_run=dry_run, deadline=time.monotonic() + 30, run=run)


SERVER = actions_pb2.TimeServer(allow=["10.213.0.0/24"], stratum=10)


def test_dry_run_then_apply_then_unchanged_without_systemd(etc: Path) -> None:
    ran: list[list[str]] = []
    planned = chrony.time_server(SERVER, context := _context(True, ran))
    assert planned.outcome == agent_pb2.ACTION_OUTCOME_PLANNED
    assert [list(c.argv) for c in context.commands] == [["write", str(etc / "conf.d" / "picoord-time.conf")]]
    assert not (etc / "conf.d" / "picoord-time.conf").exists()
    done = chrony.time_server(SERVER, _context(False, ran))
    assert done.outcome == agent_pb2.ACTION_OUTCOME_SUCCEEDED
    assert "takes effect when chronyd next starts" in done.message
    assert "allow 10.213.0.0/24\nlocal stratum 10\n" in (etc / "conf.d" / "picoord-time.conf").read_text()
    again = chrony.time_server(SERVER, _context(False, ran))
    assert again.outcome == agent_pb2.ACTION_OUTCOME_UNCHANGED
    assert ran == []  # no systemd: nothing is run, the clock is never touched


def test_with_systemd_a_change_restarts_chrony(etc: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (etc / "systemd").mkdir()
    monkeypatch.setattr(chrony, "SYSTEMD_RUNNING", etc / "systemd")
    ran: list[list[str]] = []
    done = chrony.time_client(actions_pb2.TimeClient(servers=["10.213.0.1"]), _context(False, ran))
    assert done.outcome == agent_pb2.ACTION_OUTCOME_SUCCEEDED
    assert ran == [["systemctl", "is-active", "chrony"], ["systemctl", "restart", "chrony"]]


def test_refusals_change_nothing(etc: Path) -> None:
    drop_in = etc / "conf.d" / "picoord-time.conf"
    drop_in.write_text("server 10.9.9.9 iburst\n")
    with pytest.raises(ActionFailed, match="picoord did not write it"):
        chrony.time_server(SERVER, _context(False, []))
    assert drop_in.read_text() == "server 10.9.9.9 iburst\n"
    (etc / "chrony.conf").write_text("pool 2.debian.pool.ntp.org iburst\n")
    with pytest.raises(ActionFailed, match="has no `confdir"):
        chrony.time_server(SERVER, _context(False, []))
    (etc / "chrony.conf").unlink()
    with pytest.raises(ActionFailed, match="apt-get install chrony"):
        chrony.time_server(SERVER, _context(False, []))
    with pytest.raises(FieldError, match="stratum"):
        chrony.time_server(actions_pb2.TimeServer(allow=["10.0.0.0/8"], stratum=99), _context(False, []))


def test_the_example_file_reads_and_plans() -> None:
    text = (Path(__file__).parents[2] / "examples" / "timesource.yaml").read_text()
    inventory = [NodeView("ubuntu-desktop", {}, "x86_64", "192.168.10.2")] + [
        NodeView(f"pi{i}", {}, "aarch64", f"192.168.20.{10 + i}") for i in (1, 2, 3)
    ]
    steps = plan(parse_spec(text), inventory)
    assert [(s.node, s.kind) for s in steps] == [("ubuntu-desktop", "time_server")] + [
        (f"pi{i}", "time_client") for i in (1, 2, 3)
    ]
    assert {tuple(s.action.time_client.servers) for s in steps[1:]} == {("192.168.10.2",)}

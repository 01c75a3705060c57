"""Operator output is literal: whatever a node reports reaches the terminal as visible text,
never as rich markup or as control sequences. The listings are produced by the real
`coordctl` (its `main`) against a real gRPC Admin server on a unix socket that answers with
hostile strings."""

from __future__ import annotations

import json
import shlex
from collections.abc import Iterator
from concurrent import futures
from pathlib import Path

import grpc
import pytest
import yaml

from picoord.coordinator.ctl.cli import main as coordctl
from picoord.coordinator.ctl.output import escape_control, literal, table
from picoord.v1 import actions_pb2, admin_pb2, admin_pb2_grpc, agent_pb2, node_pb2

HOSTILE = [
    "[/x]",
    "[bold red]x[/]",
    "[link=http://x]y[/link]",
    "\x1b[31mred",
    "\x9b2J",
    "cr\rhere",
    "bell\x07",
    "evil\u202etxt.exe",
    ":warning:",
]
FORBIDDEN = ("\x1b", "\x07", "\r", "\x9b", "\u202e")


@pytest.mark.parametrize(
    ("text", "shown"),
    [
        ("plain", "plain"),
        ("[/x]", "[/x]"),
        ("[bold red]x[/]", "[bold red]x[/]"),
        ("\x1b[31mred", "\\x1b[31mred"),
        ("\x9b2J", "\\x9b2J"),
        ("a\rb", "a\\x0db"),
        ("\x07", "\\x07"),
        ("\x00\x7f", "\\x00\\x7f"),
        ("two\nlines\ttab", "two\\x0alines\\x09tab"),
        ("\x85next line", "\\x85next line"),
        ("evil\u202etxt.exe", "evil\\u202etxt.exe"),
        ("\u2066isolate\u2069", "\\u2066isolate\\u2069"),
        ("zero\u200bwidth\ufeff", "zero\\u200bwidth\\ufeff"),
        ("ünïcode 日本 π", "ünïcode 日本 π"),
        ("C:\\path", "C:\\path"),
    ],
)
def test_escape_control(text: str, shown: str) -> None:
    assert escape_control(text) == shown
    assert literal(text).plain == shown
    assert literal(text).spans == []  # no style came from the text


def test_a_table_cell_is_never_markup() -> None:
    from rich.console import Console

    console = Console(record=True, width=200, color_system="truecolor", markup=True)
    console.print(table([{"v": text} for text in HOSTILE], [("VALUE", lambda row: row["v"])]))
    plain, styled = console.export_text(clear=False), console.export_text(styles=True)
    for text in HOSTILE:
        assert escape_control(text) in plain
    assert not any(code in plain for code in FORBIDDEN)
    assert "\x1b[1;31m" not in styled and "\x1b]8;" not in styled  # no red, no hyperlink
    assert styled.count("\x1b[") == 2  # the bold header's on and off, nothing from the cells


def hostile(index: int) -> str:
    return HOSTILE[index % len(HOSTILE)]


class HostileAdmin(admin_pb2_grpc.AdminServicer):
    """An Admin server whose every node-supplied string is hostile."""

    def __init__(self) -> None:
        self.requests: list[object] = []

    def ListNodes(self, request: admin_pb2.ListNodesRequest, context: grpc.ServicerContext) -> object:
        nodes = [
            admin_pb2.NodeSummary(
                name=f"pi{index}",
                status=admin_pb2.NODE_STATUS_READY,
                arch=text,
                machine_model=text,
                os_name=text,
                agent_version=text,
                labels={"role": text},
                last_seen=1.0,
            )
            for index, text in enumerate(HOSTILE)
        ]
        self.requests.append(request)
        if request.limit:  # as the coordinator cuts a selection: the rows, and how many matched
            return admin_pb2.ListNodesResponse(nodes=nodes[: request.limit], matched=len(nodes))
        return admin_pb2.ListNodesResponse(nodes=nodes)

    def GetNode(self, request: admin_pb2.GetNodeRequest, context: grpc.ServicerContext) -> object:
        if request.name != "pi1":
            context.abort(grpc.StatusCode.NOT_FOUND, "no node \x1b[2J[bold]pi9[/] \x07here")
        hardware = node_pb2.Hardware(
            arch=hostile(0),
            cpu_model=hostile(1),
            os_name=hostile(2),
            kernel=hostile(3),
            machine_model=hostile(4),
            disks=[
                node_pb2.Disk(device=text, mountpoint=text, fstype=text, total_bytes=1) for text in HOSTILE
            ],
            interfaces=[node_pb2.NetworkInterface(name=text, mac=text, addresses=[text]) for text in HOSTILE],
            gpus=[node_pb2.Gpu(name=text) for text in HOSTILE],
            docker=node_pb2.DockerInfo(present=True, version=hostile(5), api_version=hostile(6)),
        )
        summary = admin_pb2.NodeSummary(name="pi1", agent_version=hostile(7), labels={"k": hostile(8)})
        return admin_pb2.NodeDetail(
            summary=summary,
            hardware=hardware,
            certificate_serial=hostile(3),
            recent_metrics=[node_pb2.MetricsSample(timestamp=1.0)],
        )

    def Top(self, request: admin_pb2.TopRequest, context: grpc.ServicerContext) -> object:
        return admin_pb2.TopResponse(rows=[admin_pb2.TopRow(name=text, sample_time=1.0) for text in HOSTILE])

    def ListActions(self, request: admin_pb2.ListActionsRequest, context: grpc.ServicerContext) -> object:
        return admin_pb2.ListActionsResponse(actions=[action(text) for text in HOSTILE])

    def ListTokens(self, request: admin_pb2.ListTokensRequest, context: grpc.ServicerContext) -> object:
        return admin_pb2.ListTokensResponse(
            tokens=[admin_pb2.TokenInfo(token_id=f"abcde{i}", description=t) for i, t in enumerate(HOSTILE)]
        )

    def LabelNode(self, request: admin_pb2.LabelNodeRequest, context: grpc.ServicerContext) -> object:
        return admin_pb2.NodeSummary(name=hostile(3), labels={"a": hostile(4)})

    def Apply(self, request: admin_pb2.ApplyRequest, context: grpc.ServicerContext) -> Iterator[object]:
        for text in HOSTILE:
            yield admin_pb2.ApplyEvent(finished=action(text))
        yield admin_pb2.ApplyEvent(summary=admin_pb2.ApplySummary(converged=False, failed=len(HOSTILE)))


def action(text: str) -> admin_pb2.ActionRecord:
    return admin_pb2.ActionRecord(
        action_id=text,
        node=text,
        step=text,
        kind=text,
        requested_by=text,
        message=f"failed: {text}",
        in_place=text,
        outcome=agent_pb2.ACTION_OUTCOME_FAILED,
        commands=[actions_pb2.CommandRecord(argv=["echo", text], ran=True, exit_code=1, output_tail=text)],
    )


SERVED = HostileAdmin()  # the requests it was sent are in SERVED.requests


@pytest.fixture(scope="module")
def admin_socket(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    path = tmp_path_factory.mktemp("admin") / "admin.sock"
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    admin_pb2_grpc.add_AdminServicer_to_server(SERVED, server)
    assert server.add_insecure_port(f"unix:{path}")
    server.start()
    yield path
    server.stop(None)


def run(admin_socket: Path, capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    with pytest.raises(SystemExit) as done:
        coordctl(["--admin-socket", str(admin_socket), *argv])
    out, err = capsys.readouterr()
    return int(done.value.code or 0), out, err


def assert_no_control(text: str) -> None:
    found = [code for code in FORBIDDEN if code in text]
    assert not found, f"raw control characters reached the terminal: {found!r}"


COMMANDS = [
    ("nodes",),
    ("node", "show", "pi1"),
    ("top", "--once"),
    ("actions",),
    ("token", "list"),
]


@pytest.mark.parametrize("command", COMMANDS, ids=" ".join)
def test_table_output_shows_node_text_literally(
    admin_socket: Path, capsys: pytest.CaptureFixture[str], command: tuple[str, ...]
) -> None:
    code, out, err = run(admin_socket, capsys, *command)
    assert (code, err) == (0, "")
    assert_no_control(out)
    for text in HOSTILE:
        assert escape_control(text) in out, text


@pytest.mark.parametrize("command", COMMANDS, ids=" ".join)
@pytest.mark.parametrize("fmt", ["json", "yaml"])
def test_json_and_yaml_keep_the_exact_data_escaped(
    admin_socket: Path, capsys: pytest.CaptureFixture[str], command: tuple[str, ...], fmt: str
) -> None:
    code, out, err = run(admin_socket, capsys, *command, "-o", fmt)
    assert (code, err) == (0, "")
    assert_no_control(out)
    data = json.loads(out) if fmt == "json" else yaml.safe_load(out)
    text = json.dumps(data, ensure_ascii=False)
    for value in HOSTILE:
        assert json.dumps(value, ensure_ascii=False)[1:-1] in text, value


def test_apply_progress_lines_are_literal(
    admin_socket: Path, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    spec = tmp_path / "cluster.yaml"
    spec.write_text("kind: Mount\nname: m\ntype: bind\nsource: /srv/a\ntarget: /mnt/a\nnodes: [pi1]\n")
    code, out, err = run(admin_socket, capsys, "apply", "-f", str(spec))
    assert (code, err) == (1, "")
    assert_no_control(out)
    for text in HOSTILE:
        # a carriage return breaks the message and the output into lines, like a newline
        first, *rest = text.splitlines()
        assert f"failed: {escape_control(first)}" in out
        assert all(f"   {line}\n" in out and f"| {line}\n" in out for line in [first, *rest][1:])
        assert f"ran: echo {escape_control(shlex.quote(text))}" in out


def test_label_reply_is_literal(admin_socket: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run(admin_socket, capsys, "node", "label", "pi1", "a=b")
    assert code == 0
    assert_no_control(out)
    assert escape_control(hostile(3)) in out and escape_control(hostile(4)) in out


def test_an_error_from_the_coordinator_is_literal(
    admin_socket: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code, out, err = run(admin_socket, capsys, "node", "show", "pi9")
    assert (code, out) == (1, "")
    assert err == "coordctl: not_found: no node \\x1b[2J[bold]pi9[/] \\x07here\n"


def test_nodes_asks_for_a_selection_and_says_when_the_table_is_cut(
    admin_socket: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code, out, err = run(
        admin_socket, capsys, "nodes", "--selector", "zone=desk", "--selector", "disk=ssd", "--limit", "2"
    )
    request = SERVED.requests[-1]
    assert (dict(request.selector), request.limit) == ({"zone": "desk", "disk": "ssd"}, 2)
    assert code == 0 and out.count("\npi") + out.startswith("pi") <= 2
    assert err == f"2 of {len(HOSTILE)} nodes shown (--limit)\n"
    code, out, err = run(admin_socket, capsys, "nodes", "--limit", "2", "-o", "json")
    assert (code, err) == (0, "") and [node["name"] for node in json.loads(out)] == ["pi0", "pi1"]


@pytest.mark.parametrize("argv", [("--limit", "-1"), ("--selector", "novalue")])
def test_a_bad_selection_is_refused_before_any_call(
    admin_socket: Path, capsys: pytest.CaptureFixture[str], argv: tuple[str, ...]
) -> None:
    calls = len(SERVED.requests)
    with pytest.raises(SystemExit) as done:
        coordctl(["--admin-socket", str(admin_socket), "nodes", *argv])
    assert done.value.code != 0
    assert len(SERVED.requests) == calls

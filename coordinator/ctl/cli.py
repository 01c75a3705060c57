"""`coordctl`: tokens, nodes, labels, removal and a live `top`, over the admin API."""

from __future__ import annotations

import argparse
import dataclasses
import os
import pwd
import shlex
import socket
import sys
import time
from collections.abc import Iterable
from typing import Any

import grpc
import yaml
from google.protobuf.json_format import MessageToDict
from rich.live import Live

from picoord.common import VERSION
from picoord.common.durations import parse_duration
from picoord.common.joining import InvalidJoinFile, parse_join_command, render_first_boot
from picoord.common.names import InvalidName, parse_label_assignment, validate_label_key, validate_node_name
from picoord.common.pi_throttled_flags import describe_throttled
from picoord.common.validation import FieldError
from picoord.coordinator.apply.cluster_spec import MAX_SPEC_BYTES, SpecError
from picoord.coordinator.clock_offsets import CLOCK_OFFSET_WARNING_SECONDS
from picoord.coordinator.ctl import workloads
from picoord.coordinator.ctl.certs import add_certs_parser, certificate_line, status_with_certificate
from picoord.coordinator.ctl.client import (
    CALL_TIMEOUT,
    AdminClient,
    AdminUnavailable,
    ConnectionChoiceError,
    choose_connection,
    open_channel,
    replica_channel,
    unreachable_message,
)
from picoord.coordinator.ctl.contexts import BundleError, expiry_refusal
from picoord.coordinator.ctl.output import (
    FORMATS,
    ago,
    clock_offset_text,
    echo,
    emit,
    emit_json_lines_array,
    human_bytes,
    iso_time,
    node_view,
    table,
)
from picoord.coordinator.ctl.output import (
    console as output_console,
)
from picoord.coordinator.ctl.remote import add_remote_parsers, context_store
from picoord.coordinator.status import OUTCOME_NAMES, STATUS_NAMES
from picoord.coordinator.workloads.importers.compose import with_stack_address
from picoord.coordinator.workloads.reader import WorkloadError, read_workloads
from picoord.v1 import admin_pb2, admin_pb2_grpc, agent_pb2, services_pb2_grpc

APPLY_TIMEOUT = 3600.0


def token_view(info: admin_pb2.TokenInfo) -> dict[str, Any]:
    return {
        "token_id": info.token_id,
        "created_at": iso_time(info.created_at),
        "expires_at": iso_time(info.expires_at),
        "uses": info.uses,
        "usage_limit": info.usage_limit or None,
        "description": info.description,
        "labels": dict(sorted(info.labels.items())),
        "used_by": list(info.used_by),
    }


def _labels_text(labels: dict[str, str], pending: Iterable[str] = ()) -> str:
    """k=v,...; a label the node asked for and no operator accepted yet is marked "(asked)"."""
    held = set(pending)
    return (
        ",".join(f"{key}={value}" + (" (asked)" if key in held else "") for key, value in labels.items())
        or "-"
    )


def _uses_text(view: dict[str, Any]) -> str:
    return f"{view['uses']}/{view['usage_limit'] or 'unlimited'}"


def _node_state(view: dict[str, Any]) -> str:
    """STATUS, and what holds the node back: a hardware claim or labels to accept."""
    notes = []
    if view["held"]:
        notes.append("HELD: " + "; ".join(view["held"]))
    if view["pending_labels"]:
        notes.append("labels asked")
    return "; ".join(notes) or "-"


def _clock_line(offset: float | None) -> str:
    """`node show`: the node's clock against the coordinator's, measured from its messages."""
    if offset is None:
        return "not measured (no heartbeat or sample in the last minute)"
    return f"{offset:+.3f}s against the coordinator ({clock_offset_text(offset) if offset else 'in step'})"


def cmd_token_create(stub: admin_pb2_grpc.AdminStub, args: argparse.Namespace) -> int:
    reply = stub.CreateToken(
        admin_pb2.CreateTokenRequest(
            ttl_seconds=args.ttl,
            usage_limit=args.uses,
            description=args.description,
            labels=dict(parse_label_assignment(item) for item in args.label),
        ),
        timeout=CALL_TIMEOUT,
    )
    if args.first_boot or args.output == "table":
        info = reply.info
        uses = f"up to {info.usage_limit} node(s)" if info.usage_limit else "any number of nodes"
        grants = f"; grants {_labels_text(dict(sorted(info.labels.items())))}" if info.labels else ""
        if args.first_boot:  # the file for a Pi's boot partition (docs/join.md)
            parameters = dataclasses.replace(parse_join_command(reply.join_command), node_name=args.node_name)
            echo(render_first_boot(parameters).rstrip("\n"))
        else:
            echo(reply.join_command)
        echo(
            f"# token {info.token_id}: {uses} may join until {iso_time(info.expires_at)}{grants}",
            file=sys.stderr,
        )
        return 0
    view = {
        "token": reply.token,
        "ca_cert_hash": reply.ca_cert_hash,
        "join_command": reply.join_command,
        **token_view(reply.info),
    }
    emit(view, args.output, [])
    return 0


def cmd_token_list(stub: admin_pb2_grpc.AdminStub, args: argparse.Namespace) -> int:
    reply = stub.ListTokens(admin_pb2.ListTokensRequest(), timeout=CALL_TIMEOUT)
    views = [token_view(info) for info in reply.tokens]
    emit(
        views,
        args.output,
        [
            ("TOKEN ID", lambda v: v["token_id"]),
            ("EXPIRES", lambda v: v["expires_at"]),
            ("USES", _uses_text),
            ("USED BY", lambda v: ",".join(v["used_by"]) or "-"),
            ("GRANTS", lambda v: _labels_text(v["labels"])),
            ("DESCRIPTION", lambda v: v["description"] or "-"),
        ],
    )
    return 0


def non_negative_int(text: str) -> int:
    """An argparse type: a whole number, 0 or more."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a whole number: {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be 0 or more, not {value}")
    return value


def _selection(args: argparse.Namespace) -> dict[str, Any]:
    """The request fields of `--selector k=v` (repeatable) and `--limit N`."""
    return {
        "selector": dict(parse_label_assignment(item) for item in args.selector),
        "limit": args.limit,
    }


def _say_cut(shown: int, matched: int, output: str) -> None:
    """A table cut by --limit says so on stderr (the rows stay on stdout)."""
    if output == "table" and matched > shown:
        print(f"{shown} of {matched} nodes shown (--limit)", file=sys.stderr)


def cmd_nodes(stub: admin_pb2_grpc.AdminStub, args: argparse.Namespace) -> int:
    reply = stub.ListNodes(admin_pb2.ListNodesRequest(**_selection(args)), timeout=CALL_TIMEOUT)
    if args.output == "json":
        emit_json_lines_array(node_view(node) for node in reply.nodes)
        return 0
    views = [node_view(node) for node in reply.nodes]
    now = time.time()
    last_seen = {node.name: node.last_seen for node in reply.nodes}
    _say_cut(len(views), reply.matched, args.output)
    emit(
        views,
        args.output,
        [
            ("NAME", lambda v: v["name"]),
            ("STATUS", status_with_certificate),
            ("ARCH", lambda v: v["arch"] or "-"),
            ("CPUS", lambda v: str(v["cpu_cores"] or "-")),
            ("MEMORY", lambda v: human_bytes(v["memory_total_bytes"]) if v["memory_total_bytes"] else "-"),
            ("MODEL", lambda v: v["machine_model"] or "-"),
            ("OS", lambda v: v["os"] or "-"),
            ("AGENT", lambda v: v["agent_version"] or "-"),
            ("LAST SEEN", lambda v: ago(last_seen[v["name"]], now)),
            ("CLOCK", lambda v: clock_offset_text(v["clock_offset_seconds"], CLOCK_OFFSET_WARNING_SECONDS)),
            ("LABELS", lambda v: _labels_text(v["labels"], v["pending_labels"])),
            ("ROLE", lambda v: v["role"] or "-"),
            ("HELD", _node_state),
        ],
    )
    return 0


def cmd_node_show(stub: admin_pb2_grpc.AdminStub, args: argparse.Namespace) -> int:
    detail = stub.GetNode(
        admin_pb2.GetNodeRequest(name=args.name, recent_metrics=args.samples), timeout=CALL_TIMEOUT
    )
    view = {
        **node_view(detail.summary),
        "certificate_serial": detail.certificate_serial or None,
        "certificate_not_after": iso_time(detail.certificate_not_after),
        "hardware": MessageToDict(detail.hardware, preserving_proto_field_name=True),
        "recent_metrics": [MessageToDict(s, preserving_proto_field_name=True) for s in detail.recent_metrics],
    }
    if args.output != "table":
        emit(view, args.output, [])
        return 0
    console = output_console()
    hw = detail.hardware
    summary = [
        ("Name", detail.summary.name),
        ("Status", STATUS_NAMES[detail.summary.status]),
        ("Model", hw.machine_model or "-"),
        ("Arch", hw.arch),
        ("CPU", f"{hw.cpu_model} ({hw.cpu_cores} logical, {hw.cpu_physical_cores} physical)"),
        ("Memory", f"{human_bytes(hw.memory_total_bytes)}, swap {human_bytes(hw.swap_total_bytes)}"),
        ("OS", f"{hw.os_name}, kernel {hw.kernel}"),
        (
            "Docker",
            f"{hw.docker.version} (API {hw.docker.api_version})" if hw.docker.present else "not running",
        ),
        ("GPUs", ", ".join(f"{g.name} {human_bytes(g.memory_bytes)}" for g in hw.gpus) or "none"),
        ("Agent", detail.summary.agent_version or "-"),
        ("Labels", _labels_text(dict(sorted(detail.summary.labels.items())), detail.summary.pending_labels)),
        ("Role", detail.summary.role or "-"),
        ("Held", _node_state(view)),
        ("Certificate", certificate_line(detail, view)),
        ("Last seen", ago(detail.summary.last_seen, time.time())),
        ("Clock", _clock_line(view["clock_offset_seconds"])),
    ]
    console.print(
        table([{"k": k, "v": v} for k, v in summary], [("", lambda r: r["k"]), ("", lambda r: r["v"])])
    )
    console.print(
        table(
            [{"d": d} for d in hw.disks],
            [
                ("DEVICE", lambda r: r["d"].device),
                ("MOUNT", lambda r: r["d"].mountpoint),
                ("FSTYPE", lambda r: r["d"].fstype),
                ("SIZE", lambda r: human_bytes(r["d"].total_bytes)),
            ],
            title="Disks",
        )
    )
    console.print(
        table(
            [{"i": i} for i in hw.interfaces],
            [
                ("INTERFACE", lambda r: r["i"].name),
                ("STATE", lambda r: "up" if r["i"].up else "down"),
                ("MAC", lambda r: r["i"].mac or "-"),
                ("ADDRESSES", lambda r: " ".join(r["i"].addresses) or "-"),
            ],
            title="Network",
        )
    )
    console.print(
        table(
            [{"s": s} for s in detail.recent_metrics],
            [
                ("TIME", lambda r: iso_time(r["s"].timestamp) or "-"),
                ("CPU%", lambda r: f"{r['s'].cpu_percent:.1f}"),
                ("LOAD1", lambda r: f"{r['s'].load1:.2f}"),
                ("MEM AVAIL", lambda r: human_bytes(r["s"].memory_available_bytes)),
                ("TEMP", lambda r: " ".join(f"{t.celsius:.1f}C" for t in r["s"].temperatures) or "-"),
            ],
            title="Recent metrics",
        )
    )
    return 0


def cmd_node_label(stub: admin_pb2_grpc.AdminStub, args: argparse.Namespace) -> int:
    to_set: dict[str, str] = {}
    to_remove: list[str] = []
    for item in args.labels:
        if item.endswith("-") and "=" not in item:
            to_remove.append(validate_label_key(item[:-1]))
        else:
            key, value = parse_label_assignment(item)
            to_set[key] = value
    summary = stub.LabelNode(
        admin_pb2.LabelNodeRequest(name=args.name, set=to_set, remove=to_remove), timeout=CALL_TIMEOUT
    )
    echo(f"node/{summary.name} labelled: {_labels_text(dict(sorted(summary.labels.items())))}")
    return 0


def cmd_node_accept(stub: admin_pb2_grpc.AdminStub, args: argparse.Namespace) -> int:
    reply = stub.AcceptNode(admin_pb2.AcceptNodeRequest(name=args.name), timeout=CALL_TIMEOUT)
    accepted = []
    if reply.accepted_labels:
        accepted.append("labels " + _labels_text(dict(sorted(reply.accepted_labels.items()))))
    if reply.accepted_hardware:
        accepted.append("hardware " + "; ".join(reply.accepted_hardware))
    echo(f"node/{reply.summary.name} accepted: {', '.join(accepted) or 'nothing was held'}")
    return 0


def cmd_node_remove(stub: admin_pb2_grpc.AdminStub, args: argparse.Namespace) -> int:
    reply = stub.RemoveNode(admin_pb2.RemoveNodeRequest(name=args.name), timeout=CALL_TIMEOUT)
    revoked = ", ".join(reply.revoked_serials) or "none"
    closed = "; its session was closed" if reply.session_closed else ""
    echo(f"node/{reply.name} removed; revoked certificates: {revoked}{closed}")
    return 0


def top_view(row: admin_pb2.TopRow) -> dict[str, Any]:
    used = row.memory_total_bytes - row.memory_available_bytes
    return {
        "name": row.name,
        "status": STATUS_NAMES[row.status],
        "sample_time": iso_time(row.sample_time),
        "cpu_percent": round(row.cpu_percent, 1),
        "cpu_cores": row.cpu_cores,
        "load1": round(row.load1, 2),
        "memory_used_bytes": used if row.memory_total_bytes else None,
        "memory_available_bytes": row.memory_available_bytes if row.memory_total_bytes else None,
        "memory_total_bytes": row.memory_total_bytes or None,
        "disk_used_bytes": row.disk_size_bytes - row.disk_avail_bytes if row.disk_size_bytes else None,
        "disk_size_bytes": row.disk_size_bytes or None,
        "network_receive_bytes_per_second": round(row.network_receive_bytes_per_second, 1),
        "network_transmit_bytes_per_second": round(row.network_transmit_bytes_per_second, 1),
        "soc_temperature_celsius": round(row.soc_temperature_celsius, 1)
        if row.temperature_available
        else None,
        "throttled": describe_throttled(row.throttled) if row.throttled_available else None,
    }


def _rate(value: float) -> str:
    return f"{human_bytes(value)}/s"


TOP_COLUMNS = [
    ("NODE", lambda v: v["name"]),
    ("STATUS", lambda v: v["status"]),
    ("CPU%", lambda v: f"{v['cpu_percent']:.1f}" if v["sample_time"] else "-"),
    ("LOAD1", lambda v: f"{v['load1']:.2f}" if v["sample_time"] else "-"),
    ("MEM USED", lambda v: human_bytes(v["memory_used_bytes"]) if v["memory_total_bytes"] else "-"),
    ("MEM AVAIL", lambda v: human_bytes(v["memory_available_bytes"]) if v["memory_total_bytes"] else "-"),
    (
        "DISK",
        lambda v: (
            f"{human_bytes(v['disk_used_bytes'])}/{human_bytes(v['disk_size_bytes'])}"
            if v["disk_size_bytes"]
            else "-"
        ),
    ),
    ("NET RX", lambda v: _rate(v["network_receive_bytes_per_second"]) if v["sample_time"] else "-"),
    ("NET TX", lambda v: _rate(v["network_transmit_bytes_per_second"]) if v["sample_time"] else "-"),
    (
        "TEMP",
        lambda v: f"{v['soc_temperature_celsius']:.1f}C" if v["soc_temperature_celsius"] is not None else "-",
    ),
    ("THROTTLING", lambda v: ", ".join(v["throttled"]) or "none" if v["throttled"] is not None else "n/a"),
]


def cmd_top(stub: admin_pb2_grpc.AdminStub, args: argparse.Namespace) -> int:
    request = admin_pb2.TopRequest(**_selection(args))

    def snapshot() -> list[dict[str, Any]]:
        return [top_view(row) for row in stub.Top(request, timeout=CALL_TIMEOUT).rows]

    once = args.once or args.output != "table" or not sys.stdout.isatty()
    if args.output == "json":
        emit_json_lines_array(top_view(row) for row in stub.Top(request, timeout=CALL_TIMEOUT).rows)
        return 0
    if once:
        reply = stub.Top(request, timeout=CALL_TIMEOUT)
        _say_cut(len(reply.rows), reply.matched, args.output)
        emit([top_view(row) for row in reply.rows], args.output, TOP_COLUMNS)
        return 0
    with Live(
        table(snapshot(), TOP_COLUMNS), console=output_console(), auto_refresh=False, screen=False
    ) as live:
        try:
            while True:
                time.sleep(args.interval)
                live.update(table(snapshot(), TOP_COLUMNS), refresh=True)
        except KeyboardInterrupt:
            return 0


def action_view(record: admin_pb2.ActionRecord) -> dict[str, Any]:
    return {
        "action_id": record.action_id,
        "apply_id": record.apply_id,
        "node": record.node,
        "step": record.step,
        "kind": record.kind,
        "requested_by": record.requested_by,
        "dry_run": record.dry_run,
        "started_at": iso_time(record.started_at),
        "finished_at": iso_time(record.finished_at),
        "outcome": OUTCOME_NAMES[record.outcome],
        "message": record.message,
        "in_place": record.in_place,
        "commands": [
            {
                "argv": list(command.argv),
                "ran": command.ran,
                "exit_code": command.exit_code if command.ran else None,
                "output_tail": command.output_tail,
            }
            for command in record.commands
        ],
    }


def read_spec_file(path: str) -> str:
    """The file's text, refused before reading it whole when it is larger than a spec can be."""
    source = sys.stdin.buffer if path == "-" else open(path, "rb")  # noqa: SIM115
    with source:
        data = source.read(MAX_SPEC_BYTES + 1)
    if len(data) > MAX_SPEC_BYTES:
        raise SpecError(f"{path} is larger than {MAX_SPEC_BYTES} bytes: not a cluster spec")
    return data.decode("utf-8")


def _print_record(record: admin_pb2.ActionRecord, dry_run: bool) -> None:
    echo(f"{record.node:<12} {record.step:<48} {OUTCOME_NAMES[record.outcome]}", flush=True)
    if record.message and record.outcome != agent_pb2.ACTION_OUTCOME_UNCHANGED:
        for line in record.message.splitlines():
            echo(f"{'':<12}   {line}")
    if record.in_place:
        echo(f"{'':<12}   in place: {record.in_place}")
    for command in record.commands:
        status = "" if not command.ran else f"  (exit {command.exit_code})"
        echo(f"{'':<12}   {'would run' if dry_run else 'ran'}: {shlex.join(command.argv)}{status}")
        if command.ran and command.exit_code != 0 and command.output_tail.strip():
            for line in command.output_tail.strip().splitlines()[-5:]:
                echo(f"{'':<12}     | {line}")


def cmd_apply(stub: admin_pb2_grpc.AdminStub, args: argparse.Namespace) -> int:
    text = read_spec_file(args.file)
    if getattr(args, "address", None):
        if not args.stack:
            raise SpecError("--address is a stack's virtual address: give --stack NAME too")
        try:
            text = with_stack_address(text, args.address)
        except (FieldError, yaml.YAMLError) as error:
            raise SpecError(f"{args.file}: {error}") from None
    read_workloads(text, args.file)  # the same checks the coordinator makes: fail early, before sending
    request = admin_pb2.ApplyRequest(
        documents=text,
        dry_run=args.dry_run,
        requested_by=operator_name(),
        source=args.file,
        stack=args.stack or "",
        prune=args.prune,
    )
    records: list[admin_pb2.ActionRecord] = []
    services: list[admin_pb2.ServiceStaged] = []
    warnings: list[str] = []
    summary = admin_pb2.ApplySummary()
    for event in stub.Apply(request, timeout=APPLY_TIMEOUT):
        kind = event.WhichOneof("event")
        if kind == "warning":
            warnings.append(event.warning)
            if args.output == "table":
                echo(f"warning: {event.warning}", file=sys.stderr)
        elif kind == "service":
            services.append(event.service)
            if args.output == "table":
                echo(_staged_line(event.service, args.dry_run))
        elif kind == "finished":
            records.append(event.finished)
            if args.output == "table":
                _print_record(event.finished, args.dry_run)
        elif kind == "started" and args.output == "table" and sys.stdout.isatty():  # live progress
            echo(f"{event.started.node:<12} {event.started.step:<48} ...", flush=True)
        elif kind == "summary":
            summary = event.summary
    if args.output != "table":
        view = {
            "converged": summary.converged,
            "services": [MessageToDict(s, preserving_proto_field_name=True) for s in services],
            "warnings": warnings,
            "actions": [action_view(r) for r in records],
        }
        emit(view, args.output, [])
    elif not records and services:
        pass  # only services: their lines said it all
    elif summary.changed == 0 and summary.failed == 0:
        echo("nothing to change: every node is already as the file says")
    else:
        verb = "would change" if args.dry_run else "changed"
        echo(f"{summary.changed} {verb}, {summary.unchanged} unchanged, {summary.failed} failed")
    return 0 if summary.converged else 1


def _staged_line(service: admin_pb2.ServiceStaged, dry_run: bool) -> str:
    what = (
        f"{service.replicas} x {service.image}" if service.mode == "replicated" else f"global {service.image}"
    )
    where = f"stack/{service.stack} " if service.stack else ""
    if service.change == "dropped":
        return f"{where}service/{service.name} is no longer in the file: kept (--prune removes it)"
    if service.change == "pruned":
        verb = "would be removed" if dry_run else "removed"
        return f"{where}service/{service.name} is no longer in the file: {verb}"
    if not service.changed:
        return f"{where}service/{service.name} unchanged ({what})"
    verb = "would be recorded" if dry_run else "recorded"
    change = {"added": "new, ", "changed": "changed, "}.get(service.change, "")
    rollout = f"coordctl rollout {service.stack or service.name}"
    return f"{where}service/{service.name} {verb} ({change}{what}): roll it out with `{rollout}`"


def cmd_actions(stub: admin_pb2_grpc.AdminStub, args: argparse.Namespace) -> int:
    reply = stub.ListActions(
        admin_pb2.ListActionsRequest(node=args.node or "", limit=args.limit), timeout=CALL_TIMEOUT
    )
    views = [action_view(record) for record in reply.actions]
    emit(
        views,
        args.output,
        [
            ("STARTED", lambda v: v["started_at"] or "-"),
            ("NODE", lambda v: v["node"]),
            ("STEP", lambda v: v["step"]),
            ("BY", lambda v: v["requested_by"]),
            ("DRY RUN", lambda v: "yes" if v["dry_run"] else "no"),
            ("OUTCOME", lambda v: v["outcome"]),
            ("OUTPUT", lambda v: _last_output(v)),
        ],
    )
    return 0


def _last_output(view: dict[str, Any]) -> str:
    for command in reversed(view["commands"]):
        if command["output_tail"].strip():
            return command["output_tail"].strip().splitlines()[-1][:80]
    return view["message"][:80] or "-"


def operator_name() -> str:
    try:
        user = pwd.getpwuid(os.getuid()).pw_name
    except KeyError:
        user = str(os.getuid())
    return f"{os.environ.get('SUDO_USER', user)}@{socket.gethostname()}"


ADDRESS_HELP = (
    "the stack's LoadBalancer virtual address (an unused IPv4 of the nodes' subnet), announced by "
    "a node with a healthy replica of a service that publishes a port; 'none' gives it up, "
    "leaving it out keeps the stack's (x-picoord.address in the file says the same)"
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="coordctl",
        description="Operate a picoord cluster: on the coordinator's host over its admin socket, or "
        "from another machine with a context (coordctl context add NAME --bundle FILE).",
        epilog="Connection: --context NAME for one call; else --admin-socket or $COORDCTL_ADMIN_SOCKET; "
        "else the current context (coordctl context use); else the admin socket /run/picoord/admin.sock.",
    )
    parser.add_argument(
        "--admin-socket",
        help="coordinator admin socket (env COORDCTL_ADMIN_SOCKET); given, it wins over the current context",
    )
    parser.add_argument(
        "--context", metavar="NAME", help="use this context (remote coordinator) for this call only"
    )
    parser.add_argument("--version", action="version", version=f"coordctl {VERSION}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def with_output(sub: argparse.ArgumentParser) -> argparse.ArgumentParser:
        sub.add_argument("-o", "--output", choices=FORMATS, default="table")
        return sub

    def with_selection(sub: argparse.ArgumentParser) -> argparse.ArgumentParser:
        sub.add_argument(
            "--selector",
            action="append",
            default=[],
            metavar="k=v",
            help="only nodes with this label (repeatable: all of them)",
        )
        sub.add_argument(
            "--limit", type=non_negative_int, default=0, help="at most N nodes, in name order (default all)"
        )
        return sub

    token = commands.add_parser("token", help="bootstrap tokens").add_subparsers(
        dest="token_command", required=True
    )
    create = with_output(token.add_parser("create", help="create a token and print the join command"))
    create.add_argument(
        "--ttl", type=parse_duration, default=24 * 3600.0, help="lifetime, e.g. 24h (default)"
    )
    create.add_argument(
        "--uses", type=int, default=0, help="how many nodes may join with it (default unlimited)"
    )
    create.add_argument("--description", default="")
    create.add_argument(
        "--label",
        action="append",
        default=[],
        metavar="k=v",
        help="a label every node joining with it gets (repeatable); labels a node asks for wait for `accept`",
    )
    create.add_argument(
        "--first-boot",
        action="store_true",
        help="print a first-boot file (picoord-join.toml for a Pi's boot partition) instead of the command",
    )
    create.add_argument(
        "--node-name", help="with --first-boot: the name the node joins as (default: its hostname)"
    )
    create.set_defaults(handler=cmd_token_create)
    with_output(
        token.add_parser("list", help="list tokens (ids only) and the nodes that used each")
    ).set_defaults(handler=cmd_token_list)

    with_selection(with_output(commands.add_parser("nodes", help="list nodes"))).set_defaults(
        handler=cmd_nodes
    )
    node = commands.add_parser("node", help="one node").add_subparsers(dest="node_command", required=True)
    show = with_output(node.add_parser("show", help="hardware report and recent metrics"))
    show.add_argument("name")
    show.add_argument("--samples", type=int, default=10, help="recent metric samples to show")
    show.set_defaults(handler=cmd_node_show)
    label = node.add_parser("label", help="set labels (k=v) or remove them (k-)")
    label.add_argument("name")
    label.add_argument("labels", nargs="+", metavar="k=v|k-")
    label.set_defaults(handler=cmd_node_label)
    accept = node.add_parser(
        "accept", help="accept the labels the node asked for at join and its changed hardware report"
    )
    accept.add_argument("name")
    accept.set_defaults(handler=cmd_node_accept)
    remove = node.add_parser("remove", help="revoke the node's certificate and forget it")
    remove.add_argument("name")
    remove.set_defaults(handler=cmd_node_remove)
    workloads.add_node_commands(node)

    apply = with_output(commands.add_parser("apply", help="converge the cluster to a spec file"))
    apply.add_argument("-f", "--file", required=True, help="cluster.yaml (- for standard input)")
    apply.add_argument(
        "--dry-run", action="store_true", help="show what would run on each node; change nothing"
    )
    apply.add_argument("--stack", help="record the file's services as this stack (docker stack deploy)")
    apply.add_argument(
        "--prune", action="store_true", help="with --stack: remove its services the file no longer names"
    )
    apply.add_argument("--address", help=ADDRESS_HELP)
    apply.set_defaults(handler=cmd_apply)
    stack = commands.add_parser("stack", help="stacks: docker stack deploy's spelling").add_subparsers(
        dest="stack_command", required=True
    )
    deploy = with_output(stack.add_parser("deploy", help="apply -f FILE --stack NAME"))
    deploy.add_argument("-c", "--compose-file", dest="file", required=True, help="- for stdin")
    deploy.add_argument("stack", metavar="NAME")
    deploy.add_argument("--prune", action="store_true", help="remove its services the file no longer names")
    deploy.add_argument("--address", help=ADDRESS_HELP)
    deploy.add_argument("--dry-run", action="store_true", help="show what would change; change nothing")
    deploy.set_defaults(handler=cmd_apply)
    actions = with_output(commands.add_parser("actions", help="history of node actions"))
    actions.add_argument("node", nargs="?", help="only this node")
    actions.add_argument("--limit", type=int, default=50)
    actions.set_defaults(handler=cmd_actions)

    top = with_selection(with_output(commands.add_parser("top", help="live per-node resource view")))
    top.add_argument("--once", action="store_true", help="print one snapshot and exit")
    top.add_argument("--interval", type=parse_duration, default=2.0, help="refresh period (default 2s)")
    top.set_defaults(handler=cmd_top)
    workloads.add_commands(commands, with_output)
    add_certs_parser(commands, with_output)
    add_remote_parsers(commands, with_output)
    return parser


def connect_for(args: argparse.Namespace) -> tuple[Any, str | None]:
    """The stub this verb needs, on the connection the flags, environment and current
    context choose; and the context's name when it is one (for error messages)."""
    contexts = context_store()
    connection = choose_connection(
        args.admin_socket,
        os.environ,
        args.context,
        None if args.admin_socket or args.context else contexts.current(),
        socket_only=getattr(args, "socket_only", False),
    )
    if connection.context is not None:
        expired = expiry_refusal(contexts.load(connection.context), connection.context, time.time())
        if expired is not None:
            raise BundleError(expired)
    channel = open_channel(connection, contexts)
    if getattr(args, "api", "admin") == "workloads":
        return services_pb2_grpc.WorkloadsStub(channel), connection.context
    replica = None if connection.socket_path is None else replica_channel(connection.socket_path)
    return AdminClient(channel, replica), connection.context


def rpc_error_message(error: grpc.RpcError, context: str | None) -> str:
    """What went wrong, naming the context of a remote call; a TLS failure is probed for its cause."""
    text = f"{error.code().name.lower()}: {error.details()}"
    if context is None:
        return text
    if error.code() == grpc.StatusCode.UNAVAILABLE:
        return unreachable_message(context, context_store().load(context), text)
    return f"context {context!r}: {text}"


def main(argv: list[str] | None = None) -> None:
    parser = build_parser()
    args = parser.parse_args(argv)
    if getattr(args, "uses", 0) < 0:
        parser.error("--uses must be 0 (unlimited) or more")
    if getattr(args, "node_name", None) and not getattr(args, "first_boot", False):
        parser.error("--node-name goes with --first-boot (the join command takes its own --node-name)")
    context: str | None = None
    try:
        for field in ("name", "node", "node_name"):
            if getattr(args, field, None):
                validate_node_name(getattr(args, field))
        if getattr(args, "check", None):
            args.check(args)  # a command line that cannot be right fails before connecting
        if getattr(args, "api", "admin") == "none":  # contexts: files on this machine only
            raise SystemExit(args.handler(None, args))
        stub, context = connect_for(args)
        raise SystemExit(args.handler(stub, args))
    except (InvalidName, SpecError, WorkloadError, workloads.UsageError, ConnectionChoiceError) as error:
        echo(f"coordctl: {error}", file=sys.stderr)
        raise SystemExit(2) from None
    except (BundleError, InvalidJoinFile) as error:
        echo(f"coordctl: {error}", file=sys.stderr)
        raise SystemExit(1) from None
    except (OSError, UnicodeDecodeError) as error:
        echo(f"coordctl: {error}", file=sys.stderr)
        raise SystemExit(1) from None
    except AdminUnavailable as error:
        echo(f"coordctl: {error}", file=sys.stderr)
        raise SystemExit(1) from None
    except grpc.RpcError as error:
        echo(f"coordctl: {rpc_error_message(error, context)}", file=sys.stderr)
        raise SystemExit(1) from None

"""coordctl's workload verbs: rollout (status, history, undo, pause, resume), services, ps,
secret, node drain. Each is a thin translation between argv and the Workloads API.

Progress of a rollout shows as it happens: a live view on a terminal, one plain line per
change when piped. `coordctl rollout` exits 0 only when the service is healthy at the
revision it rolled to; a rollback, a pause or a failure exits 1 with what happened.
"""

from __future__ import annotations

import argparse
import datetime as dt
import sys
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from rich.console import Group
from rich.live import Live

from picoord.common import limits
from picoord.common.durations import parse_duration
from picoord.common.vocabulary import ReplicaHealth, ReplicaState, RolloutStatus
from picoord.coordinator.ctl.client import CALL_TIMEOUT
from picoord.coordinator.ctl.output import ago, echo, emit, escape_control, iso_time, literal
from picoord.coordinator.ctl.output import console as output_console
from picoord.coordinator.workloads import stacks
from picoord.v1 import services_pb2, services_pb2_grpc

ROLLOUT_TIMEOUT = 3600.0
ROLLOUT_VERBS = ("status", "history", "undo", "pause", "resume")


class UsageError(ValueError):
    """A command line that cannot be right; nothing was sent."""


def _count(text: str) -> int:
    """--tail's N: a whole number from 0 (all) to 2^31."""
    if not text.isdigit() or int(text) >= 2**31:
        raise argparse.ArgumentTypeError(f"invalid count {text!r}: a whole number, 0 for all")
    return int(text)


def rollout_view(info: services_pb2.RolloutInfo) -> dict[str, Any]:
    return {
        "service": info.service,
        "revision": info.revision,
        "previous": info.previous or None,
        "status": RolloutStatus.from_wire(info.status).value,
        "rolling_back": info.rolling_back,
        "desired": info.desired,
        "updated": info.updated,
        "healthy": info.healthy,
        "available": info.available,
        "message": info.message,
        "failures": list(info.failures),
        "started_at": iso_time(info.started_at),
    }


def progress_line(info: services_pb2.RolloutInfo) -> str:
    direction = (
        f"rolling back to revision {info.revision}" if info.rolling_back else f"revision {info.revision}"
    )
    counts = f"{info.updated}/{info.desired} updated, {info.healthy} healthy, {info.available} available"
    # While it moves, the notes tell what happens; the message is for where it ended.
    status = RolloutStatus.from_wire(info.status)
    return f"{info.service} {direction}: {counts}; {status}" + (
        f" ({info.message})" if info.message and not status.under_way else ""
    )


def _succeeded(info: services_pb2.RolloutInfo | None) -> bool:
    return info is not None and info.status == RolloutStatus.COMPLETE.wire and not info.rolling_back


def _started(info: services_pb2.RolloutInfo | None) -> bool:
    """A rollout left going (--detach): moving forward, not failed, paused or rolling back."""
    return info is not None and info.status == RolloutStatus.PROGRESSING.wire and not info.rolling_back


def rollout_exit_code(info: services_pb2.RolloutInfo | None, detached: bool) -> int:
    """0 when the service is healthy at the revision it rolled to; with --detach, also when
    the rollout it started is under way (the user asked not to wait for the end)."""
    return 0 if _succeeded(info) or (detached and _started(info)) else 1


def follow(events: Iterable[services_pb2.RolloutEvent], output: str, detached: bool = False) -> int:
    """Show a rollout's events until the stream ends; 0 only when it ended healthy (or,
    `detached`, when it is under way)."""
    last: services_pb2.RolloutInfo | None = None
    notes: list[str] = []
    live_view = output == "table" and sys.stdout.isatty()
    if live_view:
        with Live(literal(""), auto_refresh=False, console=output_console()) as live:
            for event in events:
                last, notes = _take(event, last, notes)
                shown = [literal(note) for note in notes[-12:]]
                if last is not None:
                    shown.append(literal(progress_line(last)))
                live.update(Group(*shown), refresh=True)
    else:
        previous_line = ""
        for event in events:
            last, notes = _take(event, last, notes)
            if output != "table":
                continue
            if event.WhichOneof("event") == "note":
                echo(event.note, flush=True)
            elif last is not None and (line := progress_line(last)) != previous_line:
                echo(line, flush=True)
                previous_line = line
    if output != "table":
        emit({"rollout": rollout_view(last) if last else None, "events": notes}, output, [])
    elif last is not None:
        _conclude(last, detached)
    return rollout_exit_code(last, detached)


def _take(
    event: services_pb2.RolloutEvent, last: services_pb2.RolloutInfo | None, notes: list[str]
) -> tuple[services_pb2.RolloutInfo | None, list[str]]:
    kind = event.WhichOneof("event")
    if kind == "progress":
        return event.progress, notes
    if kind == "note":
        return last, [*notes, event.note]
    return last, notes


def _conclude(info: services_pb2.RolloutInfo, detached: bool = False) -> None:
    if _succeeded(info):
        echo(f"service/{info.service} revision {info.revision}: {info.healthy}/{info.desired} healthy")
        return
    if detached and _started(info):
        echo(
            f"service/{info.service} revision {info.revision}: rolling out "
            f"(follow it with `coordctl rollout status {info.service} --watch`)"
        )
        return
    for failure in info.failures:
        echo(f"  failed: {failure}", file=sys.stderr)
    what = RolloutStatus.ROLLED_BACK if info.rolling_back else RolloutStatus.from_wire(info.status)
    echo(f"service/{info.service}: {what}: {info.message}", file=sys.stderr)


def cmd_rollout(stub: services_pb2_grpc.WorkloadsStub, args: argparse.Namespace) -> int:
    verb, name = _rollout_words(args.words)
    if verb == "start":
        members = stack_members(stub, name)
        if members and (args.image or args.detach):
            raise UsageError(f"--image and --detach go with one service; {name} is a stack")
        if members:
            return rollout_stack(stub, name, members, args.output)
    if verb == "start":
        request = services_pb2.RolloutRequest(name=name, image=args.image or "", detach=args.detach)
        return follow(stub.Rollout(request, timeout=ROLLOUT_TIMEOUT), args.output, args.detach)
    if args.image:
        raise UsageError("--image goes with `coordctl rollout NAME`, not with `rollout " + verb + "`")
    if verb == "status":
        reference = services_pb2.ServiceRef(name=name, follow=args.watch)
        return follow(stub.RolloutStatus(reference, timeout=ROLLOUT_TIMEOUT), args.output)
    if verb == "undo":
        request = services_pb2.UndoRequest(name=name, to_revision=args.to_revision, detach=args.detach)
        return follow(stub.RolloutUndo(request, timeout=ROLLOUT_TIMEOUT), args.output, args.detach)
    if verb in ("pause", "resume"):
        call = stub.RolloutPause if verb == "pause" else stub.RolloutResume
        info = call(services_pb2.ServiceRef(name=name), timeout=CALL_TIMEOUT)
        if args.output == "table":
            echo(progress_line(info))
        else:
            emit(rollout_view(info), args.output, [])
        return 0
    history = stub.RolloutHistory(services_pb2.ServiceRef(name=name), timeout=CALL_TIMEOUT)
    views = [
        {
            "revision": revision.revision,
            "current": revision.current,
            "created_at": iso_time(revision.created_at),
            "image": revision.image,
            "cause": revision.cause,
            "key": revision.key,
        }
        for revision in history.revisions
    ]
    emit(
        views,
        args.output,
        [
            ("REVISION", lambda v: f"{v['revision']}{' *' if v['current'] else ''}"),
            ("CREATED", lambda v: v["created_at"] or "-"),
            ("IMAGE", lambda v: v["image"]),
            ("CAUSE", lambda v: v["cause"] or "-"),
        ],
    )
    return 0


def stack_members(stub: services_pb2_grpc.WorkloadsStub, name: str) -> dict[str, list[str]]:
    """The services of stack `name` and what each depends on; empty when `name` is a service
    (a service's own name wins) or no stack."""
    reply = stub.ListServices(services_pb2.ListServicesRequest(), timeout=CALL_TIMEOUT)
    if any(service.name == name for service in reply.services):
        return {}
    return {s.name: list(s.dependencies) for s in reply.services if s.stack == name}


def rollout_stack(
    stub: services_pb2_grpc.WorkloadsStub, stack: str, members: dict[str, list[str]], output: str
) -> int:
    """Roll every service of the stack, those it depends on first; each starts once the one
    before is healthy at its new revision (a rollout ends only then). The first that fails
    is rolled back by its own rollout, and the stack stops there, naming it."""
    try:
        order = stacks.rollout_order(members)
    except stacks.StackError as error:
        raise UsageError(f"stack/{stack}: {error}") from None
    if output == "table":
        echo(f"stack/{stack}: rolling {', '.join(order)} in this order", flush=True)
    for index, name in enumerate(order):
        request = services_pb2.RolloutRequest(name=name)
        if follow(stub.Rollout(request, timeout=ROLLOUT_TIMEOUT), output) != 0:
            left = order[index + 1 :]
            echo(
                f"stack/{stack}: stopped at service/{name}"
                + (f"; not rolled: {', '.join(left)}" if left else ""),
                file=sys.stderr,
            )
            return 1
    if output == "table":
        echo(f"stack/{stack}: {len(order)} services healthy")
    return 0


def _rollout_words(words: list[str]) -> tuple[str, str]:
    """`rollout NAME` rolls NAME; `rollout VERB NAME` reads or steers its rollout."""
    if len(words) == 1:
        return "start", words[0]
    if len(words) == 2 and words[0] in (*ROLLOUT_VERBS, "start"):
        return words[0], words[1]
    verbs = "|".join(ROLLOUT_VERBS)
    raise UsageError(
        f"`coordctl rollout {' '.join(words)}`: use `rollout NAME` or `rollout {{{verbs}}} NAME`"
    )


def cmd_services(stub: services_pb2_grpc.WorkloadsStub, args: argparse.Namespace) -> int:
    reply = stub.ListServices(services_pb2.ListServicesRequest(), timeout=CALL_TIMEOUT)
    views = [
        {
            "name": service.name,
            "mode": service.mode,
            "desired": service.desired,
            "running": service.running,
            "healthy": service.healthy,
            "revision": service.revision,
            "image": service.image,
            "rollout": RolloutStatus.from_wire(service.rollout_status).value,
            "staged": service.staged,
            "ports": list(service.ports),
            "unplaced": service.unplaced,
            "stack": service.stack or None,
        }
        for service in reply.services
    ]
    emit(
        views,
        args.output,
        [
            ("NAME", lambda v: v["name"]),
            ("STACK", lambda v: v["stack"] or "-"),
            ("MODE", lambda v: v["mode"]),
            ("REPLICAS", lambda v: f"{v['healthy']}/{v['desired']}"),
            ("REVISION", lambda v: f"{v['revision']}{' (staged change)' if v['staged'] else ''}"),
            ("IMAGE", lambda v: v["image"]),
            ("PORTS", lambda v: ",".join(v["ports"]) or "-"),
            ("ROLLOUT", lambda v: v["rollout"] or "-"),
            ("UNPLACED", lambda v: v["unplaced"] or "-"),
        ],
    )
    return 0


def cmd_ps(stub: services_pb2_grpc.WorkloadsStub, args: argparse.Namespace) -> int:
    listed = stub.ListServices(services_pb2.ListServicesRequest(), timeout=CALL_TIMEOUT).services
    replicas = [
        replica
        for service in stacks.services_of(listed, args.name)
        for replica in stub.ListReplicas(services_pb2.ServiceRef(name=service), timeout=CALL_TIMEOUT).replicas
    ]
    now = time.time()
    views = [
        {
            "replica": replica.replica,
            "service": replica.service,
            "node": replica.node or None,
            "revision": replica.revision,
            "image": replica.image,
            # the last state the node reported, if it is not Ready
            "state": ReplicaState.from_wire(replica.state)
            + (" (node unreachable)" if replica.node_unreachable else ""),
            "health": ReplicaHealth.from_wire(replica.health).value,
            "since": iso_time(replica.since),
            "restarts": replica.restarts,
            "desired": replica.desired,
            "message": replica.message,
        }
        for replica in replicas
    ]
    since = {replica.replica + str(replica.revision): replica.since for replica in replicas}
    emit(
        views,
        args.output,
        [
            ("REPLICA", lambda v: v["replica"]),
            ("NODE", lambda v: v["node"] or "-"),
            ("REVISION", lambda v: str(v["revision"])),
            ("STATE", lambda v: v["state"] + ("" if v["desired"] == "running" else f" ({v['desired']})")),
            ("HEALTH", lambda v: v["health"]),
            ("SINCE", lambda v: ago(since[v["replica"] + str(v["revision"])], now)),
            ("RESTARTS", lambda v: str(v["restarts"])),
            ("MESSAGE", lambda v: v["message"][:60] or "-"),
        ],
    )
    return 0


def scale_words(words: list[str]) -> list[tuple[str, int]]:
    """`scale NAME=COUNT ...` as (name, count) pairs; UsageError for anything else."""
    pairs = []
    for word in words:
        name, equals, count = word.partition("=")
        if not equals or not name or not count.isdigit():
            raise UsageError(f"`coordctl scale {word}`: use `scale SERVICE=COUNT`, e.g. mcp-server=5")
        pairs.append((name, int(count)))
    return pairs


def scale_line(info: services_pb2.ServiceInfo) -> str:
    line = f"service/{info.name} scaled to {info.desired}: {info.running} running, {info.healthy} healthy"
    return line + (f"; cannot place all: {info.unplaced}" if info.unplaced else "")


def cmd_scale(stub: services_pb2_grpc.WorkloadsStub, args: argparse.Namespace) -> int:
    """Each service's new count; 1 when some of them cannot all be placed (the reason says why)."""
    code = 0
    views = []
    for name, count in scale_words(args.pairs):
        info = stub.Scale(services_pb2.ScaleRequest(name=name, replicas=count), timeout=CALL_TIMEOUT)
        code = 1 if info.unplaced else code
        views.append({"service": info.name, "desired": info.desired, "unplaced": info.unplaced})
        if args.output == "table":
            echo(scale_line(info), file=sys.stderr if info.unplaced else sys.stdout)
    if args.output != "table":
        emit(views, args.output, [])
    return code


def removal_line(replica: str, stops: str, away: set[str]) -> str:
    """One replica of `coordctl rm` ("id@node"): on a node that is away, it goes when the node returns."""
    node = replica.rpartition("@")[2]
    if node in away:
        return f"  replica {replica} {stops} when {node} returns ({node} is away); its container goes then"
    return f"  replica {replica} {stops} within its grace; its container goes"


def cmd_rm(stub: services_pb2_grpc.WorkloadsStub, args: argparse.Namespace) -> int:
    """`rm service NAME` / `rm stack NAME`: what goes (or, --dry-run, would go)."""
    reply = stub.Remove(
        services_pb2.RemoveRequest(
            kind=args.kind, name=args.target, dry_run=args.dry_run, volumes=args.volumes
        ),
        timeout=CALL_TIMEOUT,
    )
    view = {
        "services": list(reply.services),
        "replicas": list(reply.replicas),
        "volumes_kept": list(reply.volumes_kept),
        "away": list(reply.away),
        "volumes_removed": list(reply.volumes_removed),
        "dry_run": args.dry_run,
    }
    if args.output != "table":
        emit(view, args.output, [])
        return 0
    verb = "would be removed" if args.dry_run else "removed"
    for service in reply.services:
        echo(f"service/{service} {verb}")
    stops = "would stop" if args.dry_run else "stops"
    for replica in reply.replicas:
        echo(removal_line(replica, stops, set(reply.away)))
    for volume in reply.volumes_kept:
        echo(f"  volume {volume} kept (named volumes are kept unless --volumes)")
    goes = "would be removed" if args.dry_run else "removed"
    for volume in reply.volumes_removed:
        echo(f"  volume {volume} {goes} once no container uses it")
    if not args.dry_run:
        echo("revision history kept; a node that is away removes its containers when it returns")
    return 0


def read_secret_value(args: argparse.Namespace) -> bytes:
    """From --from-file (- for standard input) or --from-literal, bounded in size."""
    if args.from_file is not None:
        source = sys.stdin.buffer if args.from_file == "-" else Path(args.from_file).open("rb")  # noqa: SIM115
        with source:
            value = source.read(limits.SECRET_BYTES + 1)
    else:
        value = args.from_literal.encode()
        echo(
            "coordctl: note: a value given with --from-literal was visible in `ps` while coordctl ran; "
            "--from-file - reads it from standard input instead",
            file=sys.stderr,
        )
    if len(value) > limits.SECRET_BYTES:
        raise UsageError(f"a secret value is at most {limits.SECRET_BYTES} bytes")
    return value


def cmd_secret_create(stub: services_pb2_grpc.WorkloadsStub, args: argparse.Namespace) -> int:
    value = read_secret_value(args)
    info = stub.CreateSecret(
        services_pb2.CreateSecretRequest(name=args.name, key=args.key, value=value), timeout=CALL_TIMEOUT
    )
    echo(f"secret/{info.name} key {info.key} stored ({info.size} bytes)")
    return 0


def cmd_secret_list(stub: services_pb2_grpc.WorkloadsStub, args: argparse.Namespace) -> int:
    reply = stub.ListSecrets(services_pb2.ListSecretsRequest(), timeout=CALL_TIMEOUT)
    views = [
        {
            "name": s.name,
            "key": s.key,
            "size": s.size,
            "updated_at": iso_time(s.updated_at),
            "used_by": list(s.used_by),
        }
        for s in reply.secrets
    ]
    emit(
        views,
        args.output,
        [
            ("NAME", lambda v: v["name"]),
            ("KEY", lambda v: v["key"]),
            ("SIZE", lambda v: str(v["size"])),
            ("UPDATED", lambda v: v["updated_at"] or "-"),
            ("USED BY", lambda v: ",".join(v["used_by"]) or "-"),
        ],
    )
    return 0


def cmd_secret_rm(stub: services_pb2_grpc.WorkloadsStub, args: argparse.Namespace) -> int:
    reply = stub.RemoveSecret(
        services_pb2.RemoveSecretRequest(name=args.name, force=args.force), timeout=CALL_TIMEOUT
    )
    echo(f"secret/{reply.name} removed ({reply.keys} keys)")
    if reply.used_by:
        echo(
            f"coordctl: warning: {', '.join(reply.used_by)} read it: their replicas cannot be built "
            "without it and stop until the secret is created again",
            file=sys.stderr,
        )
    return 0


def log_prefix(replica: str, node: str) -> str:
    """`mcp.2@pi3 | `, as `docker service logs` prefixes a task's lines."""
    return f"{replica}@{node} | "


def log_line(entry: services_pb2.LogEntry, timestamps: bool = False) -> str:
    """One line of a replica's output for the terminal: prefixed, and escaped so that no
    byte the container wrote (an escape sequence, a carriage return) acts on the terminal."""
    text = entry.text.decode("utf-8", errors="replace")
    when = dt.datetime.fromtimestamp(entry.timestamp, dt.UTC).isoformat(timespec="microseconds")
    stamp = f"{when.replace('+00:00', 'Z') if entry.timestamp else '-'} " if timestamps else ""
    return escape_control(f"{log_prefix(entry.replica, entry.node)}{stamp}{text}")


def cmd_logs(stub: services_pb2_grpc.WorkloadsStub, args: argparse.Namespace) -> int:
    request = services_pb2.LogsRequest(
        service=args.name, follow=args.follow, tail=args.tail, since_seconds=args.since or 0.0
    )
    events = stub.Logs(request, timeout=None if args.follow else ROLLOUT_TIMEOUT)
    try:
        for event in events:
            if event.WhichOneof("event") == "line":
                print(log_line(event.line, args.timestamps), flush=args.follow)
            else:
                echo(event.note, file=sys.stderr, flush=True)
    except KeyboardInterrupt:  # -f ends when the operator says so
        events.cancel()
    return 0


def cmd_node_drain(stub: services_pb2_grpc.WorkloadsStub, args: argparse.Namespace) -> int:
    undo = args.node_command == "undrain"
    events = stub.DrainNode(services_pb2.DrainRequest(node=args.name, undo=undo), timeout=ROLLOUT_TIMEOUT)
    code = 0
    for event in events:
        kind = event.WhichOneof("event")
        if kind == "note":
            echo(event.note, flush=True)
        elif kind == "progress" and event.progress.status == RolloutStatus.FAILED.wire:
            echo(f"coordctl: {event.progress.message}", file=sys.stderr)
            code = 1
    return code


def add_commands(commands: Any, with_output: Any) -> None:
    """Register the workload verbs on coordctl's parser (`commands` is its subparsers)."""
    rollout = with_output(
        commands.add_parser(
            "rollout",
            help="roll a service to its latest spec (rollout NAME), or status|history|undo|pause|resume NAME",
        )
    )
    rollout.add_argument(
        "words", nargs="+", metavar="WORD", help="NAME, or one of " + ", ".join(ROLLOUT_VERBS) + " and NAME"
    )
    rollout.add_argument("--image", help="roll out the applied spec with this image instead")
    rollout.add_argument("--to-revision", type=int, default=0, help="undo: the revision to go back to")
    rollout.add_argument("--watch", action="store_true", help="status: follow until the rollout ends")
    rollout.add_argument("--detach", action="store_true", help="start it and return at once")
    rollout.set_defaults(handler=cmd_rollout, api="workloads", check=lambda args: _rollout_words(args.words))

    with_output(commands.add_parser("services", help="list services")).set_defaults(
        handler=cmd_services, api="workloads"
    )
    ps = with_output(
        commands.add_parser(
            "ps", help="replicas of a service, of a stack, or (no NAME) all: node, state, health"
        )
    )
    ps.add_argument("name", nargs="?", help="a service or a stack; every replica without it")
    ps.set_defaults(handler=cmd_ps, api="workloads")

    scale = with_output(
        commands.add_parser("scale", help="change services' replica counts (no new revision): NAME=COUNT ...")
    )
    scale.add_argument("pairs", nargs="+", metavar="NAME=COUNT")
    scale.set_defaults(handler=cmd_scale, api="workloads", check=lambda args: scale_words(args.pairs))

    rm = with_output(
        commands.add_parser("rm", help="remove a service or a stack: rm service NAME | rm stack NAME")
    )
    rm.add_argument("kind", choices=("service", "stack"))
    rm.add_argument("target", metavar="NAME")
    rm.add_argument("--dry-run", action="store_true", help="list what would go; change nothing")
    rm.add_argument(
        "--volumes",
        action="store_true",
        help="also remove the named volumes its replicas mounted, on each node once no container uses them",
    )
    rm.set_defaults(handler=cmd_rm, api="workloads")

    logs = commands.add_parser(
        "logs", help="every replica's output, prefixed with replica and node, in time order"
    )
    logs.add_argument("name", help="the service, or a stack (every service of it)")
    logs.add_argument("-f", "--follow", action="store_true", help="keep printing new output")
    logs.add_argument("--tail", type=_count, default=0, help="only the last N lines of each replica")
    logs.add_argument("--since", type=parse_duration, help="only output newer than this (10m, 2h)")
    logs.add_argument("-t", "--timestamps", action="store_true", help="show each line's time")
    logs.set_defaults(handler=cmd_logs, api="workloads")

    secret = commands.add_parser("secret", help="the secret store").add_subparsers(
        dest="secret_command", required=True
    )
    create = secret.add_parser("create", help="store one key of a secret")
    create.add_argument("name")
    create.add_argument("key")
    source = create.add_mutually_exclusive_group(required=True)
    source.add_argument("--from-literal", metavar="VALUE")
    source.add_argument("--from-file", metavar="FILE", help="a file, or - for standard input")
    create.set_defaults(handler=cmd_secret_create, api="workloads")
    with_output(
        secret.add_parser("list", help="names, keys and the services that use them (never values)")
    ).set_defaults(handler=cmd_secret_list, api="workloads")
    remove = secret.add_parser("rm", help="remove a secret (refused while a service uses it)")
    remove.add_argument("name")
    remove.add_argument("--force", action="store_true", help="remove it even while services use it")
    remove.set_defaults(handler=cmd_secret_rm, api="workloads")


def add_node_commands(node: Any) -> None:
    """`node drain N` and `node undrain N` on coordctl's `node` subparsers."""
    for verb, text in (
        ("drain", "move the node's replicas elsewhere (within the update bounds) and place none there"),
        ("undrain", "let the node take replicas again"),
    ):
        sub = node.add_parser(verb, help=text)
        sub.add_argument("name")
        sub.set_defaults(handler=cmd_node_drain, api="workloads")

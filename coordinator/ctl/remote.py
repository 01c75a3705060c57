"""`coordctl admin issue|list|revoke` and `coordctl context add|use|list`: remote operators."""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from picoord.common.durations import parse_duration
from picoord.common.vocabulary import CertificateState
from picoord.coordinator.ctl.client import CALL_TIMEOUT
from picoord.coordinator.ctl.contexts import (
    MAX_BUNDLE_BYTES,
    BundleError,
    ContextStore,
    bundle_from_issue,
    config_directory,
    expiry_refusal,
    render_bundle,
    validate_context_name,
)
from picoord.coordinator.ctl.output import echo, emit, iso_time
from picoord.v1 import admin_pb2

BUNDLE_ON_TERMINAL = (
    "the bundle holds a private key: redirect it to a file "
    "(umask 077; coordctl admin issue {name} > {name}.bundle), or pass --force to print it here"
)


def context_store() -> ContextStore:
    return ContextStore(config_directory(os.environ))


def admin_view(admin: admin_pb2.AdminCertificate) -> dict[str, Any]:
    return {
        "name": admin.name,
        "serial": admin.serial,
        "issued_at": iso_time(admin.issued_at),
        "not_after": iso_time(admin.not_after),
        "state": CertificateState.from_wire(admin.state).value,
        "revoked_at": iso_time(admin.revoked_at),
        "issued_by": admin.issued_by,
    }


def cmd_admin_issue(stub: Any, args: argparse.Namespace) -> int:
    name = validate_context_name(args.admin_name)
    if sys.stdout.isatty() and not args.force:  # before issuing: no certificate minted for nothing
        raise BundleError(BUNDLE_ON_TERMINAL.format(name=name))
    reply = stub.certificates.IssueAdmin(
        admin_pb2.IssueAdminRequest(name=name, validity_seconds=args.validity), timeout=CALL_TIMEOUT
    )
    sys.stdout.write(render_bundle(bundle_from_issue(reply)))
    sys.stdout.flush()
    echo(
        f"admin/{reply.name} issued (serial {reply.serial}, until {iso_time(reply.not_after)}); on the other "
        f"machine: coordctl context add NAME --bundle {reply.name}.bundle",
        file=sys.stderr,
    )
    return 0


def cmd_admin_list(stub: Any, args: argparse.Namespace) -> int:
    reply = stub.certificates.ListAdmins(admin_pb2.ListAdminsRequest(), timeout=CALL_TIMEOUT)
    emit(
        [admin_view(admin) for admin in reply.admins],
        args.output,
        [
            ("NAME", lambda v: v["name"]),
            ("SERIAL", lambda v: v["serial"]),
            ("ISSUED", lambda v: v["issued_at"]),
            ("EXPIRES", lambda v: v["not_after"]),
            ("STATE", lambda v: v["state"]),
            ("ISSUED BY", lambda v: v["issued_by"] or "-"),
        ],
    )
    return 0


def cmd_admin_revoke(stub: Any, args: argparse.Namespace) -> int:
    name = validate_context_name(args.admin_name)
    reply = stub.certificates.RevokeAdmin(admin_pb2.RevokeAdminRequest(name=name), timeout=CALL_TIMEOUT)
    revoked = ", ".join(reply.revoked_serials) or "none (already revoked)"
    echo(f"admin/{reply.name} revoked; certificates: {revoked}; its next call is refused")
    return 0


def read_bundle_file(path: str) -> bytes:
    source = sys.stdin.buffer if path == "-" else Path(path).open("rb")  # noqa: SIM115
    with source:
        return source.read(MAX_BUNDLE_BYTES + 1)


def cmd_context_add(_stub: None, args: argparse.Namespace) -> int:
    store = context_store()
    source = "standard input" if args.bundle == "-" else args.bundle
    bundle = store.add(args.context_name, read_bundle_file(args.bundle), source, args.force)
    expired = expiry_refusal(bundle, args.context_name, time.time())
    if expired is not None:
        echo(f"warning: {expired}", file=sys.stderr)
    current = store.current()
    note = "" if current else f"; make it current with: coordctl context use {args.context_name}"
    echo(
        f"context/{args.context_name} added: admin {bundle.name} at {bundle.address}, "
        f"until {iso_time(bundle.not_after)} ({store.path(args.context_name)}){note}"
    )
    return 0


def cmd_context_use(_stub: None, args: argparse.Namespace) -> int:
    bundle = context_store().use(args.context_name)
    echo(f"now using context/{args.context_name}: admin {bundle.name} at {bundle.address}")
    return 0


def cmd_context_list(_stub: None, args: argparse.Namespace) -> int:
    store = context_store()
    current = store.current()
    views = []
    for name in store.names():
        try:
            bundle = store.load(name)
        except BundleError as error:
            views.append({"name": name, "current": name == current, "problem": str(error)})
            continue
        views.append(
            {
                "name": name,
                "current": name == current,
                "admin": bundle.name,
                "address": bundle.address,
                "not_after": iso_time(bundle.not_after),
                "ca_cert_hash": bundle.ca_hash,
                "problem": expiry_refusal(bundle, name, time.time()),
            }
        )
    emit(
        views,
        args.output,
        [
            ("CURRENT", lambda v: "*" if v["current"] else ""),
            ("NAME", lambda v: v["name"]),
            ("ADMIN", lambda v: v.get("admin", "-")),
            ("ADDRESS", lambda v: v.get("address", "-")),
            ("EXPIRES", lambda v: v.get("not_after", "-")),
            ("PROBLEM", lambda v: v["problem"] or "-"),
        ],
    )
    return 0


def add_remote_parsers(
    commands: argparse._SubParsersAction,
    with_output: Callable[[argparse.ArgumentParser], argparse.ArgumentParser],
) -> None:
    admin = commands.add_parser("admin", help="remote operators' certificates").add_subparsers(
        dest="admin_command", required=True
    )
    issue = admin.add_parser(
        "issue",
        help="create an admin certificate and print its bundle (on the coordinator's host, as root)",
        description="Creates admin:NAME (key made on the coordinator) and prints one YAML bundle: "
        "certificate, key, CA, address. It always uses the admin socket, never a context. Redirect it "
        "to a file (umask 077; coordctl admin issue NAME > NAME.bundle): it holds a private key.",
    )
    issue.add_argument("admin_name", metavar="NAME")
    issue.add_argument(
        "--validity", type=parse_duration, default=0.0, help="life of the certificate, e.g. 30d (default 90d)"
    )
    issue.add_argument("--force", action="store_true", help="print the bundle even to a terminal")
    issue.set_defaults(handler=cmd_admin_issue, socket_only=True)
    with_output(admin.add_parser("list", help="admin certificates and their state")).set_defaults(
        handler=cmd_admin_list
    )
    revoke = admin.add_parser("revoke", help="lock an admin out at once (its next call is refused)")
    revoke.add_argument("admin_name", metavar="NAME")
    revoke.set_defaults(handler=cmd_admin_revoke)

    context = commands.add_parser(
        "context", help="remote coordinators (admin bundles), under ~/.config/picoord"
    ).add_subparsers(dest="context_command", required=True)
    add = context.add_parser("add", help="store an admin bundle as a context (0600)")
    add.add_argument("context_name", metavar="NAME")
    add.add_argument("--bundle", required=True, help="the file from `coordctl admin issue` (- for stdin)")
    add.add_argument("--force", action="store_true", help="replace an existing context of that name")
    add.set_defaults(handler=cmd_context_add, api="none")
    use = context.add_parser("use", help="make every coordctl verb use this context")
    use.add_argument("context_name", metavar="NAME")
    use.set_defaults(handler=cmd_context_use, api="none")
    with_output(context.add_parser("list", help="stored contexts; * marks the current one")).set_defaults(
        handler=cmd_context_list, api="none"
    )

"""`coordctl certs check-expiration`: the CA, the server certificate, every node's newest
certificate and every admin's newest certificate, with its end and residual time, as
`kubeadm certs check-expiration` shows."""

from __future__ import annotations

import argparse
from collections.abc import Callable
from typing import Any

from picoord.common.durations import format_duration
from picoord.common.vocabulary import CertificateState
from picoord.coordinator.ctl.client import CALL_TIMEOUT
from picoord.coordinator.ctl.output import emit, iso_time
from picoord.v1 import admin_pb2, admin_pb2_grpc

# What `coordctl nodes` adds to a node's STATUS when its certificate keeps it out.
CERTIFICATE_STATUS_SUFFIX = {
    CertificateState.EXPIRED: ",CertExpired",
    CertificateState.REVOKED: ",CertRevoked",
}


def certificate_view(listing: admin_pb2.CertificateExpiration, now: float) -> dict[str, Any]:
    state = CertificateState.from_wire(listing.state)
    return {
        "name": listing.name,
        "kind": listing.kind,
        "serial": listing.serial,
        "not_before": iso_time(listing.not_before),
        "not_after": iso_time(listing.not_after),
        "residual_seconds": max(0, int(listing.not_after - now)) if state is CertificateState.VALID else 0,
        "state": state.value,
        "revoked_at": iso_time(listing.revoked_at),
    }


def residual_text(view: dict[str, Any]) -> str:
    valid = view["state"] == CertificateState.VALID
    return format_duration(view["residual_seconds"]) if valid else view["state"]


CHECK_EXPIRATION_COLUMNS = [
    ("CERTIFICATE", lambda v: v["name"]),
    ("EXPIRES", lambda v: v["not_after"] or "-"),
    ("RESIDUAL TIME", residual_text),
    ("SERIAL", lambda v: v["serial"] or "-"),
]


def newest_admin_listings(admins: list[admin_pb2.AdminCertificate]) -> list[admin_pb2.CertificateExpiration]:
    """Each admin's newest certificate (revoked and expired ones included: they say why an
    admin is locked out), as check-expiration lists node certificates."""
    newest: dict[str, admin_pb2.AdminCertificate] = {}
    for admin in admins:
        if admin.name not in newest or admin.issued_at >= newest[admin.name].issued_at:
            newest[admin.name] = admin
    return [
        admin_pb2.CertificateExpiration(
            name=f"admin/{name}",
            kind="admin",
            serial=admin.serial,
            not_before=admin.issued_at,
            not_after=admin.not_after,
            state=admin.state,
            revoked_at=admin.revoked_at,
        )
        for name, admin in sorted(newest.items())
    ]


def cmd_certs_check_expiration(stub: admin_pb2_grpc.AdminStub, args: argparse.Namespace) -> int:
    reply = stub.CheckCertificateExpiration(
        admin_pb2.CheckCertificateExpirationRequest(), timeout=CALL_TIMEOUT
    )
    listings = list(reply.certificates)
    certificates = getattr(stub, "certificates", None)  # the admin certificates service beside Admin
    if certificates is not None:
        admins = certificates.ListAdmins(admin_pb2.ListAdminsRequest(), timeout=CALL_TIMEOUT)
        listings += newest_admin_listings(list(admins.admins))
    views = [certificate_view(listing, reply.now) for listing in listings]
    emit(views, args.output, CHECK_EXPIRATION_COLUMNS)
    return 0


def add_certs_parser(
    commands: argparse._SubParsersAction,
    with_output: Callable[[argparse.ArgumentParser], argparse.ArgumentParser],
) -> None:
    certs = commands.add_parser("certs", help="cluster certificates").add_subparsers(
        dest="certs_command", required=True
    )
    check = with_output(
        certs.add_parser("check-expiration", help="when the CA, server, node and admin certificates end")
    )
    check.set_defaults(handler=cmd_certs_check_expiration)


def status_with_certificate(view: dict[str, Any]) -> str:
    """Down,CertExpired: the node's status, and why it cannot come back by itself."""
    return view["status"] + CERTIFICATE_STATUS_SUFFIX.get(view.get("certificate_state", ""), "")


def certificate_line(detail: admin_pb2.NodeDetail, view: dict[str, Any]) -> str:
    """`node show`: which certificate, until when, and whether it still lets the node in."""
    if not detail.certificate_serial:
        return "none on record"
    return f"{detail.certificate_serial} until {view['certificate_not_after']} ({view['certificate_state']})"

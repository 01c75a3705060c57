"""Name a wrong clock when TLS fails on a certificate's dates.

A Pi without a real-time clock can be days behind until NTP answers. The TLS library then
says only "certificate is not yet valid" (or "expired"); this module compares the node's
clock with the window of the certificates the coordinator presents and says what to do.
Standard library only: the running agent never loads cryptography (about 10 MiB).
"""

from __future__ import annotations

import datetime as dt
import socket
import ssl

from picoord.common.defaults import COORDINATOR_SERVER_NAME

RETRIES_BY_ITSELF = "picoord-agent retries by itself"
JOIN_AGAIN = "then run this join again"


def minute_utc(timestamp: float) -> str:
    """2026-12-06 19:55 UTC: minutes are what someone compares with a wall clock."""
    return dt.datetime.fromtimestamp(timestamp, dt.UTC).strftime("%Y-%m-%d %H:%M UTC")


def clock_message(now: float, not_before: float, not_after: float, then: str) -> str | None:
    """One line naming the clock when `now` lies outside the certificates' window, else None."""
    if now < not_before:
        seen = f"is valid from {minute_utc(not_before)}"
    elif now >= not_after:
        seen = f"expired at {minute_utc(not_after)}"
    else:
        return None
    return (
        f"this node's clock says {minute_utc(now)}, but the coordinator's certificate {seen}: "
        f"set the time (timedatectl, NTP); {then}"
    )


def presented_certificates(host: str, port: int, timeout: float) -> list:
    """The certificates (`ssl` objects) the server at host:port presents, leaf first,
    trusting none of them: the caller pins them or only reads their dates."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE  # nothing is trusted here
    context.set_alpn_protocols(["h2"])
    with (
        socket.create_connection((host, port), timeout=timeout) as raw,
        context.wrap_socket(raw, server_hostname=COORDINATOR_SERVER_NAME) as tls,
    ):
        # public in Python 3.13, private before
        getter = getattr(tls, "get_unverified_chain", None) or tls._sslobj.get_unverified_chain  # type: ignore[union-attr]
        return list(getter())


def certificate_der(certificate: object) -> bytes:
    return certificate.public_bytes(ssl._ssl.ENCODING_DER)  # type: ignore[attr-defined]


def presented_window(host: str, port: int, timeout: float) -> tuple[float, float] | None:
    """When all the certificates the coordinator presents are valid (latest start, earliest
    end); None when it cannot be reached or shows none."""
    try:
        infos = [certificate.get_info() for certificate in presented_certificates(host, port, timeout)]
        starts = [ssl.cert_time_to_seconds(info["notBefore"]) for info in infos]
        ends = [ssl.cert_time_to_seconds(info["notAfter"]) for info in infos]
    except (OSError, ValueError, KeyError):  # ssl.SSLError is an OSError
        return None
    if not infos:
        return None
    return float(max(starts)), float(min(ends))

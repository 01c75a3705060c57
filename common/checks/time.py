"""Checks of the time actions (chrony serving time, chrony taking it), one per message.

Run by the coordinator's planner on what it builds from a `TimeSource` document and by the
agent before its executor writes anything. The `*_lines` helpers return the normalised
values the executor writes, so what was checked is exactly what lands in chrony's config.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from picoord.common.validation import FieldError, cidr, ip_address
from picoord.v1 import actions_pb2

MAX_NETWORKS = 32  # `allow` lines of one server
MAX_SERVERS = 8  # chrony needs 3-4 to outvote a falseticker; more is noise on a home lab
STRATUM_RANGE = (1, 15)  # NTP's 16 means unsynchronised
DEFAULT_STRATUM = 10  # well below any real upstream, so a real one wins when reachable


def _unique(
    field: str, values: Sequence[str], limit: int, validate: Callable[[str, str], str], empty: str
) -> list[str]:
    """One to `limit` values, each validated and normalised, none twice."""
    if not values:
        raise FieldError(field, empty)
    if len(values) > limit:
        raise FieldError(field, f"has more than {limit} entries")
    normalised = [validate(f"{field}[{i}]", value) for i, value in enumerate(values)]
    if len(set(normalised)) != len(normalised):
        raise FieldError(field, "names one twice")
    return normalised


def networks(field: str, values: Sequence[str]) -> list[str]:
    """CIDRs that may ask for time (chrony serves no one without an `allow`)."""
    return _unique(field, values, MAX_NETWORKS, cidr, "names no network (the server would answer no one)")


def addresses(field: str, values: Sequence[str]) -> list[str]:
    """The servers a client asks, as IP addresses."""
    return _unique(field, values, MAX_SERVERS, ip_address, "names no server")


def stratum(field: str, value: int) -> int:
    low, high = STRATUM_RANGE
    if not low <= value <= high:
        raise FieldError(field, f"{value} is not a stratum ({low}-{high})")
    return value


def allowed_networks(request: actions_pb2.TimeServer) -> list[str]:
    return networks("time_server.allow", request.allow)


def check_time_server(request: actions_pb2.TimeServer) -> None:
    allowed_networks(request)
    stratum("time_server.stratum", request.stratum)


def server_addresses(request: actions_pb2.TimeClient) -> list[str]:
    return addresses("time_client.servers", request.servers)


def check_time_client(request: actions_pb2.TimeClient) -> None:
    server_addresses(request)

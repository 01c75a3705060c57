"""Checks of the time actions (chrony serving time, chrony taking it), one per message.

Run by the coordinator's planner on what it builds from a `TimeSource` document and by the
agent before its executor writes anything. The `*_lines` helpers return the normalised
values the executor writes, so what was checked is exactly what lands in chrony's config.
"""

from __future__ import annotations

from picoord.common.validation import FieldError, cidr, ip_address
from picoord.v1 import actions_pb2

MAX_NETWORKS = 32  # `allow` lines of one server
MAX_SERVERS = 8  # chrony needs 3-4 to outvote a falseticker; more is noise on a home lab
STRATUM_RANGE = (1, 15)  # NTP's 16 means unsynchronised
DEFAULT_STRATUM = 10  # well below any real upstream, so a real one wins when reachable


def allowed_networks(request: actions_pb2.TimeServer) -> list[str]:
    """The CIDRs, normalised; at least one (chrony serves no one without an `allow`)."""
    if not request.allow:
        raise FieldError("time_server.allow", "names no network (the server would answer no one)")
    if len(request.allow) > MAX_NETWORKS:
        raise FieldError("time_server.allow", f"has more than {MAX_NETWORKS} networks")
    networks = [cidr(f"time_server.allow[{i}]", value) for i, value in enumerate(request.allow)]
    if len(set(networks)) != len(networks):
        raise FieldError("time_server.allow", "names a network twice")
    return networks


def check_time_server(request: actions_pb2.TimeServer) -> None:
    allowed_networks(request)
    low, high = STRATUM_RANGE
    if not low <= request.stratum <= high:
        raise FieldError("time_server.stratum", f"{request.stratum} is outside {low}-{high}")


def server_addresses(request: actions_pb2.TimeClient) -> list[str]:
    """The servers' addresses, normalised; one to MAX_SERVERS, none twice."""
    if not request.servers:
        raise FieldError("time_client.servers", "names no server")
    if len(request.servers) > MAX_SERVERS:
        raise FieldError("time_client.servers", f"has more than {MAX_SERVERS} servers")
    addresses = [ip_address(f"time_client.servers[{i}]", value) for i, value in enumerate(request.servers)]
    if len(set(addresses)) != len(addresses):
        raise FieldError("time_client.servers", "names a server twice")
    return addresses


def check_time_client(request: actions_pb2.TimeClient) -> None:
    server_addresses(request)

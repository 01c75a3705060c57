"""HOST:PORT as typed in flags, config files and join commands (IPv6 in brackets)."""

from __future__ import annotations

import ipaddress
import urllib.parse
from collections.abc import Iterable


class InvalidAddress(ValueError):
    pass


def split_host_port(text: str, what: str = "address") -> tuple[str, int]:
    host, sep, port = str(text).rpartition(":")
    host = host.strip("[]")
    if not sep or not host or host.startswith("-") or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise InvalidAddress(f"invalid {what} {text!r}: expected HOST:PORT")
    return host, int(port)


def join_host_port(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def grpc_unix_address(path: object) -> str:
    """gRPC percent-decodes unix: addresses (1.51 and 1.85 alike), so a socket path with a
    space or a % in it must be encoded."""
    return f"unix:{urllib.parse.quote(str(path))}"


def interface_holding(
    address: str, interfaces: Iterable[tuple[str, Iterable[str]]]
) -> tuple[str, int] | None:
    """(interface name, prefix length) of the interface that holds `address`, from (name,
    ["10.0.0.5/24", ...]) pairs as a hardware report or the agent's own view lists them;
    None when none does. The coordinator and the agent both find a node's cluster network so."""
    if not address:
        return None
    for name, addresses in interfaces:
        for text in addresses:
            try:
                found = ipaddress.ip_interface(text)
            except ValueError:
                continue
            if str(found.ip) == address:
                return name, found.network.prefixlen
    return None

"""HOST:PORT as typed in flags, config files and join commands (IPv6 in brackets)."""

from __future__ import annotations

import urllib.parse


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

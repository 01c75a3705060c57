"""HOST:PORT as typed in flags, config files and join commands (IPv6 in brackets)."""

from __future__ import annotations


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

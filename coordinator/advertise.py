"""The address join commands name: one the Pis can reach.

Decided by pure functions over what the start-up probes found; the probes are small and
passed in. Choices (docs/join.md):
- no --advertise-address and listening on all addresses: this host's address on its
  default-route interface (the one the Pis on the LAN reach it by), not its hostname,
  which a freshly flashed Pi cannot resolve; logged at start. Without a default route: the
  hostname, with a warning that says to set the address.
- a given address that is not a host name or IP address: an error (the daemon exits 78).
- a name that does not resolve here, an address not on this host, or a loopback address
  while listening beyond loopback: a warning at start, not an error. A name may resolve on
  the Pis only (their DNS or mDNS), the desktop's resolver may not be up yet at boot, and a
  virtual address (keepalived) or a port forward is legitimately not on this host; a
  loopback address is right for an agent on this same machine. The warning says why the
  Pis may fail to join and how to set it.
"""

from __future__ import annotations

import ipaddress
import re
import socket
from dataclasses import dataclass

# Any address in TEST-NET-1: connecting a UDP socket sends nothing, it only asks the kernel
# which source address its routes would use (that of the default-route interface).
_ROUTE_PROBE_V4 = ("192.0.2.1", 9)
_ROUTE_PROBE_V6 = ("2001:db8::1", 9)
_HOSTNAME = re.compile(
    r"^(?=.{1,253}$)[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?(\.[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?)*\.?$"
)
ALL_ADDRESSES = ("0.0.0.0", "::", "")
HOW_TO_SET = (
    "set advertise_address in /etc/picoord/coordinator.toml (or --advertise-address) "
    "to this host's LAN address"
)


class InvalidAdvertiseAddress(ValueError):
    """The advertise address is neither a host name nor an IP address."""


@dataclass(frozen=True)
class Advertised:
    host: str  # what join commands and admin bundles name
    source: str  # how it was chosen, for the start-up log


def check_advertise_syntax(text: str) -> str:
    """A host name or an IP address (no port, no brackets, no spaces): else an error naming it."""
    value = text.strip()
    try:
        ipaddress.ip_address(value)
        return value
    except ValueError:
        pass
    if not _HOSTNAME.fullmatch(value) or value.replace(".", "").isdigit():
        raise InvalidAdvertiseAddress(
            f"advertise_address {text[:80]!r} is neither a host name nor an IP address "
            "(no port: the listen port is added)"
        )
    return value


def choose_advertised(
    configured: str, listen_host: str, route_address: str | None, hostname: str
) -> Advertised:
    """The host join commands name: the configured one, a specific listen address, else
    the default-route interface's address, else (no route at all) the hostname."""
    if configured:
        return Advertised(check_advertise_syntax(configured), "advertise_address")
    if listen_host not in ALL_ADDRESSES:
        return Advertised(listen_host, "the listen address")
    if route_address:
        return Advertised(route_address, "the address of the default-route interface")
    return Advertised(hostname, "the hostname (no default route)")


def advertise_warnings(
    advertised: Advertised, listen_host: str, resolved: list[str] | None, local: set[str]
) -> list[str]:
    """Why the Pis may not reach `advertised.host` (empty: nothing to say). `resolved` is
    what it resolves to here (None: it does not), `local` which of those are on this host."""
    host = advertised.host
    if advertised.source.startswith("the hostname"):
        return [
            f"no default route: join commands name the hostname {host!r}, "
            f"which the Pis may not resolve; {HOW_TO_SET}"
        ]
    if resolved is None:
        return [
            f"advertise_address {host!r} does not resolve on this host: "
            f"the Pis must resolve it; else {HOW_TO_SET}"
        ]
    loopback = [a for a in resolved if ipaddress.ip_address(a.split("%")[0]).is_loopback]
    if loopback and len(loopback) == len(resolved) and listen_host not in ("127.0.0.1", "::1", "localhost"):
        return [
            f"advertise_address {host!r} is a loopback address while the agent port listens on "
            f"{listen_host or 'all addresses'}: only an agent on this machine can join with it; {HOW_TO_SET}"
        ]
    if not local:
        shown = ", ".join(resolved[:4])
        return [
            f"advertise_address {host!r} ({shown}) is not an address of this host: fine for a "
            f"virtual address or a port forward to it, else {HOW_TO_SET}"
        ]
    return []


# The probes (thin; each bounded by the resolver's or the kernel's own answer time).


def route_address() -> str | None:
    """This host's source address for its default route (IPv4, else IPv6), or None."""
    for family, probe in ((socket.AF_INET, _ROUTE_PROBE_V4), (socket.AF_INET6, _ROUTE_PROBE_V6)):
        try:
            with socket.socket(family, socket.SOCK_DGRAM) as sock:
                sock.connect(probe)
                address = str(sock.getsockname()[0])
        except OSError:
            continue
        if not ipaddress.ip_address(address).is_loopback:
            return address
    return None


def resolve(host: str) -> list[str] | None:
    """The addresses `host` resolves to here, or None."""
    try:
        infos = socket.getaddrinfo(host, None, proto=socket.IPPROTO_TCP)
    except (OSError, UnicodeError):
        return None
    return list(dict.fromkeys(str(info[4][0]) for info in infos)) or None


def local_addresses(addresses: list[str]) -> set[str]:
    """Those of `addresses` this host owns: binding to one succeeds only then."""
    owned = set()
    for address in addresses:
        family = socket.AF_INET6 if ":" in address else socket.AF_INET
        try:
            with socket.socket(family, socket.SOCK_DGRAM) as sock:
                sock.bind((address, 0))
            owned.add(address)
        except OSError:
            continue
    return owned


def advertise(configured: str, listen_host: str) -> tuple[Advertised, list[str]]:
    """The shell: probe, then decide. An invalid configured address raises."""
    chosen = choose_advertised(configured, listen_host, route_address(), socket.gethostname())
    resolved = resolve(chosen.host)
    return chosen, advertise_warnings(chosen, listen_host, resolved, local_addresses(resolved or []))

"""Rate limits in the spirit of fail2ban: failed enrollments per source address, and one
node's session opens and messages (servicers/session.py's SessionLimits); and `duty_pause`,
the brake on work that grows with the cluster (controller ticks, /metrics renders).

The enrollment port takes calls from anyone who can reach it. Without a brake, a client
can try bootstrap tokens as fast as the coordinator answers (1,578 a second on loopback).
After `max_failures` refusals from one source within `window` seconds, that source is
refused for `ban` seconds without its token even being looked at. Pure: the caller passes
the clock, so tests can walk through time.
"""

from __future__ import annotations

import ipaddress
import math
import urllib.parse
from collections import OrderedDict
from dataclasses import dataclass, field

# IPv6 clients are throttled per /64, the smallest block a home or cloud network hands out:
# a host can pick any address inside its /64 at will.
IPV6_SOURCE_PREFIX = 64


@dataclass(frozen=True)
class ThrottlePolicy:
    max_failures: int = 10
    window: float = 60.0
    ban: float = 60.0
    max_sources: int = 4096  # an attacker with many addresses cannot grow the table past this

    def __post_init__(self) -> None:
        if self.max_failures < 1 or self.window <= 0 or self.ban <= 0 or self.max_sources < 1:
            raise ValueError(f"invalid throttle policy {self}")


@dataclass
class _Source:
    failures: list[float] = field(default_factory=list)  # recent failure times, oldest first
    banned_until: float = 0.0


class FailureThrottle:
    """Who may try to enroll now: `retry_after` before the token check, `failed` and
    `succeeded` after it."""

    def __init__(self, policy: ThrottlePolicy | None = None) -> None:
        self.policy = policy or ThrottlePolicy()
        self._sources: OrderedDict[str, _Source] = OrderedDict()

    def __len__(self) -> int:
        return len(self._sources)

    def retry_after(self, source: str, now: float) -> float:
        """Seconds until `source` may try again; 0 when it may try now."""
        record = self._sources.get(source)
        if record is None or record.banned_until <= 0:
            return 0.0
        if now >= record.banned_until:
            del self._sources[source]  # served its time: a clean slate
            return 0.0
        return record.banned_until - now

    def failed(self, source: str, now: float) -> bool:
        """Count a refused enrollment; True when this one put the source in the penalty box."""
        record = self._sources.pop(source, None) or _Source()
        self._sources[source] = record  # most recently seen last: evicted last
        while len(self._sources) > self.policy.max_sources:
            self._sources.popitem(last=False)
        if record.banned_until > now:
            return False
        horizon = now - self.policy.window
        recent = [at for at in record.failures if at > horizon]
        record.failures = [*recent, now][-self.policy.max_failures :]
        if len(record.failures) < self.policy.max_failures:
            return False
        record.failures = []
        record.banned_until = now + self.policy.ban
        return True

    def succeeded(self, source: str) -> None:
        """A good enrollment clears the source's record."""
        self._sources.pop(source, None)


def duty_pause(busy_seconds: float, duty: float) -> float:
    """How long to rest after `busy_seconds` of work so that the work takes at most a `duty`
    share of the time: with 5,000 nodes a controller tick or a render takes tens of ms, and
    back to back they would starve the sessions of the event loop (or of the GIL)."""
    if not 0 < duty <= 1:
        raise ValueError(f"a duty is a share in (0, 1], not {duty}")
    return max(0.0, busy_seconds) * (1 - duty) / duty


def retry_hint(seconds: float) -> str:
    """Whole seconds, rounded up: "retry in 0 s" would invite an immediate retry."""
    return f"retry in {max(1, math.ceil(seconds))} s"


def source_of_peer(peer: str) -> str:
    """The throttling key of a gRPC peer string: the IPv4 address, or the IPv6 /64.

    `ipv4:10.0.0.5:40000` -> `10.0.0.5`; `ipv6:[2001:db8::7]:40000` -> `2001:db8::/64`;
    IPv4-mapped IPv6 counts as IPv4. Anything else (a unix socket) is its own key."""
    scheme, _, rest = urllib.parse.unquote(peer).partition(":")
    host = rest.rpartition(":")[0] if scheme in ("ipv4", "ipv6") else ""
    try:
        address = ipaddress.ip_address(host.strip("[]").split("%")[0])
    except ValueError:
        return peer[:128]
    if isinstance(address, ipaddress.IPv6Address):
        if address.ipv4_mapped is not None:
            return str(address.ipv4_mapped)
        return str(ipaddress.IPv6Network((address, IPV6_SOURCE_PREFIX), strict=False))
    return str(address)

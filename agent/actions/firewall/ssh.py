"""Keep the operator's SSH reachable: the sources of live SSH sessions stay allowed.

A default-deny policy written for the wrong network (the seed's 192.168.10.0/24 on a flat
home LAN) would otherwise cut SSH to every node it is applied to, and the coordinator's
own connection, which the guard keeps, is no way in for a person. So, unless the document
says `keep_ssh: false`, every address with an established TCP connection to the local
sshd port when the policy is applied gets an allow rule for that port, placed with the
coordinator's rules ahead of the policy's. Only addresses the policy would not already
let in get one, so a policy that allows SSH itself adds nothing and stays idempotent.

Sessions are read from the kernel (/proc/net/tcp and tcp6 of the agent's network
namespace: the table `ss` prints), not from sshd or utmp, so a session of any SSH server
counts, and a NAT'd or jump-host source is the address the node really sees.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable, Sequence
from pathlib import Path

from picoord.agent.actions.base import ActionFailed, read_file
from picoord.common.checks.firewall import PolicySpec, Rule, verdict_for

PROC_NET_TCP = {4: "/proc/net/tcp", 6: "/proc/net/tcp6"}
ESTABLISHED = "01"  # the kernel's TCP_ESTABLISHED, as /proc/net/tcp writes st
KEEP_SSH_COMMENT = "picoord ssh session"
FACT_KEPT_OPEN = "firewall.ssh_kept_open"  # the sources kept, space-separated CIDRs


def _address(hexed: str, family: int) -> str:
    """/proc/net/tcp's address: 32-bit words in host byte order (little endian here),
    an IPv4-mapped IPv6 address written as the IPv4 one."""
    raw = bytes.fromhex(hexed)
    words = b"".join(raw[i : i + 4][::-1] for i in range(0, len(raw), 4))
    address = ipaddress.ip_address(words) if family == 6 else ipaddress.IPv4Address(words)
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped:
        return str(address.ipv4_mapped)
    return str(address)


def session_sources(text: str, family: int, local_port: int) -> list[str]:
    """The remote addresses of the established connections to `local_port` in one
    /proc/net/tcp(6) table (header line skipped; malformed lines ignored)."""
    sources = []
    for line in text.splitlines()[1:]:
        words = line.split()
        if len(words) < 4 or words[3] != ESTABLISHED:
            continue
        try:
            _, local_hex_port = words[1].split(":")
            remote_hex, _ = words[2].split(":")
            if int(local_hex_port, 16) != local_port:
                continue
            sources.append(_address(remote_hex, family))
        except ValueError:
            continue
    return sources


def live_sources(local_port: int) -> list[str]:
    """Who has an SSH session to this node from elsewhere now, as the kernel sees it
    (deduplicated; loopback left out)."""
    found: list[str] = []
    for family, path in PROC_NET_TCP.items():
        text = read_file(Path(path))
        if text is None and family == 4:
            raise ActionFailed(f"{path} is missing: cannot see this node's SSH sessions")
        found += session_sources(text or "", family, local_port)
    return [source for source in dict.fromkeys(found) if not ipaddress.ip_address(source).is_loopback]


def keep_ssh_rules(spec: PolicySpec, sources: Iterable[str]) -> tuple[Rule, ...]:
    """An allow rule on the SSH port for each session source the policy would not let in
    anew (none when the document says `keep_ssh: false`; none for loopback, which both
    backends always accept)."""
    if not spec.keep_ssh:
        return ()
    rules = []
    for source in dict.fromkeys(sources):
        if ipaddress.ip_address(source).is_loopback:
            continue  # a session from the node itself: loopback is never filtered
        verdict, _ = verdict_for(spec.rules, spec.default_incoming, source, spec.ssh_port, "tcp")
        if verdict != "allow":
            network = str(ipaddress.ip_network(source))
            rules.append(Rule("allow", network, spec.ssh_port, spec.ssh_port, "tcp", KEEP_SSH_COMMENT))
    return tuple(rules)


def describe(rules: Sequence[Rule], spec: PolicySpec, sessions: int) -> str:
    """The line a dry run and the result show about SSH (`sessions`: how many sources)."""
    if not spec.keep_ssh:
        return "keep_ssh: false: live SSH sessions get no rule of their own"
    if not sessions:
        return f"no live SSH session to {spec.ssh_port}/tcp to keep open"
    if not rules:
        return f"the policy itself lets every live SSH session's source in on {spec.ssh_port}/tcp"
    sources = ", ".join(ipaddress.ip_network(rule.source).network_address.compressed for rule in rules)
    return (
        f"keeping {spec.ssh_port}/tcp open for the source of each live SSH session: {sources} "
        "(say keep_ssh: false in the policy not to)"
    )

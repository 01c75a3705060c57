"""FirewallPolicy: validation at both ends, and the plain-data form the executors work on.

`check_firewall(policy)` raises FieldError naming the field ("rules[2].from_cidr: ...");
`policy_spec(policy)` validates and returns the policy as plain, normalised data (the
backends' planners never see protobuf messages).

Choices worth knowing:
- CIDRs are strict: "10.0.0.1/24" is rejected (host bits set), because it is ambiguous
  (the host 10.0.0.1, or the network 10.0.0.0/24?) and a firewall should not guess. A
  bare address means that one host (/32 or /128).
- In the message, port 0 means "any port" (proto3 cannot tell unset from 0), so a rule
  with port_from 0 and port_to 0 matches every port. A range that starts at 0
  (port_from 0, port_to N) is rejected; YAML front ends must reject `port: 0` themselves.
- With ufw, a port range needs tcp or udp (ufw refuses "2379:2380" without a protocol);
  nftables takes it for both (`meta l4proto { tcp, udp } th dport 2379-2380`).
- A comment is free text for people, but it ends up inside an nft ruleset file between
  double quotes, so it is limited to letters, digits, single spaces and `_ . , : / + = @ -`.
- Two rules matching the same traffic are rejected: the second could never apply.
- Protocol vrrp (IP protocol 112, what keepalived's virtual addresses speak) takes no port.
- `ssh_port` 0 means 22; `no_keep_ssh` is the document's `keep_ssh: false` (see ssh.py).
"""

from __future__ import annotations

import ipaddress
import math
import re
from collections.abc import Sequence
from dataclasses import dataclass

from picoord.common import limits
from picoord.common.validation import FieldError, cidr, hostname, port, port_range
from picoord.v1 import actions_pb2

MAX_RULES = limits.FIREWALL_RULES
MAX_COMMENT = limits.FIREWALL_COMMENT
DEFAULT_CONFIRM_SECONDS = 10.0
MAX_CONFIRM_SECONDS = 300.0
_COMMENT = re.compile(r"[A-Za-z0-9_.,:/+=@-]+( [A-Za-z0-9_.,:/+=@-]+)*")

BACKENDS = {
    actions_pb2.FIREWALL_BACKEND_UNSPECIFIED: "ufw",
    actions_pb2.FIREWALL_BACKEND_UFW: "ufw",
    actions_pb2.FIREWALL_BACKEND_NFTABLES: "nftables",
}
DEFAULTS = {
    actions_pb2.FIREWALL_VERDICT_UNSPECIFIED: "deny",
    actions_pb2.FIREWALL_VERDICT_ALLOW: "allow",
    actions_pb2.FIREWALL_VERDICT_DENY: "deny",
}
VERDICTS = {actions_pb2.FIREWALL_VERDICT_ALLOW: "allow", actions_pb2.FIREWALL_VERDICT_DENY: "deny"}
PROTOCOLS = {
    actions_pb2.PROTOCOL_ANY: "any",
    actions_pb2.PROTOCOL_TCP: "tcp",
    actions_pb2.PROTOCOL_UDP: "udp",
    actions_pb2.PROTOCOL_VRRP: "vrrp",
}
PORTLESS = ("vrrp",)  # protocols without ports (ufw's "portless_protocols")
DEFAULT_SSH_PORT = 22


@dataclass(frozen=True)
class Rule:
    """One firewall rule as plain data. `source`/`destination` are normalised CIDRs or ""
    (anywhere); ports are 0 for any, port_to == port_from for a single port. Rules from a
    policy are incoming and have no source_port; the executor adds the rules that keep
    the coordinator reachable: its replies on the agent's established connection
    (`established`: conntrack state established/related, never a bare source port, which
    anyone could send from), and the agent's new connections to it (an outgoing rule)."""

    verdict: str  # "allow" | "deny"
    source: str = ""
    port_from: int = 0
    port_to: int = 0
    protocol: str = "any"  # "any" | "tcp" | "udp" | "vrrp"
    comment: str = ""
    source_port: int = 0
    direction: str = "in"  # "in" | "out"
    destination: str = ""
    established: bool = False  # only packets of a connection conntrack already tracks

    @property
    def family(self) -> int | None:
        """4 or 6 when an address ties the rule to one IP version, None for both."""
        address = self.source or self.destination
        return ipaddress.ip_network(address).version if address else None

    @property
    def ports(self) -> str:
        """ "", "6443" or "2379:2380" (ufw's notation)."""
        if not self.port_from:
            return ""
        return str(self.port_from) if self.port_to == self.port_from else f"{self.port_from}:{self.port_to}"

    def match_key(self) -> tuple[object, ...]:
        """What traffic the rule matches (everything but verdict and comment)."""
        return (
            self.source,
            self.port_from,
            self.port_to,
            self.protocol,
            self.source_port,
            self.direction,
            self.destination,
            self.established,
        )


@dataclass(frozen=True)
class PolicySpec:
    backend: str  # "ufw" | "nftables"
    default_incoming: str  # "allow" | "deny"
    rules: tuple[Rule, ...]
    coordinator_address: str  # as given in the policy ("" when the coordinator did not fill it)
    coordinator_port: int
    confirm_within: float  # seconds; DEFAULT_CONFIRM_SECONDS when the policy says 0
    keep_ssh: bool = True  # keep the sources of live SSH sessions allowed (ssh.py)
    ssh_port: int = DEFAULT_SSH_PORT


def comment(field: str, value: str) -> str:
    """Free text for people, safe inside an nft double-quoted string and a ufw comment."""
    if len(value) > MAX_COMMENT:
        raise FieldError(field, f"longer than {MAX_COMMENT} characters")
    if not _COMMENT.fullmatch(value):
        bad = sorted({c for c in value if not re.fullmatch(r"[A-Za-z0-9_.,:/+=@ -]", c)})
        why = f"contains {''.join(bad)!r}" if bad else "has leading, trailing or doubled spaces"
        raise FieldError(field, f"{value!r} {why}; use letters, digits, single spaces and _ . , : / + = @ -")
    return value


def _rule(index: int, rule: actions_pb2.FirewallRule, backend: str) -> Rule:
    at = f"rules[{index}]"
    if rule.verdict not in VERDICTS:
        raise FieldError(f"{at}.verdict", "must be allow or deny")
    if rule.protocol not in PROTOCOLS:
        raise FieldError(f"{at}.protocol", f"unknown protocol {rule.protocol} (use any, tcp or udp)")
    protocol = PROTOCOLS[rule.protocol]
    if protocol in PORTLESS and (rule.port_from or rule.port_to):
        raise FieldError(f"{at}.port_from", f"{protocol} has no ports; leave port_from and port_to 0")
    source = cidr(f"{at}.from_cidr", rule.from_cidr) if rule.from_cidr else ""
    if rule.port_from == 0 and rule.port_to == 0:
        low = high = 0
    elif rule.port_from == 0:
        raise FieldError(
            f"{at}.port_from", f"port 0 is not a port (range 0:{rule.port_to}); leave both 0 for any port"
        )
    elif rule.port_to in (0, rule.port_from):
        low = high = port(f"{at}.port_from", rule.port_from)
    else:
        port(f"{at}.port_from", rule.port_from)
        low, high = port_range(f"{at}.port_to", rule.port_from, rule.port_to)
        if backend == "ufw" and protocol == "any":
            raise FieldError(
                f"{at}.protocol",
                f"a port range ({low}:{high}) needs tcp or udp with ufw, which refuses it otherwise",
            )
    text = comment(f"{at}.comment", rule.comment) if rule.comment else ""
    return Rule(VERDICTS[rule.verdict], source, low, high, protocol, text)


def policy_spec(policy: actions_pb2.FirewallPolicy) -> PolicySpec:
    """Validate the whole policy (FieldError naming the first bad field) and return it as data."""
    if policy.backend not in BACKENDS:
        raise FieldError("backend", f"unknown firewall backend {policy.backend} (use ufw or nftables)")
    backend = BACKENDS[policy.backend]
    if policy.default_incoming not in DEFAULTS:
        raise FieldError("default_incoming", f"unknown verdict {policy.default_incoming} (use allow or deny)")
    if len(policy.rules) > MAX_RULES:
        raise FieldError("rules", f"{len(policy.rules)} rules; at most {MAX_RULES}")
    rules: list[Rule] = []
    seen: dict[tuple[object, ...], int] = {}
    for index, message in enumerate(policy.rules):
        rule = _rule(index, message, backend)
        earlier = seen.setdefault(rule.match_key(), index)
        if earlier != index:
            raise FieldError(
                f"rules[{index}]", f"matches the same traffic as rules[{earlier}], so it could never apply"
            )
        rules.append(rule)
    address = ""
    if policy.coordinator_address:
        address = hostname("coordinator_address", policy.coordinator_address)
        port("coordinator_port", policy.coordinator_port)
    elif policy.coordinator_port:
        raise FieldError("coordinator_address", "empty, but coordinator_port is set")
    seconds = policy.confirm_within_seconds
    if not math.isfinite(seconds) or not 0 <= seconds <= MAX_CONFIRM_SECONDS:
        raise FieldError("confirm_within_seconds", f"{seconds} is not between 0 and {MAX_CONFIRM_SECONDS:g}")
    return PolicySpec(
        backend=backend,
        default_incoming=DEFAULTS[policy.default_incoming],
        rules=tuple(rules),
        coordinator_address=address,
        coordinator_port=policy.coordinator_port if address else 0,
        confirm_within=seconds or DEFAULT_CONFIRM_SECONDS,
        keep_ssh=not policy.no_keep_ssh,
        ssh_port=port("ssh_port", policy.ssh_port) if policy.ssh_port else DEFAULT_SSH_PORT,
    )


def check_firewall(policy: actions_pb2.FirewallPolicy) -> None:
    """Raise FieldError naming the first invalid field; return None when the policy is valid."""
    policy_spec(policy)


def rule_matches(rule: Rule, source: str, port_number: int, protocol: str) -> bool:
    """Whether an incoming rule matches a new connection (or datagram) from the address
    `source` to local port `port_number` (0 for portless protocols) over `protocol`
    ("tcp", "udp" or "vrrp"), as ufw and the nftables table evaluate it: "any" with a port
    means tcp or udp, "any" without one every protocol."""
    if rule.direction != "in" or rule.established or rule.source_port or rule.destination:
        return False
    if rule.source and ipaddress.ip_address(source) not in ipaddress.ip_network(rule.source):
        return False
    if rule.port_from and not (protocol in ("tcp", "udp") and rule.port_from <= port_number <= rule.port_to):
        return False
    return rule.protocol in (protocol, "any")


def verdict_for(
    rules: Sequence[Rule], default_incoming: str, source: str, port_number: int, protocol: str
) -> tuple[str, int | None]:
    """What a policy does with a new connection: (verdict, index of the first rule that
    matches it, or None when the default decides). Rules are evaluated in order, first
    match wins, as in ufw's user chain and the nftables table."""
    for index, rule in enumerate(rules):
        if rule_matches(rule, source, port_number, protocol):
            return rule.verdict, index
    return default_incoming, None

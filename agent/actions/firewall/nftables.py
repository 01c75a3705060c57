"""The nftables backend: the whole policy as one table, `inet picoord`, loaded atomically.

The ruleset file deletes and re-creates the table in the same `nft -f` run, which the
kernel applies as one transaction: either the new table is in place, or (on any error)
the old one still is. Other tables (Docker's, ufw's iptables-nft ones) are left alone;
a packet must pass every table's input hook, so this table is the policy's own gate.

State is read with `nft -j list table inet picoord` and parsed into plain data (the
chain's hook and policy, each rule's match expressions and comment); the desired state is
rendered into the same form, so a policy already in place runs nothing. The snapshot for
the guard is the table's text listing (`nft list table inet picoord`), or its absence,
and is restored the same atomic way.

The chain, in order: the coordinator's replies (always first, and only on a connection
conntrack tracks: `ip saddr C tcp sport P ct state established,related`, so a new
connection merely sent from the coordinator's port meets the policy), established/related
traffic, invalid packets dropped, loopback, ICMP and ICMPv6 (IPv6 needs neighbour
discovery; ufw allows these too), then the policy's rules; its policy is the default.
"""

from __future__ import annotations

import contextlib
import hashlib
import ipaddress
import json
import os
import re
import socket
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from picoord.agent.actions.base import ActionContext, ActionFailed, Outcome
from picoord.agent.actions.firewall import guard
from picoord.common.checks.firewall import PolicySpec, Rule
from picoord.common.files import write_atomically
from picoord.v1 import actions_pb2

FAMILY, TABLE, CHAIN = "inet", "picoord", "input"
STAGE_DIR = "/run/picoord/firewall"
READ_TIMEOUT = 15.0
LOAD_TIMEOUT = 30.0
TABLE_COMMENT = "managed by picoord: edits here are replaced by the next policy"
VERDICT = {"allow": "accept", "deny": "drop"}

_ESTABLISHED: dict[str, Any] = {
    "match": {"op": "in", "left": {"ct": {"key": "state"}}, "right": ["established", "related"]}
}

# The rules every picoord table has after the coordinator's: (text, expressions).
_BASE_RULES: tuple[tuple[str, list[dict[str, Any]]], ...] = (
    (
        "ct state established,related accept",
        [
            {"match": {"op": "in", "left": {"ct": {"key": "state"}}, "right": ["established", "related"]}},
            {"accept": None},
        ],
    ),
    (
        "ct state invalid drop",
        [{"match": {"op": "in", "left": {"ct": {"key": "state"}}, "right": "invalid"}}, {"drop": None}],
    ),
    (
        'iif "lo" accept',
        [{"match": {"op": "==", "left": {"meta": {"key": "iif"}}, "right": "lo"}}, {"accept": None}],
    ),
    (
        "meta l4proto icmp accept",
        [{"match": {"op": "==", "left": {"meta": {"key": "l4proto"}}, "right": "icmp"}}, {"accept": None}],
    ),
    (
        "meta l4proto ipv6-icmp accept",
        [
            {"match": {"op": "==", "left": {"meta": {"key": "l4proto"}}, "right": "ipv6-icmp"}},
            {"accept": None},
        ],
    ),
)


@dataclass(frozen=True)
class NftTable:
    """The picoord table as plain data: its chains (name, type, hook, priority, policy)
    and rules (chain, canonical JSON of the match expressions, comment), in order."""

    chains: tuple[tuple[str, str, str, int, str], ...]
    rules: tuple[tuple[str, str, str], ...]
    other: tuple[str, ...] = ()  # sets, maps, ... anything a picoord table never has


# ---------------------------------------------------------------- rendering (pure)


def _canonical(exprs: list[dict[str, Any]]) -> str:
    return json.dumps(exprs, sort_keys=True, separators=(",", ":"))


def _address(network: str) -> tuple[str, Any]:
    """nft's text and JSON for a source network: a single host is written bare."""
    net = ipaddress.ip_network(network)
    if net.prefixlen == net.max_prefixlen:
        return str(net.network_address), str(net.network_address)
    return str(net), {"prefix": {"addr": str(net.network_address), "len": net.prefixlen}}


def _match(left: dict[str, Any], right: Any) -> dict[str, Any]:
    return {"match": {"op": "==", "left": left, "right": right}}


def _payload(protocol: str, name: str) -> dict[str, Any]:
    return {"payload": {"protocol": protocol, "field": name}}


def rule_text_and_exprs(rule: Rule) -> tuple[str, list[dict[str, Any]]]:
    """One incoming rule as nft text (as `nft list` prints it) and as `nft -j` expressions."""
    words: list[str] = []
    exprs: list[dict[str, Any]] = []
    if rule.source:
        text, value = _address(rule.source)
        ip = "ip" if ipaddress.ip_network(rule.source).version == 4 else "ip6"
        words.append(f"{ip} saddr {text}")
        exprs.append(_match(_payload(ip, "saddr"), value))
    if rule.port_from:
        ports_text = (
            str(rule.port_from) if rule.port_to == rule.port_from else f"{rule.port_from}-{rule.port_to}"
        )
        ports_json: Any = (
            rule.port_from if rule.port_to == rule.port_from else {"range": [rule.port_from, rule.port_to]}
        )
        if rule.protocol == "any":
            words.append(f"meta l4proto {{ tcp, udp }} th dport {ports_text}")
            exprs.append(_match({"meta": {"key": "l4proto"}}, {"set": ["tcp", "udp"]}))
            exprs.append(_match(_payload("th", "dport"), ports_json))
        else:
            words.append(f"{rule.protocol} dport {ports_text}")
            exprs.append(_match(_payload(rule.protocol, "dport"), ports_json))
    elif rule.source_port:
        words.append(f"{rule.protocol} sport {rule.source_port}")
        exprs.append(_match(_payload(rule.protocol, "sport"), rule.source_port))
    elif rule.protocol != "any":
        words.append(f"meta l4proto {rule.protocol}")
        exprs.append(_match({"meta": {"key": "l4proto"}}, rule.protocol))
    if rule.established:
        words.append("ct state established,related")
        exprs.append(_ESTABLISHED)
    words.append(VERDICT[rule.verdict])
    exprs.append({VERDICT[rule.verdict]: None})
    if rule.comment:
        words.append(f'comment "{rule.comment}"')
    return " ".join(words), exprs


def incoming(rules: Sequence[Rule]) -> list[Rule]:
    """This table filters incoming traffic only (the outgoing keep-open rules are ufw's)."""
    return [rule for rule in rules if rule.direction == "in"]


def render_table(default_incoming: str, keep_open: Sequence[Rule], rules: Sequence[Rule]) -> str:
    """The table as `nft list table inet picoord` prints it."""
    lines = [f"table {FAMILY} {TABLE} {{", f'\tcomment "{TABLE_COMMENT}"', f"\tchain {CHAIN} {{"]
    lines.append(f"\t\ttype filter hook input priority filter; policy {VERDICT[default_incoming]};")
    for rule in incoming(keep_open):
        lines.append("\t\t" + rule_text_and_exprs(rule)[0])
    lines += ["\t\t" + text for text, _ in _BASE_RULES]
    for rule in incoming(rules):
        lines.append("\t\t" + rule_text_and_exprs(rule)[0])
    lines += ["\t}", "}"]
    return "\n".join(lines) + "\n"


def load_file(table_text: str | None) -> str:
    """An `nft -f` file that replaces the table with `table_text` (or removes it, for None)
    in one transaction: `add` makes the `delete` safe when the table does not exist yet."""
    head = f"add table {FAMILY} {TABLE}\ndelete table {FAMILY} {TABLE}\n"
    return head + (table_text or "")


def desired_table(default_incoming: str, keep_open: Sequence[Rule], rules: Sequence[Rule]) -> NftTable:
    listed = [*incoming(keep_open)]
    ordered: list[tuple[str, str, str]] = [
        (CHAIN, _canonical(rule_text_and_exprs(rule)[1]), rule.comment) for rule in listed
    ]
    ordered += [(CHAIN, _canonical(exprs), "") for _, exprs in _BASE_RULES]
    ordered += [(CHAIN, _canonical(rule_text_and_exprs(rule)[1]), rule.comment) for rule in incoming(rules)]
    return NftTable(((CHAIN, "filter", "input", 0, VERDICT[default_incoming]),), tuple(ordered))


# ---------------------------------------------------------------- parsing (pure)


def parse_listing(text: str) -> NftTable:
    """`nft -j list table inet picoord` as plain data (handles and metainfo dropped)."""
    try:
        objects = json.loads(text)["nftables"]
    except (ValueError, KeyError, TypeError) as error:
        raise ActionFailed(f"cannot parse `nft -j list table` output: {error}") from None
    chains, rules, other = [], [], []
    for item in objects:
        (kind, body), *_ = item.items()
        if kind in ("metainfo", "table"):
            continue
        if kind == "chain":
            chains.append(
                (
                    body.get("name", ""),
                    body.get("type", ""),
                    body.get("hook", ""),
                    body.get("prio", 0),
                    body.get("policy", ""),
                )
            )
        elif kind == "rule":
            rules.append((body.get("chain", ""), _canonical(body.get("expr", [])), body.get("comment", "")))
        else:
            other.append(f"{kind} {body.get('name', '')}")
    return NftTable(tuple(chains), tuple(rules), tuple(other))


def describe(table: NftTable | None) -> str:
    if table is None:
        return "no nftables table inet picoord"
    policies = ", ".join(f"chain {c[0]} policy {c[4]}" for c in table.chains)
    return f"nftables table inet picoord: {policies}, {len(table.rules)} rules"


# ---------------------------------------------------------------- the imperative shell


def _absent(stderr: str) -> bool:
    return "No such file or directory" in stderr


def read_table(context: ActionContext) -> NftTable | None:
    done = context.read(["nft", "-j", "list", "table", FAMILY, TABLE], READ_TIMEOUT)
    if done.exit_code != 0:
        if _absent(done.stderr):
            return None
        raise ActionFailed(
            f"nft -j list table {FAMILY} {TABLE} failed: {(done.stderr or done.stdout).strip()[-300:]}"
        )
    return parse_listing(done.stdout)


def read_snapshot(context: ActionContext) -> str | None:
    """The table as text nft can load back, or None when there is none."""
    done = context.read(["nft", "list", "table", FAMILY, TABLE], READ_TIMEOUT)
    if done.exit_code != 0:
        if _absent(done.stderr):
            return None
        raise ActionFailed(
            f"nft list table {FAMILY} {TABLE} failed: {(done.stderr or done.stdout).strip()[-300:]}"
        )
    return done.stdout


def stage_path(content: str, host: str | None = None) -> str:
    """Named by this host and the content: the same ruleset has the same path in a dry run
    and a real one, and hosts sharing /run (lab Pis: same /run, own host names) never
    touch each other's file."""
    name = re.sub(r"[^A-Za-z0-9_.-]", "_", host if host is not None else socket.gethostname())[:64]
    digest = hashlib.sha256(content.encode()).hexdigest()[:16]
    return os.path.join(STAGE_DIR, f"picoord-{name}-{digest}.nft")


def _write_stage(content: str) -> str:
    path = stage_path(content)
    os.makedirs(STAGE_DIR, mode=0o700, exist_ok=True)
    write_atomically(Path(path), content.encode(), 0o600)
    return path


def load_argv(content: str) -> list[str]:
    return ["nft", "-f", stage_path(content)]


def load(context: ActionContext, content: str) -> None:
    if context.dry_run:
        context.change(load_argv(content), LOAD_TIMEOUT)
        return
    path = _write_stage(content)
    try:
        context.change(load_argv(content), LOAD_TIMEOUT)
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)


def restore_snapshot(context: ActionContext, snapshot: Mapping[str, Any]) -> None:
    """Put back what `read_snapshot` saw: {"table": text, or None for no table}."""
    table = snapshot.get("table")
    if table is not None and not isinstance(table, str):
        raise ActionFailed("the nftables snapshot is not a table listing")
    load(context, load_file(table))


def apply(
    spec: PolicySpec, keep_open: Sequence[Rule], endpoints: Sequence[guard.Endpoint], context: ActionContext
) -> Outcome:
    """Make `table inet picoord` hold exactly the keep-open rules + the policy, guarded."""
    current = read_table(context)
    wanted = desired_table(spec.default_incoming, keep_open, spec.rules)
    in_place = describe(current)
    what = f"nftables policy (default {spec.default_incoming} incoming, {len(spec.rules)} rules)"
    if current == wanted:
        return Outcome.done(context, f"the {what} is already in place", in_place)
    content = load_file(render_table(spec.default_incoming, keep_open, spec.rules))
    if context.dry_run:
        load(context, content)
        outcome = Outcome.done(context, f"would apply the {what}, keeping the coordinator open", in_place)
        outcome.facts.append(actions_pb2.Fact(key=f"file {stage_path(content)}", value=content))
        return outcome
    snapshot = {"table": read_snapshot(context)}
    outcome = guard.confirm_or_revert(
        context,
        apply=lambda ctx: load(ctx, content),
        restore=lambda ctx: restore_snapshot(ctx, snapshot),
        endpoints=endpoints,
        window=spec.confirm_within,
        what=what,
        backend="nftables",
        snapshot=snapshot,
    )
    outcome.in_place = in_place
    return outcome

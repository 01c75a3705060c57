"""Keeping the operator's SSH open: live sessions read from the kernel's TCP tables, the
rules a policy gets for them, and the first-match evaluation they (and the cluster-port
check) rest on. The /proc/net/tcp(6) texts are what this machine's kernel wrote for a
listener on 22 (and on 2222 over IPv6) with connections to it (trailing columns cut)."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from picoord.agent.actions.base import ActionContext
from picoord.agent.actions.firewall import firewall, ssh, ufw
from picoord.common.checks.firewall import PolicySpec, Rule, policy_spec, rule_matches, verdict_for
from picoord.common.validation import FieldError
from picoord.v1 import actions_pb2 as pb
from picoord.v1 import agent_pb2

ALLOW, VRRP = pb.FIREWALL_VERDICT_ALLOW, pb.PROTOCOL_VRRP
PROC_TCP = """\
  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode
   0: 00000000:0016 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0
   1: 0100007F:0016 0708090A:CBC9 01 00000000:00000000 00:00000000 00000000     0        0
   2: 0100007F:EB30 0100007F:08AE 01 00000000:00000000 00:00000000 00000000     0        0
   3: 0708090A:CBC9 0100007F:0016 01 00000000:00000000 00:00000000 00000000     0        0
   4: 0100007F:0016 0808090A:CBCA 06 00000000:00000000 00:00000000 00000000     0        0
   5: garbage
"""
PROC_TCP6 = """\
  sl  local_address                         remote_address                        st tx_queue rx_queue
   0: 00000000000000000000000000000000:08AE 00000000000000000000000000000000:0000 0A 00000000:00000000
   1: 00000000000000000000000001000000:08AE 00000000000000000000000001000000:91FC 01 00000000:00000000
   2: 0000000000000000FFFF00000100007F:08AE 0000000000000000FFFF00000100007F:EB30 01 00000000:00000000
   3: B80D0120000000000000000001000000:08AE B80D0120000000000000000005000000:91FD 01 00000000:00000000
"""


@pytest.mark.parametrize(
    ("text", "family", "port", "sources"),
    [
        # the listener (0A) and the session's own client end (local port CBC9) are no sessions;
        # TIME_WAIT (06) is over
        (PROC_TCP, 4, 22, ["10.9.8.7"]),
        (PROC_TCP, 4, 2222, []),  # line 2 is the client end of a connection to 2222
        (PROC_TCP, 4, 2022, []),
        # IPv6: ::1, an IPv4-mapped client written as IPv4, and 2001:db8::5
        (PROC_TCP6, 6, 2222, ["::1", "127.0.0.1", "2001:db8::5"]),
        ("", 4, 22, []),
    ],
)
def test_session_sources_are_the_remote_ends_of_established_connections_to_the_port(
    text: str, family: int, port: int, sources: list[str]
) -> None:
    assert ssh.session_sources(text, family, port) == sources


def spec(*rules: Rule, default: str = "deny", keep: bool = True, port: int = 22) -> PolicySpec:
    return PolicySpec("ufw", default, tuple(rules), "", 0, 10.0, keep_ssh=keep, ssh_port=port)


def kept(source: str, port: int = 22) -> Rule:
    return Rule("allow", source, port, port, "tcp", ssh.KEEP_SSH_COMMENT)


@pytest.mark.parametrize(
    ("policy", "sources", "rules"),
    [
        # the seed's policy on a flat 192.168.1.0/24 home LAN: the operator's laptop is kept
        (
            spec(Rule("allow", "192.168.10.0/24"), Rule("allow", "192.168.20.0/24")),
            ["192.168.1.20"],
            (kept("192.168.1.20/32"),),
        ),
        # a policy that lets the source in on 22 already adds nothing (stays idempotent)
        (spec(Rule("allow", "192.168.1.0/24")), ["192.168.1.20"], ()),
        (spec(Rule("allow", "", 22, 22, "tcp")), ["192.168.1.20", "fd00::7"], ()),
        # ...but a rule for another port or protocol does not
        (spec(Rule("allow", "", 22, 22, "udp")), ["192.168.1.20"], (kept("192.168.1.20/32"),)),
        # an explicit deny of the source is still overridden: only keep_ssh: false says so
        (spec(Rule("deny", "192.168.1.20/32", 22, 22, "tcp")), ["192.168.1.20"], (kept("192.168.1.20/32"),)),
        (spec(keep=False), ["192.168.1.20"], ()),
        # default allow: nothing to keep
        (spec(default="allow"), ["192.168.1.20"], ()),
        # IPv6 sessions, duplicates once, another sshd port
        (spec(), ["fd00::7", "fd00::7", "10.0.0.5"], (kept("fd00::7/128"), kept("10.0.0.5/32"))),
        (spec(port=2022), ["10.0.0.5"], (kept("10.0.0.5/32", 2022),)),
        (spec(), [], ()),
        (spec(), ["127.0.0.1", "::1"], ()),  # from the node itself: loopback is always let in
    ],
)
def test_keep_ssh_rules_are_for_sources_the_policy_would_shut_out(
    policy: PolicySpec, sources: list[str], rules: tuple[Rule, ...]
) -> None:
    assert ssh.keep_ssh_rules(policy, sources) == rules


MATCHES = [
    (Rule("allow"), "10.0.0.1", 22, "tcp", True),
    (Rule("allow"), "10.0.0.1", 0, "vrrp", True),  # any protocol, no port: everything
    (Rule("allow", "10.0.0.0/24"), "10.0.0.1", 4789, "udp", True),
    (Rule("allow", "10.0.0.0/24"), "10.0.1.1", 4789, "udp", False),
    (Rule("allow", "fd00::/8"), "10.0.0.1", 22, "tcp", False),
    (Rule("allow", "", 7946, 7946, "any"), "10.0.0.1", 7946, "udp", True),  # "any" + port: tcp/udp
    (Rule("allow", "", 7946, 7946, "any"), "10.0.0.1", 0, "vrrp", False),
    (Rule("allow", "", 2377, 2377, "tcp"), "10.0.0.1", 2377, "udp", False),
    (Rule("allow", "", 2376, 2378, "tcp"), "10.0.0.1", 2377, "tcp", True),
    (Rule("allow", "", 2378, 2380, "tcp"), "10.0.0.1", 2377, "tcp", False),
    (Rule("allow", "", 0, 0, "vrrp"), "10.0.0.1", 0, "vrrp", True),
    (Rule("allow", "", 0, 0, "vrrp"), "10.0.0.1", 22, "tcp", False),
    # the coordinator's keep-open rules match no new incoming connection
    (Rule("allow", "", 0, 0, "tcp", source_port=7443, established=True), "10.0.0.1", 22, "tcp", False),
    (Rule("allow", "", 7443, 7443, "tcp", direction="out"), "10.0.0.1", 7443, "tcp", False),
]  # fmt: skip


@pytest.mark.parametrize(("rule", "source", "port", "protocol", "matches"), MATCHES)
def test_rule_matching(rule: Rule, source: str, port: int, protocol: str, matches: bool) -> None:
    assert rule_matches(rule, source, port, protocol) is matches


def test_the_first_matching_rule_decides_else_the_default() -> None:
    rules = (Rule("deny", "10.0.0.9/32"), Rule("allow", "10.0.0.0/24"), Rule("deny", "", 22, 22, "tcp"))
    assert verdict_for(rules, "deny", "10.0.0.9", 22, "tcp") == ("deny", 0)
    assert verdict_for(rules, "deny", "10.0.0.8", 22, "tcp") == ("allow", 1)
    assert verdict_for(rules, "allow", "10.0.1.8", 22, "tcp") == ("deny", 2)
    assert verdict_for(rules, "allow", "10.0.1.8", 80, "tcp") == ("allow", None)


@pytest.mark.parametrize(
    ("policy", "field"),
    [
        (pb.FirewallPolicy(ssh_port=70000), "ssh_port"),
        (
            pb.FirewallPolicy(rules=[pb.FirewallRule(verdict=ALLOW, port_from=112, protocol=VRRP)]),
            "rules[0].port_from",
        ),
    ],
)
def test_bad_ssh_port_or_a_port_on_vrrp_is_refused(policy: pb.FirewallPolicy, field: str) -> None:
    with pytest.raises(FieldError) as caught:
        policy_spec(policy)
    assert caught.value.field == field


def test_the_policy_message_carries_keep_ssh_and_the_port() -> None:
    assert policy_spec(pb.FirewallPolicy()).keep_ssh is True
    assert policy_spec(pb.FirewallPolicy()).ssh_port == 22
    given = policy_spec(pb.FirewallPolicy(no_keep_ssh=True, ssh_port=2022))
    assert (given.keep_ssh, given.ssh_port) == (False, 2022)
    vrrp = pb.FirewallRule(verdict=ALLOW, from_cidr="10.0.0.0/24", protocol=VRRP)
    wanted = (Rule("allow", "10.0.0.0/24", protocol="vrrp"),)
    assert policy_spec(pb.FirewallPolicy(rules=[vrrp])).rules == wanted


def test_ufw_and_nft_render_vrrp_as_they_write_it() -> None:
    from picoord.agent.actions.firewall import nftables

    rule = Rule("allow", "10.0.0.2/32", protocol="vrrp", comment="swarm")
    # as `ufw allow proto vrrp from 10.0.0.2` wrote it (ufw 0.36.2)
    assert ufw.rule_tuple(rule, 4) == "allow vrrp any 0.0.0.0/0 any 10.0.0.2 in"
    assert ufw.rule_lines(rule, 4) == ["-A ufw-user-input -p vrrp -s 10.0.0.2 -j ACCEPT"]
    # as `nft list` / `nft -j list` (1.0.6) print `ip saddr 10.0.0.2 meta l4proto 112 accept`
    text, exprs = nftables.rule_text_and_exprs(rule)
    assert text == 'ip saddr 10.0.0.2 meta l4proto vrrp accept comment "swarm"'
    assert exprs[1] == {"match": {"op": "==", "left": {"meta": {"key": "l4proto"}}, "right": "vrrp"}}


def test_a_dry_run_shows_the_kept_session_in_its_message_facts_and_rules(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from tests.actions.test_firewall import FakeSystem, seed_policy

    world = FakeSystem(tmp_path, monkeypatch, live=False)
    tables = {4: tmp_path / "tcp", 6: tmp_path / "tcp6"}
    tables[4].write_text(PROC_TCP)
    tables[6].write_text(PROC_TCP6)
    monkeypatch.setattr(ssh, "PROC_NET_TCP", {family: str(path) for family, path in tables.items()})

    def run(policy: pb.FirewallPolicy) -> tuple[str, dict[str, str]]:
        ctx = ActionContext(
            dry_run=True,
            deadline=time.monotonic() + 30,
            coordinator_host="10.213.0.1",
            coordinator_port=7443,
            run=world.run,
        )
        outcome = firewall(policy, ctx)
        assert outcome.outcome == agent_pb2.ACTION_OUTCOME_PLANNED, outcome.message
        return outcome.message, {fact.key: fact.value for fact in outcome.facts}

    message, facts = run(seed_policy())
    assert "keeping 22/tcp open for the source of each live SSH session: 10.9.8.7" in message
    assert facts[ssh.FACT_KEPT_OPEN] == "10.9.8.7/32"
    tuples = ufw.parse_tuples(facts[f"file {ufw.USER_RULES}"])
    kept_at = tuples.index(("allow tcp 22 0.0.0.0/0 any 10.9.8.7 in", ssh.KEEP_SSH_COMMENT))
    first_policy_rule = tuples.index(("allow any any 0.0.0.0/0 any 192.168.10.0/24 in", "Services VLAN"))
    assert kept_at < first_policy_rule  # ahead of the policy's rules, like the coordinator's

    message, facts = run(seed_policy(no_keep_ssh=True))
    assert "keep_ssh: false" in message and ssh.FACT_KEPT_OPEN not in facts
    assert "10.9.8.7" not in facts[f"file {ufw.USER_RULES}"]


@pytest.mark.parametrize(
    ("policy", "sources", "says"),
    [
        (spec(), ["10.0.0.5"], "keeping 22/tcp open for the source of each live SSH session: 10.0.0.5 ("),
        (spec(Rule("allow", "10.0.0.0/24")), ["10.0.0.5"], "the policy itself lets every live SSH session's"),
        (spec(), [], "no live SSH session to 22/tcp to keep open"),
        (spec(keep=False), [], "keep_ssh: false: live SSH sessions get no rule of their own"),
    ],
)
def test_what_the_result_says_about_ssh(policy: PolicySpec, sources: list[str], says: str) -> None:
    assert ssh.describe(ssh.keep_ssh_rules(policy, sources), policy, len(sources)).startswith(says)

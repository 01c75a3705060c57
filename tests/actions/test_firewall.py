"""Firewall executor, without a firewall: validation, the ufw and nftables planners, the
guard's confirm-or-revert logic, and the dry run over ufw files in a temp dir.

The expected ufw lines and nft JSON below are copied from what ufw 0.36.2 and nft 1.0.6
(Debian 12) actually wrote and printed; tests/lab/test_firewall_lab.py checks the same
renderings against the real programs again, in a lab Pi.
"""

from __future__ import annotations

import json
import socket
import subprocess
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest

from picoord.agent.actions.base import ActionContext, ActionFailed, Outcome
from picoord.agent.actions.firewall import firewall, guard, nftables, ufw, watchdog
from picoord.agent.commands import CommandResult
from picoord.common.checks.firewall import Rule, check_firewall, policy_spec
from picoord.common.validation import FieldError
from picoord.v1 import actions_pb2 as pb
from picoord.v1 import agent_pb2
from tests.actions.runner import run_executor

ALLOW, DENY = pb.FIREWALL_VERDICT_ALLOW, pb.FIREWALL_VERDICT_DENY
TCP, UDP = pb.PROTOCOL_TCP, pb.PROTOCOL_UDP
COORDINATOR = guard.Endpoint("10.213.0.1", 7443, ("10.213.0.1",))
KEEP = guard.keep_open_rules([COORDINATOR])


def seed_policy(**fields: Any) -> pb.FirewallPolicy:
    """The seed document's ufw commands, one rule each."""
    rules = [
        pb.FirewallRule(verdict=ALLOW, from_cidr="192.168.10.0/24", comment="Services VLAN"),
        pb.FirewallRule(verdict=ALLOW, from_cidr="192.168.20.0/24", comment="Compute VLAN"),
        pb.FirewallRule(verdict=ALLOW, port_from=6443, protocol=TCP),
        pb.FirewallRule(verdict=ALLOW, port_from=2379, port_to=2380, protocol=TCP),
        pb.FirewallRule(verdict=ALLOW, port_from=10250, protocol=TCP),
        pb.FirewallRule(verdict=ALLOW, port_from=10251, protocol=TCP),
        pb.FirewallRule(verdict=ALLOW, port_from=10252, protocol=TCP),
    ]
    return pb.FirewallPolicy(default_incoming=DENY, rules=rules, **fields)


def one_rule(**fields: Any) -> pb.FirewallPolicy:
    fields.setdefault("verdict", ALLOW)
    return pb.FirewallPolicy(rules=[pb.FirewallRule(**fields)])


# ---------------------------------------------------------------- validation


BAD_POLICIES = [
    (one_rule(from_cidr="10.0.0.0/33"), "rules[0].from_cidr", "not a valid CIDR"),
    (one_rule(from_cidr="10.0.0.1/24"), "rules[0].from_cidr", "host bits set"),
    (one_rule(from_cidr="2001:db8::/129"), "rules[0].from_cidr", "not a valid CIDR"),
    (one_rule(from_cidr="pi2"), "rules[0].from_cidr", "not a valid CIDR"),
    (one_rule(from_cidr="10.0.0.0/8; rm -rf /"), "rules[0].from_cidr", "';'"),
    (one_rule(from_cidr="--policy=ACCEPT"), "rules[0].from_cidr", "option"),
    (one_rule(port_from=70000, protocol=TCP), "rules[0].port_from", "outside 1-65535"),
    (one_rule(port_from=0, port_to=80, protocol=TCP), "rules[0].port_from", "port 0"),
    (one_rule(port_from=22, port_to=70000, protocol=TCP), "rules[0].port_to", "outside 1-65535"),
    (one_rule(port_from=2380, port_to=2379, protocol=TCP), "rules[0].port_to", "inverted"),
    (one_rule(port_from=22, protocol=7), "rules[0].protocol", "unknown protocol"),
    (one_rule(verdict=pb.FIREWALL_VERDICT_UNSPECIFIED), "rules[0].verdict", "allow or deny"),
    (one_rule(verdict=9), "rules[0].verdict", "allow or deny"),
    (one_rule(port_from=2379, port_to=2380), "rules[0].protocol", "needs tcp or udp with ufw"),
    (one_rule(comment="ssh; rm -rf /"), "rules[0].comment", "';'"),
    (one_rule(comment='x" accept comment "y'), "rules[0].comment", "'\"'"),
    (one_rule(comment="$(reboot)"), "rules[0].comment", "'$()'"),
    (one_rule(comment="two\nlines"), "rules[0].comment", "'\\n'"),
    (one_rule(comment=" padded"), "rules[0].comment", "spaces"),
    (one_rule(comment="x" * 65), "rules[0].comment", "longer than 64"),
    (pb.FirewallPolicy(backend=7), "backend", "unknown firewall backend"),
    (pb.FirewallPolicy(default_incoming=5), "default_incoming", "unknown verdict"),
    (pb.FirewallPolicy(rules=[pb.FirewallRule(verdict=ALLOW)] * 257), "rules", "at most 256"),
    (
        pb.FirewallPolicy(coordinator_address="10.0.0.1; reboot", coordinator_port=7443),
        "coordinator_address",
        "';'",
    ),
    (pb.FirewallPolicy(coordinator_address="10.0.0.1", coordinator_port=0), "coordinator_port", "outside"),
    (pb.FirewallPolicy(coordinator_port=7443), "coordinator_address", "empty"),
    (pb.FirewallPolicy(confirm_within_seconds=-1), "confirm_within_seconds", "not between"),
    (pb.FirewallPolicy(confirm_within_seconds=float("nan")), "confirm_within_seconds", "not between"),
    (pb.FirewallPolicy(confirm_within_seconds=301), "confirm_within_seconds", "not between"),
]


@pytest.mark.parametrize(("policy", "field", "reason"), BAD_POLICIES)
def test_bad_policies_are_rejected_naming_the_field(
    policy: pb.FirewallPolicy, field: str, reason: str
) -> None:
    with pytest.raises(FieldError) as caught:
        check_firewall(policy)
    assert caught.value.field == field
    assert reason in caught.value.reason


def test_a_later_rule_in_a_long_policy_is_named_by_its_index() -> None:
    policy = seed_policy()
    policy.rules.add(verdict=ALLOW, port_from=2380, port_to=2379, protocol=TCP)
    with pytest.raises(FieldError) as caught:
        check_firewall(policy)
    assert caught.value.field == "rules[7].port_to"


def test_two_rules_for_the_same_traffic_are_rejected() -> None:
    policy = pb.FirewallPolicy(
        rules=[
            pb.FirewallRule(verdict=ALLOW, port_from=22, protocol=TCP),
            pb.FirewallRule(verdict=DENY, port_from=22, port_to=22, protocol=TCP, comment="never"),
        ]
    )
    with pytest.raises(FieldError) as caught:
        check_firewall(policy)
    assert caught.value.field == "rules[1]" and "rules[0]" in caught.value.reason


def test_nftables_takes_a_port_range_for_both_protocols() -> None:
    policy = one_rule(port_from=2379, port_to=2380)
    policy.backend = pb.FIREWALL_BACKEND_NFTABLES
    assert policy_spec(policy).rules == (Rule("allow", "", 2379, 2380, "any"),)


def test_the_seed_policy_is_expressible_one_to_one() -> None:
    spec = policy_spec(seed_policy())
    assert (spec.backend, spec.default_incoming, spec.confirm_within) == ("ufw", "deny", 10.0)
    assert [(r.verdict, r.source, r.ports, r.protocol) for r in spec.rules] == [
        ("allow", "192.168.10.0/24", "", "any"),
        ("allow", "192.168.20.0/24", "", "any"),
        ("allow", "", "6443", "tcp"),
        ("allow", "", "2379:2380", "tcp"),
        ("allow", "", "10250", "tcp"),
        ("allow", "", "10251", "tcp"),
        ("allow", "", "10252", "tcp"),
    ]


@pytest.mark.parametrize(
    ("given", "normalised"),
    [
        ("2001:DB8::/32", "2001:db8::/32"),
        ("10.0.0.5", "10.0.0.5/32"),
        ("fd00::1", "fd00::1/128"),
        ("0.0.0.0/0", "0.0.0.0/0"),
    ],
)
def test_cidrs_are_normalised(given: str, normalised: str) -> None:
    assert policy_spec(one_rule(from_cidr=given)).rules[0].source == normalised


def test_comments_may_read_like_the_seed() -> None:
    assert policy_spec(one_rule(comment="Compute VLAN: k8s 10.0/16, etcd+api @pi1")).rules[0].comment


# ---------------------------------------------------------------- ufw rendering

# The coordinator's replies need no user rule: ufw's before.rules accept established
# traffic (a bare "source port 7443" rule would let anyone in who sends from that port).
SEED_TUPLES_V4 = [
    ("allow tcp 7443 10.213.0.1 any 0.0.0.0/0 out", "picoord coordinator"),
    ("allow any any 0.0.0.0/0 any 192.168.10.0/24 in", "Services VLAN"),
    ("allow any any 0.0.0.0/0 any 192.168.20.0/24 in", "Compute VLAN"),
    ("allow tcp 6443 0.0.0.0/0 any 0.0.0.0/0 in", ""),
    ("allow tcp 2379:2380 0.0.0.0/0 any 0.0.0.0/0 in", ""),
    ("allow tcp 10250 0.0.0.0/0 any 0.0.0.0/0 in", ""),
    ("allow tcp 10251 0.0.0.0/0 any 0.0.0.0/0 in", ""),
    ("allow tcp 10252 0.0.0.0/0 any 0.0.0.0/0 in", ""),
]

# What ufw 0.36.2 wrote for `ufw allow from 192.168.10.0/24`, `ufw allow 2379:2380/tcp`,
# `ufw deny proto udp from 10.0.0.0/8 to any port 53 comment 'dns; rm'`, `ufw allow 80`,
# `ufw allow proto tcp from 10.213.0.1 port 7443`, `ufw allow out proto tcp to 10.213.0.1
# port 7443` and `ufw allow from 2001:db8::/32 to any port 22 proto tcp`.
UFW_WROTE = [
    (
        Rule("allow", "192.168.10.0/24"),
        4,
        "allow any any 0.0.0.0/0 any 192.168.10.0/24 in",
        ["-A ufw-user-input -s 192.168.10.0/24 -j ACCEPT"],
    ),
    (
        Rule("allow", "", 2379, 2380, "tcp"),
        4,
        "allow tcp 2379:2380 0.0.0.0/0 any 0.0.0.0/0 in",
        ["-A ufw-user-input -p tcp -m multiport --dports 2379:2380 -j ACCEPT"],
    ),
    (
        Rule("allow", "", 2379, 2380, "tcp"),
        6,
        "allow tcp 2379:2380 ::/0 any ::/0 in",
        ["-A ufw6-user-input -p tcp -m multiport --dports 2379:2380 -j ACCEPT"],
    ),
    (
        Rule("deny", "10.0.0.0/8", 53, 53, "udp"),
        4,
        "deny udp 53 0.0.0.0/0 any 10.0.0.0/8 in",
        ["-A ufw-user-input -p udp --dport 53 -s 10.0.0.0/8 -j DROP"],
    ),
    (
        Rule("allow", "", 80, 80, "any"),
        6,
        "allow any 80 ::/0 any ::/0 in",
        ["-A ufw6-user-input -p tcp --dport 80 -j ACCEPT", "-A ufw6-user-input -p udp --dport 80 -j ACCEPT"],
    ),
    (
        KEEP[0],
        4,
        "allow tcp any 0.0.0.0/0 7443 10.213.0.1 in",
        ["-A ufw-user-input -p tcp -s 10.213.0.1 --sport 7443 -j ACCEPT"],
    ),
    (
        KEEP[1],
        4,
        "allow tcp 7443 10.213.0.1 any 0.0.0.0/0 out",
        ["-A ufw-user-output -p tcp -d 10.213.0.1 --dport 7443 -j ACCEPT"],
    ),
    (
        Rule("allow", "2001:db8::/32", 22, 22, "tcp"),
        6,
        "allow tcp 22 ::/0 any 2001:db8::/32 in",
        ["-A ufw6-user-input -p tcp --dport 22 -s 2001:db8::/32 -j ACCEPT"],
    ),
    (
        Rule("allow", "2001:db8::1/128"),
        6,
        "allow any any ::/0 any 2001:db8::1 in",
        ["-A ufw6-user-input -s 2001:db8::1 -j ACCEPT"],
    ),
]


@pytest.mark.parametrize(("rule", "family", "tuple_text", "lines"), UFW_WROTE)
def test_ufw_rules_render_as_ufw_writes_them(
    rule: Rule, family: int, tuple_text: str, lines: list[str]
) -> None:
    assert ufw.rule_tuple(rule, family) == tuple_text
    assert ufw.rule_lines(rule, family) == lines


def test_rules_land_in_the_file_of_their_ip_version() -> None:
    rules = [Rule("allow", "10.0.0.0/8"), Rule("allow", "fd00::/8"), Rule("allow", "", 22, 22, "tcp")]
    assert [t for t, _ in ufw.wanted_tuples(rules, 4)] == [
        "allow any any 0.0.0.0/0 any 10.0.0.0/8 in",
        "allow tcp 22 0.0.0.0/0 any 0.0.0.0/0 in",
    ]
    assert [t for t, _ in ufw.wanted_tuples(rules, 6)] == [
        "allow any any ::/0 any fd00::/8 in",
        "allow tcp 22 ::/0 any ::/0 in",
    ]


def test_the_seed_policy_renders_ufw_tuples_with_the_coordinator_first() -> None:
    rules = [*ufw.user_rules(KEEP), *policy_spec(seed_policy()).rules]
    assert ufw.wanted_tuples(rules, 4) == SEED_TUPLES_V4
    assert [t for t, _ in ufw.wanted_tuples(rules, 6)] == [
        "allow tcp 6443 ::/0 any ::/0 in",
        "allow tcp 2379:2380 ::/0 any ::/0 in",
        "allow tcp 10250 ::/0 any ::/0 in",
        "allow tcp 10251 ::/0 any ::/0 in",
        "allow tcp 10252 ::/0 any ::/0 in",
    ]


PRISTINE_V4 = """*filter
:ufw-user-input - [0:0]
:ufw-user-output - [0:0]
:ufw-user-forward - [0:0]
:ufw-user-limit - [0:0]
:ufw-user-limit-accept - [0:0]
### RULES ###
-A ufw-user-limit -m limit --limit 3/minute -j LOG --log-prefix "[UFW LIMIT BLOCK] "
-A ufw-user-limit -j REJECT
-A ufw-user-limit-accept -j ACCEPT
COMMIT
"""
PRISTINE_V6 = """*filter
:ufw6-user-input - [0:0]
:ufw6-user-output - [0:0]
:ufw6-user-forward - [0:0]
### RULES ###
COMMIT
"""
DEFAULTS_TEXT = (
    '# /etc/default/ufw\nIPV6=yes\nDEFAULT_INPUT_POLICY="ACCEPT"\nDEFAULT_OUTPUT_POLICY="ACCEPT"\n'
)
CONF_TEXT = "# /etc/ufw/ufw.conf\nENABLED=no\nLOGLEVEL=low\n"


def pristine(live: bool = False, enabled: str = "no", defaults: str = DEFAULTS_TEXT) -> ufw.UfwState:
    files = {
        ufw.USER_RULES: PRISTINE_V4,
        ufw.USER6_RULES: PRISTINE_V6,
        ufw.DEFAULTS: defaults,
        ufw.CONF: CONF_TEXT.replace("ENABLED=no", f"ENABLED={enabled}"),
    }
    return ufw.UfwState(files, live)


def test_a_pristine_rules_file_gets_the_rules_after_its_mark_and_keeps_the_rest() -> None:
    text = ufw.replace_rules_section(PRISTINE_V4, ufw.render_rules_section(KEEP[:1], 4), "user.rules")
    assert text == PRISTINE_V4.replace(
        "### RULES ###\n",
        "### RULES ###\n\n### tuple ### allow tcp any 0.0.0.0/0 7443 10.213.0.1 in"
        " comment=7069636f6f726420636f6f7264696e61746f72\n"
        "-A ufw-user-input -p tcp -s 10.213.0.1 --sport 7443 -j ACCEPT\n\n### END RULES ###\n",
    )
    again = ufw.replace_rules_section(text, ufw.render_rules_section([], 4), "user.rules")
    assert again == PRISTINE_V4.replace("### RULES ###\n", "### RULES ###\n\n### END RULES ###\n")
    assert ufw.parse_tuples(text) == [("allow tcp any 0.0.0.0/0 7443 10.213.0.1 in", "picoord coordinator")]


def test_a_rules_file_ufw_did_not_write_is_not_rewritten() -> None:
    with pytest.raises(ActionFailed, match="RULES"):
        ufw.replace_rules_section("*filter\nCOMMIT\n", "", "/etc/ufw/user.rules")


def test_parsed_tuples_are_normalised_like_the_wanted_ones() -> None:
    text = (
        "### tuple ### allow any any 0.0.0.0/0 any 10.0.0.5/32 in comment=6869\n"
        "### tuple ### deny tcp 22 ::/0 any 2001:DB8::/32 in\n"
    )
    assert ufw.parse_tuples(text) == [
        ("allow any any 0.0.0.0/0 any 10.0.0.5 in", "hi"),
        ("deny tcp 22 ::/0 any 2001:db8::/32 in", ""),
    ]


def test_assignments_are_read_and_set_like_ufw_does() -> None:
    assert ufw.parse_assignments(DEFAULTS_TEXT)["DEFAULT_INPUT_POLICY"] == "ACCEPT"
    changed = ufw.set_assignment(DEFAULTS_TEXT, "DEFAULT_INPUT_POLICY", "DROP")
    assert changed == DEFAULTS_TEXT.replace('"ACCEPT"\nDEFAULT_OUTPUT', '"DROP"\nDEFAULT_OUTPUT')
    assert ufw.set_assignment("A=1", "B", "2") == 'A=1\nB="2"\n'


def stage(path: str) -> str:
    return ufw.stage_path(path)


def mv(path: str) -> list[str]:
    return ["mv", "-f", "--", stage(path), path]


def argvs(steps: Sequence[ufw.Step]) -> list[list[str]]:
    return [list(step.argv) for step in steps]


def test_first_apply_on_an_inactive_ufw_writes_both_files_the_default_and_enables() -> None:
    current = pristine()
    target = ufw.desired_state(current, "deny", [*KEEP, Rule("allow", "", 22, 22, "tcp")])
    steps = ufw.plan_transition(current, target)
    assert argvs(steps) == [
        mv(ufw.USER_RULES),
        mv(ufw.USER6_RULES),
        ["cp", "--", stage(ufw.DEFAULTS), ufw.DEFAULTS],
        ["ufw", "--force", "enable"],
    ]
    assert 'DEFAULT_INPUT_POLICY="DROP"' in steps[2].content
    assert "allow tcp 22 ::/0 any ::/0 in" in steps[1].content


def test_rule_changes_on_an_active_ufw_load_atomically_with_iptables_restore() -> None:
    before = ufw.desired_state(pristine(), "deny", [*KEEP, Rule("allow", "", 22, 22, "tcp")])
    current = ufw.UfwState({**before.files, ufw.CONF: CONF_TEXT.replace("=no", "=yes")}, live=True)
    v4_only = ufw.desired_state(current, "deny", [*KEEP, Rule("allow", "10.0.0.0/8", 22, 22, "tcp")])
    assert argvs(ufw.plan_transition(current, v4_only)) == [
        mv(ufw.USER_RULES),
        mv(ufw.USER6_RULES),
        ["iptables-restore", "-n", ufw.USER_RULES],
        ["ip6tables-restore", "-n", ufw.USER6_RULES],
    ]
    no_v6_change = ufw.desired_state(
        current, "deny", [*KEEP, Rule("allow", "", 22, 22, "tcp"), Rule("deny", "10.9.0.0/16")]
    )
    assert argvs(ufw.plan_transition(current, no_v6_change)) == [
        mv(ufw.USER_RULES),
        ["iptables-restore", "-n", ufw.USER_RULES],
    ]


def test_a_default_policy_change_on_an_active_ufw_reloads_it() -> None:
    before = ufw.desired_state(pristine(), "deny", KEEP)
    current = ufw.UfwState({**before.files, ufw.CONF: CONF_TEXT.replace("=no", "=yes")}, live=True)
    target = ufw.desired_state(current, "allow", KEEP)
    assert argvs(ufw.plan_transition(current, target)) == [
        ["cp", "--", stage(ufw.DEFAULTS), ufw.DEFAULTS],
        ["ufw", "reload"],
    ]


def test_the_policy_in_place_plans_nothing() -> None:
    before = ufw.desired_state(pristine(), "deny", [*KEEP, *policy_spec(seed_policy()).rules])
    current = ufw.UfwState({**before.files, ufw.CONF: CONF_TEXT.replace("=no", "=yes")}, live=True)
    target = ufw.desired_state(current, "deny", [*KEEP, *policy_spec(seed_policy()).rules])
    assert target.files == current.files
    assert ufw.plan_transition(current, target) == []


def test_loaded_chains_with_ufw_conf_disabled_are_enabled_and_reloaded() -> None:
    current = pristine(live=True, enabled="no")
    assert argvs(ufw.plan_transition(current, ufw.desired_state(current, "allow", []))) == [
        ["ufw", "--force", "enable"],
        ["ufw", "reload"],
    ]


def test_restoring_a_snapshot_of_an_inactive_ufw_disables_it_then_puts_every_file_back() -> None:
    snapshot = pristine()
    applied = ufw.desired_state(snapshot, "deny", KEEP)
    after = ufw.UfwState({**applied.files, ufw.CONF: CONF_TEXT.replace("=no", "=yes")}, live=True)
    steps = ufw.plan_transition(after, snapshot)
    assert argvs(steps) == [
        ["ufw", "--force", "disable"],
        mv(ufw.USER_RULES),
        ["cp", "--", stage(ufw.DEFAULTS), ufw.DEFAULTS],
        mv(ufw.CONF),
    ]
    assert [step.content for step in steps[1:]] == [PRISTINE_V4, DEFAULTS_TEXT, CONF_TEXT]


def test_restoring_a_snapshot_of_an_active_ufw_reloads_the_old_files() -> None:
    enabled = CONF_TEXT.replace("=no", "=yes")
    snapshot = ufw.UfwState({**pristine().files, ufw.CONF: enabled}, live=True)
    applied = ufw.desired_state(snapshot, "deny", KEEP)
    assert argvs(ufw.plan_transition(applied, snapshot)) == [
        mv(ufw.USER_RULES),
        ["cp", "--", stage(ufw.DEFAULTS), ufw.DEFAULTS],
        ["ufw", "reload"],
    ]


def test_ipv6_off_skips_the_ipv6_restore() -> None:
    defaults = DEFAULTS_TEXT.replace("IPV6=yes", "IPV6=no")
    before = ufw.desired_state(pristine(defaults=defaults), "allow", [])
    current = ufw.UfwState({**before.files, ufw.CONF: CONF_TEXT.replace("=no", "=yes")}, live=True)
    target = ufw.desired_state(current, "allow", [Rule("allow", "", 22, 22, "tcp")])
    assert argvs(ufw.plan_transition(current, target)) == [
        mv(ufw.USER_RULES),
        mv(ufw.USER6_RULES),
        ["iptables-restore", "-n", ufw.USER_RULES],
    ]


def test_a_missing_ufw_is_a_failure_not_a_guess() -> None:
    with pytest.raises(ActionFailed, match="is ufw installed"):
        ufw.desired_state(ufw.UfwState({ufw.USER_RULES: None}), "deny", [])


# ---------------------------------------------------------------- nftables rendering

# `nft -j list table inet picoord` (nft 1.0.6) after loading render_table() of NFT_RULES.
NFT_RULES = [
    Rule("allow", "192.168.10.0/24", comment="Services VLAN"),
    Rule("allow", "", 2379, 2380, "tcp"),
    Rule("allow", "", 80, 80, "any"),
    Rule("allow", "2001:db8::1/128", protocol="udp"),
    Rule("deny", "10.0.0.0/8", 22, 22, "tcp"),
]
NFT_LISTING = {
    "nftables": [
        {"metainfo": {"version": "1.0.6", "release_name": "Lester Gooch #5", "json_schema_version": 1}},
        {"table": {"family": "inet", "name": "picoord", "handle": 2}},
        {
            "chain": {
                "family": "inet",
                "table": "picoord",
                "name": "input",
                "handle": 1,
                "type": "filter",
                "hook": "input",
                "prio": 0,
                "policy": "drop",
            }
        },
        {
            "rule": {
                "family": "inet",
                "table": "picoord",
                "chain": "input",
                "handle": 2,
                "comment": "picoord coordinator",
                "expr": [
                    {
                        "match": {
                            "op": "==",
                            "left": {"payload": {"protocol": "ip", "field": "saddr"}},
                            "right": "10.213.0.1",
                        }
                    },
                    {
                        "match": {
                            "op": "==",
                            "left": {"payload": {"protocol": "tcp", "field": "sport"}},
                            "right": 7443,
                        }
                    },
                    {
                        "match": {
                            "op": "in",
                            "left": {"ct": {"key": "state"}},
                            "right": ["established", "related"],
                        }
                    },
                    {"accept": None},
                ],
            }
        },
        {
            "rule": {
                "family": "inet",
                "table": "picoord",
                "chain": "input",
                "handle": 3,
                "expr": [
                    {
                        "match": {
                            "op": "in",
                            "left": {"ct": {"key": "state"}},
                            "right": ["established", "related"],
                        }
                    },
                    {"accept": None},
                ],
            }
        },
        {
            "rule": {
                "family": "inet",
                "table": "picoord",
                "chain": "input",
                "handle": 4,
                "expr": [
                    {"match": {"op": "in", "left": {"ct": {"key": "state"}}, "right": "invalid"}},
                    {"drop": None},
                ],
            }
        },
        {
            "rule": {
                "family": "inet",
                "table": "picoord",
                "chain": "input",
                "handle": 5,
                "expr": [
                    {"match": {"op": "==", "left": {"meta": {"key": "iif"}}, "right": "lo"}},
                    {"accept": None},
                ],
            }
        },
        {
            "rule": {
                "family": "inet",
                "table": "picoord",
                "chain": "input",
                "handle": 6,
                "expr": [
                    {"match": {"op": "==", "left": {"meta": {"key": "l4proto"}}, "right": "icmp"}},
                    {"accept": None},
                ],
            }
        },
        {
            "rule": {
                "family": "inet",
                "table": "picoord",
                "chain": "input",
                "handle": 7,
                "expr": [
                    {"match": {"op": "==", "left": {"meta": {"key": "l4proto"}}, "right": "ipv6-icmp"}},
                    {"accept": None},
                ],
            }
        },
        {
            "rule": {
                "family": "inet",
                "table": "picoord",
                "chain": "input",
                "handle": 8,
                "comment": "Services VLAN",
                "expr": [
                    {
                        "match": {
                            "op": "==",
                            "left": {"payload": {"protocol": "ip", "field": "saddr"}},
                            "right": {"prefix": {"addr": "192.168.10.0", "len": 24}},
                        }
                    },
                    {"accept": None},
                ],
            }
        },
        {
            "rule": {
                "family": "inet",
                "table": "picoord",
                "chain": "input",
                "handle": 9,
                "expr": [
                    {
                        "match": {
                            "op": "==",
                            "left": {"payload": {"protocol": "tcp", "field": "dport"}},
                            "right": {"range": [2379, 2380]},
                        }
                    },
                    {"accept": None},
                ],
            }
        },
        {
            "rule": {
                "family": "inet",
                "table": "picoord",
                "chain": "input",
                "handle": 11,
                "expr": [
                    {
                        "match": {
                            "op": "==",
                            "left": {"meta": {"key": "l4proto"}},
                            "right": {"set": ["tcp", "udp"]},
                        }
                    },
                    {
                        "match": {
                            "op": "==",
                            "left": {"payload": {"protocol": "th", "field": "dport"}},
                            "right": 80,
                        }
                    },
                    {"accept": None},
                ],
            }
        },
        {
            "rule": {
                "family": "inet",
                "table": "picoord",
                "chain": "input",
                "handle": 12,
                "expr": [
                    {
                        "match": {
                            "op": "==",
                            "left": {"payload": {"protocol": "ip6", "field": "saddr"}},
                            "right": "2001:db8::1",
                        }
                    },
                    {"match": {"op": "==", "left": {"meta": {"key": "l4proto"}}, "right": "udp"}},
                    {"accept": None},
                ],
            }
        },
        {
            "rule": {
                "family": "inet",
                "table": "picoord",
                "chain": "input",
                "handle": 13,
                "expr": [
                    {
                        "match": {
                            "op": "==",
                            "left": {"payload": {"protocol": "ip", "field": "saddr"}},
                            "right": {"prefix": {"addr": "10.0.0.0", "len": 8}},
                        }
                    },
                    {
                        "match": {
                            "op": "==",
                            "left": {"payload": {"protocol": "tcp", "field": "dport"}},
                            "right": 22,
                        }
                    },
                    {"drop": None},
                ],
            }
        },
    ]
}
NFT_JSON = json.dumps(NFT_LISTING)


def test_the_nft_listing_of_the_rendered_table_parses_back_to_the_desired_table() -> None:
    assert nftables.parse_listing(NFT_JSON) == nftables.desired_table("deny", KEEP, NFT_RULES)


@pytest.mark.parametrize(
    "different",
    [
        nftables.desired_table("allow", KEEP, NFT_RULES),
        nftables.desired_table("deny", KEEP, NFT_RULES[:-1]),
        nftables.desired_table("deny", KEEP, [*NFT_RULES[:-1], Rule("deny", "10.0.0.0/8", 23, 23, "tcp")]),
        nftables.desired_table("deny", KEEP, [Rule("allow", "192.168.10.0/24"), *NFT_RULES[1:]]),
        nftables.desired_table("deny", (), NFT_RULES),
    ],
)
def test_any_difference_from_the_listing_is_seen(different: nftables.NftTable) -> None:
    assert nftables.parse_listing(NFT_JSON) != different


def test_extra_objects_in_the_table_make_it_differ() -> None:
    data = json.loads(NFT_JSON)
    data["nftables"].append({"set": {"family": "inet", "table": "picoord", "name": "x", "type": "ipv4_addr"}})
    parsed = nftables.parse_listing(json.dumps(data))
    assert parsed.other == ("set x",) and parsed != nftables.desired_table("deny", KEEP, NFT_RULES)


def test_the_nft_table_text_is_what_nft_lists() -> None:
    text = nftables.render_table("deny", KEEP, NFT_RULES)
    assert text == (
        "table inet picoord {\n"
        f'\tcomment "{nftables.TABLE_COMMENT}"\n'
        "\tchain input {\n"
        "\t\ttype filter hook input priority filter; policy drop;\n"
        "\t\tip saddr 10.213.0.1 tcp sport 7443 ct state established,related accept"
        ' comment "picoord coordinator"\n'
        "\t\tct state established,related accept\n"
        "\t\tct state invalid drop\n"
        '\t\tiif "lo" accept\n'
        "\t\tmeta l4proto icmp accept\n"
        "\t\tmeta l4proto ipv6-icmp accept\n"
        '\t\tip saddr 192.168.10.0/24 accept comment "Services VLAN"\n'
        "\t\ttcp dport 2379-2380 accept\n"
        "\t\tmeta l4proto { tcp, udp } th dport 80 accept\n"
        "\t\tip6 saddr 2001:db8::1 meta l4proto udp accept\n"
        "\t\tip saddr 10.0.0.0/8 tcp dport 22 drop\n"
        "\t}\n"
        "}\n"
    )


def test_the_nft_file_replaces_or_removes_the_table_in_one_transaction() -> None:
    assert nftables.load_file(None) == "add table inet picoord\ndelete table inet picoord\n"
    assert nftables.load_file("table inet picoord {\n}\n").endswith(
        "delete table inet picoord\ntable inet picoord {\n}\n"
    )
    content = nftables.load_file("x")
    assert nftables.load_argv(content) == ["nft", "-f", nftables.stage_path(content)]
    assert nftables.stage_path(content, "pi1") == nftables.stage_path("" + content, "pi1")
    assert nftables.stage_path(content, "pi1") != nftables.stage_path(content + "\n", "pi1")
    assert nftables.stage_path(content, "pi1") != nftables.stage_path(content, "pi2")
    assert "/" not in nftables.stage_path(content, "../../etc").removeprefix(nftables.STAGE_DIR + "/")


# ---------------------------------------------------------------- guard


def context(**fields: Any) -> ActionContext:
    fields.setdefault("deadline", time.monotonic() + 60)
    return ActionContext(dry_run=False, **fields)


def test_the_agent_session_and_the_policy_name_the_coordinator() -> None:
    resolved = {"coord.lan": ("10.0.0.9", "fd00::9")}

    def resolver(host: str, port: int) -> tuple[str, ...]:
        return resolved.get(host, (host,))

    spec = policy_spec(pb.FirewallPolicy(coordinator_address="coord.lan", coordinator_port=7443))
    endpoints = guard.coordinator_endpoints(
        spec, context(coordinator_host="10.0.0.9", coordinator_port=7443), resolver
    )
    assert [str(e) for e in endpoints] == ["10.0.0.9:7443", "coord.lan:7443"]
    assert endpoints[1].addresses == ("10.0.0.9", "fd00::9")
    keep = guard.keep_open_rules(endpoints)
    assert keep == (
        Rule("allow", "10.0.0.9/32", 0, 0, "tcp", "picoord coordinator", source_port=7443, established=True),
        Rule(
            "allow", "", 7443, 7443, "tcp", "picoord coordinator", direction="out", destination="10.0.0.9/32"
        ),
        Rule("allow", "fd00::9/128", 0, 0, "tcp", "picoord coordinator", source_port=7443, established=True),
        Rule(
            "allow", "", 7443, 7443, "tcp", "picoord coordinator", direction="out", destination="fd00::9/128"
        ),
    )
    only_policy = guard.coordinator_endpoints(spec, context(), resolver)
    assert [str(e) for e in only_policy] == ["coord.lan:7443"]


def test_without_any_coordinator_the_policy_is_refused() -> None:
    with pytest.raises(FieldError) as caught:
        guard.coordinator_endpoints(policy_spec(pb.FirewallPolicy()), context())
    assert caught.value.field == "coordinator_address"


class Script:
    """A fake world for confirm_or_revert: probe answers in order, apply/restore may fail."""

    def __init__(self, answers: list[bool], apply_fails: bool = False, restore_fails: bool = False) -> None:
        self.answers = list(answers)
        self.apply_fails, self.restore_fails = apply_fails, restore_fails
        self.calls: list[str] = []

    def probe(self, endpoints: Sequence[guard.Endpoint], window: float) -> tuple[bool, str]:
        self.calls.append(f"probe {window:g}")
        return self.answers.pop(0), "Connection refused"

    def apply(self, ctx: ActionContext) -> None:
        self.calls.append("apply")
        if self.apply_fails:
            raise ActionFailed("iptables-restore exited 1")

    def restore(self, ctx: ActionContext) -> None:
        self.calls.append(f"restore budget>{ctx.deadline - time.monotonic() > 30}")
        if self.restore_fails:
            raise ActionFailed("ufw exited 1")

    def arm(self, ctx: ActionContext, pending: watchdog.PendingRevert) -> watchdog.Armed:
        """Writes the pending file as the real arm does, and starts nothing: the watchdog
        process itself is proven in the lab (tests/lab/test_firewall_lab.py)."""
        path = watchdog.pending_path(ctx.state_dir)
        path.write_bytes(pending.to_json())
        self.calls.append(f"arm {pending.backend} {pending.deadline - time.time():.0f}")
        self.pending = pending
        return watchdog.Armed("watchdog", path, pending.id)

    def disarm(self, ctx: ActionContext, armed: watchdog.Armed) -> None:
        self.calls.append(f"disarm pending={watchdog.pending_path(ctx.state_dir).exists()}")


def guarded(script: Script, state_dir: Path, ctx: ActionContext | None = None) -> Outcome:
    ctx = ctx or context()
    ctx.state_dir = state_dir
    return guard.confirm_or_revert(
        ctx,
        apply=script.apply,
        restore=script.restore,
        endpoints=[COORDINATOR],
        window=8,
        what="test policy",
        backend="nftables",
        snapshot={"table": None},
        probe=script.probe,
        arm=script.arm,
        disarm=script.disarm,
    )


def test_a_confirmed_change_stands(tmp_path: Path) -> None:
    script = Script([True, True])
    outcome = guarded(script, tmp_path)
    assert outcome.outcome == agent_pb2.ACTION_OUTCOME_SUCCEEDED and "reachable" in outcome.message
    assert script.calls == ["probe 5", "arm nftables 21", "apply", "probe 8", "disarm pending=False"]


def test_an_unconfirmed_change_is_reverted_by_the_agent_itself(tmp_path: Path) -> None:
    script = Script([True, False])
    outcome = guarded(script, tmp_path, context(deadline=time.monotonic() + 24))
    assert outcome.outcome == agent_pb2.ACTION_OUTCOME_REVERTED
    assert "restored the previous rules by itself" in outcome.message and "10.213.0.1:7443" in outcome.message
    assert script.calls == [
        "probe 5",
        "arm nftables 21",
        "apply",
        "probe 8",
        "disarm pending=False",
        "restore budget>True",
    ]


def test_a_failed_revert_is_a_loud_failure(tmp_path: Path) -> None:
    script = Script([True, False], restore_fails=True)
    with pytest.raises(ActionFailed, match=r"FIREWALL RESTORE FAILED.*console"):
        guarded(script, tmp_path)


def test_a_change_that_fails_half_way_is_undone(tmp_path: Path) -> None:
    script = Script([True], apply_fails=True)
    with pytest.raises(ActionFailed, match="previous rules were restored"):
        guarded(script, tmp_path)
    assert script.calls == [
        "probe 5",
        "arm nftables 21",
        "apply",
        "disarm pending=False",
        "restore budget>True",
    ]
    loud = Script([True], apply_fails=True, restore_fails=True)
    with pytest.raises(ActionFailed, match="FIREWALL RESTORE FAILED"):
        guarded(loud, tmp_path)


def test_no_baseline_means_no_change(tmp_path: Path) -> None:
    script = Script([False])
    with pytest.raises(ActionFailed, match="nothing was changed"):
        guarded(script, tmp_path)
    assert script.calls == ["probe 5"]


def test_too_little_time_for_the_confirm_window_means_no_change(tmp_path: Path) -> None:
    script = Script([True, True])
    with pytest.raises(ActionFailed, match="nothing was changed"):
        guarded(script, tmp_path, context(deadline=time.monotonic() + 20))
    assert script.calls == []


def test_wait_reachable_dials_a_new_connection_each_time() -> None:
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen(4)
        port = server.getsockname()[1]
        ok, detail = guard.wait_reachable([guard.Endpoint("127.0.0.1", port, ("127.0.0.1",))], 2)
        assert ok and f"127.0.0.1:{port}" in detail
    started = time.monotonic()
    ok, detail = guard.wait_reachable([guard.Endpoint("127.0.0.1", port, ("127.0.0.1",))], 0.6)
    assert not ok and "refused" in detail.lower()
    assert 0.5 < time.monotonic() - started < 3


# ---------------------------------------------------------------- the executor over temp files


class FakeSystem:
    """ufw's files under a temp dir, and a command runner that answers the one read
    (iptables -L) and fails the test on anything else: a dry run must change nothing."""

    def __init__(self, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, live: bool) -> None:
        self.live = live
        self.ran: list[list[str]] = []
        paths = {}
        for name, text in (
            ("USER_RULES", PRISTINE_V4),
            ("USER6_RULES", PRISTINE_V6),
            ("DEFAULTS", DEFAULTS_TEXT),
            ("CONF", CONF_TEXT),
        ):
            path = tmp_path / name.lower()
            path.write_text(text)
            paths[name] = str(path)
            monkeypatch.setattr(ufw, name, str(path))
        monkeypatch.setattr(
            ufw, "FILES", (paths["USER_RULES"], paths["USER6_RULES"], paths["DEFAULTS"], paths["CONF"])
        )
        monkeypatch.setattr(ufw, "COPIED", (paths["DEFAULTS"],))
        before = {}
        for family, chain in ((4, "ufw-before-input"), (6, "ufw6-before-input")):
            before[family] = tmp_path / f"before{family}"
            before[family].write_text(f"-A {chain} -m conntrack --ctstate RELATED,ESTABLISHED -j ACCEPT\n")
        monkeypatch.setattr(ufw, "BEFORE_RULES", {family: str(path) for family, path in before.items()})
        monkeypatch.setattr(ufw, "STAGE_DIR", str(tmp_path))

    def run(self, argv: Sequence[str], timeout: float) -> CommandResult:
        self.ran.append(list(argv))
        if list(argv[:3]) == ["iptables", "-n", "-L"]:
            return CommandResult(tuple(argv), 0 if self.live else 1, "", "")
        raise AssertionError(f"a dry run ran {argv}")


def test_a_dry_run_plans_exact_argv_and_shows_the_files_but_changes_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    world = FakeSystem(tmp_path, monkeypatch, live=False)
    ctx = ActionContext(
        dry_run=True,
        deadline=time.monotonic() + 30,
        coordinator_host="10.213.0.1",
        coordinator_port=7443,
        run=world.run,
    )
    outcome = firewall(seed_policy(), ctx)
    assert outcome.outcome == agent_pb2.ACTION_OUTCOME_PLANNED
    assert [list(c.argv) for c in ctx.commands] == [
        ["mv", "-f", "--", ufw.stage_path(ufw.USER_RULES), ufw.USER_RULES],
        ["mv", "-f", "--", ufw.stage_path(ufw.USER6_RULES), ufw.USER6_RULES],
        ["cp", "--", ufw.stage_path(ufw.DEFAULTS), ufw.DEFAULTS],
        ["ufw", "--force", "enable"],
    ]
    assert not any(c.ran for c in ctx.commands)
    facts = {fact.key: fact.value for fact in outcome.facts}
    assert ufw.parse_tuples(facts[f"file {ufw.USER_RULES}"]) == SEED_TUPLES_V4
    assert 'DEFAULT_INPUT_POLICY="DROP"' in facts[f"file {ufw.DEFAULTS}"]
    assert Path(ufw.USER_RULES).read_text() == PRISTINE_V4
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "before4",
        "before6",
        "conf",
        "defaults",
        "user6_rules",
        "user_rules",
    ]
    assert world.ran == [["iptables", "-n", "-L", "ufw-user-input"]]


def test_a_policy_already_in_the_files_is_unchanged_and_runs_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    world = FakeSystem(tmp_path, monkeypatch, live=True)
    rules = [*ufw.user_rules(KEEP), *policy_spec(seed_policy()).rules]
    target = ufw.desired_state(ufw.read_state(context(run=world.run)), "deny", rules)
    for path, text in target.files.items():
        Path(path).write_text(text or "")
    Path(ufw.CONF).write_text(CONF_TEXT.replace("=no", "=yes"))
    for dry_run in (True, False):
        ctx = ActionContext(
            dry_run=dry_run,
            deadline=time.monotonic() + 30,
            coordinator_host="10.213.0.1",
            coordinator_port=7443,
            run=world.run,
        )
        outcome = firewall(seed_policy(), ctx)
        assert outcome.outcome == agent_pb2.ACTION_OUTCOME_UNCHANGED, outcome.message
        assert ctx.commands == [] and "already in place" in outcome.message
        assert outcome.in_place == "ufw active, default incoming DROP, 8 IPv4 and 5 IPv6 rules"


def test_a_bad_policy_is_rejected_before_anything_is_read(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    world = FakeSystem(tmp_path, monkeypatch, live=False)
    ctx = context(coordinator_host="10.213.0.1", coordinator_port=7443, run=world.run)
    with pytest.raises(FieldError, match=r"rules\[0\]\.from_cidr"):
        firewall(one_rule(from_cidr="10.0.0.0/33"), ctx)
    assert world.ran == [] and ctx.commands == []


# ---------------------------------------------------------------- the shared runner


class LocalSandbox:
    """Runs the runner's argv on this machine (no namespaces): enough to test the runner."""

    name = "local"

    def run(self, argv: list[str], timeout: float = 30, env: Any = None) -> subprocess.CompletedProcess[str]:
        root = Path(__file__).resolve().parents[2]  # so `tests.actions...` imports in the child
        return subprocess.run(argv, capture_output=True, text=True, timeout=timeout, check=False, cwd=root)


def recording_executor(request: pb.FirewallPolicy, context: ActionContext) -> Outcome:
    """A stand-in executor for the runner test: records one command, shows the context."""
    context.change(["echo", request.rules[0].comment, context.coordinator_host])
    outcome = Outcome.done(context, f"port {context.coordinator_port}")
    outcome.facts.append(pb.Fact(key="k", value="v", secret=True))
    return outcome


def test_the_runner_returns_commands_facts_and_the_context_it_built() -> None:
    result = run_executor(
        LocalSandbox(),
        "tests.actions.test_firewall:recording_executor",
        one_rule(comment="hello there"),
        dry_run=True,
        timeout=20,
        coordinator=("10.213.0.1", 7443),
    )
    assert (result["outcome"], result["message"]) == ("PLANNED", "port 7443"), result
    assert result["commands"] == [
        {
            "argv": ["echo", "hello there", "10.213.0.1"],
            "ran": False,
            "exit_code": 0,
            "output_tail": "",
            "seconds": 0.0,
        }
    ]
    assert result["facts"] == [{"key": "k", "value": "v", "secret": True}]


def test_the_runner_carries_the_request_over_and_maps_a_rejection() -> None:
    result = run_executor(
        LocalSandbox(),
        "picoord.agent.actions.firewall:firewall",
        one_rule(port_from=2380, port_to=2379, protocol=TCP),
        dry_run=True,
        timeout=20,
        coordinator=("10.213.0.1", 7443),
    )
    assert result["outcome"] == "REJECTED"
    assert result["message"].startswith("rules[0].port_to: range 2380:2379 is inverted")
    assert result["commands"] == [] and result["error"] == ""


def test_the_runner_reports_an_executor_crash_with_its_traceback() -> None:
    result = run_executor(
        LocalSandbox(), "picoord.agent.actions.firewall.ufw:describe", pb.FirewallPolicy(), True, 20
    )
    assert result["outcome"] == "FAILED" and "executor error" in result["message"]
    assert "Traceback" in result["error"]


@pytest.mark.parametrize(
    ("text", "family", "accepts"),
    [
        (Path("/etc/ufw/before.rules").read_text(), 4, True),  # as Debian's ufw ships it
        (Path("/etc/ufw/before6.rules").read_text(), 6, True),
        (Path("/etc/ufw/before.rules").read_text(), 6, False),  # the IPv4 chain is not the IPv6 one
        ("-A ufw-before-input -m conntrack --ctstate RELATED,ESTABLISHED -j ACCEPT\n", 4, True),
        ("# -A ufw-before-input -m conntrack --ctstate RELATED,ESTABLISHED -j ACCEPT\n", 4, False),
        ("-A ufw-before-output -m conntrack --ctstate RELATED,ESTABLISHED -j ACCEPT\n", 4, False),
        ("", 4, False),
    ],
)
def test_ufw_keeps_the_coordinators_replies_only_while_before_rules_accept_established(
    text: str, family: int, accepts: bool
) -> None:
    assert ufw.accepts_established(text, family) is accepts


def test_ufw_takes_no_user_rule_for_the_coordinators_replies() -> None:
    assert [rule.direction for rule in ufw.user_rules(KEEP)] == ["out"]
    assert all(rule.established for rule in KEEP if rule.direction == "in")


def test_a_ufw_without_the_established_rule_is_refused_before_any_change(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    world = FakeSystem(tmp_path, monkeypatch, live=False)
    (tmp_path / "before4").write_text("*filter\nCOMMIT\n")
    ctx = context(coordinator_host="10.213.0.1", coordinator_port=7443, run=world.run)
    with pytest.raises(ActionFailed, match="does not accept established connections"):
        firewall(seed_policy(), ctx)
    assert ctx.commands == [] and Path(ufw.USER_RULES).read_text() == PRISTINE_V4

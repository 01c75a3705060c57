"""One definition of each limit: the spec reader and the checks on both ends agree."""

import pytest

from picoord.common import limits
from picoord.common.checks import firewall, storage
from picoord.coordinator.apply.cluster_spec import SpecError, parse_spec


def firewall_spec(rules: int) -> str:
    lines = ["kind: FirewallPolicy", "name: many", "nodes: [pi1]", "rules:"]
    lines += [f"  - {{action: allow, port: {1000 + index}, protocol: tcp}}" for index in range(rules)]
    return "\n".join(lines) + "\n"


def test_the_spec_reader_takes_as_many_firewall_rules_as_the_checks() -> None:
    (policy,) = parse_spec(firewall_spec(limits.FIREWALL_RULES))
    assert len(policy.rules) == limits.FIREWALL_RULES == firewall.MAX_RULES
    with pytest.raises(SpecError, match=rf"rules: has more than {limits.FIREWALL_RULES} entries"):
        parse_spec(firewall_spec(limits.FIREWALL_RULES + 1))


def test_the_spec_reader_uses_the_storage_limits() -> None:
    bricks = ", ".join(f"pi{index}:/data/b" for index in range(limits.GLUSTER_BRICKS + 1))
    with pytest.raises(SpecError, match=rf"bricks: has more than {limits.GLUSTER_BRICKS} entries"):
        parse_spec(f"kind: GlusterVolume\nname: v\nreplica: 2\nbricks: [{bricks}]\n")
    options = ", ".join(["noatime"] * (limits.MOUNT_OPTIONS + 1))
    with pytest.raises(SpecError, match=rf"options: has more than {limits.MOUNT_OPTIONS} entries"):
        parse_spec(f"kind: Mount\nname: m\ntype: tmpfs\ntarget: /mnt/m\nnodes: [pi1]\noptions: [{options}]\n")
    assert (storage.MAX_BRICKS, storage.MAX_OPTIONS, storage.MAX_PEERS) == (
        limits.GLUSTER_BRICKS,
        limits.MOUNT_OPTIONS,
        limits.GLUSTER_PEERS,
    )


def test_history_bounds_hold_two_of_the_largest_samples() -> None:
    """Rates need two samples: the per-node byte bound must fit two at their budget."""
    assert 2 * limits.MESSAGE_BYTES["metrics"] <= limits.HISTORY_NODE_BYTES
    assert limits.HISTORY_TOTAL_BYTES >= limits.HISTORY_NODE_BYTES


def test_a_nodes_log_chunks_stay_far_below_its_message_share() -> None:
    """Log chunks count against the session's per-node message share: a node streaming logs
    at its most must leave room for its samples and reports, or its session would end."""
    from picoord.coordinator.servicers.session import SessionLimits

    share = SessionLimits().messages
    most = limits.LOG_NODE_MESSAGE_BURST + share.window * limits.LOG_NODE_MESSAGES
    assert most <= share.max_failures * 0.75

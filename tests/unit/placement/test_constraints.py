"""Constraints: Swarm's text, nodeSelector pairs, matching with one arch normalisation."""

import pytest

from picoord.common.validation import FieldError
from picoord.coordinator.placement.constraints import (
    Constraint,
    NodeFacts,
    Spread,
    first_unmet,
    from_node_selector,
    matches,
    parse_constraint,
    parse_spread,
)

PI = NodeFacts("pi1", arch="aarch64", hostname="raspberrypi", labels={"disk": "ssd", "zone": "shelf-a"})
PI32 = NodeFacts("pi0", arch="armv7l")
DESKTOP = NodeFacts("ubuntu-desktop", arch="x86_64", role="manager", labels={"gpu": "nvidia"})
MAC = NodeFacts("mac", arch="arm64")
BARE = NodeFacts("bare")  # no arch reported yet


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("node.platform.arch == aarch64", Constraint("node.arch", "==", "aarch64")),
        ("node.arch==arm64", Constraint("node.arch", "==", "arm64")),
        ("node.hostname != ubuntu-desktop", Constraint("node.hostname", "!=", "ubuntu-desktop")),
        ("node.role == manager", Constraint("node.role", "==", "manager")),
        ("node.id == pi1", Constraint("node.id", "==", "pi1")),
        ("node.platform.os == linux", Constraint("node.platform.os", "==", "linux")),
        ("  node.labels.disk   ==  ssd ", Constraint("node.labels.disk", "==", "ssd")),
        ("node.labels.example.com/tier!=cold", Constraint("node.labels.example.com/tier", "!=", "cold")),
    ],
)
def test_parse_constraint(text, expected):
    assert parse_constraint("placement.constraints[0]", text) == expected


@pytest.mark.parametrize(
    ("text", "words"),
    [
        ("engine.labels.x == y", "unknown constraint key 'engine.labels.x'"),
        ("node.cpu == 4", "unknown constraint key 'node.cpu'"),
        ("arch == arm64", "unknown constraint key 'arch'"),
        ("node.arch = arm64", "operator '=' in"),
        ("node.arch >= arm64", "operator '>=' in"),
        ("node.arch < arm64", "operator '<' in"),
        ("node.arch arm64", "is not KEY == VALUE"),
        ("node.arch ==", "constraint value ''"),
        ("node.arch == arm 64", "constraint value 'arm 64'"),
        ("node.arch == $(reboot)", "constraint value '$(reboot)'"),
        ("node.labels. == x", "invalid label key ''"),
        ("node.labels.-bad == x", "invalid label key '-bad'"),
        ("", "is not KEY == VALUE"),
    ],
)
def test_parse_constraint_rejects_with_the_field_named(text, words):
    with pytest.raises(FieldError) as caught:
        parse_constraint("deploy.placement.constraints[1]", text)
    assert caught.value.field == "deploy.placement.constraints[1]"
    assert words in str(caught.value)


def test_parse_constraint_rejects_a_non_string():
    with pytest.raises(FieldError, match="must be a string, not int"):
        parse_constraint("c", 3)


@pytest.mark.parametrize(
    ("key", "value", "expected"),
    [
        ("kubernetes.io/arch", "arm64", Constraint("node.arch", "==", "arm64")),
        ("beta.kubernetes.io/arch", "amd64", Constraint("node.arch", "==", "amd64")),
        ("kubernetes.io/hostname", "pi3", Constraint("node.hostname", "==", "pi3")),
        ("kubernetes.io/os", "linux", Constraint("node.platform.os", "==", "linux")),
        ("disk", "ssd", Constraint("node.labels.disk", "==", "ssd")),
        ("example.com/zone", "a", Constraint("node.labels.example.com/zone", "==", "a")),
    ],
)
def test_from_node_selector(key, value, expected):
    assert from_node_selector("spec.template.spec.nodeSelector", key, value) == expected


def test_from_node_selector_rejects_bad_values():
    with pytest.raises(FieldError, match="nodeSelector keys and values must be strings"):
        from_node_selector("nodeSelector", "disk", 1)
    with pytest.raises(FieldError, match="invalid label key"):
        from_node_selector("nodeSelector", "-x", "y")


@pytest.mark.parametrize(
    ("text", "node", "expected"),
    [
        # one normalisation on both sides: each spelling matches each spelling of the same arch
        ("node.platform.arch == aarch64", PI, True),
        ("node.platform.arch == aarch64", MAC, True),
        ("node.arch == arm64", PI, True),
        ("node.arch == ARM64", PI, True),
        ("node.arch == aarch64", PI32, False),
        ("node.arch == armhf", PI32, True),
        ("node.arch == arm", PI32, True),
        ("node.arch == armv7l", PI32, True),
        ("node.arch == amd64", DESKTOP, True),
        ("node.arch == x86_64", DESKTOP, True),
        ("node.arch != x86_64", DESKTOP, False),
        ("node.arch != aarch64", DESKTOP, True),
        ("node.arch == aarch64", BARE, False),  # unknown arch never equals
        ("node.arch != aarch64", BARE, True),
        # hostname: the node's name or the hostname it reports, case-insensitive like Swarm
        ("node.hostname == pi1", PI, True),
        ("node.hostname == raspberrypi", PI, True),
        ("node.hostname == PI1", PI, True),
        ("node.hostname != pi1", PI, False),
        ("node.hostname == pi2", PI, False),
        ("node.id == pi1", PI, True),
        ("node.id == raspberrypi", PI, False),
        ("node.role == manager", DESKTOP, True),
        ("node.role == manager", PI, False),
        ("node.role == worker", PI, True),
        ("node.platform.os == linux", PI, True),
        ("node.platform.os != linux", PI, False),
        # labels: an absent label is "not equal" to anything
        ("node.labels.disk == ssd", PI, True),
        ("node.labels.disk == SSD", PI, True),
        ("node.labels.disk == hdd", PI, False),
        ("node.labels.disk != hdd", PI, True),
        ("node.labels.disk == ssd", DESKTOP, False),
        ("node.labels.disk != ssd", DESKTOP, True),
    ],
)
def test_matches(text, node, expected):
    assert matches(parse_constraint("c", text), node) is expected


def test_unmet_is_the_negation_and_first_unmet_keeps_the_written_order():
    arch = parse_constraint("c", "node.platform.arch == aarch64")
    not_desktop = parse_constraint("c", "node.hostname != ubuntu-desktop")
    assert arch.unmet() == "node.arch != aarch64"
    assert not_desktop.unmet() == "node.hostname == ubuntu-desktop"
    assert str(arch) == "node.arch == aarch64"
    assert first_unmet((arch, not_desktop), DESKTOP) is arch
    assert first_unmet((not_desktop, arch), DESKTOP) is not_desktop
    assert first_unmet((arch, not_desktop), PI) is None
    assert first_unmet((), BARE) is None


def test_parse_spread():
    assert parse_spread("preferences[0].spread", "node.labels.zone") == "zone"
    assert Spread() == Spread(max_per_node=0, over_label="")
    for bad in ("node.hostname", "zone", "node.labels.", 3):
        with pytest.raises(FieldError) as caught:
            parse_spread("preferences[0].spread", bad)
        assert caught.value.field == "preferences[0].spread"

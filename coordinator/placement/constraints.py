"""Placement constraints in Docker Swarm's syntax, and the spread preferences beside them.

A stack file's `node.platform.arch == aarch64` and a Kubernetes nodeSelector's
`kubernetes.io/arch: arm64` both become the same `Constraint`, so the scheduler knows one
form. Matching follows swarmkit's: values compare case-insensitively, an absent label is
"not equal" to anything, and architectures are normalised on both sides by the one
`normalise_arch` (so aarch64/arm64, x86_64/amd64 and armv7l/armhf/arm are each one arch).

A rejected node is explained by the negation of the constraint it fails
(`node.arch != aarch64` for a failed `node.arch == aarch64`), which is what the scheduler
aggregates into Kubernetes' "0/5 nodes available: ..." line.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field

from picoord.common.names import InvalidName, normalise_arch, validate_label_key
from picoord.common.validation import FieldError

EQUAL = "=="
NOT_EQUAL = "!="
OPERATORS = (EQUAL, NOT_EQUAL)

# Canonical keys. Aliases below map Swarm's and Kubernetes' spellings onto them.
ARCH = "node.arch"
HOSTNAME = "node.hostname"
NODE_ID = "node.id"
ROLE = "node.role"
OS = "node.platform.os"
LABEL_PREFIX = "node.labels."

_KEY_ALIASES = {
    "node.arch": ARCH,
    "node.platform.arch": ARCH,
    "node.hostname": HOSTNAME,
    "node.id": NODE_ID,
    "node.role": ROLE,
    "node.platform.os": OS,
}
# nodeSelector keys with a built-in meaning; any other key is a node label.
_SELECTOR_KEYS = {
    "kubernetes.io/arch": ARCH,
    "beta.kubernetes.io/arch": ARCH,
    "kubernetes.io/hostname": HOSTNAME,
    "kubernetes.io/os": OS,
    "beta.kubernetes.io/os": OS,
}
KNOWN_KEYS = (ARCH, "node.platform.arch", HOSTNAME, NODE_ID, ROLE, OS, LABEL_PREFIX + "KEY")

# Swarm splits on the operator; a single '=' or '>=' is a typo we name rather than guess.
_SPLIT = re.compile(r"^\s*([^=!<>\s]+)\s*(==|!=|=|<=|>=|<|>|!)\s*(.*?)\s*$")
_VALUE = re.compile(r"^[A-Za-z0-9_./:+-]{1,253}$")


@dataclass(frozen=True)
class NodeFacts:
    """What constraints can see of a node. `role` is set by the shell: "manager" for the
    node that hosts the coordinator, "worker" otherwise (Swarm's two roles)."""

    name: str
    arch: str = ""
    hostname: str = ""  # as the node reports it; "" means the same as name
    role: str = "worker"
    os: str = "linux"
    labels: Mapping[str, str] = field(default_factory=dict)
    swarm: bool = False  # in the Swarm picoord's membership actions made (overlay stacks need it)


@dataclass(frozen=True)
class Constraint:
    """`key operator value`, with `key` canonical (see KNOWN_KEYS).

    Build one with `parse_constraint` or `from_node_selector`; constructing it directly is
    fine for canonical keys."""

    key: str
    operator: str
    value: str

    def __str__(self) -> str:
        return f"{self.key} {self.operator} {self.value}"

    def unmet(self) -> str:
        """Why a node fails this constraint, e.g. `node.arch != aarch64`."""
        other = NOT_EQUAL if self.operator == EQUAL else EQUAL
        return f"{self.key} {other} {self.value}"

    @property
    def label(self) -> str | None:
        return self.key[len(LABEL_PREFIX) :] if self.key.startswith(LABEL_PREFIX) else None


@dataclass(frozen=True)
class Spread:
    """How replicas of one service spread: at most `max_per_node` on a node (0: no limit;
    1 is "one per node"), and evenly over the values of node label `over_label` ("" for none),
    like Swarm's `max_replicas_per_node` and `preferences: - spread: node.labels.zone`.
    Replicas always prefer the node with the fewest of their service, whatever this says."""

    max_per_node: int = 0
    over_label: str = ""


def _canonical_key(field_name: str, key: str) -> str:
    if key in _KEY_ALIASES:
        return _KEY_ALIASES[key]
    if key.startswith(LABEL_PREFIX):
        label = key[len(LABEL_PREFIX) :]
        try:
            validate_label_key(label)
        except InvalidName as error:
            raise FieldError(field_name, str(error)) from None
        return key
    raise FieldError(field_name, f"unknown constraint key {key!r}; use one of {', '.join(KNOWN_KEYS)}")


def _checked_value(field_name: str, value: str) -> str:
    if not isinstance(value, str) or not _VALUE.fullmatch(value):
        raise FieldError(
            field_name,
            f"constraint value {value!r} must be 1-253 letters, digits or any of _ . / : + -",
        )
    return value


def make_constraint(field_name: str, key: str, operator: str, value: str) -> Constraint:
    """A validated Constraint from its three parts (Swarm or canonical key)."""
    if operator not in OPERATORS:
        raise FieldError(field_name, f"operator {operator!r} is not supported; use == or !=")
    return Constraint(_canonical_key(field_name, key), operator, _checked_value(field_name, value))


def parse_constraint(field_name: str, text: str) -> Constraint:
    """`node.platform.arch == aarch64`, `node.labels.disk!=hdd`, ... (Swarm's syntax)."""
    if not isinstance(text, str):
        raise FieldError(field_name, f"a constraint must be a string, not {type(text).__name__}")
    match = _SPLIT.match(text)
    if not match:
        raise FieldError(field_name, f"{text!r} is not KEY == VALUE or KEY != VALUE")
    key, operator, value = match.groups()
    if operator not in OPERATORS:
        raise FieldError(field_name, f"operator {operator!r} in {text!r} is not supported; use == or !=")
    return make_constraint(field_name, key, operator, value)


def from_node_selector(field_name: str, key: str, value: str) -> Constraint:
    """A Kubernetes nodeSelector pair as an `==` constraint (other keys are node labels)."""
    if not isinstance(key, str) or not isinstance(value, str):
        raise FieldError(field_name, "nodeSelector keys and values must be strings")
    canonical = _SELECTOR_KEYS.get(key, LABEL_PREFIX + key)
    return make_constraint(field_name, canonical, EQUAL, value)


def parse_spread(field_name: str, text: str) -> str:
    """Swarm's `spread: node.labels.zone` -> the label key `zone`."""
    if not isinstance(text, str) or not text.startswith(LABEL_PREFIX):
        raise FieldError(field_name, f"spread {text!r} must name a node label: node.labels.KEY")
    _canonical_key(field_name, text)
    return text[len(LABEL_PREFIX) :]


def _fact_values(constraint: Constraint, node: NodeFacts) -> tuple[str, ...] | None:
    """The node's values for the key, normalised like the constraint's; None if absent."""
    if constraint.key == ARCH:
        return (normalise_arch(node.arch),) if node.arch else None
    if constraint.key == HOSTNAME:
        return (node.name, node.hostname) if node.hostname else (node.name,)
    if constraint.key == NODE_ID:
        return (node.name,)
    if constraint.key == ROLE:
        return (node.role,)
    if constraint.key == OS:
        return (node.os,)
    label = constraint.label
    if label is not None and label in node.labels:
        return (node.labels[label],)
    return None


def matches(constraint: Constraint, node: NodeFacts) -> bool:
    """Swarm's rule: `==` needs the value present and equal; `!=` holds when absent too."""
    wanted = normalise_arch(constraint.value) if constraint.key == ARCH else constraint.value
    values = _fact_values(constraint, node)
    equal = values is not None and any(value.casefold() == wanted.casefold() for value in values)
    return equal if constraint.operator == EQUAL else not equal


def first_unmet(constraints: tuple[Constraint, ...] | list[Constraint], node: NodeFacts) -> Constraint | None:
    """The first constraint the node fails, in the order written (for a stable reason)."""
    for constraint in constraints:
        if not matches(constraint, node):
            return constraint
    return None

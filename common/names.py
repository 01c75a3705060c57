"""Validation of node names and labels, the identifiers every message carries.

Node names are RFC 1123 DNS labels because they end up as certificate common names,
hostnames in join commands and Prometheus `instance` labels. Label keys and values
follow Kubernetes' rules so manifests brought over from the seed keep their meaning.
"""

from __future__ import annotations

import re

_DNS_LABEL = re.compile(r"^[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?$")
_DNS_SUBDOMAIN = re.compile(r"^[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?(\.[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?)*$")
_LABEL_NAME = re.compile(r"^[A-Za-z0-9]([A-Za-z0-9_.-]{0,61}[A-Za-z0-9])?$")


class InvalidName(ValueError):
    """A node name, label key or label value that does not follow the rules."""


# Each architecture under its several spellings (uname -m, Docker/Go, Debian), so that
# `node.platform.arch == aarch64` and `kubernetes.io/arch: arm64` mean the same nodes.
_ARCH_ALIASES = {
    "aarch64": "arm64",
    "arm64": "arm64",
    "armv8": "arm64",
    "x86_64": "amd64",
    "amd64": "amd64",
    "x86-64": "amd64",
    "armv7l": "arm",
    "armv7": "arm",
    "armhf": "arm",
    "arm": "arm",
}


def normalise_arch(arch: str) -> str:
    """The one spelling of a CPU architecture: arm64, amd64 or arm (others lowercased as given)."""
    lowered = arch.strip().lower()
    return _ARCH_ALIASES.get(lowered, lowered)


def validate_node_name(name: str) -> str:
    if not isinstance(name, str) or not _DNS_LABEL.fullmatch(name):
        raise InvalidName(
            f"invalid node name {name!r}: use a DNS label (lowercase letters, digits and '-', "
            "1-63 characters, starting and ending with a letter or digit)"
        )
    return name


def validate_label_key(key: str) -> str:
    prefix, _, name = key.rpartition("/")
    if prefix and (len(prefix) > 253 or not _DNS_SUBDOMAIN.fullmatch(prefix)):
        raise InvalidName(f"invalid label key {key!r}: the prefix must be a DNS subdomain")
    if not _LABEL_NAME.fullmatch(name):
        raise InvalidName(
            f"invalid label key {key!r}: 1-63 characters of letters, digits, '-', '_' or '.', "
            "starting and ending with a letter or digit"
        )
    return key


def validate_label_value(key: str, value: str) -> str:
    if value and not _LABEL_NAME.fullmatch(value):
        raise InvalidName(
            f"invalid value {value!r} for label {key!r}: at most 63 characters of letters, digits, "
            "'-', '_' or '.', starting and ending with a letter or digit"
        )
    return value


def validate_labels(labels: dict[str, str]) -> dict[str, str]:
    for key, value in labels.items():
        validate_label_key(key)
        validate_label_value(key, value)
    return dict(labels)


def parse_label_assignment(text: str) -> tuple[str, str]:
    """Parse `key=value` as typed on a command line."""
    key, sep, value = text.partition("=")
    if not sep:
        raise InvalidName(f"invalid label {text!r}: expected key=value")
    return validate_label_key(key), validate_label_value(key, value)

"""Node names are DNS labels; labels follow Kubernetes' syntax."""

import pytest

from picoord.common.names import (
    InvalidName,
    parse_label_assignment,
    validate_label_key,
    validate_labels,
    validate_node_name,
)


@pytest.mark.parametrize("name", ["pi1", "a", "rack-2-pi-14", "x" * 63, "0pi"])
def test_valid_node_names(name: str) -> None:
    assert validate_node_name(name) == name


@pytest.mark.parametrize(
    "name", ["", "Pi1", "-pi", "pi-", "pi_1", "pi.lan", "x" * 64, "pi 1", "pi;rm", "--help", "pi\n"]
)
def test_invalid_node_names(name: str) -> None:
    with pytest.raises(InvalidName, match="DNS label"):
        validate_node_name(name)


@pytest.mark.parametrize("key", ["role", "kubernetes.io/arch", "node.picoord/zone", "a_b.c-d"])
def test_valid_label_keys(key: str) -> None:
    assert validate_label_key(key) == key


@pytest.mark.parametrize("key", ["", "-role", "role-", "Bad_Prefix/x", "a/b/c", "x" * 64, "$(id)"])
def test_invalid_label_keys(key: str) -> None:
    with pytest.raises(InvalidName):
        validate_label_key(key)


def test_label_values() -> None:
    assert validate_labels({"role": "storage", "empty": ""}) == {"role": "storage", "empty": ""}
    with pytest.raises(InvalidName, match="value"):
        validate_labels({"role": "a b"})


@pytest.mark.parametrize(
    ("text", "expected"), [("role=storage", ("role", "storage")), ("arch=", ("arch", ""))]
)
def test_parse_label_assignment(text: str, expected: tuple[str, str]) -> None:
    assert parse_label_assignment(text) == expected


@pytest.mark.parametrize("text", ["role", "=x", "role=a;b"])
def test_parse_label_assignment_rejects(text: str) -> None:
    with pytest.raises(InvalidName):
        parse_label_assignment(text)

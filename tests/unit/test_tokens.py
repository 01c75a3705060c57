"""Bootstrap tokens: format, secrecy, and the pure enrollment decision."""

import re

import pytest

from picoord.common.tokens import BootstrapToken, InvalidToken, hash_secret
from picoord.coordinator.store import TokenRecord
from picoord.coordinator.tokens import TokenRefused, check_token


def test_generated_tokens_have_kubeadm_format_and_differ() -> None:
    tokens = {str(BootstrapToken.generate()) for _ in range(200)}
    assert len(tokens) == 200
    assert all(re.fullmatch(r"[a-z0-9]{6}\.[a-z0-9]{16}", token) for token in tokens)


@pytest.mark.parametrize(
    "text",
    [
        "",
        "abcdef0123456789abcdef",
        "abcde.0123456789abcdef",
        "abcdef.0123456789abcde",
        "ABCDEF.0123456789abcdef",
        "abcdef.0123456789abcdeg;",
        "abcdef:0123456789abcdef",
        "-bcdef.0123456789abcdef",
    ],
)
def test_malformed_tokens_are_rejected(text: str) -> None:
    with pytest.raises(InvalidToken):
        BootstrapToken.parse(text)


def test_repr_hides_the_secret() -> None:
    token = BootstrapToken.parse("abcdef.0123456789abcdef")
    assert "0123456789abcdef" not in repr(token)
    assert str(token) == "abcdef.0123456789abcdef"


def record(**overrides: object) -> TokenRecord:
    values = {
        "token_id": "abcdef",
        "secret_hash": hash_secret("0123456789abcdef"),
        "created_at": 0.0,
        "expires_at": 100.0,
        "usage_limit": 0,
        "uses": 0,
        "description": "",
    }
    values.update(overrides)
    return TokenRecord(**values)  # type: ignore[arg-type]


GOOD = BootstrapToken("abcdef", "0123456789abcdef")


@pytest.mark.parametrize(
    ("token", "stored", "now", "refusal"),
    [
        (GOOD, record(), 50.0, None),
        (GOOD, record(usage_limit=3, uses=2), 50.0, None),
        (GOOD, None, 50.0, "unknown token or wrong secret"),
        (BootstrapToken("abcdef", "0123456789abcdee"), record(), 50.0, "unknown token or wrong secret"),
        (GOOD, record(), 100.0, "expired"),
        (GOOD, record(), 150.0, "expired"),
        (GOOD, record(usage_limit=3, uses=3), 50.0, "used up"),
        (GOOD, record(usage_limit=1, uses=5), 50.0, "used up"),
    ],
)
def test_check_token(
    token: BootstrapToken, stored: TokenRecord | None, now: float, refusal: str | None
) -> None:
    if refusal is None:
        check_token(token, stored, now)
    else:
        with pytest.raises(TokenRefused, match=refusal):
            check_token(token, stored, now)

"""Bootstrap tokens in kubeadm's format: `[a-z0-9]{6}.[a-z0-9]{16}`.

The six-character id is public (it names the token in listings); the sixteen-character
secret is only ever stored hashed.
"""

from __future__ import annotations

import hashlib
import hmac
import re
import secrets
import string
from dataclasses import dataclass

TOKEN_PATTERN = re.compile(r"^([a-z0-9]{6})\.([a-z0-9]{16})$")
_ALPHABET = string.ascii_lowercase + string.digits


class InvalidToken(ValueError):
    """The text is not a bootstrap token."""


@dataclass(frozen=True)
class BootstrapToken:
    token_id: str
    secret: str

    def __str__(self) -> str:
        return f"{self.token_id}.{self.secret}"

    def __repr__(self) -> str:  # never print the secret by accident
        return f"BootstrapToken(token_id={self.token_id!r}, secret=<hidden>)"

    @property
    def secret_hash(self) -> str:
        return hash_secret(self.secret)

    @classmethod
    def parse(cls, text: str) -> BootstrapToken:
        match = TOKEN_PATTERN.fullmatch(text.strip()) if isinstance(text, str) else None
        if not match:
            raise InvalidToken("malformed token: expected 6 and 16 characters of [a-z0-9] joined by '.'")
        return cls(match.group(1), match.group(2))

    @classmethod
    def generate(cls) -> BootstrapToken:
        def pick(length: int) -> str:
            return "".join(secrets.choice(_ALPHABET) for _ in range(length))

        return cls(pick(6), pick(16))


def hash_secret(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()


def secret_matches(secret: str, stored_hash: str) -> bool:
    return hmac.compare_digest(hash_secret(secret), stored_hash)

"""Whether a bootstrap token may enroll a node now: a pure decision over the stored record."""

from __future__ import annotations

from picoord.common.tokens import BootstrapToken, secret_matches
from picoord.coordinator.store import TokenRecord


class TokenRefused(Exception):
    """The token cannot be used; the message is safe to show the joining agent."""


def check_token(token: BootstrapToken, record: TokenRecord | None, now: float) -> None:
    # Unknown id and wrong secret read the same, so the reply does not confirm which ids exist.
    if record is None or not secret_matches(token.secret, record.secret_hash):
        raise TokenRefused("unknown token or wrong secret")
    if record.expires_at <= now:
        raise TokenRefused(f"token {token.token_id} has expired")
    if record.usage_limit and record.uses >= record.usage_limit:
        raise TokenRefused(f"token {token.token_id} is used up ({record.uses} of {record.usage_limit} uses)")

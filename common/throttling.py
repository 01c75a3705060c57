"""Raspberry Pi firmware throttling flags, as `vcgencmd get_throttled` reports them."""

from __future__ import annotations

THROTTLE_FLAGS: dict[int, str] = {
    0: "under-voltage",
    1: "frequency capped",
    2: "throttled",
    3: "soft temperature limit",
    16: "under-voltage occurred",
    17: "frequency capping occurred",
    18: "throttling occurred",
    19: "soft temperature limit occurred",
}


def describe_throttled(bits: int) -> list[str]:
    """Names of the set flags, current conditions first."""
    return [name for bit, name in THROTTLE_FLAGS.items() if bits & (1 << bit)]

"""Raspberry Pi firmware throttling flags, as `vcgencmd get_throttled` reports them."""

from __future__ import annotations

# Bits 0-3 are conditions now, 16-19 the same conditions since boot.
THROTTLED_FLAGS: dict[int, str] = {
    0: "under-voltage",
    1: "arm frequency capped",
    2: "currently throttled",
    3: "soft temperature limit active",
    16: "under-voltage has occurred",
    17: "arm frequency capping has occurred",
    18: "throttling has occurred",
    19: "soft temperature limit has occurred",
}


def describe_throttled(bits: int) -> list[str]:
    """Short words for each set bit, current conditions first; an undocumented bit is shown, never hidden."""
    return [THROTTLED_FLAGS.get(bit, f"unknown flag bit {bit}") for bit in range(32) if bits & (1 << bit)]

"""Untrusted text is clipped before it is logged, and refusals are logged at a bounded rate."""

import pytest

from picoord.common.logs import LogThrottle, clipped


@pytest.mark.parametrize(
    ("value", "limit", "expected"),
    [
        ("short", 10, "short"),
        ("x" * 10, 10, "x" * 10),
        ("x" * 11, 10, "x" * 10 + "...(+1 characters)"),
        ("y" * 1_000_000, 5, "yyyyy...(+999995 characters)"),
        (b"abc", 10, "abc"),
        (b"\xff" * 20, 2, "\ufffd\ufffd...(+18 bytes)"),
        (12345, 3, "123...(+2 characters)"),
        ("", 0, ""),
    ],
)
def test_clipped(value: object, limit: int, expected: str) -> None:
    assert clipped(value, limit) == expected


def test_clipped_has_a_default_limit() -> None:
    assert len(clipped("z" * 10**6)) < 300


# (key, now) -> (logged?, held back before it), in order, with one line per 10 s per key.
THROTTLE_STEPS = [
    ("pi1", 0.0, (True, 0)),
    ("pi1", 1.0, (False, 0)),
    ("pi1", 9.9, (False, 0)),
    ("pi2", 9.9, (True, 0)),
    ("pi1", 10.0, (True, 2)),
    ("pi1", 19.0, (False, 0)),
    ("pi1", 40.0, (True, 1)),
    ("pi1", 41.0, (False, 0)),
    ("pi1", 5.0, (True, 1)),  # the clock went back: log rather than stay silent
]


def test_throttle_steps() -> None:
    throttle = LogThrottle(every=10.0)
    assert [throttle.admit(key, now) for key, now, _ in THROTTLE_STEPS] == [
        expected for _, _, expected in THROTTLE_STEPS
    ]


def test_throttle_forgets_the_least_recent_keys_beyond_its_bound() -> None:
    throttle = LogThrottle(every=10.0, max_keys=3)
    for index in range(1000):
        assert throttle.admit(f"10.0.{index // 256}.{index % 256}", 0.0) == (True, 0)
    assert len(throttle._last) == 3
    assert throttle.admit("10.0.3.231", 1.0) == (False, 0)  # among the last three: still held
    assert throttle.admit("10.0.0.0", 1.0) == (True, 0)  # forgotten: logs again

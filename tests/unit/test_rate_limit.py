"""Failed-enrollment throttling: a pure decision over injected time."""

from __future__ import annotations

import pytest

from picoord.coordinator.rate_limit import (
    FailureThrottle,
    ThrottlePolicy,
    duty_pause,
    retry_hint,
    source_of_peer,
)

POLICY = ThrottlePolicy(max_failures=3, window=60.0, ban=30.0, max_sources=4)

# Each event: (time, source, what happens) where what is "fail", "ok" (a good enrollment)
# or "check" (asking before the token is looked at); the expected column is what
# retry_after gives at that moment, before the event is applied.
SCENARIOS = {
    "below the threshold nobody waits": [
        (0, "a", "fail", 0),
        (1, "a", "fail", 0),
        (2, "a", "check", 0),
    ],
    "the third failure within the window bans for 30 s": [
        (0, "a", "fail", 0),
        (1, "a", "fail", 0),
        (2, "a", "fail", 0),
        (3, "a", "check", 29),
        (31, "a", "check", 1),
        (32, "a", "check", 0),
    ],
    "a ban ends with a clean slate": [
        (0, "a", "fail", 0),
        (1, "a", "fail", 0),
        (2, "a", "fail", 0),
        (40, "a", "fail", 0),
        (41, "a", "fail", 0),
        (42, "a", "check", 0),
    ],
    "failures spread wider than the window never ban": [
        (0, "a", "fail", 0),
        (50, "a", "fail", 0),
        (100, "a", "fail", 0),
        (101, "a", "check", 0),
    ],
    "attempts during a ban do not lengthen it": [
        (0, "a", "fail", 0),
        (1, "a", "fail", 0),
        (2, "a", "fail", 0),
        (10, "a", "fail", 22),
        (20, "a", "fail", 12),
        (32, "a", "check", 0),
    ],
    "other sources are unaffected": [
        (0, "a", "fail", 0),
        (1, "a", "fail", 0),
        (2, "a", "fail", 0),
        (3, "b", "check", 0),
        (3, "b", "ok", 0),
        (4, "a", "check", 28),
    ],
    "a good enrollment clears the record": [
        (0, "a", "fail", 0),
        (1, "a", "fail", 0),
        (2, "a", "ok", 0),
        (3, "a", "fail", 0),
        (4, "a", "fail", 0),
        (5, "a", "check", 0),
    ],
}


@pytest.mark.parametrize("events", SCENARIOS.values(), ids=SCENARIOS.keys())
def test_throttle_scenarios(events: list[tuple[float, str, str, float]]) -> None:
    throttle = FailureThrottle(POLICY)
    for now, source, what, expected_wait in events:
        assert throttle.retry_after(source, now) == pytest.approx(expected_wait), (now, source, what)
        if what == "fail":
            throttle.failed(source, now)
        elif what == "ok":
            throttle.succeeded(source)


def test_failed_says_when_a_ban_starts() -> None:
    throttle = FailureThrottle(POLICY)
    assert [throttle.failed("a", t) for t in range(5)] == [False, False, True, False, False]


def test_the_table_is_bounded_by_max_sources() -> None:
    throttle = FailureThrottle(POLICY)
    for number in range(1000):
        throttle.failed(f"10.0.{number // 256}.{number % 256}", float(number))
    assert len(throttle) == POLICY.max_sources


def test_the_least_recently_seen_source_goes_first() -> None:
    throttle = FailureThrottle(POLICY)
    for t in range(3):
        throttle.failed("attacker", float(t))  # banned at t=2
    for number in range(POLICY.max_sources - 1):
        throttle.failed(f"other{number}", 3.0)
    assert throttle.retry_after("attacker", 4.0) > 0  # still held: others evicted first only when full
    throttle.failed("newcomer", 5.0)
    assert throttle.retry_after("attacker", 6.0) == 0  # the oldest entry made room


@pytest.mark.parametrize(
    ("policy", "valid"),
    [
        (dict(max_failures=1), True),
        (dict(max_failures=0), False),
        (dict(window=0), False),
        (dict(ban=-1), False),
        (dict(max_sources=0), False),
    ],
)
def test_policy_validation(policy: dict[str, float], valid: bool) -> None:
    if valid:
        ThrottlePolicy(**policy)  # type: ignore[arg-type]
    else:
        with pytest.raises(ValueError, match="invalid throttle policy"):
            ThrottlePolicy(**policy)  # type: ignore[arg-type]


def test_a_single_failure_policy_bans_at_once() -> None:
    throttle = FailureThrottle(ThrottlePolicy(max_failures=1, ban=5.0))
    assert throttle.failed("a", 0.0)
    assert throttle.retry_after("a", 1.0) == pytest.approx(4.0)


@pytest.mark.parametrize(
    ("peer", "source"),
    [
        ("ipv4:10.0.0.5:40000", "10.0.0.5"),
        ("ipv4:127.0.0.1:1", "127.0.0.1"),
        ("ipv6:[2001:db8::7]:40000", "2001:db8::/64"),
        ("ipv6:%5B2001:db8:0:0:ffff::1%5D:40000", "2001:db8::/64"),
        ("ipv6:[::ffff:10.0.0.5]:40000", "10.0.0.5"),
        ("ipv6:[fe80::1%25eth0]:40000", "fe80::/64"),
        ("unix:/run/picoord/admin.sock", "unix:/run/picoord/admin.sock"),
        ("ipv4:not-an-address:1", "ipv4:not-an-address:1"),
        ("x" * 10_000, "x" * 128),
    ],
)
def test_source_of_peer(peer: str, source: str) -> None:
    assert source_of_peer(peer) == source


@pytest.mark.parametrize(
    ("seconds", "text"), [(0.01, "retry in 1 s"), (26.2, "retry in 27 s"), (60, "retry in 60 s")]
)
def test_retry_hint_rounds_up(seconds: float, text: str) -> None:
    assert retry_hint(seconds) == text


@pytest.mark.parametrize(
    ("busy", "duty", "pause"),
    [
        (0.04, 0.3, 0.04 * 0.7 / 0.3),  # a 5,000-node tick: rest about 93 ms
        (0.001, 0.3, 0.001 * 0.7 / 0.3),  # a small cluster's tick: about 2 ms
        (0.5, 0.2, 2.0),  # a render at 20 %: four times its length
        (0.0, 0.2, 0.0),
        (-1.0, 0.5, 0.0),  # a clock step backwards rests nothing
        (0.3, 1.0, 0.0),  # a duty of the whole time never rests
    ],
)
def test_duty_pause_keeps_work_to_its_share(busy: float, duty: float, pause: float) -> None:
    assert duty_pause(busy, duty) == pytest.approx(pause)
    if busy > 0:
        assert busy / (busy + duty_pause(busy, duty)) == pytest.approx(duty)


@pytest.mark.parametrize("duty", [0.0, -0.1, 1.5])
def test_duty_pause_refuses_a_share_outside_zero_to_one(duty: float) -> None:
    with pytest.raises(ValueError, match="share"):
        duty_pause(1.0, duty)

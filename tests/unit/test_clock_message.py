"""The line that names a wrong clock, from a certificate window and the node's time."""

from __future__ import annotations

import datetime as dt

import pytest

from picoord.agent.clock import JOIN_AGAIN, RETRIES_BY_ITSELF, clock_message


def at(text: str) -> float:
    return dt.datetime.fromisoformat(text).replace(tzinfo=dt.UTC).timestamp()


START, END = at("2026-12-06 19:55:00"), at("2027-12-06 19:55:00")


@pytest.mark.parametrize(
    ("now", "then", "expected"),
    [
        (
            at("2026-12-03 20:03:30"),
            RETRIES_BY_ITSELF,
            "this node's clock says 2026-12-03 20:03 UTC, but the coordinator's certificate is valid "
            "from 2026-12-06 19:55 UTC: set the time (timedatectl, NTP); picoord-agent retries by itself",
        ),
        (
            at("2027-12-09 08:00:00"),
            RETRIES_BY_ITSELF,
            "this node's clock says 2027-12-09 08:00 UTC, but the coordinator's certificate expired "
            "at 2027-12-06 19:55 UTC: set the time (timedatectl, NTP); picoord-agent retries by itself",
        ),
        (
            END,  # the end itself is already outside
            JOIN_AGAIN,
            "this node's clock says 2027-12-06 19:55 UTC, but the coordinator's certificate expired "
            "at 2027-12-06 19:55 UTC: set the time (timedatectl, NTP); then run this join again",
        ),
        (
            START - 1,
            JOIN_AGAIN,
            f"this node's clock says 2026-12-06 19:54 UTC, but the coordinator's "
            f"certificate is valid from 2026-12-06 19:55 UTC: set the time (timedatectl, NTP); {JOIN_AGAIN}",
        ),
        (START, RETRIES_BY_ITSELF, None),
        (at("2027-01-01 00:00:00"), RETRIES_BY_ITSELF, None),
        (END - 1, RETRIES_BY_ITSELF, None),
    ],
)
def test_clock_message(now: float, then: str, expected: str | None) -> None:
    assert clock_message(now, START, END, then) == expected

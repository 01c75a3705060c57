"""The plain-data codec: every shape the core uses survives a round trip through JSON."""

from __future__ import annotations

import json
from dataclasses import dataclass, field

import pytest

from picoord.common.plaindata import DecodeError, from_plain, to_plain
from picoord.common.vocabulary import RolloutStatus


@dataclass(frozen=True)
class Inner:
    name: str
    amount: int | str | None = None


@dataclass(frozen=True)
class Outer:
    items: tuple[Inner, ...] = ()
    pair: tuple[str, int] = ("a", 1)
    maybe: Inner | None = None
    ratio: float = 0.5
    labels: dict[str, str] = field(default_factory=dict)
    pairs: tuple[tuple[str, str], ...] = ()


@pytest.mark.parametrize(
    "value",
    [
        Outer(),
        Outer(items=(Inner("x"), Inner("y", 3), Inner("z", "25%"))),
        Outer(maybe=Inner("m", None), ratio=1.0, labels={"zone": "a"}, pairs=(("k", "v"),)),
        Outer(pair=("b", 2)),
    ],
)
def test_round_trip_through_json(value: Outer) -> None:
    assert from_plain(Outer, json.loads(json.dumps(to_plain(value)))) == value


def test_an_int_reads_as_a_float_where_a_float_is_declared() -> None:
    assert from_plain(Outer, {"ratio": 1}).ratio == 1.0


@pytest.mark.parametrize(
    "data",
    [
        {"items": "not a list"},
        {"unknown": 1},
        {"maybe": {"name": 3}},
        {"ratio": "half"},
        [],
    ],
)
def test_data_that_does_not_fit_is_refused(data: object) -> None:
    with pytest.raises(DecodeError):
        from_plain(Outer, data)


@dataclass(frozen=True)
class WithStatus:
    status: RolloutStatus = RolloutStatus.PROGRESSING


def test_an_enum_is_stored_as_its_word_and_read_back_as_its_member() -> None:
    plain = json.loads(json.dumps(to_plain(WithStatus(RolloutStatus.PAUSED))))
    assert plain == {"status": "paused"}
    assert from_plain(WithStatus, plain).status is RolloutStatus.PAUSED
    with pytest.raises(DecodeError, match=r"value.status: 'resting' is not a RolloutStatus"):
        from_plain(WithStatus, {"status": "resting"})

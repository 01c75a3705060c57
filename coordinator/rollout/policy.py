"""The update policy of a service: how fast a rolling update goes and what a failure does.

Defaults are Swarm's (parallelism 1, no delay, stop-first, monitor 5 s, max failure ratio
0) except the failure action, which is `rollback`: a revision that does not become
healthy is undone by itself instead of leaving the service half-updated (Swarm pauses).

Swarm thinks in batches (parallelism, order), Kubernetes in bounds (maxSurge,
maxUnavailable); a policy carries both. When surge/unavailable are not given they follow
from the batch: stop-first may take `parallelism` replicas down at once and adds none,
start-first adds `parallelism` new replicas before taking any down. Given explicitly (a
Deployment's `strategy.rollingUpdate`), they are resolved against the replica count the
Kubernetes way: a surge percentage rounds up, an unavailable percentage rounds down, and if
both come to 0 one replica may be unavailable, so a rollout can always move.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from dataclasses import dataclass, replace

from picoord.common.validation import FieldError

STOP_FIRST = "stop-first"
START_FIRST = "start-first"
ORDERS = (STOP_FIRST, START_FIRST)

ROLLBACK = "rollback"
PAUSE = "pause"
CONTINUE = "continue"
FAILURE_ACTIONS = (ROLLBACK, PAUSE, CONTINUE)

_PERCENT = re.compile(r"^(\d{1,3})%$")

# An amount of replicas: an int, or a percentage written "25%" (resolved per replica count).
Amount = int | str


@dataclass(frozen=True)
class UpdatePolicy:
    parallelism: int = 1  # replicas updated per batch; 0 means all at once (Swarm's meaning)
    delay: float = 0.0  # seconds between batches
    max_surge: Amount | None = None  # None: follows from parallelism and order (module docstring)
    max_unavailable: Amount | None = None
    order: str = STOP_FIRST
    monitor: float = 5.0  # seconds a new replica must stay healthy before it counts as updated
    failure_action: str = ROLLBACK
    max_failure_ratio: float = 0.0  # failed / updated replicas tolerated before failure_action

    def batch_size(self, replicas: int) -> int:
        """Replicas per batch for this count (parallelism 0 means all of them, at least 1)."""
        return max(1, replicas if self.parallelism == 0 else self.parallelism)

    def bounds(self, replicas: int) -> tuple[int, int]:
        """(surge, unavailable) in replicas for `replicas` desired, as module docstring says."""
        batch = self.batch_size(replicas)
        if self.max_surge is None:
            surge = batch if self.order == START_FIRST else 0
        else:
            surge = resolve_amount(self.max_surge, replicas, round_up=True)
        if self.max_unavailable is None:
            unavailable = batch if self.order == STOP_FIRST else 0
        else:
            unavailable = resolve_amount(self.max_unavailable, replicas, round_up=False)
        if surge == 0 and unavailable == 0:
            unavailable = 1
        return surge, unavailable


def resolve_amount(amount: Amount, replicas: int, round_up: bool) -> int:
    """An int as is; "N%" of `replicas`, rounded up (surge) or down (unavailable)."""
    if isinstance(amount, int):
        return amount
    match = _PERCENT.fullmatch(amount)
    if not match:
        raise ValueError(f"{amount!r} is not an int or a percentage")
    exact = int(match.group(1)) * replicas / 100
    return math.ceil(exact) if round_up else math.floor(exact)


def _amount(field: str, value: object) -> Amount | None:
    if value is None:
        return None
    if isinstance(value, bool):
        raise FieldError(field, f"{value!r} is not a replica count or a percentage")
    if isinstance(value, int):
        if value < 0:
            raise FieldError(field, f"{value} is negative")
        return value
    if isinstance(value, str):
        match = _PERCENT.fullmatch(value.strip())
        if not match:
            raise FieldError(field, f"{value!r} is not a replica count or a percentage such as '25%'")
        if int(match.group(1)) > 100:
            raise FieldError(field, f"{value!r} is more than 100%")
        return value.strip()
    raise FieldError(field, f"{value!r} is not a replica count or a percentage")


def _seconds(field: str, value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise FieldError(field, f"{value!r} is not a number of seconds")
    if value < 0:
        raise FieldError(field, f"{value} is negative")
    return float(value)


def validate_update_policy(
    policy: UpdatePolicy, field: str = "update", names: Mapping[str, str] | None = None
) -> UpdatePolicy:
    """The policy with normalised values, or FieldError naming `field.<name>`.

    `names` maps an attribute to the spelling of the document being read (for example
    {"max_surge": "maxSurge"}) so the error names what the user wrote."""
    names = dict(names or {})

    def path(attribute: str) -> str:
        return f"{field}.{names.get(attribute, attribute)}"

    parallelism = policy.parallelism
    if isinstance(parallelism, bool) or not isinstance(parallelism, int) or parallelism < 0:
        raise FieldError(path("parallelism"), f"{parallelism!r} is not a count >= 0 (0 updates all at once)")
    if policy.order not in ORDERS:
        raise FieldError(path("order"), f"{policy.order!r} is not one of {', '.join(ORDERS)}")
    if policy.failure_action not in FAILURE_ACTIONS:
        raise FieldError(
            path("failure_action"), f"{policy.failure_action!r} is not one of {', '.join(FAILURE_ACTIONS)}"
        )
    ratio = policy.max_failure_ratio
    if isinstance(ratio, bool) or not isinstance(ratio, int | float) or not 0 <= ratio <= 1:
        raise FieldError(path("max_failure_ratio"), f"{ratio!r} is not a fraction between 0 and 1")
    surge = _amount(path("max_surge"), policy.max_surge)
    unavailable = _amount(path("max_unavailable"), policy.max_unavailable)
    if _is_zero(surge) and _is_zero(unavailable):
        raise FieldError(
            path("max_unavailable"), "may not be 0 when max_surge is 0: the rollout could not move"
        )
    if policy.order == START_FIRST and _is_zero(surge):
        raise FieldError(path("max_surge"), "start-first needs a surge of at least 1 replica")
    if policy.order == STOP_FIRST and _is_zero(unavailable) and surge is None:
        raise FieldError(path("max_unavailable"), "stop-first with no surge needs at least 1 unavailable")
    return replace(
        policy,
        delay=_seconds(path("delay"), policy.delay),
        monitor=_seconds(path("monitor"), policy.monitor),
        max_failure_ratio=float(ratio),
        max_surge=surge,
        max_unavailable=unavailable,
    )


def _is_zero(amount: Amount | None) -> bool:
    return amount is not None and resolve_amount(amount, 100, round_up=False) == 0

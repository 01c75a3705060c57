"""Update policy: defaults, validation naming the field, and the surge/unavailable arithmetic."""

import pytest

from picoord.common.validation import FieldError
from picoord.coordinator.rollout.policy import (
    CONTINUE,
    PAUSE,
    ROLLBACK,
    START_FIRST,
    STOP_FIRST,
    UpdatePolicy,
    resolve_amount,
    validate_update_policy,
)


def test_defaults_are_swarms_except_rollback():
    policy = UpdatePolicy()
    assert (policy.parallelism, policy.delay, policy.order, policy.monitor) == (1, 0.0, STOP_FIRST, 5.0)
    assert policy.failure_action == ROLLBACK
    assert policy.max_failure_ratio == 0.0
    assert validate_update_policy(policy) == policy


@pytest.mark.parametrize(
    ("amount", "replicas", "round_up", "expected"),
    [
        (2, 10, True, 2),
        (0, 10, False, 0),
        ("25%", 10, True, 3),  # 2.5 up
        ("25%", 10, False, 2),  # 2.5 down
        ("25%", 4, True, 1),
        ("25%", 4, False, 1),
        ("25%", 3, True, 1),  # 0.75 up
        ("25%", 3, False, 0),  # 0.75 down
        ("10%", 1, True, 1),
        ("10%", 1, False, 0),
        ("100%", 7, False, 7),
        ("0%", 7, True, 0),
        ("50%", 0, True, 0),
        ("33%", 10, True, 4),
        ("33%", 10, False, 3),
    ],
)
def test_resolve_amount_rounds_like_kubernetes(amount, replicas, round_up, expected):
    assert resolve_amount(amount, replicas, round_up) == expected


@pytest.mark.parametrize(
    ("policy", "replicas", "bounds"),
    [
        (UpdatePolicy(), 3, (0, 1)),  # stop-first, parallelism 1: one down at a time, none extra
        (UpdatePolicy(parallelism=2), 3, (0, 2)),
        (UpdatePolicy(parallelism=0), 5, (0, 5)),  # 0: all at once
        (UpdatePolicy(parallelism=0), 0, (0, 1)),
        (UpdatePolicy(order=START_FIRST), 3, (1, 0)),
        (UpdatePolicy(order=START_FIRST, parallelism=2), 3, (2, 0)),
        (UpdatePolicy(max_surge="25%", max_unavailable="25%"), 4, (1, 1)),  # Kubernetes' default
        (UpdatePolicy(max_surge="25%", max_unavailable="25%"), 10, (3, 2)),
        (UpdatePolicy(max_surge="25%", max_unavailable="25%"), 1, (1, 0)),
        (UpdatePolicy(max_surge=0, max_unavailable="25%"), 3, (0, 1)),  # both 0 -> 1 unavailable
        (UpdatePolicy(max_surge="0%", max_unavailable="10%"), 5, (0, 1)),
        (UpdatePolicy(max_surge=2, max_unavailable=0), 3, (2, 0)),
        (UpdatePolicy(max_surge=1), 3, (1, 1)),  # unavailable follows stop-first's batch
        (UpdatePolicy(max_unavailable=2, order=START_FIRST), 3, (1, 2)),
    ],
)
def test_bounds(policy, replicas, bounds):
    assert validate_update_policy(policy).bounds(replicas) == bounds


@pytest.mark.parametrize(
    ("policy", "field", "words"),
    [
        (UpdatePolicy(parallelism=-1), "update.parallelism", "not a count >= 0"),
        (UpdatePolicy(parallelism=True), "update.parallelism", "not a count"),
        (UpdatePolicy(parallelism=1.5), "update.parallelism", "not a count"),
        (UpdatePolicy(delay=-1), "update.delay", "negative"),
        (UpdatePolicy(delay="5s"), "update.delay", "not a number of seconds"),
        (UpdatePolicy(delay=float("inf")), "update.delay", "not a number of seconds"),
        (UpdatePolicy(monitor=-0.5), "update.monitor", "negative"),
        (UpdatePolicy(order="blue-green"), "update.order", "not one of stop-first, start-first"),
        (
            UpdatePolicy(failure_action="retry"),
            "update.failure_action",
            "not one of rollback, pause, continue",
        ),
        (UpdatePolicy(max_failure_ratio=1.5), "update.max_failure_ratio", "between 0 and 1"),
        (UpdatePolicy(max_failure_ratio=-0.1), "update.max_failure_ratio", "between 0 and 1"),
        (UpdatePolicy(max_failure_ratio="0.2"), "update.max_failure_ratio", "between 0 and 1"),
        (UpdatePolicy(max_surge=-1), "update.max_surge", "negative"),
        (UpdatePolicy(max_surge="1.5"), "update.max_surge", "percentage such as '25%'"),
        (UpdatePolicy(max_surge="150%"), "update.max_surge", "more than 100%"),
        (UpdatePolicy(max_surge=True), "update.max_surge", "not a replica count"),
        (UpdatePolicy(max_unavailable=[1]), "update.max_unavailable", "not a replica count"),
        (UpdatePolicy(max_surge=0, max_unavailable="0%"), "update.max_unavailable", "may not be 0"),
        (UpdatePolicy(order=START_FIRST, max_surge=0), "update.max_surge", "start-first needs a surge"),
        (UpdatePolicy(max_unavailable=0), "update.max_unavailable", "stop-first with no surge"),
    ],
)
def test_validation_names_the_field(policy, field, words):
    with pytest.raises(FieldError) as caught:
        validate_update_policy(policy)
    assert caught.value.field == field
    assert words in str(caught.value)


def test_validation_uses_the_documents_spelling():
    with pytest.raises(FieldError) as caught:
        validate_update_policy(
            UpdatePolicy(max_surge="x"),
            "spec.strategy.rollingUpdate",
            {"max_surge": "maxSurge", "max_unavailable": "maxUnavailable"},
        )
    assert caught.value.field == "spec.strategy.rollingUpdate.maxSurge"


def test_validation_normalises():
    policy = validate_update_policy(
        UpdatePolicy(delay=2, monitor=10, max_surge=" 25% ", max_failure_ratio=0, failure_action=PAUSE)
    )
    assert (policy.delay, policy.monitor, policy.max_surge, policy.max_failure_ratio) == (
        2.0,
        10.0,
        "25%",
        0.0,
    )
    assert isinstance(policy.delay, float) and isinstance(policy.max_failure_ratio, float)
    assert validate_update_policy(UpdatePolicy(failure_action=CONTINUE)).failure_action == CONTINUE

"""What the planner reads of a replica from the agent's report: the failure detail."""

import pytest

from picoord.common.vocabulary import ReplicaState
from picoord.coordinator.controller.observed import replica_view
from picoord.coordinator.controller.records import ReplicaRecord
from picoord.coordinator.rollout.planner import Rollout, step
from picoord.coordinator.rollout.policy import UpdatePolicy
from picoord.v1 import workloads_pb2

HEALTHY = workloads_pb2.REPLICA_HEALTH_HEALTHY
STARTING = workloads_pb2.REPLICA_HEALTH_STARTING
UNHEALTHY = workloads_pb2.REPLICA_HEALTH_UNHEALTHY


def record() -> ReplicaRecord:
    return ReplicaRecord(id="crashy.3", service="crashy", revision=2, node="pi3", created_at=10.0)


@pytest.mark.parametrize(
    ("state", "health", "restarts", "exit_code", "message", "failure"),
    [
        ("exited", STARTING, 0, 3, "exit code 3", "exit code 3"),
        ("running", UNHEALTHY, 0, 0, "HTTP 404", "HTTP 404"),
        ("restarting", STARTING, 1, 3, "exit code 3", "exit code 3"),  # restarted by its policy
        ("running", STARTING, 2, 0, "", ""),  # running again, code unknown
        # probed while its policy restarted it: the failed probe, and why it was gone
        ("running", UNHEALTHY, 1, 3, "no address", "no address (last run: exit code 3)"),
        ("running", UNHEALTHY, 0, 0, "HTTP 500", "HTTP 500"),
        ("running", HEALTHY, 0, 0, "HTTP 200", ""),  # nothing wrong
    ],
)
def test_failure_detail(state, health, restarts, exit_code, message, failure):
    report = workloads_pb2.ReplicaReport(
        service="crashy",
        revision=2,
        replica="crashy.3",
        state=ReplicaState(state).wire,
        health=health,
        restarts=restarts,
        exit_code=exit_code,
        message=message,
    )
    assert replica_view(record(), report, None).failure == failure


def test_a_replica_restarted_by_its_policy_fails_the_rollout_naming_its_exit_code():
    report = workloads_pb2.ReplicaReport(
        service="crashy",
        revision=2,
        replica="crashy.3",
        state=ReplicaState.RESTARTING.wire,
        restarts=1,
        exit_code=3,
    )
    rollout = Rollout("crashy", 2, 1, 2, UpdatePolicy(), started_at=5.0, phase_started_at=5.0)
    decided = step(rollout, [replica_view(record(), report, None)], 12.0)
    assert [str(failure) for failure in decided.rollout.failures] == [
        "replica crashy.3 on pi3 (revision 2) was restarted 1 time: exit code 3"
    ]

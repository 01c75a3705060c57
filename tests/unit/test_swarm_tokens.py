"""Which swarm join token travels: only the worker token, and only when a worker joins.
The manager token (whoever holds it can add managers, i.e. take the swarm over) never
leaves the manager; tests/lab/test_swarm_lab.py proves the agent's side against dockerd."""

import pytest

from picoord.coordinator.apply.action_planner import FACT_SWARM_WORKER_TOKEN, NodeView, plan
from picoord.coordinator.apply.cluster_spec import parse_spec

INVENTORY = [
    NodeView("desktop", {}, "x86_64", "10.0.0.5"),
    NodeView("pi1", {}, "aarch64", "10.0.0.11"),
    NodeView("pi2", {}, "aarch64", "10.0.0.12"),
]


def swarm(workers: str) -> str:
    return f"kind: ClusterMembership\nname: swarm\nengine: swarm\nmanager: desktop\nworkers: {workers}\n"


@pytest.mark.parametrize(
    ("workers", "joins", "token_asked"),
    [
        ("[pi1, pi2]", 2, True),
        ("[pi1]", 1, True),
        ("[desktop]", 0, False),  # the manager alone: nobody needs a token
    ],
)
def test_the_manager_hands_out_the_worker_token_only_when_a_worker_joins(
    workers: str, joins: int, token_asked: bool
) -> None:
    init, *rest = plan(parse_spec(swarm(workers)), INVENTORY)
    assert init.kind == "swarm_init" and len(rest) == joins
    assert init.action.swarm_init.report_worker_token is token_asked
    facts_used = {ref.key for step in rest for _, ref in step.inputs}
    assert facts_used <= {FACT_SWARM_WORKER_TOKEN, "swarm.manager_address"}
    assert not any("manager_token" in key for key in facts_used)

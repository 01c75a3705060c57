"""The agent's action path: unknown kinds, bad timeouts, executor crashes and bad fields
all come back as outcomes, never as an exception that would end the session."""

from picoord.agent.actions import registry
from picoord.agent.actions.registry import EXECUTORS, NodeSettings, execute
from picoord.v1 import actions_pb2, agent_pb2

NODE = NodeSettings("10.0.0.1", 7443)


def test_every_action_kind_has_an_executor() -> None:
    kinds = {field.name for field in actions_pb2.Action.DESCRIPTOR.oneofs_by_name["kind"].fields}
    assert set(EXECUTORS) == kinds


def test_an_empty_action_is_rejected() -> None:
    result = execute(agent_pb2.ActionRequest(action_id="a", timeout_seconds=10), NODE)
    assert result.outcome == agent_pb2.ACTION_OUTCOME_REJECTED and result.action_id == "a"


def test_a_missing_or_huge_timeout_is_rejected() -> None:
    for timeout in (0, -1, 86400):
        request = agent_pb2.ActionRequest(
            action_id="a", timeout_seconds=timeout, action=actions_pb2.Action(unmount=actions_pb2.Unmount())
        )
        result = execute(request, NODE)
        assert result.outcome == agent_pb2.ACTION_OUTCOME_REJECTED and "timeout_seconds" in result.message


def test_an_executor_crash_is_a_failure_not_an_agent_crash(monkeypatch) -> None:
    def broken(request: object, context: object) -> None:
        raise KeyError("bug")

    monkeypatch.setattr(registry, "executor_for", lambda kind: broken)
    request = agent_pb2.ActionRequest(
        action_id="a",
        timeout_seconds=5,
        action=actions_pb2.Action(unmount=actions_pb2.Unmount(target="/mnt/x")),
    )
    result = execute(request, NODE)
    assert result.outcome == agent_pb2.ACTION_OUTCOME_FAILED and "executor error" in result.message

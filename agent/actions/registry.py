"""Which executor carries out which action, and the one path every action takes through
the agent: bounds checked, executor run, outcome reported with what ran.

Executors are imported when first needed: the swarm executor loads the Docker SDK, which
would cost a Pi ~15 MiB of memory for nothing until a swarm action arrives.
"""

from __future__ import annotations

import importlib
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import structlog

from picoord.agent.actions.base import ActionContext, ActionFailed, Outcome
from picoord.common import defaults
from picoord.common.validation import FieldError
from picoord.v1 import agent_pb2

log = structlog.get_logger("picoord.agent.actions")

MAX_TIMEOUT = 3600.0
EXECUTORS: dict[str, str] = {
    "swarm_init": "picoord.agent.actions.swarm:swarm_init",
    "swarm_join": "picoord.agent.actions.swarm:swarm_join",
    "swarm_leave": "picoord.agent.actions.swarm:swarm_leave",
    "kubeadm_init": "picoord.agent.actions.kubeadm:kubeadm_init",
    "kubeadm_join": "picoord.agent.actions.kubeadm:kubeadm_join",
    "kubeadm_reset": "picoord.agent.actions.kubeadm:kubeadm_reset",
    "k3s_server": "picoord.agent.actions.k3s:k3s_server",
    "k3s_agent": "picoord.agent.actions.k3s:k3s_agent",
    "k3s_uninstall": "picoord.agent.actions.k3s:k3s_uninstall",
    "gluster_peer_probe": "picoord.agent.actions.gluster:gluster_peer_probe",
    "gluster_volume": "picoord.agent.actions.gluster:gluster_volume",
    "mount": "picoord.agent.actions.mount:mount",
    "unmount": "picoord.agent.actions.mount:unmount",
    "firewall": "picoord.agent.actions.firewall:firewall",
    "time_server": "picoord.agent.actions.chrony:time_server",
    "time_client": "picoord.agent.actions.chrony:time_client",
    "registry_server": "picoord.agent.actions.container_registry:registry_server",
    "registry_trust": "picoord.agent.actions.container_registry:registry_trust",
}


@dataclass(frozen=True)
class NodeSettings:
    """What executors need to know about this node, from the agent's enrollment and config."""

    coordinator_host: str
    coordinator_port: int
    docker_socket: str = defaults.DOCKER_SOCKET
    state_dir: Path = defaults.AGENT_STATE_DIR
    allow_mount_paths: tuple[str, ...] = ()


def executor_for(kind: str) -> Callable[[object, ActionContext], Outcome]:
    module_name, _, function = EXECUTORS[kind].partition(":")
    return getattr(importlib.import_module(module_name), function)


def execute(request: agent_pb2.ActionRequest, node: NodeSettings) -> agent_pb2.ActionResult:
    """Carry out one request; never raises: every failure is an outcome the coordinator sees."""
    result = agent_pb2.ActionResult(action_id=request.action_id)
    kind = request.action.WhichOneof("kind")
    if kind is None or kind not in EXECUTORS:
        result.outcome = agent_pb2.ACTION_OUTCOME_REJECTED
        result.message = f"this agent does not know the action {kind!r}"
        return result
    if not 0 < request.timeout_seconds <= MAX_TIMEOUT:
        result.outcome = agent_pb2.ACTION_OUTCOME_REJECTED
        result.message = f"timeout_seconds must be between 0 and {MAX_TIMEOUT:.0f}"
        return result
    context = ActionContext(
        dry_run=request.dry_run,
        deadline=time.monotonic() + request.timeout_seconds,
        coordinator_host=node.coordinator_host,
        coordinator_port=node.coordinator_port,
        docker_socket=node.docker_socket,
        state_dir=node.state_dir,
        allow_mount_paths=node.allow_mount_paths,
    )
    bound = log.bind(action_id=request.action_id, kind=kind, dry_run=request.dry_run)
    bound.info("action started")
    try:
        outcome = executor_for(kind)(getattr(request.action, kind), context)
        result.outcome, result.message, result.in_place = outcome.outcome, outcome.message, outcome.in_place
        result.facts.extend(outcome.facts)
    except FieldError as error:
        result.outcome, result.message = agent_pb2.ACTION_OUTCOME_REJECTED, str(error)
    except ActionFailed as error:
        result.outcome, result.message = agent_pb2.ACTION_OUTCOME_FAILED, str(error)
    except Exception as error:  # an executor bug must not take the agent down
        bound.exception("executor crashed")
        result.outcome, result.message = agent_pb2.ACTION_OUTCOME_FAILED, f"executor error: {error!r}"
    result.commands.extend(context.commands)
    bound.info(
        "action finished",
        outcome=agent_pb2.ActionOutcome.Name(result.outcome),
        commands=[" ".join(c.argv) for c in context.commands],
    )
    return result

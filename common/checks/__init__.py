"""Whole-message checks of node actions, one module per family (membership, storage,
firewall, time), built from the field validators in common/validation.py.

Both ends run the same checks: the coordinator's planner on every action it builds from a
spec file (so a bad document fails before anything is sent), and the agent's executors on
every request they receive (so nothing unchecked ever runs)."""

from __future__ import annotations

from collections.abc import Callable

from picoord.common.checks import firewall, membership, registry, storage, time
from picoord.v1 import actions_pb2

CHECKS: dict[str, Callable[..., None]] = {
    "swarm_init": membership.check_swarm_init,
    "swarm_join": membership.check_swarm_join,
    "swarm_leave": membership.check_swarm_leave,
    "kubeadm_init": membership.check_kubeadm_init,
    "kubeadm_join": membership.check_kubeadm_join,
    "kubeadm_reset": membership.check_kubeadm_reset,
    "k3s_server": membership.check_k3s_server,
    "k3s_agent": membership.check_k3s_agent,
    "k3s_uninstall": membership.check_k3s_uninstall,
    "gluster_peer_probe": storage.check_gluster_peer_probe,
    "gluster_volume": storage.check_gluster_volume,
    "mount": storage.check_mount,
    "unmount": storage.check_unmount,
    "firewall": firewall.check_firewall,
    "time_server": time.check_time_server,
    "time_client": time.check_time_client,
    "registry_server": registry.check_registry_server,
    "registry_trust": registry.check_registry_trust,
}


def check_action(action: actions_pb2.Action) -> None:
    """Raise FieldError naming the field when the action is not acceptable to any agent."""
    kind = action.WhichOneof("kind")
    if kind is None:
        raise ValueError("empty action")
    CHECKS[kind](getattr(action, kind))

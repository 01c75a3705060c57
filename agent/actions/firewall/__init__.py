"""The firewall executor: one FirewallPolicy applied as one change, ufw or nftables.

The policy is the whole incoming firewall: its default plus exactly its rules (rules not
in it are removed), always preceded by rules that keep this agent's connection to the
coordinator open (its replies on the established connection, new connections out to it)
and, unless the policy says `keep_ssh: false`, the sources of live SSH sessions (ssh.py).
After the change the agent must open a new connection to the coordinator within the
policy's window, or it restores the previous rules by itself (guard.py); a revert armed
outside the agent before the change does so should the agent die (watchdog.py). The
backends (ufw.py, nftables.py) read the firewall's own state, plan with pure functions
and load the result in one step; their docstrings say how atomic that is.
"""

from __future__ import annotations

from picoord.agent.actions.base import ActionContext, Outcome
from picoord.agent.actions.firewall import guard, nftables, ssh, ufw
from picoord.common.checks.firewall import policy_spec
from picoord.v1 import actions_pb2


def firewall(request: actions_pb2.FirewallPolicy, context: ActionContext) -> Outcome:
    """Validate the whole policy, then hand it to its backend (UNSPECIFIED means ufw)."""
    spec = policy_spec(request)
    endpoints = guard.coordinator_endpoints(spec, context)
    sessions = ssh.live_sources(spec.ssh_port) if spec.keep_ssh else []
    kept_ssh = ssh.keep_ssh_rules(spec, sessions)
    keep_open = (*guard.keep_open_rules(endpoints), *kept_ssh)
    backend = nftables if spec.backend == "nftables" else ufw
    outcome = backend.apply(spec, keep_open, endpoints, context)
    outcome.message += "; " + ssh.describe(kept_ssh, spec, len(sessions))
    if kept_ssh:  # one fact, however many sessions: a result holds at most limits.FACTS
        outcome.facts.append(
            actions_pb2.Fact(key=ssh.FACT_KEPT_OPEN, value=" ".join(rule.source for rule in kept_ssh))
        )
    return outcome

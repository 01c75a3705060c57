"""Firewall safety: keep the coordinator reachable, or put the previous rules back.

A firewall change is the one action that can cut the agent off from the coordinator,
after which nobody could fix it remotely. So every backend applies a policy through
`confirm_or_revert`:

1. baseline: the agent must be able to open a new TCP connection to the coordinator
   *before* the change, or it refuses (a failing check afterwards would prove nothing);
2. apply the change (one backend-specific step list), with rules that keep the
   coordinator's address and port open inserted first, whatever the policy says;
3. confirm: within the policy's window, open a NEW TCP connection to the coordinator
   (short connect timeouts, retried), which exercises the new rules the way a
   reconnecting session would;
4. if that fails, or applying failed half-way, restore the snapshot taken before the
   change and say so: REVERTED, or FAILED (loudly) when even the restore failed.

The restore runs with its own time budget: it must not be skipped because the action's
deadline passed while waiting for the coordinator.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import socket
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from picoord.agent.actions.base import ActionContext, ActionFailed, Outcome
from picoord.common.checks.firewall import PolicySpec, Rule
from picoord.common.validation import FieldError, hostname, port
from picoord.v1 import agent_pb2

CONNECT_TIMEOUT = 1.0  # per attempt: a dropped SYN must not eat the whole window
RETRY_PAUSE = 0.2
BASELINE_SECONDS = 5.0  # how long the pre-change check may try
RESTORE_SECONDS = 60.0  # the restore's own budget, independent of the action's deadline
APPLY_MARGIN = 10.0  # time an apply needs besides the confirm window
KEEP_OPEN_COMMENT = "picoord coordinator"


@dataclass(frozen=True)
class Endpoint:
    host: str  # as configured (name or address): what the confirm check dials
    port: int
    addresses: tuple[str, ...]  # what it resolved to: what the keep-open rules allow

    def __str__(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"


Resolver = Callable[[str, int], tuple[str, ...]]
Probe = Callable[[Sequence[Endpoint], float], tuple[bool, str]]


def resolve(host: str, number: int) -> tuple[str, ...]:
    """The addresses a host name stands for (an address stands for itself)."""
    try:
        return (str(ipaddress.ip_address(host)),)
    except ValueError:
        pass
    try:
        infos = socket.getaddrinfo(host, number, type=socket.SOCK_STREAM)
    except OSError as error:
        raise ActionFailed(f"cannot resolve the coordinator's host name {host!r}: {error}") from None
    return tuple(dict.fromkeys(str(ipaddress.ip_address(info[4][0])) for info in infos))


def coordinator_endpoints(
    spec: PolicySpec, context: ActionContext, resolver: Resolver = resolve
) -> tuple[Endpoint, ...]:
    """The coordinator as this agent dials it (its session; checked first) and as the
    policy names it, when that differs. Both are kept open; refusing when neither is known
    keeps a policy from ever being applied without a path back."""
    wanted: list[tuple[str, int]] = []
    if context.coordinator_host:
        wanted.append(
            (
                hostname("coordinator_host", context.coordinator_host),
                port("coordinator_port", context.coordinator_port),
            )
        )
    if spec.coordinator_address:
        wanted.append((spec.coordinator_address, spec.coordinator_port))
    if not wanted:
        raise FieldError(
            "coordinator_address",
            "neither the agent's session nor the policy names the coordinator; refusing to change "
            "the firewall without knowing which connection to keep open",
        )
    return tuple(Endpoint(host, number, resolver(host, number)) for host, number in dict.fromkeys(wanted))


def keep_open_rules(endpoints: Sequence[Endpoint]) -> tuple[Rule, ...]:
    """Rules that keep the agent's session to the coordinator working, placed before the
    policy's rules: the coordinator's replies (from its address and port) in, and the
    agent's connections to it out (ufw can filter outgoing traffic; nftables here does not)."""
    rules: list[Rule] = []
    for endpoint in endpoints:
        for address in endpoint.addresses:
            rules.append(
                Rule(
                    "allow", address_cidr(address), 0, 0, "tcp", KEEP_OPEN_COMMENT, source_port=endpoint.port
                )
            )
            rules.append(
                Rule(
                    "allow",
                    "",
                    endpoint.port,
                    endpoint.port,
                    "tcp",
                    KEEP_OPEN_COMMENT,
                    direction="out",
                    destination=address_cidr(address),
                )
            )
    return tuple(dict.fromkeys(rules))


def address_cidr(address: str) -> str:
    return str(ipaddress.ip_network(address))


def wait_reachable(endpoints: Sequence[Endpoint], window: float) -> tuple[bool, str]:
    """Try to open a new TCP connection to any endpoint until `window` seconds pass.

    Returns (True, "<endpoint> in <s> s") or (False, the last error)."""
    started = time.monotonic()
    deadline = started + window
    last = "no attempt made"
    while True:
        for endpoint in endpoints:
            left = deadline - time.monotonic()
            try:
                with socket.create_connection(
                    (endpoint.host, endpoint.port), timeout=max(0.05, min(CONNECT_TIMEOUT, left))
                ):
                    return True, f"{endpoint} in {time.monotonic() - started:.2f} s"
            except OSError as error:
                last = f"{endpoint}: {error.strerror or error}"
        left = deadline - time.monotonic()
        if left <= 0:
            return False, last
        time.sleep(min(RETRY_PAUSE, left))


def restore_context(context: ActionContext) -> ActionContext:
    """The same context (commands recorded in the same list) with a fresh time budget."""
    return dataclasses.replace(context, deadline=max(context.deadline, time.monotonic() + RESTORE_SECONDS))


def confirm_or_revert(
    context: ActionContext,
    *,
    apply: Callable[[ActionContext], None],
    restore: Callable[[ActionContext], None],
    endpoints: Sequence[Endpoint],
    window: float,
    what: str,
    probe: Probe = wait_reachable,
) -> Outcome:
    """Apply a firewall change and keep it only if the coordinator stays reachable.

    `apply` and `restore` run their commands through the context they get (so everything
    is recorded); `restore` must put back the snapshot taken before `apply`. Returns
    SUCCEEDED or REVERTED; raises ActionFailed when nothing was changed (no baseline),
    when applying failed (after restoring), or when restoring failed (the loud case)."""
    baseline = min(window, BASELINE_SECONDS)
    needed = baseline + window + APPLY_MARGIN
    left = context.deadline - time.monotonic()
    if left < needed:
        raise ActionFailed(
            f"only {left:.0f} s left for this action, but a guarded firewall change needs up to "
            f"{needed:g} s ({baseline:g} s to check the coordinator first, {window:g} s to confirm, "
            f"~{APPLY_MARGIN:g} s to apply); nothing was changed (give the action a longer timeout)"
        )
    names = ", ".join(str(endpoint) for endpoint in endpoints)
    reachable, detail = probe(endpoints, baseline)
    if not reachable:
        raise ActionFailed(
            f"cannot open a TCP connection to the coordinator ({detail}) even before changing the "
            "firewall, so the change could not be confirmed; nothing was changed"
        )
    try:
        apply(context)
    except Exception as error:  # whatever broke half-way, the previous rules go back
        _restore_or_raise(context, restore, f"applying the {what} failed: {error}")
        raise ActionFailed(f"applying the {what} failed: {error}; the previous rules were restored") from None
    reachable, detail = probe(endpoints, window)
    if reachable:
        return Outcome(
            agent_pb2.ACTION_OUTCOME_SUCCEEDED, f"applied the {what}; the coordinator is reachable ({detail})"
        )
    why = (
        f"after applying the {what}, the agent could not open a new TCP connection to the coordinator "
        f"({names}) within {window:g} s (last error: {detail})"
    )
    _restore_or_raise(context, restore, why)
    return Outcome(agent_pb2.ACTION_OUTCOME_REVERTED, f"{why}; it restored the previous rules by itself")


def _restore_or_raise(context: ActionContext, restore: Callable[[ActionContext], None], why: str) -> None:
    try:
        restore(restore_context(context))
    except Exception as error:
        raise ActionFailed(
            f"FIREWALL RESTORE FAILED: {why}, and restoring the previous rules failed too: {error}. "
            "The node's firewall is in an unknown state and may block the coordinator; "
            "fix it from the node's console"
        ) from None

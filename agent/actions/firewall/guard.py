"""Firewall safety: keep the coordinator reachable, or put the previous rules back.

A firewall change is the one action that can cut the agent off from the coordinator,
after which nobody could fix it remotely. So every backend applies a policy through
`confirm_or_revert`:

1. baseline: the agent must be able to open a new TCP connection to the coordinator
   *before* the change, or it refuses (a failing check afterwards would prove nothing);
2. arm the revert outside this process (watchdog.py: a pending-revert file in the
   agent's state dir plus a systemd timer or a detached watchdog that restores the
   snapshot at a deadline unless the file is gone), so that an agent killed inside the
   window cannot leave a policy that cut it off;
3. apply the change (one backend-specific step list), with rules that keep the
   agent's connection to the coordinator open inserted first, whatever the policy says;
4. confirm: within the policy's window, open a NEW TCP connection to the coordinator
   (short connect timeouts, retried), which exercises the new rules the way a
   reconnecting session would;
5. confirmed: claim the pending revert (remove the file) and stop the watchdog; not
   confirmed, or applying failed half-way: claim it and restore the snapshot here and
   say so: REVERTED, or FAILED (loudly) when even the restore failed. A claim that finds
   the file gone means the watchdog was first (it fires a few seconds after the agent's
   own last chance) and restored.

The restore runs with its own time budget: it must not be skipped because the action's
deadline passed while waiting for the coordinator.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import socket
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from picoord.agent.actions.base import ActionContext, ActionFailed, Outcome
from picoord.agent.actions.firewall import watchdog
from picoord.common.checks.firewall import PolicySpec, Rule
from picoord.common.validation import FieldError, hostname, port
from picoord.v1 import agent_pb2

CONNECT_TIMEOUT = 1.0  # per attempt: a dropped SYN must not eat the whole window
RETRY_PAUSE = 0.2
BASELINE_SECONDS = 5.0  # how long the pre-change check may try
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
Arm = Callable[[ActionContext, "watchdog.PendingRevert"], "watchdog.Armed"]
Disarm = Callable[[ActionContext, "watchdog.Armed"], None]


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
    policy's rules: the coordinator's replies in, but only on a connection conntrack
    tracks as established (a packet merely claiming the coordinator's source port is a
    new connection and meets the policy), and the agent's connections to it out (ufw can
    filter outgoing traffic; nftables here does not)."""
    rules: list[Rule] = []
    for endpoint in endpoints:
        for address in endpoint.addresses:
            rules.append(
                Rule(
                    "allow",
                    address_cidr(address),
                    0,
                    0,
                    "tcp",
                    KEEP_OPEN_COMMENT,
                    source_port=endpoint.port,
                    established=True,
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
    return dataclasses.replace(
        context, deadline=max(context.deadline, time.monotonic() + watchdog.RESTORE_SECONDS)
    )


def confirm_or_revert(
    context: ActionContext,
    *,
    apply: Callable[[ActionContext], None],
    restore: Callable[[ActionContext], None],
    endpoints: Sequence[Endpoint],
    window: float,
    what: str,
    backend: str,
    snapshot: Mapping[str, Any],
    probe: Probe = wait_reachable,
    arm: Arm = watchdog.arm,
    disarm: Disarm = watchdog.disarm,
) -> Outcome:
    """Apply a firewall change and keep it only if the coordinator stays reachable.

    `apply` and `restore` run their commands through the context they get (so everything
    is recorded); `restore` must put back `snapshot`, taken before `apply`, which is also
    what the watchdog armed before applying restores should this process die. Returns
    SUCCEEDED or REVERTED; raises ActionFailed when nothing was changed (no baseline, no
    watchdog), when applying failed (after restoring), or when restoring failed (loudly)."""
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
    # The agent decides by `decide_by`; the watchdog fires GRACE later, whatever happens here.
    decide_by = time.monotonic() + APPLY_MARGIN + window
    pending = watchdog.new_pending(
        backend, snapshot, APPLY_MARGIN + window + watchdog.GRACE, what, time.time()
    )
    try:
        armed = arm(context, pending)
    except ActionFailed as error:
        raise ActionFailed(
            f"cannot arm the firewall revert watchdog ({error}); nothing was changed"
        ) from None
    try:
        apply(context)
    except Exception as error:  # whatever broke half-way, the previous rules go back
        _take_over_and_restore(context, restore, armed, disarm, f"applying the {what} failed: {error}")
        raise ActionFailed(f"applying the {what} failed: {error}; the previous rules were restored") from None
    reachable, detail = probe(endpoints, max(0.0, min(window, decide_by - time.monotonic())))
    if reachable:
        if watchdog.claim(context.state_dir, armed.id):
            disarm(context, armed)
            return Outcome(
                agent_pb2.ACTION_OUTCOME_SUCCEEDED,
                f"applied the {what}; the coordinator is reachable ({detail})",
            )
        return _watchdog_was_first(context, armed, f"the coordinator became reachable only late ({detail})")
    why = (
        f"after applying the {what}, the agent could not open a new TCP connection to the coordinator "
        f"({names}) within {window:g} s (last error: {detail})"
    )
    if not _take_over_and_restore(context, restore, armed, disarm, why):
        return _watchdog_was_first(context, armed, why)
    return Outcome(agent_pb2.ACTION_OUTCOME_REVERTED, f"{why}; it restored the previous rules by itself")


def _take_over_and_restore(
    context: ActionContext,
    restore: Callable[[ActionContext], None],
    armed: watchdog.Armed,
    disarm: Disarm,
    why: str,
) -> bool:
    """Claim the pending revert and restore in this process (recorded with the action);
    False when the watchdog had already claimed it (and restored)."""
    if not watchdog.claim(context.state_dir, armed.id):
        return False
    disarm(context, armed)
    _restore_or_raise(context, restore, why)
    return True


def _watchdog_was_first(context: ActionContext, armed: watchdog.Armed, why: str) -> Outcome:
    record = watchdog.last_record(context.state_dir, armed.id) or {}
    if record.get("ok"):
        return Outcome(
            agent_pb2.ACTION_OUTCOME_REVERTED, f"{why}; the revert watchdog restored the previous rules"
        )
    raise ActionFailed(
        f"FIREWALL RESTORE FAILED: {why}; the revert watchdog tried to restore the previous rules and "
        f"failed: {record.get('error', 'no record of it')}. Fix the firewall from the node's console"
    )


def _restore_or_raise(context: ActionContext, restore: Callable[[ActionContext], None], why: str) -> None:
    try:
        restore(restore_context(context))
    except Exception as error:
        raise ActionFailed(
            f"FIREWALL RESTORE FAILED: {why}, and restoring the previous rules failed too: {error}. "
            "The node's firewall is in an unknown state and may block the coordinator; "
            "fix it from the node's console"
        ) from None

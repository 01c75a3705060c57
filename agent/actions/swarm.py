"""Docker Swarm membership through the Docker Engine API: init, join, leave.

The seed pastes `docker swarm init/join-token/join` into each machine; here the agent asks
the local dockerd directly (the socket in ActionContext.docker_socket). It reads
`info()["Swarm"]` first and acts only on the difference, so a second apply is UNCHANGED.

API calls are not argv commands, but history and dry runs should read the same as for CLI
executors: each call is recorded as a CommandRecord whose argv reads like the CLI
(`docker-api swarm.join --remote 10.213.0.11:2377 --token <redacted>`), by one helper
(`_call`). The decisions are pure functions (`plan_swarm_*`) over a `SwarmState`.

The calls go through the agent's one Engine API client (picoord.agent.docker_api), under
the names and with the request bodies of docker-py's APIClient, which it replaced.
"""

from __future__ import annotations

import ipaddress
import socket
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

from picoord.agent.actions.base import ActionContext, ActionFailed, Outcome
from picoord.agent.docker_api import CALL_ERRORS, DockerAPI, explain
from picoord.common import limits
from picoord.common.checks.membership import (
    SWARM_PORT,
    check_swarm_init,
    check_swarm_join,
    check_swarm_leave,
    ip_or_ip_port,
    swarm_manager_address,
)
from picoord.v1 import actions_pb2

READ_TIMEOUT = 20.0  # info / inspect
CHANGE_TIMEOUT = 90.0  # init / join / leave: raft and TLS setup can take a while on a Pi
OUTPUT_TAIL = limits.COMMAND_OUTPUT_TAIL


@dataclass(frozen=True)
class SwarmState:
    """What `info()["Swarm"]` says about this engine, as plain data."""

    local_state: str  # inactive | pending | active | error | locked
    node_id: str = ""
    node_address: str = ""  # NodeAddr: the address this node advertises (IP only)
    is_manager: bool = False  # ControlAvailable
    managers: tuple[str, ...] = ()  # RemoteManagers[].Addr, HOST:PORT
    manager_ids: tuple[str, ...] = ()  # RemoteManagers[].NodeID, same order
    cluster_id: str = ""
    error: str = ""

    def describe(self) -> str:
        if self.local_state == "inactive":
            return "not in a swarm"
        role = "manager" if self.is_manager else "worker"
        text = f"swarm {self.local_state}: {role} node {self.node_id or '?'}"
        if self.managers:
            text += f", managers {', '.join(self.managers)}"
        if self.error:
            text += f" ({self.error})"
        return text

    def own_manager_address(self) -> str:
        """This manager's HOST:PORT as the swarm lists it (falls back to NodeAddr:2377)."""
        for node_id, address in zip(self.manager_ids, self.managers, strict=False):
            if node_id == self.node_id:
                return address
        return _with_port(self.node_address, SWARM_PORT) if self.node_address else ""


@dataclass(frozen=True)
class ApiCall:
    """One Engine API call: the DockerAPI method, its arguments, and how it is recorded."""

    method: str
    kwargs: Mapping[str, Any] = field(default_factory=dict)
    argv: tuple[str, ...] = ()


def _with_port(address: str, port: int) -> str:
    return f"[{address}]:{port}" if ":" in address else f"{address}:{port}"


def _host_of(address: str) -> str:
    """The IP of `IP` or `IP:PORT` / `[IPv6]:PORT`."""
    try:
        return str(ipaddress.ip_address(address))
    except ValueError:
        return address.rpartition(":")[0].strip("[]")


def swarm_state(swarm_info: Mapping[str, Any] | None) -> SwarmState:
    """`info()["Swarm"]` → SwarmState (missing keys mean an engine without swarm support)."""
    data = dict(swarm_info or {})
    remotes = [entry for entry in data.get("RemoteManagers") or [] if isinstance(entry, Mapping)]
    cluster = data.get("Cluster") or {}
    return SwarmState(
        local_state=str(data.get("LocalNodeState") or "inactive"),
        node_id=str(data.get("NodeID") or ""),
        node_address=str(data.get("NodeAddr") or ""),
        is_manager=bool(data.get("ControlAvailable")),
        managers=tuple(str(entry.get("Addr", "")) for entry in remotes),
        manager_ids=tuple(str(entry.get("NodeID", "")) for entry in remotes),
        cluster_id=str(cluster.get("ID", "")) if isinstance(cluster, Mapping) else "",
        error=str(data.get("Error") or ""),
    )


def _unusable(state: SwarmState) -> str | None:
    """Why this engine's swarm state blocks any membership change, if it does."""
    if state.local_state == "pending":
        return (
            "this node has a swarm join pending (the manager was not reached); "
            "swarm_leave with force abandons it"
        )
    if state.local_state == "locked":
        return "this node's swarm is locked (autolock); unlock it with `docker swarm unlock` first"
    if state.local_state == "error":
        return f"this node's swarm is in an error state: {state.error or 'unknown error'}"
    if state.local_state not in ("inactive", "active"):
        return f"unknown swarm state {state.local_state!r}"
    return None


def plan_swarm_init(state: SwarmState, advertise: str, listen: str) -> list[ApiCall]:
    """Nothing when this node already manages a swarm advertising `advertise`; else init.

    Raises ActionFailed when the node is a worker elsewhere, or manages a swarm under
    another address: leaving a swarm is never implicit (swarm_leave does it).
    """
    problem = _unusable(state)
    if problem:
        raise ActionFailed(problem)
    if state.local_state == "active":
        if not state.is_manager:
            raise ActionFailed(
                f"this node is a worker in a swarm managed by {', '.join(state.managers) or '?'}; "
                "swarm_leave first to make it a manager of a new swarm"
            )
        if state.node_address and _host_of(state.node_address) != _host_of(advertise):
            raise ActionFailed(
                f"this node already manages swarm {state.cluster_id or '?'} advertising "
                f"{state.node_address}, not {_host_of(advertise)}; swarm_leave (force) first to re-create it"
            )
        return []
    return [
        ApiCall(
            "init_swarm",
            {"advertise_addr": advertise, "listen_addr": listen},
            ("docker-api", "swarm.init", "--advertise-addr", advertise, "--listen-addr", listen),
        )
    ]


def plan_swarm_join(
    state: SwarmState,
    manager: str,
    token: str,
    advertise: str = "",
    manager_addresses: frozenset[str] = frozenset(),
) -> list[ApiCall]:
    """Nothing when already in the swarm `manager` belongs to; else join.

    `manager_addresses` are other HOST:PORT spellings of `manager` (its resolved IPs), so a
    manager given by name still matches the IP:PORT the engine lists. In another swarm,
    raises ActionFailed: leaving is explicit.
    """
    problem = _unusable(state)
    if problem:
        raise ActionFailed(problem)
    if state.local_state == "active":
        if {manager, *manager_addresses} & set(state.managers):
            return []
        raise ActionFailed(
            f"this node is already in another swarm (managers {', '.join(state.managers) or '?'}), "
            f"not the one at {manager}; swarm_leave first"
        )
    kwargs: dict[str, Any] = {"remote_addrs": [manager], "join_token": token}
    argv = ["docker-api", "swarm.join", "--remote", manager, "--token", token]
    if advertise:
        kwargs["advertise_addr"] = advertise
        argv += ["--advertise-addr", advertise]
    return [ApiCall("join_swarm", kwargs, tuple(argv))]


def plan_swarm_leave(state: SwarmState, force: bool) -> list[ApiCall]:
    """Nothing when not in a swarm; a manager leaves only with force (it may break quorum)."""
    if state.local_state == "inactive":
        return []
    if state.local_state == "active" and state.is_manager and not force:
        raise ActionFailed(
            "this node is a swarm manager: leaving can break the swarm's quorum; set force to leave anyway"
        )
    argv = ("docker-api", "swarm.leave", "--force") if force else ("docker-api", "swarm.leave")
    return [ApiCall("leave_swarm", {"force": force}, argv)]


# --- the imperative shell ----------------------------------------------------------


@contextmanager
def _engine(context: ActionContext) -> Iterator[DockerAPI]:
    """The Engine API client on the context's socket, with a timeout, closed afterwards."""
    try:
        client = DockerAPI(context.docker_socket, timeout=context.remaining(READ_TIMEOUT))
    except CALL_ERRORS as error:
        raise ActionFailed(
            f"cannot reach the Docker Engine at {context.docker_socket}: {explain(error)}"
        ) from None
    try:
        yield client
    finally:
        client.close()


def _read_state(client: DockerAPI, context: ActionContext) -> SwarmState:
    client.timeout = context.remaining(READ_TIMEOUT)
    try:
        return swarm_state(client.info().get("Swarm"))
    except CALL_ERRORS as error:
        raise ActionFailed(
            f"cannot read swarm state from {context.docker_socket}: {explain(error)}"
        ) from None


def _call(context: ActionContext, client: Any, call: ApiCall) -> Any:
    """Record an API call like a command (argv redacted); in a dry run record it only."""
    record = actions_pb2.CommandRecord(
        argv=[context.redact(word) for word in call.argv],  # the context's one redaction rule
        ran=not context.dry_run,
    )
    context.commands.append(record)
    if context.dry_run:
        return None
    started = time.monotonic()
    client.timeout = context.remaining(CHANGE_TIMEOUT)
    try:
        result = getattr(client, call.method)(**call.kwargs)
    except Exception as error:  # the Engine's refusal, a timeout, or a dropped socket
        record.exit_code = 1
        record.seconds = round(time.monotonic() - started, 3)
        record.output_tail = context.redact(explain(error))[-OUTPUT_TAIL:]
        raise ActionFailed(f"{call.argv[1]} failed: {record.output_tail[-500:]}") from None
    record.exit_code = 0
    record.seconds = round(time.monotonic() - started, 3)
    record.output_tail = context.redact("" if result is None or result is True else str(result))[
        -OUTPUT_TAIL:
    ]
    return result


def _resolved(manager: str) -> frozenset[str]:
    """HOST:PORT spellings of a manager given by name (its addresses); empty for an IP."""
    host, _, port = manager.rpartition(":")
    host = host.strip("[]")
    try:
        ipaddress.ip_address(host)
        return frozenset()
    except ValueError:
        pass
    try:
        infos = socket.getaddrinfo(host, int(port), type=socket.SOCK_STREAM)
    except OSError:
        return frozenset()
    return frozenset(_with_port(str(info[4][0]), int(port)) for info in infos)


def _fact(key: str, value: str, secret: bool = False) -> actions_pb2.Fact:
    return actions_pb2.Fact(key=key, value=value, secret=secret)


def swarm_init(request: actions_pb2.SwarmInit, context: ActionContext) -> Outcome:
    """Make this node the manager of a new swarm, unless it already is; hand out join tokens.

    Facts (changed or not): swarm.manager_address (HOST:PORT workers join), and, once the
    swarm exists, swarm.node_id, swarm.cluster_id and, only when the request asks for it
    (a worker is to join), swarm.worker_token (secret). The manager token never leaves the
    manager: whoever holds it can add managers, i.e. take the swarm over. A dry run on a
    node not yet in a swarm has only the address.
    """
    check_swarm_init(request)
    advertise = ip_or_ip_port("advertise_address", request.advertise_address)
    listen = ip_or_ip_port("listen_address", request.listen_address or advertise, SWARM_PORT)
    with _engine(context) as client:
        state = _read_state(client, context)
        calls = plan_swarm_init(state, advertise, listen)
        for call in calls:
            _call(context, client, call)
        if context.dry_run and calls:
            outcome = Outcome.done(context, f"would create a swarm advertising {advertise}", state.describe())
            outcome.facts = [
                _fact("swarm.manager_address", ip_or_ip_port("advertise", advertise, SWARM_PORT))
            ]
            return outcome
        after = _read_state(client, context) if calls else state
        client.timeout = context.remaining(READ_TIMEOUT)
        try:
            tokens = client.inspect_swarm().get("JoinTokens") or {}
        except CALL_ERRORS as error:
            raise ActionFailed(f"cannot read the swarm's join tokens: {explain(error)}") from None
    worker, manager = str(tokens.get("Worker", "")), str(tokens.get("Manager", ""))
    if not worker:
        raise ActionFailed("the Engine returned no worker join token for this swarm")
    context.secrets = (*context.secrets, worker, manager)  # redacted wherever they might show up
    message = f"swarm created, manager at {after.own_manager_address()}" if calls else ""
    outcome = Outcome.done(context, message or "already the manager of this swarm", state.describe())
    outcome.facts = [
        _fact("swarm.manager_address", after.own_manager_address()),
        _fact("swarm.node_id", after.node_id),
        _fact("swarm.cluster_id", after.cluster_id),
    ]
    if request.report_worker_token:
        outcome.facts.append(_fact("swarm.worker_token", worker, secret=True))
    return outcome


def swarm_join(request: actions_pb2.SwarmJoin, context: ActionContext) -> Outcome:
    """Join the swarm at manager_address with join_token, unless already in it.

    Facts: swarm.node_id once a member (the manager lists the node under it).
    """
    check_swarm_join(request)
    manager = swarm_manager_address(request)
    advertise = (
        ip_or_ip_port("advertise_address", request.advertise_address) if request.advertise_address else ""
    )
    context.secrets = (*context.secrets, request.join_token)
    with _engine(context) as client:
        state = _read_state(client, context)
        names = _resolved(manager) if state.local_state == "active" else frozenset()
        calls = plan_swarm_join(state, manager, request.join_token, advertise, names)
        for call in calls:
            _call(context, client, call)
        after = _read_state(client, context) if calls and not context.dry_run else state
    if calls and not context.dry_run and after.local_state != "active":
        raise ActionFailed(f"joined, but the node's swarm state is {after.describe()}")
    verb = "would join" if context.dry_run else "joined"
    outcome = Outcome.done(context, f"{verb} the swarm at {manager}" if calls else "", state.describe())
    if after.local_state == "active":
        outcome.facts = [_fact("swarm.node_id", after.node_id)]
    return outcome


def swarm_leave(request: actions_pb2.SwarmLeave, context: ActionContext) -> Outcome:
    """Leave the swarm (a manager only with force); nothing to do when not in one.

    Facts: swarm.left_node_id, the ID the manager still lists (as Down) until someone runs
    `docker node rm` there.
    """
    check_swarm_leave(request)
    with _engine(context) as client:
        state = _read_state(client, context)
        calls = plan_swarm_leave(state, request.force)
        for call in calls:
            _call(context, client, call)
    verb = "would leave" if context.dry_run else "left"
    outcome = Outcome.done(context, f"{verb} the swarm" if calls else "not in a swarm", state.describe())
    if calls and state.node_id:
        outcome.facts = [_fact("swarm.left_node_id", state.node_id)]
    return outcome

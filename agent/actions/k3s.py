"""k3s membership: a server (control plane) and agents (workers), as systemd services.

`k3s server` and `k3s agent` are long-running processes, so, as k3s's own installer does,
the executor writes a unit (k3s.service / k3s-agent.service) and starts it with
`systemctl enable --now`. The agent's join token goes into a 0600 file read through
`--token-file`: it never appears on any command line (ps) nor in the unit. Without systemd
as the init system (no /run/systemd/system) there is nothing to keep k3s running across
agent restarts and reboots, so the executors say FAILED "needs systemd" and change nothing
rather than start an unsupervised process.

Files written or removed are recorded like commands (`write-file PATH MODE`,
`remove-file PATH`, `remove-tree PATH`) so history and dry runs show them; the plans are
pure functions of what is on disk. The `k3s` program is found through PATH; it is not
packaged for this machine, so the tests use a recording stand-in (tests/fixtures/standin).
"""

from __future__ import annotations

import os
import shutil
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from picoord.agent.actions.base import ActionContext, ActionFailed, Outcome, read_file
from picoord.common.checks.membership import (
    KUBE_API_PORT,
    check_k3s_agent,
    check_k3s_server,
    check_k3s_uninstall,
)
from picoord.common.files import write_atomically
from picoord.common.mountinfo import at_or_below, mount_points
from picoord.common.validation import FieldError, host_port, https_url, safe_word
from picoord.v1 import actions_pb2

SYSTEMD_RUNNING = Path("/run/systemd/system")  # what sd_booted() checks
UNIT_DIR = Path("/etc/systemd/system")
SERVER_UNIT = "k3s.service"
AGENT_UNIT = "k3s-agent.service"
CONFIG_DIR = Path("/etc/rancher/k3s")
AGENT_TOKEN_FILE = CONFIG_DIR / "agent-token"
DATA_DIR = Path("/var/lib/rancher/k3s")
NODE_TOKEN = DATA_DIR / "server" / "node-token"  # the server's join token for agents

SYSTEMCTL_TIMEOUT = 90.0
NODE_TOKEN_WAIT = 120.0  # a server writes node-token once its datastore is up
UNIT_MODE = 0o644
TOKEN_MODE = 0o600
WRITE, REMOVE_FILE, REMOVE_TREE = "write-file", "remove-file", "remove-tree"


@dataclass(frozen=True)
class Step:
    """A command (argv) or a file operation (argv[0] is write-file/remove-file/remove-tree)."""

    argv: tuple[str, ...]
    content: str = ""  # for write-file

    @property
    def is_file_operation(self) -> bool:
        return self.argv[0] in (WRITE, REMOVE_FILE, REMOVE_TREE)


@dataclass(frozen=True)
class ServiceState:
    """What is on disk and running for one k3s unit."""

    systemd: bool  # systemd is the init system
    unit: str | None  # the unit file's text, None when absent
    active: bool  # `systemctl is-active` said active
    token: str | None = None  # agent: the token file's content


# --- pure parts ----------------------------------------------------------------------


def _systemd_quote(word: str) -> str:
    """One ExecStart word: validated words hold no whitespace or quotes; '%' is systemd's."""
    return word.replace("%", "%%")


def unit_text(description: str, exec_start: Sequence[str]) -> str:
    """A unit as k3s's installer writes one (delegated cgroups, restart always)."""
    return "\n".join(
        [
            "# Written by picoord-agent; edits are replaced on the next apply.",
            "[Unit]",
            f"Description={description}",
            "Documentation=https://k3s.io",
            "Wants=network-online.target",
            "After=network-online.target",
            "",
            "[Service]",
            "Type=exec",
            "KillMode=process",
            "Delegate=yes",
            "LimitNOFILE=1048576",
            "LimitNPROC=infinity",
            "LimitCORE=infinity",
            "TasksMax=infinity",
            "TimeoutStartSec=0",
            "Restart=always",
            "RestartSec=5s",
            "ExecStartPre=-/sbin/modprobe br_netfilter",
            "ExecStartPre=-/sbin/modprobe overlay",
            "ExecStart=" + " ".join(_systemd_quote(word) for word in exec_start),
            "",
            "[Install]",
            "WantedBy=multi-user.target",
            "",
        ]
    )


def server_exec(k3s: str, advertise: str) -> list[str]:
    return [k3s, "server", "--advertise-address", advertise, "--node-ip", advertise]


def agent_exec(k3s: str, server_url: str, token_file: Path = AGENT_TOKEN_FILE) -> list[str]:
    return [k3s, "agent", "--server", server_url, "--token-file", str(token_file)]


def unit_option(unit: str, flag: str) -> str | None:
    """The value after `flag` on a unit's ExecStart line (e.g. the agent's --server)."""
    for line in unit.splitlines():
        if line.startswith("ExecStart="):
            words = line[len("ExecStart=") :].split()
            for index, word in enumerate(words[:-1]):
                if word == flag:
                    return words[index + 1].replace("%%", "%")
    return None


def _needs_systemd(what: str) -> ActionFailed:
    return ActionFailed(
        f"{what} runs as a systemd service, and systemd is not the init system here "
        f"({SYSTEMD_RUNNING} is absent); nothing was changed"
    )


def plan_service(
    state: ServiceState, unit_name: str, desired_unit: str, token: str | None = None
) -> list[Step]:
    """Write what differs (token file, unit), reload, and start or restart the service."""
    steps: list[Step] = []
    if token is not None and state.token != token:
        steps.append(Step((WRITE, str(AGENT_TOKEN_FILE), f"{TOKEN_MODE:04o}"), token + "\n"))
    if state.unit != desired_unit:
        steps.append(Step((WRITE, str(UNIT_DIR / unit_name), f"{UNIT_MODE:04o}"), desired_unit))
        steps.append(Step(("systemctl", "daemon-reload")))
    if not state.active:
        steps.append(Step(("systemctl", "enable", "--now", unit_name)))
    elif steps:
        steps.append(Step(("systemctl", "restart", unit_name)))
    return steps


def plan_k3s_server(state: ServiceState, desired_unit: str, advertise: str) -> list[Step]:
    if not state.systemd:
        raise _needs_systemd("k3s server")
    current = unit_option(state.unit, "--advertise-address") if state.unit else None
    if current is not None and current != advertise:
        raise ActionFailed(
            f"a k3s server advertising {current} is already set up here, not {advertise}; k3s_uninstall first"
        )
    return plan_service(state, SERVER_UNIT, desired_unit)


def plan_k3s_agent(state: ServiceState, desired_unit: str, server_url: str, token: str) -> list[Step]:
    """Nothing when the agent unit for `server_url` is in place, with this token, running.

    An agent of another server fails: its node state belongs to that cluster, so moving is
    k3s_uninstall then k3s_agent, never implicit.
    """
    if not state.systemd:
        raise _needs_systemd("k3s agent")
    current = unit_option(state.unit, "--server") if state.unit else None
    if current is not None and current != server_url:
        raise ActionFailed(
            f"this node is already a k3s agent of {current}, not {server_url}; k3s_uninstall first"
        )
    return plan_service(state, AGENT_UNIT, desired_unit, token)


def plan_k3s_uninstall(
    systemd: bool, units: Sequence[str], files: Sequence[str], trees: Sequence[str]
) -> list[Step]:
    """Stop and disable the units present, remove them, the token file and k3s's data."""
    steps = [Step(("systemctl", "disable", "--now", unit)) for unit in units] if systemd else []
    steps += [Step((REMOVE_FILE, str(UNIT_DIR / unit))) for unit in units]
    steps += [Step((REMOVE_FILE, path)) for path in files]
    if units and systemd:
        steps.append(Step(("systemctl", "daemon-reload")))
    steps += [Step((REMOVE_TREE, path)) for path in trees]
    return steps


def mounted_below(mountinfo: str, path: str) -> list[str]:
    """Mount points at or below `path` (rm -r must not walk into them)."""
    return [point for point in mount_points(mountinfo) if at_or_below(point, path)]


# --- the imperative shell ----------------------------------------------------------


def _k3s_binary() -> str:
    found = shutil.which("k3s")
    if not found:
        raise ActionFailed("k3s is not installed on this node (not found on PATH)")
    try:
        return safe_word("k3s", os.path.abspath(found), 1024)
    except FieldError:
        raise ActionFailed(f"k3s was found at {found!r}, a path a unit file cannot hold") from None


def _active(context: ActionContext, systemd: bool, unit: str) -> bool:
    if not systemd:
        return False
    return context.read(["systemctl", "is-active", "--quiet", unit], 15.0).ok


def _record_file_operation(context: ActionContext, step: Step) -> None:
    """Record a file write/removal like a command; in a dry run record it only."""
    record = actions_pb2.CommandRecord(argv=list(step.argv), ran=not context.dry_run)
    context.commands.append(record)
    if context.dry_run:
        return
    started = time.monotonic()
    path = Path(step.argv[1])
    try:
        if step.argv[0] == WRITE:
            write_atomically(path, step.content.encode(), int(step.argv[2], 8))
        elif step.argv[0] == REMOVE_FILE:
            path.unlink(missing_ok=True)
        else:
            shutil.rmtree(path)
    except OSError as error:
        record.exit_code = 1
        record.output_tail = context.redact(str(error))  # the context's one redaction rule
        raise ActionFailed(f"{step.argv[0]} {path}: {error}") from None
    finally:
        record.seconds = round(time.monotonic() - started, 3)


def _carry_out(context: ActionContext, steps: Sequence[Step]) -> None:
    for step in steps:
        if step.is_file_operation:
            _record_file_operation(context, step)
        else:
            context.change(list(step.argv), SYSTEMCTL_TIMEOUT)


def _wait_for_node_token(context: ActionContext) -> str:
    deadline = time.monotonic() + context.remaining(NODE_TOKEN_WAIT)
    while True:
        token = (read_file(NODE_TOKEN) or "").strip()
        if token:
            return token
        if time.monotonic() >= deadline:
            raise ActionFailed(f"the k3s server did not write {NODE_TOKEN} within {NODE_TOKEN_WAIT:g}s")
        time.sleep(0.5)


def _fact(key: str, value: str, secret: bool = False) -> actions_pb2.Fact:
    return actions_pb2.Fact(key=key, value=value, secret=secret)


def k3s_server(request: actions_pb2.K3sServer, context: ActionContext) -> Outcome:
    """Set up and start k3s.service unless it is in place and running; read its token.

    Facts: k3s.server_url (https://ADDRESS:6443) and, once the server has written it,
    k3s.token (secret, from /var/lib/rancher/k3s/server/node-token).
    """
    check_k3s_server(request)
    advertise = request.advertise_address
    k3s = _k3s_binary()
    systemd = SYSTEMD_RUNNING.is_dir()
    current = read_file(UNIT_DIR / SERVER_UNIT)
    state = ServiceState(systemd, current, _active(context, systemd, SERVER_UNIT))
    desired = unit_text("Lightweight Kubernetes (k3s server)", server_exec(k3s, advertise))
    steps = plan_k3s_server(state, desired, advertise)
    _carry_out(context, steps)
    url = "https://" + host_port("advertise_address", advertise, KUBE_API_PORT)
    facts = [_fact("k3s.server_url", url)]
    token = _wait_for_node_token(context) if not context.dry_run else (read_file(NODE_TOKEN) or "").strip()
    if token:
        context.secrets = (*context.secrets, token)
        facts.append(_fact("k3s.token", token, secret=True))
    in_place = f"{SERVER_UNIT} {'active' if state.active else 'present' if current else 'absent'}"
    verb = "would start" if context.dry_run else "started"
    outcome = Outcome.done(context, f"{verb} the k3s server at {url}" if steps else "", in_place)
    outcome.facts = facts
    return outcome


def k3s_agent(request: actions_pb2.K3sAgent, context: ActionContext) -> Outcome:
    """Run k3s-agent.service against server_url, token from a 0600 file; idempotent.

    Facts: k3s.server_url this node is an agent of.
    """
    check_k3s_agent(request)
    server_url = https_url("server_url", request.server_url)
    context.secrets = (*context.secrets, request.token)
    k3s = _k3s_binary()
    systemd = SYSTEMD_RUNNING.is_dir()
    current = read_file(UNIT_DIR / AGENT_UNIT)
    token_text = read_file(AGENT_TOKEN_FILE)
    state = ServiceState(
        systemd,
        current,
        _active(context, systemd, AGENT_UNIT),
        token_text.strip() if token_text is not None else None,
    )
    desired = unit_text("Lightweight Kubernetes (k3s agent)", agent_exec(k3s, server_url))
    steps = plan_k3s_agent(state, desired, server_url, request.token)
    _carry_out(context, steps)
    in_place = f"{AGENT_UNIT} {'active' if state.active else 'present' if current else 'absent'}"
    verb = "would start" if context.dry_run else "started"
    outcome = Outcome.done(context, f"{verb} the k3s agent of {server_url}" if steps else "", in_place)
    outcome.facts = [_fact("k3s.server_url", server_url)]
    return outcome


def k3s_uninstall(request: actions_pb2.K3sUninstall, context: ActionContext) -> Outcome:
    """Stop and remove the k3s units this agent wrote, the token file, and k3s's data.

    Refuses (FAILED) to delete a data directory with something still mounted below it.
    """
    check_k3s_uninstall(request)
    systemd = SYSTEMD_RUNNING.is_dir()
    units = [name for name in (AGENT_UNIT, SERVER_UNIT) if (UNIT_DIR / name).exists()]
    files = [str(AGENT_TOKEN_FILE)] if AGENT_TOKEN_FILE.exists() else []
    trees = [str(path) for path in (DATA_DIR, CONFIG_DIR) if path.is_dir()]
    mountinfo = read_file(Path("/proc/self/mountinfo")) or ""
    busy = [point for tree in trees for point in mounted_below(mountinfo, tree)]
    if busy:
        raise ActionFailed(f"still mounted below k3s's data: {', '.join(busy)}; stop k3s and unmount first")
    steps = plan_k3s_uninstall(systemd, units, files, trees)
    _carry_out(context, steps)
    in_place = ", ".join([*units, *trees]) or "no k3s here"
    verb = "would remove" if context.dry_run else "removed"
    return Outcome.done(context, f"{verb} k3s ({in_place})" if steps else "", in_place)

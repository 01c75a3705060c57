"""Time executors: chrony serving time to the lab network, and chrony taking time from it.

Both write one drop-in, /etc/chrony/conf.d/picoord-time.conf (Debian's chrony.conf reads
the directory with `confdir`), whose first line marks it as picoord's; a file there without
that line is someone else's and the action FAILS before anything changes. The server's
drop-in says `allow CIDR` for each network and `local stratum N` (serve the node's own
clock when no upstream answers: the cluster keeps time without the internet); a client's
says `server ADDRESS iburst` for each server. The same drop-in again is UNCHANGED.

chrony reads `allow` and `local` only at start, so a changed drop-in means
`systemctl restart chrony` where systemd runs (an inactive chrony is enabled and started).
Without systemd (a container, a lab Pi) nothing is started and the clock is never set:
the message says the file takes effect when chronyd next starts. The decisions are the pure
`server_conf`, `client_conf`, `plan_conf` and `daemon_commands`, table-tested.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from picoord.agent.actions.base import ActionContext, ActionFailed, Outcome, read_file
from picoord.agent.actions.mount import SYSTEMD_RUNNING, record_file_change, write_file
from picoord.common.checks.time import allowed_networks, check_time_server, server_addresses
from picoord.v1 import actions_pb2

CHRONY_CONF = Path("/etc/chrony/chrony.conf")
CONF_DIR = Path("/etc/chrony/conf.d")
DROP_IN = CONF_DIR / "picoord-time.conf"
MARKER = "# picoord: written by the picoord agent, which edits or removes only files carrying this line"
SERVICE = "chrony"
COMMAND_TIMEOUT = 30.0


class ForeignFile(ActionFailed):
    """The drop-in exists and picoord did not write it."""


def server_conf(networks: Sequence[str], stratum: int) -> str:
    lines = [MARKER, "# Serve time to the lab network, from this clock when no upstream answers."]
    lines += [f"allow {network}" for network in networks]
    lines.append(f"local stratum {stratum}")
    return "\n".join(lines) + "\n"


def client_conf(servers: Sequence[str]) -> str:
    lines = [MARKER, "# Take time from the cluster's time source."]
    lines += [f"server {address} iburst" for address in servers]
    return "\n".join(lines) + "\n"


def plan_conf(existing: str | None, wanted: str) -> bool:
    """Whether the drop-in must be written; ForeignFile when a file not ours is in the way."""
    if existing is None:
        return True
    if existing.partition("\n")[0] != MARKER:
        raise ForeignFile(f"{DROP_IN} exists and picoord did not write it (no marker line); left as is")
    return existing != wanted


def reads_conf_dir(chrony_conf: str) -> bool:
    """Whether chrony.conf includes /etc/chrony/conf.d (Debian's and Ubuntu's do)."""
    for line in chrony_conf.splitlines():
        words = line.split()
        if words[:1] == ["confdir"] and str(CONF_DIR) in (word.rstrip("/") for word in words[1:]):
            return True
    return False


def daemon_commands(systemd: bool, written: bool, active: bool, service: str = SERVICE) -> list[list[str]]:
    """What brings a daemon (chronyd; the registry too) in line with its config: nothing
    without systemd (never set the clock from here), start an inactive one, restart a
    running one on a change."""
    if not systemd:
        return []
    if not active:
        return [["systemctl", "enable", "--now", service]]
    if written:
        return [["systemctl", "restart", service]]
    return []


def _apply(wanted: str, what: str, context: ActionContext) -> Outcome:
    chrony_conf = read_file(CHRONY_CONF)
    if chrony_conf is None:
        raise ActionFailed(f"chrony is not installed here ({CHRONY_CONF} is missing): apt-get install chrony")
    if not reads_conf_dir(chrony_conf):
        raise ActionFailed(f"{CHRONY_CONF} has no `confdir {CONF_DIR}`, so chrony would ignore {DROP_IN}")
    written = plan_conf(read_file(DROP_IN), wanted)
    if written:
        record_file_change(context, "write", DROP_IN, what, lambda: write_file(DROP_IN, wanted))
    systemd = SYSTEMD_RUNNING.is_dir()
    active = (
        systemd
        and context.read(["systemctl", "is-active", SERVICE], COMMAND_TIMEOUT).stdout.strip() == "active"
    )
    for argv in daemon_commands(systemd, written, active):
        context.change(argv, COMMAND_TIMEOUT)
    note = "" if systemd else "; systemd does not run here, so it takes effect when chronyd next starts"
    return Outcome.done(context, f"{what}{note}" if written else what, in_place=f"{DROP_IN}: {what}")


def time_server(request: actions_pb2.TimeServer, context: ActionContext) -> Outcome:
    check_time_server(request)
    networks = allowed_networks(request)
    what = f"chrony serves time to {', '.join(networks)} (local stratum {request.stratum})"
    return _apply(server_conf(networks, request.stratum), what, context)


def time_client(request: actions_pb2.TimeClient, context: ActionContext) -> Outcome:
    servers = server_addresses(request)
    return _apply(client_conf(servers), f"chrony takes time from {', '.join(servers)}", context)

"""Run one action executor "on" a lab Pi: inside its PiSandbox, as the agent would.

Why a subprocess: the executor must see the Pi's network namespace (its iptables/nft
rules, its addresses) and its mount namespace (its /etc/ufw, /etc/fstab, dockerd socket),
which only a process entered into them has. The snippet below rebuilds the request from
its serialized bytes, calls the executor with a fresh ActionContext, turns exceptions
into outcomes the way the agent's registry does, and prints one JSON line.

    result = run_executor(sb, "picoord.agent.actions.firewall:firewall", policy,
                          dry_run=False, timeout=60, coordinator=("10.213.5.1", 7443))
    result["outcome"]     # "SUCCEEDED", "UNCHANGED", "PLANNED", "REJECTED", "FAILED", "REVERTED"
    result["commands"]    # [{"argv": [...], "ran": True, "exit_code": 0, ...}, ...]
"""

from __future__ import annotations

import base64
import json
import sys
from typing import Any, Protocol

from google.protobuf.message import Message

RESULT_MARKER = "PICOORD-EXECUTOR-RESULT "
SNIPPET_MARGIN = 30.0  # the subprocess gets this much longer than the action's deadline

_SNIPPET = r"""
import base64, importlib, json, sys, time, traceback
from picoord.agent.actions.base import ActionContext, ActionFailed
from picoord.common.validation import FieldError
from picoord.v1 import agent_pb2

kind, message_type, payload, dry_run, timeout, host, port, docker_socket, state_dir, allowed = sys.argv[1:11]
module_name, _, class_name = message_type.partition(":")
request = getattr(importlib.import_module(module_name), class_name)()
request.ParseFromString(base64.b64decode(payload))
module_name, _, function_name = kind.partition(":")
executor = getattr(importlib.import_module(module_name), function_name)

def plain(message):
    out = {}
    for field in message.DESCRIPTOR.fields:
        value = getattr(message, field.name)
        out[field.name] = value if isinstance(value, (str, bytes, int, float, bool)) else list(value)
    return out

context = ActionContext(dry_run=dry_run == "1", deadline=time.monotonic() + float(timeout),
                        coordinator_host=host, coordinator_port=int(port))
if docker_socket:
    context.docker_socket = docker_socket
if state_dir:
    from pathlib import Path
    context.state_dir = Path(state_dir)
context.allow_mount_paths = tuple(json.loads(allowed))
started = time.monotonic()
facts, in_place, error = [], "", ""
try:
    outcome = executor(request, context)
    name, message, in_place = agent_pb2.ActionOutcome.Name(outcome.outcome), outcome.message, outcome.in_place
    facts = [plain(fact) for fact in outcome.facts]
except FieldError as exc:
    name, message = "ACTION_OUTCOME_REJECTED", str(exc)
except ActionFailed as exc:
    name, message = "ACTION_OUTCOME_FAILED", str(exc)
except Exception as exc:
    name, message, error = "ACTION_OUTCOME_FAILED", f"executor error: {exc!r}", traceback.format_exc()
print(__MARKER__ + json.dumps({
    "outcome": name.removeprefix("ACTION_OUTCOME_"),
    "message": message,
    "in_place": in_place,
    "facts": facts,
    "commands": [plain(record) for record in context.commands],
    "seconds": round(time.monotonic() - started, 3),
    "error": error,
}))
""".replace("__MARKER__", repr(RESULT_MARKER))


class Sandbox(Protocol):
    """What run_executor needs of picoord.lab.sandbox.PiSandbox."""

    name: str

    def run(self, argv: list[str], timeout: float = 30, env: Any = None) -> Any: ...


def run_executor(
    sandbox: Sandbox,
    kind: str,
    request_message: Message,
    dry_run: bool,
    timeout: float = 60.0,
    coordinator: tuple[str, int] | None = None,
    docker_socket: str | None = None,
    state_dir: str | None = None,
    allow_mount_paths: tuple[str, ...] = (),
) -> dict[str, Any]:
    """Run executor `kind` ("module.path:function") on the Pi with `request_message`.

    Returns the JSON the snippet printed: outcome (short name), message, in_place, facts,
    commands (every CommandRecord field), seconds, and `error` (a traceback when the
    executor crashed). Raises AssertionError with the snippet's output when it printed
    no result (the interpreter itself failed)."""
    message_type = f"{type(request_message).__module__}:{type(request_message).__name__}"
    host, port = coordinator if coordinator is not None else ("", 0)
    argv = [
        sys.executable,
        "-c",
        _SNIPPET,
        kind,
        message_type,
        base64.b64encode(request_message.SerializeToString()).decode(),
        "1" if dry_run else "0",
        repr(float(timeout)),
        host,
        str(port),
        docker_socket or "",
        state_dir or "",
        json.dumps(list(allow_mount_paths)),
    ]
    done = sandbox.run(argv, timeout=timeout + SNIPPET_MARGIN)
    for line in reversed(done.stdout.splitlines()):
        if line.startswith(RESULT_MARKER):
            return json.loads(line[len(RESULT_MARKER) :])
    raise AssertionError(
        f"executor {kind} on {sandbox.name} printed no result (exit {done.returncode}):\n"
        f"stdout: {done.stdout[-3000:]}\nstderr: {done.stderr[-3000:]}"
    )


def argvs(result: dict[str, Any]) -> list[list[str]]:
    """Just the argv lists of a result's commands, for compact assertions."""
    return [list(command["argv"]) for command in result["commands"]]

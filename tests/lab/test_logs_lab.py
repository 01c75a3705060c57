"""`coordctl logs` and `coordctl secret` end to end: a real coordinator, three agents with
their own dockerd, services made of the lab's busybox stand-in with a command that prints.

One lab serves the module. `chatty` (3 replicas) prints a numbered line every 0.2 s;
`hostile` prints terminal escape sequences and then 50 MB of output. Each test restores
any agent it takes away.
"""

from __future__ import annotations

import json
import re
import signal
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from picoord.common import limits
from picoord.lab.cluster import Lab
from tests.conftest import require_root_or_fail
from tests.lab.test_workloads_lab import ctl, lab_coordctl_argv, ok, settle, spec_file, wait_until, words

pytestmark = pytest.mark.lab

CHATTY = (
    "kind: Service\nname: chatty\nimage: mcp:1\nreplicas: 3\n"
    "resources: {requests: {memory: 8Mi}}\n"
    "command: [/bin/sh, -c, 'i=0; while true; do i=$((i+1)); echo \"chatty line $i\"; sleep 0.2; done']\n"
)
# 50,000 lines of 1,000 bytes after the escapes (busybox sh: its echo is a builtin)
HOSTILE_SCRIPT = (
    "printf 'before \\033]0;owned\\007\\033[2Jcleared\\r\\n'; "
    "s=xxxxxxxxxx; s=$s$s$s$s$s$s$s$s$s$s; s=$s$s$s$s$s$s$s$s$s$s; "
    'i=0; while [ $i -lt 50000 ]; do echo "$s"; i=$((i+1)); done; echo done-printing; '
    "while true; do sleep 60; done"
)
HOSTILE = (
    "kind: Service\nname: hostile\nimage: mcp:1\nreplicas: 1\n"
    "resources: {requests: {memory: 8Mi}}\n"
    f"command: [/bin/sh, -c, {json.dumps(HOSTILE_SCRIPT)}]\n"
)
USES_SECRET = (
    "kind: Service\nname: keeper\nimage: mcp:1\nreplicas: 1\n"
    "resources: {requests: {memory: 8Mi}}\n"
    "command: [/bin/sh, -c, 'while true; do sleep 60; done']\n"
    "secrets: [{env: TOKEN, secret: keeper-secrets, key: token}]\n"
)
# a stack of two services (compose, as `docker stack deploy` takes it), for `coordctl logs STACK`;
# this lab's Pis are in no Swarm, so the file chooses published-ports mode (docs/networking.md)
TALK = """x-picoord: {network_mode: published-ports}
services:
  ping:
    image: mcp:1
    entrypoint: [/bin/sh, -c, 'while true; do echo "ping says hi"; sleep 0.5; done']
    deploy: {resources: {reservations: {memory: 8M}}}
  pong:
    image: mcp:1
    entrypoint: [/bin/sh, -c, 'while true; do echo "pong says hi"; sleep 0.5; done']
    deploy: {resources: {reservations: {memory: 8M}}}
"""
PREFIX = re.compile(r"^(chatty\.\d+)@(pi\d+) \| (?:(\S+) )?chatty line (\d+)$")


def replica_nodes(lab: Lab, service: str) -> dict[str, str]:
    return {r["replica"]: r["node"] for r in lab.coordctl_json("ps", service) if r["desired"] == "running"}


@pytest.fixture(scope="module")
def lab(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Lab]:
    require_root_or_fail()
    work = tmp_path_factory.mktemp("logs")
    lab = Lab(work, sandboxes=True, services=["dockerd"], registry=True)
    try:
        lab.up(3)
        for name, text in (("chatty", CHATTY), ("hostile", HOSTILE)):
            ok(lab, "apply", "-f", str(spec_file(work, name, text)))
            ok(lab, "rollout", name)
        settle(lab, "chatty settled", "chatty", 3, timeout=60)
        yield lab
    finally:
        lab.down()


def drain(pipe: Any, into: bytearray) -> None:
    """Read a pipe to its end as it comes (a full pipe would stop the writer)."""
    while piece := pipe.read1(65536):
        into += piece


def chatty_lines(output: str) -> list[tuple[str, str, str, int]]:
    found = []
    for line in output.splitlines():
        match = PREFIX.match(line)
        if match:
            found.append((match.group(1), match.group(2), match.group(3) or "", int(match.group(4))))
    return found


def test_logs_of_three_replicas_are_prefixed_and_in_time_order(lab: Lab) -> None:
    time.sleep(1.0)  # a few lines each
    where = replica_nodes(lab, "chatty")
    assert len(where) == 3
    done = ctl(lab, "logs", "chatty", "--timestamps", timeout=60)
    assert done.returncode == 0, words(done)
    lines = chatty_lines(done.stdout)
    assert {(replica, node) for replica, node, _, _ in lines} == set(where.items())
    stamps = [stamp for _, _, stamp, _ in lines]
    assert stamps == sorted(stamps), "lines not merged in time order"
    for replica in where:  # each replica's own lines in its order, from its first
        numbers = [number for name, _, _, number in lines if name == replica]
        assert numbers[0] == 1 and numbers == sorted(numbers)


def test_tail_and_since(lab: Lab) -> None:
    done = ctl(lab, "logs", "chatty", "--tail", "2", timeout=60)
    assert done.returncode == 0, words(done)
    lines = chatty_lines(done.stdout)
    counts: dict[str, int] = {}
    for replica, _, _, _ in lines:
        counts[replica] = counts.get(replica, 0) + 1
    assert counts == dict.fromkeys(replica_nodes(lab, "chatty"), 2), done.stdout
    recent = ctl(lab, "logs", "chatty", "--since", "2s", timeout=60)
    everything = ctl(lab, "logs", "chatty", timeout=60)
    assert 0 < len(recent.stdout.splitlines()) < len(everything.stdout.splitlines())


def test_follow_prints_new_lines_until_interrupted(lab: Lab) -> None:
    argv = [*lab_coordctl_argv(lab), "logs", "chatty", "-f", "--tail", "1"]
    follower = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        time.sleep(4.0)
    finally:
        follower.send_signal(signal.SIGINT)
        out, err = follower.communicate(timeout=20)
    lines = chatty_lines(out)
    replicas = {replica for replica, _, _, _ in lines}
    assert replicas == set(replica_nodes(lab, "chatty")), out + err
    for replica in replicas:  # 1 tail line, then about 5 new ones a second
        assert len([1 for name, _, _, _ in lines if name == replica]) >= 5, out


def test_escapes_printed_literally_and_a_flood_bounded_with_the_dropped_line(lab: Lab) -> None:
    wait_until(
        "hostile printed everything",
        lambda: "done-printing" in ctl(lab, "logs", "hostile", "--tail", "1", timeout=60).stdout,
        timeout=120,
        every=2,
    )
    started = time.monotonic()
    done = ctl(lab, "logs", "hostile", timeout=120)
    took = time.monotonic() - started
    assert done.returncode == 0, done.stderr[-2000:]
    assert "\x1b" not in done.stdout and "\x07" not in done.stdout and "\r" not in done.stdout
    assert "before \\x1b]0;owned\\x07\\x1b[2Jcleared\\x0d" in done.stdout
    printed = len(done.stdout.encode())
    assert printed < limits.LOG_STREAM_BURST * 1.5, f"{printed} bytes printed: not bounded"
    assert printed > limits.LOG_STREAM_BURST // 2, done.stderr[-2000:]
    said = done.stderr
    assert re.search(r"hostile\.1 on pi\d+: \d+ bytes of output dropped", said), said[-2000:]
    assert "the log is longer than one stream's budget" in said and "--tail N" in said
    print(f"50 MB log: {printed} bytes printed in {took:.1f} s")

    latest = ctl(lab, "logs", "hostile", "--tail", "3", timeout=60)  # the end of it, as the note says
    assert latest.returncode == 0 and latest.stdout.rstrip().endswith("done-printing"), latest.stdout[-300:]

    # -f reads all of it (no cut when following): the budget holds and the drop is said
    follower = subprocess.Popen(
        [*lab_coordctl_argv(lab), "logs", "hostile", "-f"], stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )
    out, err = bytearray(), bytearray()
    readers = [
        threading.Thread(target=drain, args=(follower.stdout, out), daemon=True),
        threading.Thread(target=drain, args=(follower.stderr, err), daemon=True),
    ]
    for reader in readers:
        reader.start()
    started = time.monotonic()
    try:
        wait_until("-f says output was dropped", lambda: b"bytes of output dropped" in err, timeout=60)
    finally:
        follower.send_signal(signal.SIGINT)
        follower.wait(timeout=30)
        for reader in readers:
            reader.join(timeout=10)
    following = time.monotonic() - started
    assert len(out) < limits.LOG_STREAM_BURST * 1.5 + following * limits.LOG_STREAM_RATE


def test_logs_when_a_node_is_away_says_so_and_prints_the_others(lab: Lab) -> None:
    where = replica_nodes(lab, "chatty")
    away_replica, away = sorted(where.items())[0]
    lab.kill_agent(away)
    try:

        def said() -> subprocess.CompletedProcess[str] | None:
            done = ctl(lab, "logs", "chatty", "--tail", "3", timeout=60)
            return done if f"on {away}: the node is away" in done.stderr else None

        done = wait_until("logs says the node is away", said, timeout=60, every=1)
        assert done.returncode == 0
        shown = {replica for replica, _, _, _ in chatty_lines(done.stdout)}
        assert shown == set(where) - {away_replica}
    finally:
        lab.start_agent(away)
    wait_until(
        "the node's replica has output again",
        lambda: f"{away_replica}@{away}" in ctl(lab, "logs", "chatty", "--tail", "1", timeout=60).stdout,
        timeout=60,
        every=1,
    )


def test_logs_of_a_stack_print_every_service_of_it(lab: Lab, tmp_path: Path) -> None:
    ok(lab, "stack", "deploy", "-c", str(spec_file(tmp_path, "talk", TALK)), "talk")
    ok(lab, "rollout", "talk")
    said = re.compile(r"^((ping|pong)\.\d+)@pi\d+ \| (ping|pong) says hi$")

    def both() -> set[tuple[str, str]] | None:
        done = ctl(lab, "logs", "talk", "--tail", "2", timeout=60)
        assert done.returncode == 0, words(done)
        assert "chatty" not in done.stdout, done.stdout  # only the stack's services
        found = {(m.group(2), m.group(3)) for line in done.stdout.splitlines() if (m := said.match(line))}
        return found if found == {("ping", "ping"), ("pong", "pong")} else None

    try:
        wait_until("logs talk prints ping's and pong's lines", both, timeout=60, every=1)
    finally:
        ok(lab, "rm", "stack", "talk")


def test_unknown_service(lab: Lab) -> None:
    done = ctl(lab, "logs", "no-such-service", timeout=30)
    assert done.returncode == 1
    assert "no service 'no-such-service'" in done.stderr


def secret_rows(lab: Lab) -> dict[str, Any]:
    return {row["name"]: row for row in lab.coordctl_json("secret", "list")}


def test_secret_list_rm_and_a_replaced_value_stages_a_change(lab: Lab, tmp_path: Path) -> None:
    ok(lab, "secret", "create", "keeper-secrets", "token", "--from-literal", "first-Value-9x")
    ok(lab, "apply", "-f", str(spec_file(tmp_path, "keeper", USES_SECRET)))
    ok(lab, "rollout", "keeper")
    listed = ok(lab, "secret", "list")
    assert "keeper-secrets" in listed and "keeper" in listed and "first-Value-9x" not in listed
    assert secret_rows(lab)["keeper-secrets"]["used_by"] == ["keeper"]

    refused = ctl(lab, "secret", "rm", "keeper-secrets", timeout=30)
    assert refused.returncode == 1
    assert "used by keeper" in refused.stderr
    assert "keeper-secrets" in secret_rows(lab)  # nothing changed

    staged = {view["name"]: view["staged"] for view in lab.coordctl_json("services")}
    assert staged["keeper"] is False
    ok(lab, "secret", "create", "keeper-secrets", "token", "--from-literal", "second-Value-9x")
    staged = {view["name"]: view["staged"] for view in lab.coordctl_json("services")}
    assert staged["keeper"] is True and staged["chatty"] is False
    ok(lab, "rollout", "keeper")
    staged = {view["name"]: view["staged"] for view in lab.coordctl_json("services")}
    assert staged["keeper"] is False

    forced = ok(lab, "secret", "rm", "keeper-secrets", "--force")
    assert "keeper" in forced
    assert "keeper-secrets" not in secret_rows(lab)
    ok(lab, "secret", "create", "unused-secrets", "k", "--from-literal", "v")
    ok(lab, "secret", "rm", "unused-secrets")
    assert ctl(lab, "secret", "rm", "unused-secrets", timeout=30).returncode == 1  # gone: not found

"""`picoord-lab demo`, the quick start's main command (./scripts/lab-demo), end to end.

It runs as a user runs it (a separate process, building the agent deb itself) and is judged
by what it prints: the seed's layout (pi1..pi3 arm64 through qemu-user, ubuntu-desktop
amd64), the seed's docker-stack.yml rolled out unchanged, a broken update rolled back, and
nothing left behind. About 3 minutes on 2 cores once the arm64 root is cached in
/var/cache/picoord-test (shared with tests/lab/test_arm64_lab.py); building it the first
time takes longer.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from picoord.lab.cli import build_parser, cmd_demo
from picoord.lab.netns import LabError
from tests.conftest import require_root_or_fail
from tests.test_lab_network import host_names

PICOORD_LAB = Path(sys.executable).parent / "picoord-lab"
DEMO_TIMEOUT = 2400.0  # a first run builds the arm64 root (debootstrap under qemu-user)
PIS = ["pi1", "pi2", "pi3"]
DESKTOP = "ubuntu-desktop"


def sections(output: str) -> list[tuple[str, str]]:
    """(command, what it printed) for each `$ command` the demo shows, in order (the
    demo's own `picoord-lab demo: ...` lines end a section)."""
    found: list[tuple[str, list[str]]] = []
    for line in output.splitlines():
        if line.startswith("$ "):
            found.append((line[2:].split("   #")[0].strip(), []))
        elif line.startswith("picoord-lab"):
            found.append(("", []))
        elif found:
            found[-1][1].append(line)
    return [(command, "\n".join(lines).strip()) for command, lines in found]


def outputs(found: list[tuple[str, str]], command: str) -> list[str]:
    return [text for shown, text in found if shown == command]


def table(text: str) -> list[dict[str, str]]:
    """Rows of a coordctl table (columns split on runs of 2+ spaces; no empty cells here)."""
    lines = [line for line in text.splitlines() if line.strip()]
    header = re.split(r"\s{2,}", lines[0].strip())
    return [dict(zip(header, re.split(r"\s{2,}", line.strip()), strict=False)) for line in lines[1:]]


@pytest.mark.parametrize(
    "argv",
    [["demo", "--nodes", "5"], ["demo", "--node-names", "a,b,c"], ["demo", "--arm64-nodes", "pi1"]],
)
def test_the_seed_demo_refuses_other_layouts_before_starting_anything(argv: list[str]) -> None:
    with pytest.raises(LabError, match="--amd64"):
        cmd_demo(build_parser().parse_args(argv))


@pytest.mark.lab
@pytest.mark.arm64
def test_the_demo_rolls_the_seed_stack_out_on_arm64_pis(tmp_path: Path) -> None:
    require_root_or_fail()
    work_dir = tmp_path / "lab"
    process = subprocess.Popen(
        [str(PICOORD_LAB), "demo", "--work-dir", str(work_dir)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        stdin=subprocess.DEVNULL,
        text=True,
        start_new_session=True,
    )
    try:
        stdout, stderr = process.communicate(timeout=DEMO_TIMEOUT)
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGTERM)
            process.communicate(timeout=120)
        if work_dir.exists():  # the demo keeps a failed lab's work dir (logs): take the lab down
            subprocess.run(
                [str(PICOORD_LAB), "down", "--work-dir", str(work_dir)],
                capture_output=True,
                text=True,
                timeout=300,
                check=False,
            )
    said = f"exit {process.returncode}\n{stdout}\n{stderr}"
    assert process.returncode == 0, said
    lab_id = re.search(r"tearing lab ([0-9a-f]{4}) down", stdout)
    assert lab_id, said
    assert [name for name in host_names() if name.startswith(f"pcl{lab_id[1]}")] == [], said
    assert not work_dir.exists(), "a demo that succeeded removes its work dir"

    found = sections(stdout)
    nodes = {row["NAME"]: row for row in table(outputs(found, "coordctl nodes")[0])}
    assert {name: (row["STATUS"], row["ARCH"]) for name, row in nodes.items()} == {
        **dict.fromkeys(PIS, ("Ready", "aarch64")),
        DESKTOP: ("Ready", "x86_64"),
    }, said
    applied = outputs(found, "coordctl apply -f lab/demo-seed-cluster.yaml")
    assert applied[0].endswith("5 changed, 0 unchanged, 0 failed"), applied
    assert applied[1].endswith("nothing to change: every node is already as the file says"), applied
    swarm = table(outputs(found, "docker node ls")[0])
    assert sorted(row["HOSTNAME"] for row in swarm) == sorted([*PIS, DESKTOP]), swarm
    deploys = [
        (shown, text)
        for shown, text in found
        if re.fullmatch(
            r"coordctl stack deploy -c examples/seed-docker-stack.yml --address [\d.]+ mcp", shown
        )
    ]
    assert len(deploys) == 1, [shown for shown, _ in found if "stack deploy" in shown]
    vip = deploys[0][0].split()[-2]
    deployed = deploys[0][1]
    assert "service/mcp-server recorded" in deployed and "service/postgres recorded" in deployed, deployed
    rolled = outputs(found, "coordctl rollout mcp")[0]
    assert rolled.index("postgres") < rolled.index("mcp-server"), rolled  # dependencies first

    first, after_rollback = (table(text) for text in outputs(found, "coordctl ps mcp-server"))
    assert sorted(row["NODE"] for row in first) == PIS, first
    assert {(row["REVISION"], row["STATE"]) for row in first} == {("1", "running")}, first
    postgres = table(outputs(found, "coordctl ps postgres")[0])
    assert [(row["NODE"], row["STATE"]) for row in postgres] == [(DESKTOP, "running")], postgres
    machines = [text for command, text in found if command.startswith("docker exec") and "uname" in command]
    assert machines == ["aarch64"] * 3, machines  # each replica's own `uname -m`, on its Pi
    # each replica reaches postgres by name over the stack's overlay network...
    reached = [
        text for command, text in found if command.startswith("docker exec") and "cgi-bin/db" in command
    ]
    assert len(reached) == 3 and all(
        text.startswith("db: reached postgres:5432 from ") for text in reached
    ), reached
    # ... while 5432 is closed on every node's own address
    closed = outputs(found, "nc -w 3 <node> 5432")[0].splitlines()
    assert len(closed) == 4 and all(line.endswith(": 5432 closed") for line in closed), closed
    # one address, the stack's VIP, answered by all three replicas
    counted = outputs(
        found, f"for i in $(seq 30); do curl -s http://{vip}:8080/cgi-bin/db; done | sort | uniq -c"
    )
    answers = [line.split(None, 1)[1] for line in counted[0].splitlines()]
    assert set(answers) == set(reached), (answers, reached)
    # after the update to mcp:2, the three new replicas answer there too (other containers)
    renewed = {line.split(None, 1)[1] for line in counted[1].splitlines()}
    assert len(renewed) == 3 and not renewed & set(reached), (renewed, reached)
    assert all(text.startswith("db: reached postgres:5432 from ") for text in renewed), renewed

    broken = outputs(found, "coordctl rollout mcp-server --image mcp:4")[0]
    assert "(exit 1, as expected)" in broken and "rolled back mcp-server to revision 2" in broken, broken
    assert sorted(row["NODE"] for row in after_rollback) == PIS, after_rollback
    assert {(row["REVISION"], row["STATE"]) for row in after_rollback} == {("2", "running")}, after_rollback
    versions = outputs(found, "curl -s http://<pi>:8080/version")
    assert versions[-1].splitlines() == [f"{pi}: mcp 2" for pi in PIS], versions
    asked = [text for command, text in found if command.startswith("docker exec") and "/version" in command]
    assert asked == ["mcp 2"] * 3, asked  # each new replica, on its own loopback
    logged = outputs(found, "coordctl logs mcp-server --tail 1")[0].splitlines()
    prefixes = [re.match(r"mcp-server\.\d+@(pi\d) \| .*response:200", line) for line in logged]
    assert all(prefixes) and sorted(match[1] for match in prefixes if match) == PIS, logged
    history = table(outputs(found, "coordctl rollout history mcp-server")[0])
    assert [(row["REVISION"], row["IMAGE"]) for row in history] == [
        ("1", "mcp-modules-rust:latest"),
        ("2 *", "mcp:2"),
        ("3", "mcp:4"),
    ], history
    scaled = table(outputs(found, "coordctl services")[0])
    assert {row["NAME"]: row["REPLICAS"] for row in scaled}["mcp-server"].endswith("/2"), scaled
    gone = outputs(found, "docker ps -a --filter label=org.picoord.service")[0]
    assert gone == f"no container of stack mcp on {', '.join([*PIS, DESKTOP])}", gone
    remaining = table(outputs(found, "coordctl nodes")[-1])
    assert sorted(row["NAME"] for row in remaining) == sorted(["pi1", "pi2", DESKTOP]), remaining

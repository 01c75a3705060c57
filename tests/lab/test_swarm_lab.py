"""Docker Swarm membership for real: three lab Pis, each with its own dockerd (Debian's
docker.io) in its own sandbox, and the swarm executors run inside them as the agent would.

pi1 creates the swarm advertising its lab address; pi2 and pi3 join with the worker
token from pi1's facts (what the coordinator hands out); `docker node ls` on pi1 then
lists all three Ready. Second runs are UNCHANGED, leaving and re-joining works, and bad
input is REJECTED naming the field with the swarm state untouched. A last test runs the
executors on Debian 12's own python3, what a Pi has (python3-docker 5.0.3 is installed
there, but the agent's own Engine client, agent/docker_api.py, does not use it).
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from google.protobuf.message import Message

from picoord.lab.sandbox import PiRack, PiSandbox
from picoord.v1 import actions_pb2
from tests.actions.runner import run_executor

pytestmark = pytest.mark.lab

SWARM = "picoord.agent.actions.swarm"
TOKEN = re.compile(r"SWMTKN-1-[0-9a-z]{50}-[0-9a-z]{25}")
READY_TIMEOUT = 60.0
REPO_ROOT = Path(__file__).resolve().parent.parent.parent
DEBIAN_PYTHON = "/usr/bin/python3"
SYSTEM_PATH = "/usr/sbin:/usr/bin:/sbin:/bin"


def act(sb: Any, kind: str, request: Message, dry_run: bool = False) -> dict[str, Any]:
    result = run_executor(
        sb, f"{SWARM}:{kind}", request, dry_run=dry_run, timeout=120, docker_socket=sb.docker_socket
    )
    assert not result["error"], result["error"]
    return result


def docker(sb: PiSandbox, *args: str) -> str:
    done = sb.run(["docker", "-H", f"unix://{sb.docker_socket}", *args], timeout=30)
    assert done.returncode == 0, f"docker {' '.join(args)} on {sb.name}: {done.stderr}"
    return done.stdout


def swarm_info(sb: PiSandbox) -> dict[str, Any]:
    return dict(json.loads(docker(sb, "info", "--format", "{{json .Swarm}}")))


def nodes(manager: PiSandbox) -> list[dict[str, str]]:
    """`docker node ls` on the manager, one dict per node."""
    out = docker(manager, "node", "ls", "--format", "{{json .}}")
    return [json.loads(line) for line in out.splitlines() if line.strip()]


def wait_ready(manager: PiSandbox, node_ids: set[str]) -> list[dict[str, str]]:
    """Until every node in `node_ids` is listed Ready (and Active) on the manager."""
    deadline = time.monotonic() + READY_TIMEOUT
    while True:
        listed = nodes(manager)
        ready = {
            node["ID"] for node in listed if node["Status"] == "Ready" and node["Availability"] == "Active"
        }
        if node_ids <= ready:
            return listed
        if time.monotonic() > deadline:
            pytest.fail(f"nodes {sorted(node_ids - ready)} not Ready within {READY_TIMEOUT:g}s: {listed}")
        time.sleep(0.5)


def facts(result: dict[str, Any]) -> dict[str, str]:
    return {fact["key"]: fact["value"] for fact in result["facts"]}


def recorded(result: dict[str, Any]) -> list[list[str]]:
    return [list(command["argv"]) for command in result["commands"]]


def assert_no_token(results: list[dict[str, Any]], *tokens: str) -> None:
    for result in results:
        text = json.dumps([result["commands"], result["message"], result["in_place"]])
        for token in tokens:
            assert token not in text, f"a join token leaked into {result}"


@pytest.fixture(scope="module")
def rack(module_sandbox_factory: Callable[..., PiRack]) -> PiRack:
    return module_sandbox_factory(3, services=("dockerd",))


def test_swarm_init_join_leave_rejoin(rack: PiRack) -> None:
    pi1, pi2, pi3 = (rack.sandbox(name) for name in ("pi1", "pi2", "pi3"))
    ip1, ip2 = rack.address("pi1"), rack.address("pi2")
    manager = f"{ip1}:2377"
    results: list[dict[str, Any]] = []

    # The manager: a dry run plans the API call and changes nothing; then the real init.
    init = actions_pb2.SwarmInit(advertise_address=ip1, report_worker_token=True)
    init_argv = ["docker-api", "swarm.init", "--advertise-addr", ip1, "--listen-addr", manager]
    planned = act(pi1, "swarm_init", init, dry_run=True)
    assert planned["outcome"] == "PLANNED", planned
    assert recorded(planned) == [init_argv] and planned["commands"][0]["ran"] is False
    assert facts(planned) == {"swarm.manager_address": manager}
    assert swarm_info(pi1)["LocalNodeState"] == "inactive"

    made = act(pi1, "swarm_init", init)
    assert made["outcome"] == "SUCCEEDED", made
    assert recorded(made) == [init_argv]
    assert made["commands"][0]["ran"] is True and made["commands"][0]["exit_code"] == 0
    given = facts(made)
    assert given["swarm.manager_address"] == manager
    assert TOKEN.fullmatch(given["swarm.worker_token"])
    # The manager token never leaves the manager: only the worker token is a fact.
    assert {f["key"] for f in made["facts"] if f["secret"]} == {"swarm.worker_token"}
    manager_token = docker(pi1, "swarm", "join-token", "-q", "manager").strip()
    assert TOKEN.fullmatch(manager_token) and manager_token not in json.dumps(made)
    assert given["swarm.node_id"] == swarm_info(pi1)["NodeID"]
    # No worker to join: no token travels at all.
    tokenless = act(pi1, "swarm_init", actions_pb2.SwarmInit(advertise_address=ip1))
    assert tokenless["outcome"] == "UNCHANGED" and not any(f["secret"] for f in tokenless["facts"])
    assert given["swarm.worker_token"] not in json.dumps(tokenless) and manager_token not in json.dumps(
        tokenless
    )

    again = act(pi1, "swarm_init", init)
    assert again["outcome"] == "UNCHANGED", again
    assert again["commands"] == [] and facts(again) == given
    results += [planned, made, again]

    # The workers, with the worker token from the manager's facts.
    worker_token = given["swarm.worker_token"]
    join2 = actions_pb2.SwarmJoin(manager_address=manager, join_token=worker_token, advertise_address=ip2)
    join3 = actions_pb2.SwarmJoin(manager_address=manager, join_token=worker_token)
    dry = act(pi2, "swarm_join", join2, dry_run=True)
    assert dry["outcome"] == "PLANNED", dry
    assert recorded(dry) == [
        ["docker-api", "swarm.join", "--remote", manager, "--token", "<redacted>", "--advertise-addr", ip2]
    ]
    assert swarm_info(pi2)["LocalNodeState"] == "inactive"
    joined2, joined3 = act(pi2, "swarm_join", join2), act(pi3, "swarm_join", join3)
    for joined in (joined2, joined3):
        assert joined["outcome"] == "SUCCEEDED", joined
        assert joined["commands"][0]["ran"] is True and joined["commands"][0]["exit_code"] == 0
    assert recorded(joined3) == [["docker-api", "swarm.join", "--remote", manager, "--token", "<redacted>"]]
    results += [dry, joined2, joined3]

    ids = {given["swarm.node_id"], facts(joined2)["swarm.node_id"], facts(joined3)["swarm.node_id"]}
    listed = wait_ready(pi1, ids)
    assert sorted(node["Hostname"] for node in listed) == ["pi1", "pi2", "pi3"]
    assert [node["Hostname"] for node in listed if node["ManagerStatus"] == "Leader"] == ["pi1"]

    for sb, request in ((pi2, join2), (pi3, join3)):
        same = act(sb, "swarm_join", request)
        assert same["outcome"] == "UNCHANGED", same
        assert same["commands"] == []
        results.append(same)

    # Refusals: nothing implicit happens to a member of a swarm.
    elsewhere = actions_pb2.SwarmJoin(manager_address=f"{rack.network.gateway}:2377", join_token=worker_token)
    refused = act(pi2, "swarm_join", elsewhere)
    assert refused["outcome"] == "FAILED" and "swarm_leave first" in refused["message"], refused
    assert refused["commands"] == []
    worker_init = act(pi2, "swarm_init", actions_pb2.SwarmInit(advertise_address=ip2))
    assert worker_init["outcome"] == "FAILED" and "worker" in worker_init["message"], worker_init
    manager_leave = act(pi1, "swarm_leave", actions_pb2.SwarmLeave())
    assert manager_leave["outcome"] == "FAILED" and "force" in manager_leave["message"], manager_leave
    assert manager_leave["commands"] == []
    assert swarm_info(pi1)["ControlAvailable"] is True
    results += [refused, worker_init, manager_leave]

    # pi3 leaves, and leaving again changes nothing; then it joins again.
    left = act(pi3, "swarm_leave", actions_pb2.SwarmLeave())
    assert left["outcome"] == "SUCCEEDED", left
    assert recorded(left) == [["docker-api", "swarm.leave"]]
    assert facts(left) == {"swarm.left_node_id": facts(joined3)["swarm.node_id"]}
    assert swarm_info(pi3)["LocalNodeState"] == "inactive"
    assert act(pi3, "swarm_leave", actions_pb2.SwarmLeave())["outcome"] == "UNCHANGED"

    rejoined = act(pi3, "swarm_join", join3)
    assert rejoined["outcome"] == "SUCCEEDED", rejoined
    new_id = facts(rejoined)["swarm.node_id"]
    assert new_id and new_id != facts(joined3)["swarm.node_id"]  # a new node; the old one stays Down
    listed = wait_ready(pi1, {given["swarm.node_id"], facts(joined2)["swarm.node_id"], new_id})
    assert {node["Hostname"] for node in listed if node["Status"] == "Ready"} == {"pi1", "pi2", "pi3"}
    results += [left, rejoined]

    assert_no_token(results, worker_token, manager_token)
    assert all(manager_token not in json.dumps(result) for result in results)


BAD_INPUT = [
    ("swarm_join", {"manager_address": "MANAGER", "join_token": "SWMTKN-1-bad"}, "join_token"),
    ("swarm_join", {"manager_address": "10.0.0.1:2377; reboot", "join_token": "TOKEN"}, "manager_address"),
    ("swarm_join", {"manager_address": "--help", "join_token": "TOKEN"}, "manager_address"),
    (
        "swarm_join",
        {"manager_address": "MANAGER", "join_token": "TOKEN", "advertise_address": "--help"},
        "advertise_address",
    ),
    ("swarm_init", {"advertise_address": "--help"}, "advertise_address"),
    ("swarm_init", {"advertise_address": "10.0.0.1; reboot"}, "advertise_address"),
]


@pytest.mark.parametrize(("kind", "fields", "field_name"), BAD_INPUT)
def test_bad_input_is_rejected_and_changes_nothing(
    rack: PiRack, kind: str, fields: dict[str, str], field_name: str
) -> None:
    manager = f"{rack.address('pi1')}:2377"
    token = "SWMTKN-1-" + "0" * 50 + "-" + "a" * 25
    values = {key: value.replace("MANAGER", manager).replace("TOKEN", token) for key, value in fields.items()}
    request = actions_pb2.SwarmJoin(**values) if kind == "swarm_join" else actions_pb2.SwarmInit(**values)
    for name in ("pi1", "pi2", "pi3"):
        sb = rack.sandbox(name)
        before = swarm_info(sb)
        result = act(sb, kind, request)
        assert result["outcome"] == "REJECTED", result
        assert result["message"].startswith(f"{field_name}: "), result
        assert result["commands"] == []
        after = swarm_info(sb)
        assert (after["LocalNodeState"], after["NodeID"]) == (before["LocalNodeState"], before["NodeID"])


# --- on Debian's own python3 and python3-docker 5.0.3 --------------------------------


class DebianPython:
    """A sandbox whose executor snippet runs on /usr/bin/python3 with picoord built for it."""

    def __init__(self, sb: PiSandbox, tree: Path) -> None:
        self.sb, self.tree, self.name = sb, tree, f"{sb.name} (Debian python3)"
        self.docker_socket = sb.docker_socket

    def run(self, argv: list[str], timeout: float = 30, env: Any = None) -> subprocess.CompletedProcess[str]:
        assert argv[0] == sys.executable
        debian = {"PYTHONPATH": str(self.tree), "PYTHONNOUSERSITE": "1", "PATH": SYSTEM_PATH}
        return self.sb.run([DEBIAN_PYTHON, "-s", *argv[1:]], timeout=timeout, env=debian)


@pytest.fixture(scope="module")
def debian_tree(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """picoord installed by Debian's toolchain (scripts/build-debian-tree), for Debian's python."""
    tree = tmp_path_factory.mktemp("debian-tree") / "tree"
    done = subprocess.run(
        [DEBIAN_PYTHON, str(REPO_ROOT / "scripts" / "build-debian-tree"), str(tree)],
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    assert done.returncode == 0, f"build-debian-tree failed:\n{done.stdout}{done.stderr}"
    yield tree


def test_swarm_on_debians_python3_docker(sandbox_factory: Callable[..., PiRack], debian_tree: Path) -> None:
    """The same executors on Debian 12's python3 (Raspberry Pi OS bookworm), beside its
    python3-docker 5.0.3, which the agent's Engine client replaced."""
    for package in ("agent/actions", "common/checks"):
        assert (debian_tree / "picoord" / package / "__init__.py").exists(), (
            f"picoord/{package} is missing from the installed package: pyproject.toml's "
            "[tool.setuptools] packages must list it"
        )
    version = subprocess.run(
        [DEBIAN_PYTHON, "-s", "-c", "import docker; print(docker.__version__, docker.__file__)"],
        capture_output=True,
        text=True,
        check=True,
        env={"PYTHONPATH": str(debian_tree), "PATH": SYSTEM_PATH},
    ).stdout.split()
    assert version[0].startswith("5.") and version[1].startswith("/usr/lib/python3/dist-packages/"), version

    rack = sandbox_factory(2, services=("dockerd",))
    pi1, pi2 = (DebianPython(rack.sandbox(name), debian_tree) for name in ("pi1", "pi2"))
    init = actions_pb2.SwarmInit(advertise_address=rack.address("pi1"), report_worker_token=True)
    made = act(pi1, "swarm_init", init)
    assert made["outcome"] == "SUCCEEDED", made
    token = facts(made)["swarm.worker_token"]
    join = actions_pb2.SwarmJoin(manager_address=facts(made)["swarm.manager_address"], join_token=token)
    joined = act(pi2, "swarm_join", join)
    assert joined["outcome"] == "SUCCEEDED", joined
    wait_ready(rack.sandbox("pi1"), {facts(made)["swarm.node_id"], facts(joined)["swarm.node_id"]})
    assert act(pi1, "swarm_init", init)["outcome"] == "UNCHANGED"
    assert act(pi2, "swarm_join", join)["outcome"] == "UNCHANGED"
    left = act(pi2, "swarm_leave", actions_pb2.SwarmLeave())
    assert left["outcome"] == "SUCCEEDED" and swarm_info(rack.sandbox("pi2"))["LocalNodeState"] == "inactive"
    assert_no_token([made, joined, left], token)

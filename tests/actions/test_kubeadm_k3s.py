"""kubeadm and k3s executors against a recording stand-in, in a private mount namespace.

kubeadm, kubelet and k3s have no package for this machine (Debian 12 on x86_64, no
network to fetch release binaries), and systemd is not its init system. So these tests
do NOT run real Kubernetes: `kubeadm`, `k3s` and `systemctl` are a stand-in
(tests/fixtures/standin/recorder) placed first on PATH, which records every argv it is
called with and leaves the files the real programs would (admin.conf, kubelet.conf,
pki/ca.crt, node-token; unit activity). What is tested is what the agent controls: the
exact argv for the manager-side init and join-token retrieval and for the worker join,
idempotency (a second run changes nothing), dry runs (nothing runs), refusals, and that
no join token ever lands in a recorded argv or on the k3s command line.

Each executor call runs in a fresh `unshare --mount` namespace in which /etc and /var/lib
are overlays whose upper layer belongs to the test's "node" (so /etc/kubernetes,
/etc/systemd/system, /etc/rancher and /var/lib/rancher are private to it and persist from
call to call), and /run/systemd is a tmpfs that holds /run/systemd/system only when the
test says systemd is running. Product code keeps its real paths; nothing on the host
changes.
"""

from __future__ import annotations

import hashlib
import json
import os
import stat
import subprocess
import sys
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from google.protobuf.message import Message

from picoord.v1 import actions_pb2
from tests.actions.runner import run_executor

STANDIN = Path(__file__).resolve().parent.parent / "fixtures" / "standin"
RECORDER = STANDIN / "recorder"
SYSTEM_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
MANAGER_IP = "10.213.0.11"
API_SERVER = f"{MANAGER_IP}:6443"
POD_CIDR = "10.244.0.0/16"
KUBEADM = "picoord.agent.actions.kubeadm"
K3S = "picoord.agent.actions.k3s"

# Runs first inside the new mount namespace: the node's overlays, then exec the command.
PRELUDE = r"""
import json, os, subprocess, sys
for argv in json.loads(sys.argv[1]):
    subprocess.run(argv, check=True)
os.execvp(sys.argv[2], sys.argv[2:])
"""


def openssl_pin(cert: Path) -> str:
    """kubeadm's CA pin computed the way kubeadm's docs say, independent of the executor."""
    public = subprocess.run(
        ["openssl", "x509", "-in", str(cert), "-pubkey", "-noout"], capture_output=True, check=True
    ).stdout
    der = subprocess.run(
        ["openssl", "pkey", "-pubin", "-outform", "der"], input=public, capture_output=True, check=True
    ).stdout
    return "sha256:" + hashlib.sha256(der).hexdigest()


@dataclass
class Node:
    """A stand-in node: its private /etc and /var/lib layers, stand-in PATH and record."""

    name: str
    root: Path
    systemd: bool = True
    path_first: bool = True  # the stand-in directory leads PATH (False: no kubeadm/k3s at all)
    extra_env: dict[str, str] = field(default_factory=dict)  # e.g. STANDIN_TOKEN_EXPIRES
    seen: int = 0  # stand-in calls already returned by new_calls()
    results: list[dict[str, Any]] = field(default_factory=list)

    def __post_init__(self) -> None:
        for part in ("etc", "var-lib"):
            (self.root / "upper" / part).mkdir(parents=True, exist_ok=True)
            (self.root / "work" / part).mkdir(parents=True, exist_ok=True)
        self.bin.mkdir(parents=True, exist_ok=True)
        for program in ("kubeadm", "k3s", "systemctl"):
            link = self.bin / program
            if not link.exists():
                link.symlink_to(RECORDER)
        self.record.touch()

    @property
    def bin(self) -> Path:
        return self.root / "bin"

    @property
    def record(self) -> Path:
        return self.root / "calls.jsonl"

    def mounts(self) -> list[list[str]]:
        argv = []
        for target, part in (("/etc", "etc"), ("/var/lib", "var-lib")):
            options = (
                f"lowerdir={target},upperdir={self.root / 'upper' / part},workdir={self.root / 'work' / part}"
            )
            argv.append(["mount", "-t", "overlay", "overlay", "-o", options, target])
        argv.append(["mount", "-t", "tmpfs", "-o", "mode=0755", "tmpfs", "/run/systemd"])
        if self.systemd:
            argv.append(["mkdir", "/run/systemd/system"])
        return argv

    def env(self) -> dict[str, str]:
        return {
            "PATH": (f"{self.bin}:" if self.path_first else "") + SYSTEM_PATH,
            "HOME": "/root",
            "LANG": "C.UTF-8",
            "STANDIN_RECORD": str(self.record),
            "STANDIN_STATE": str(self.root / "state"),
            **self.extra_env,
        }

    def run(
        self, argv: Sequence[str], timeout: float = 30, env: Any = None
    ) -> subprocess.CompletedProcess[str]:
        """`argv` inside a fresh mount namespace holding this node's private layers."""
        wrapped = [
            "unshare",
            "--mount",
            "--propagation",
            "private",
            "--",
            sys.executable,
            "-c",
            PRELUDE,
            json.dumps(self.mounts()),
            *argv,
        ]
        return subprocess.run(
            wrapped,
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
            env=self.env(),
            stdin=subprocess.DEVNULL,
        )

    def act(self, kind: str, request: Message, dry_run: bool = False) -> dict[str, Any]:
        result = run_executor(self, kind, request, dry_run=dry_run, timeout=60)
        assert not result["error"], result["error"]
        self.results.append(result)
        return result

    def calls(self) -> list[list[str]]:
        return [json.loads(line)["argv"] for line in self.record.read_text().splitlines() if line]

    def new_calls(self) -> list[list[str]]:
        """Stand-in calls since the last time this was asked."""
        calls = self.calls()
        fresh, self.seen = calls[self.seen :], len(calls)
        return fresh

    def read(self, path: str) -> str | None:
        """A file as the node sees it (overlay deletions included), None when absent."""
        done = self.run(["cat", path])
        return done.stdout if done.returncode == 0 else None

    def mode(self, path: str) -> int:
        done = self.run(["stat", "-c", "%a", path])
        assert done.returncode == 0, done.stderr
        return int(done.stdout.strip(), 8)


@pytest.fixture
def make_node(root: None, tmp_path: Path) -> Iterator[Any]:
    def make(name: str, systemd: bool = True) -> Node:
        return Node(name, tmp_path / name, systemd=systemd)

    yield make


def facts(result: dict[str, Any]) -> dict[str, str]:
    return {fact["key"]: fact["value"] for fact in result["facts"]}


def secret_keys(result: dict[str, Any]) -> set[str]:
    return {fact["key"] for fact in result["facts"] if fact["secret"]}


def recorded(result: dict[str, Any]) -> list[list[str]]:
    return [list(command["argv"]) for command in result["commands"]]


def assert_secret_kept(node: Node, secret: str) -> None:
    """The secret is in no CommandRecord (argv, output) or message of any result on `node`."""
    assert secret
    for result in node.results:
        for command in result["commands"]:
            assert secret not in " ".join(command["argv"]), command
            assert secret not in command["output_tail"], command
        assert secret not in result["message"] and secret not in result["in_place"], result


# --- kubeadm -------------------------------------------------------------------------


def init_request() -> actions_pb2.KubeadmInit:
    return actions_pb2.KubeadmInit(advertise_address=MANAGER_IP, pod_network_cidr=POD_CIDR)


INIT_ARGV = [
    "kubeadm",
    "init",
    "--apiserver-advertise-address",
    MANAGER_IP,
    "--pod-network-cidr",
    POD_CIDR,
    "--skip-token-print",
]
TOKEN_LIST_ARGV = ["kubeadm", "token", "list", "-o", "json"]


def test_fixture_ca_pin_matches_the_stand_ins_canned_hash() -> None:
    """The stand-in's canned `--discovery-token-ca-cert-hash` is its CA's real pin."""
    canned = next(
        line.split('"')[1] for line in RECORDER.read_text().splitlines() if line.startswith("CA_CERT_HASH")
    )
    assert canned == openssl_pin(STANDIN / "ca.crt")


def test_kubeadm_manager_init_then_reuses_inits_token(make_node: Any) -> None:
    manager = make_node("manager")
    result = manager.act(f"{KUBEADM}:kubeadm_init", init_request())
    assert result["outcome"] == "SUCCEEDED", result
    assert manager.new_calls() == [INIT_ARGV, TOKEN_LIST_ARGV]
    assert recorded(result) == [INIT_ARGV]  # the list is a read: not recorded as a change
    tokens = json.loads((manager.root / "state" / "kubeadm-tokens.json").read_text())
    assert len(tokens) == 1  # init's own token, reused: none created
    assert facts(result) == {
        "kubeadm.api_server": API_SERVER,
        "kubeadm.ca_cert_hash": openssl_pin(STANDIN / "ca.crt"),
        "kubeadm.token": tokens[0]["token"],
    }
    assert secret_keys(result) == {"kubeadm.token"}

    again = manager.act(f"{KUBEADM}:kubeadm_init", init_request())
    assert again["outcome"] == "UNCHANGED", again
    assert again["commands"] == []
    assert manager.new_calls() == [TOKEN_LIST_ARGV]  # only the read
    assert facts(again) == facts(result)
    assert_secret_kept(manager, tokens[0]["token"])


def test_kubeadm_token_create_when_no_usable_token(make_node: Any) -> None:
    """init's token is expired: the agent has kubeadm create one. The token is never on an
    argv, and the output that prints it is withheld from the record."""
    manager = make_node("manager")
    manager.extra_env["STANDIN_TOKEN_EXPIRES"] = "2020-01-01T00:00:00Z"
    result = manager.act(f"{KUBEADM}:kubeadm_init", init_request())
    assert result["outcome"] == "SUCCEEDED", result
    token = facts(result)["kubeadm.token"]
    create = ["kubeadm", "token", "create", "--print-join-command"]
    assert manager.new_calls() == [INIT_ARGV, TOKEN_LIST_ARGV, create]
    assert recorded(result) == [INIT_ARGV, create]
    assert result["commands"][1]["output_tail"] == "<output withheld: it contains a secret>"
    assert facts(result)["kubeadm.api_server"] == API_SERVER
    assert facts(result)["kubeadm.ca_cert_hash"] == openssl_pin(STANDIN / "ca.crt")

    # Every listed token is expired again: a dry run plans a create, and runs only the list.
    planned = manager.act(f"{KUBEADM}:kubeadm_init", init_request(), dry_run=True)
    assert planned["outcome"] == "PLANNED", planned
    assert recorded(planned) == [create]
    assert manager.new_calls() == [TOKEN_LIST_ARGV]
    assert facts(planned) == {
        "kubeadm.api_server": API_SERVER,
        "kubeadm.ca_cert_hash": openssl_pin(STANDIN / "ca.crt"),
    }
    assert_secret_kept(manager, token)


def test_kubeadm_init_dry_run_runs_nothing(make_node: Any) -> None:
    manager = make_node("manager")
    result = manager.act(f"{KUBEADM}:kubeadm_init", init_request(), dry_run=True)
    assert result["outcome"] == "PLANNED", result
    assert recorded(result) == [INIT_ARGV]
    assert [command["ran"] for command in result["commands"]] == [False]
    assert manager.new_calls() == []
    assert manager.read("/etc/kubernetes/admin.conf") is None
    assert facts(result) == {"kubeadm.api_server": API_SERVER}


def test_kubeadm_init_refuses_a_control_plane_of_another_address(make_node: Any) -> None:
    manager = make_node("manager")
    assert manager.act(f"{KUBEADM}:kubeadm_init", init_request())["outcome"] == "SUCCEEDED"
    manager.new_calls()
    other = actions_pb2.KubeadmInit(advertise_address="10.213.0.12", pod_network_cidr=POD_CIDR)
    result = manager.act(f"{KUBEADM}:kubeadm_init", other)
    assert result["outcome"] == "FAILED"
    assert "10.213.0.11:6443" in result["message"] and "kubeadm_reset" in result["message"]
    assert result["commands"] == [] and manager.new_calls() == []


def test_manager_token_to_worker_join_then_reset(make_node: Any) -> None:
    """The coordinator's sequence: init on the manager, its facts into the workers' joins."""
    manager, worker = make_node("manager"), make_node("worker")
    made = manager.act(f"{KUBEADM}:kubeadm_init", init_request())
    assert made["outcome"] == "SUCCEEDED", made
    given = facts(made)
    join = actions_pb2.KubeadmJoin(
        api_server=given["kubeadm.api_server"],
        token=given["kubeadm.token"],
        ca_cert_hash=given["kubeadm.ca_cert_hash"],
    )
    # The token reaches kubeadm in a 0600 file (the stand-in refuses anything else), not on argv.
    join_argv = ["kubeadm", "join", "--config", "/run/picoord-agent/kubeadm-join.yaml"]

    planned = worker.act(f"{KUBEADM}:kubeadm_join", join, dry_run=True)
    assert planned["outcome"] == "PLANNED", planned
    assert worker.new_calls() == []
    assert recorded(planned) == [join_argv]

    joined = worker.act(f"{KUBEADM}:kubeadm_join", join)
    assert joined["outcome"] == "SUCCEEDED", joined
    assert worker.new_calls() == [join_argv]
    assert recorded(joined) == [join_argv]
    assert worker.read("/run/picoord-agent/kubeadm-join.yaml") is None  # removed after the join
    assert f"https://{API_SERVER}" in (worker.read("/etc/kubernetes/kubelet.conf") or "")
    assert facts(joined) == {"kubeadm.api_server": API_SERVER}

    again = worker.act(f"{KUBEADM}:kubeadm_join", join)
    assert again["outcome"] == "UNCHANGED", again
    assert again["commands"] == [] and worker.new_calls() == []

    elsewhere = actions_pb2.KubeadmJoin(
        api_server="10.213.0.99:6443", token=join.token, ca_cert_hash=join.ca_cert_hash
    )
    refused = worker.act(f"{KUBEADM}:kubeadm_join", elsewhere)
    assert refused["outcome"] == "FAILED" and "kubeadm_reset" in refused["message"], refused
    assert refused["commands"] == [] and worker.new_calls() == []

    reset = worker.act(f"{KUBEADM}:kubeadm_reset", actions_pb2.KubeadmReset())
    assert reset["outcome"] == "SUCCEEDED", reset
    assert worker.new_calls() == [["kubeadm", "reset", "--force"]]
    assert worker.read("/etc/kubernetes/kubelet.conf") is None
    assert worker.act(f"{KUBEADM}:kubeadm_reset", actions_pb2.KubeadmReset())["outcome"] == "UNCHANGED"
    assert worker.new_calls() == []

    rejoined = worker.act(f"{KUBEADM}:kubeadm_join", join)
    assert rejoined["outcome"] == "SUCCEEDED" and worker.new_calls() == [join_argv]
    for node in (manager, worker):
        assert_secret_kept(node, join.token)


@pytest.mark.parametrize(
    ("request_message", "field_name"),
    [
        (actions_pb2.KubeadmJoin(api_server="--help", token="abcdef.0123456789abcdef"), "api_server"),
        (
            actions_pb2.KubeadmJoin(
                api_server="10.213.0.11:6443; reboot",
                token="abcdef.0123456789abcdef",
                ca_cert_hash="sha256:" + "a" * 64,
            ),
            "api_server",
        ),
        (
            actions_pb2.KubeadmJoin(api_server=API_SERVER, token="ABCDEF.0123456789abcdef"),
            "token",
        ),
        (
            actions_pb2.KubeadmJoin(
                api_server=API_SERVER, token="abcdef.0123456789abcdef", ca_cert_hash="sha256:xyz"
            ),
            "ca_cert_hash",
        ),
        (actions_pb2.KubeadmInit(advertise_address="-v=9"), "advertise_address"),
        (
            actions_pb2.KubeadmInit(advertise_address=MANAGER_IP, pod_network_cidr="10.244.0.0/33"),
            "pod_network_cidr",
        ),
    ],
)
def test_kubeadm_bad_input_is_rejected_and_runs_nothing(
    make_node: Any, request_message: Message, field_name: str
) -> None:
    node = make_node("node")
    kind = "kubeadm_join" if isinstance(request_message, actions_pb2.KubeadmJoin) else "kubeadm_init"
    result = node.act(f"{KUBEADM}:{kind}", request_message)
    assert result["outcome"] == "REJECTED", result
    assert result["message"].startswith(f"{field_name}: "), result
    assert result["commands"] == [] and node.new_calls() == []


def test_kubeadm_missing_is_a_clear_failure(make_node: Any) -> None:
    node = make_node("node")
    node.path_first = False  # no stand-in on PATH: like a node without kubeadm installed
    result = node.act(f"{KUBEADM}:kubeadm_init", init_request())
    assert result["outcome"] == "FAILED"
    assert "kubeadm is not installed" in result["message"]
    assert node.calls() == []


# --- k3s -----------------------------------------------------------------------------

SERVER_URL = f"https://{API_SERVER}"
AGENT_UNIT = "/etc/systemd/system/k3s-agent.service"
TOKEN_FILE = "/etc/rancher/k3s/agent-token"


def test_k3s_server_unit_started_and_token_handed_out(make_node: Any) -> None:
    server = make_node("server")
    request = actions_pb2.K3sServer(advertise_address=MANAGER_IP)
    result = server.act(f"{K3S}:k3s_server", request)
    assert result["outcome"] == "SUCCEEDED", result
    assert recorded(result) == [
        ["write-file", "/etc/systemd/system/k3s.service", "0644"],
        ["systemctl", "daemon-reload"],
        ["systemctl", "enable", "--now", "k3s.service"],
    ]
    k3s = str(server.bin / "k3s")
    assert server.new_calls() == [
        ["systemctl", "is-active", "--quiet", "k3s.service"],
        ["systemctl", "daemon-reload"],
        ["systemctl", "enable", "--now", "k3s.service"],
        ["k3s", "server", "--advertise-address", MANAGER_IP, "--node-ip", MANAGER_IP],
    ]
    unit = server.read("/etc/systemd/system/k3s.service") or ""
    assert f"ExecStart={k3s} server --advertise-address {MANAGER_IP} --node-ip {MANAGER_IP}" in unit
    node_token = (server.read("/var/lib/rancher/k3s/server/node-token") or "").strip()
    assert node_token.startswith("K10")
    assert facts(result) == {"k3s.server_url": SERVER_URL, "k3s.token": node_token}
    assert secret_keys(result) == {"k3s.token"}

    again = server.act(f"{K3S}:k3s_server", request)
    assert again["outcome"] == "UNCHANGED", again
    assert server.new_calls() == [["systemctl", "is-active", "--quiet", "k3s.service"]]
    assert facts(again) == facts(result)
    assert_secret_kept(server, node_token)


def test_k3s_agent_token_only_in_a_0600_file_never_on_argv(make_node: Any) -> None:
    agent = make_node("agent")
    token = "K10" + "ab" * 32 + "::server:" + "cd" * 16
    request = actions_pb2.K3sAgent(server_url=SERVER_URL, token=token)

    planned = agent.act(f"{K3S}:k3s_agent", request, dry_run=True)
    assert planned["outcome"] == "PLANNED", planned
    assert [command["ran"] for command in planned["commands"]] == [False] * 4
    assert agent.new_calls() == [["systemctl", "is-active", "--quiet", "k3s-agent.service"]]
    assert agent.read(AGENT_UNIT) is None and agent.read(TOKEN_FILE) is None

    result = agent.act(f"{K3S}:k3s_agent", request)
    assert result["outcome"] == "SUCCEEDED", result
    assert (
        recorded(result)
        == recorded(planned)
        == [
            ["write-file", TOKEN_FILE, "0600"],
            ["write-file", AGENT_UNIT, "0644"],
            ["systemctl", "daemon-reload"],
            ["systemctl", "enable", "--now", "k3s-agent.service"],
        ]
    )
    assert agent.new_calls() == [
        ["systemctl", "is-active", "--quiet", "k3s-agent.service"],
        ["systemctl", "daemon-reload"],
        ["systemctl", "enable", "--now", "k3s-agent.service"],
        ["k3s", "agent", "--server", SERVER_URL, "--token-file", TOKEN_FILE],
    ]
    assert (agent.read(TOKEN_FILE) or "").strip() == token
    assert stat.S_IMODE(agent.mode(TOKEN_FILE)) == 0o600
    unit = agent.read(AGENT_UNIT) or ""
    assert f"--server {SERVER_URL} --token-file {TOKEN_FILE}" in unit and token not in unit
    assert all(token not in " ".join(call) for call in agent.calls())  # ps never shows it
    assert facts(result) == {"k3s.server_url": SERVER_URL}

    again = agent.act(f"{K3S}:k3s_agent", request)
    assert again["outcome"] == "UNCHANGED", again
    assert agent.new_calls() == [["systemctl", "is-active", "--quiet", "k3s-agent.service"]]

    rotated = actions_pb2.K3sAgent(server_url=SERVER_URL, token="K10" + "ef" * 32 + "::server:" + "01" * 16)
    changed = agent.act(f"{K3S}:k3s_agent", rotated)
    assert changed["outcome"] == "SUCCEEDED", changed
    assert recorded(changed) == [
        ["write-file", TOKEN_FILE, "0600"],
        ["systemctl", "restart", "k3s-agent.service"],
    ]
    assert (agent.read(TOKEN_FILE) or "").strip() == rotated.token

    other = actions_pb2.K3sAgent(server_url="https://10.213.0.99:6443", token=token)
    refused = agent.act(f"{K3S}:k3s_agent", other)
    assert refused["outcome"] == "FAILED" and "k3s_uninstall" in refused["message"], refused
    assert refused["commands"] == []
    assert_secret_kept(agent, token)
    assert_secret_kept(agent, rotated.token)

    agent.new_calls()
    removed = agent.act(f"{K3S}:k3s_uninstall", actions_pb2.K3sUninstall())
    assert removed["outcome"] == "SUCCEEDED", removed
    assert recorded(removed) == [
        ["systemctl", "disable", "--now", "k3s-agent.service"],
        ["remove-file", AGENT_UNIT],
        ["remove-file", TOKEN_FILE],
        ["systemctl", "daemon-reload"],
        ["remove-tree", "/etc/rancher/k3s"],
    ]
    assert agent.read(AGENT_UNIT) is None and agent.read(TOKEN_FILE) is None
    assert agent.act(f"{K3S}:k3s_uninstall", actions_pb2.K3sUninstall())["outcome"] == "UNCHANGED"
    rejoined = agent.act(f"{K3S}:k3s_agent", other)
    assert rejoined["outcome"] == "SUCCEEDED", rejoined


def test_k3s_without_systemd_fails_and_changes_nothing(make_node: Any) -> None:
    agent = make_node("agent", systemd=False)
    request = actions_pb2.K3sAgent(server_url=SERVER_URL, token="K10" + "ab" * 32 + "::server:" + "cd" * 16)
    for dry_run in (True, False):
        result = agent.act(f"{K3S}:k3s_agent", request, dry_run=dry_run)
        assert result["outcome"] == "FAILED", result
        assert "systemd" in result["message"] and "nothing was changed" in result["message"]
        assert result["commands"] == []
    assert agent.calls() == []
    assert agent.read(AGENT_UNIT) is None and agent.read(TOKEN_FILE) is None


@pytest.mark.parametrize(
    ("request_message", "field_name"),
    [
        (actions_pb2.K3sAgent(server_url="http://10.213.0.11:6443", token="K10" + "a" * 64), "server_url"),
        (actions_pb2.K3sAgent(server_url="https://10.213.0.11:6443;reboot", token="abcdefgh"), "server_url"),
        (actions_pb2.K3sAgent(server_url=SERVER_URL, token="--token-file=/etc/shadow"), "token"),
        (actions_pb2.K3sAgent(server_url=SERVER_URL, token="short"), "token"),
        (actions_pb2.K3sServer(advertise_address="--help"), "advertise_address"),
    ],
)
def test_k3s_bad_input_is_rejected_and_runs_nothing(
    make_node: Any, request_message: Message, field_name: str
) -> None:
    node = make_node("node")
    kind = "k3s_agent" if isinstance(request_message, actions_pb2.K3sAgent) else "k3s_server"
    result = node.act(f"{K3S}:{kind}", request_message)
    assert result["outcome"] == "REJECTED", result
    assert result["message"].startswith(f"{field_name}: "), result
    assert result["commands"] == [] and node.calls() == []


def test_the_private_layers_leave_the_host_alone() -> None:
    """Nothing these tests write reaches the host's /etc or /var/lib."""
    for path in (
        "/etc/kubernetes",
        "/etc/rancher",
        "/var/lib/rancher",
        "/etc/systemd/system/k3s-agent.service",
    ):
        assert not os.path.exists(path), f"{path} exists on the host"

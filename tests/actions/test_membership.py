"""Cluster-membership checks and plans as tables: plain data in, argv (or a refusal) out.

No I/O here except where said: the executors' decisions (swarm_state, plan_swarm_*,
plan_kubeadm_*, usable_token, parse_join_command, plan_k3s_*, unit_text) are pure, and
the one recording helper of the swarm executor is exercised with a fake Engine client.
"""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from google.protobuf.message import Message

from picoord.agent.actions import k3s, kubeadm, swarm
from picoord.agent.actions.base import REDACTED, ActionContext, ActionFailed
from picoord.common.checks import membership
from picoord.common.validation import FieldError
from picoord.v1 import actions_pb2

WORKER_TOKEN = "SWMTKN-1-" + "3" * 50 + "-" + "a" * 25
MANAGER = "10.213.0.11:2377"
CA_CERT = Path(__file__).resolve().parent.parent / "fixtures" / "standin" / "ca.crt"
CA_PIN = "sha256:28f2a5a6edde868dc3ea86d18ca3fb61bc31ad99afc9ecce31878c090b302030"  # openssl, see below
KUBE_TOKEN = "abcdef.0123456789abcdef"

# --- checks --------------------------------------------------------------------------

GOOD = [
    actions_pb2.SwarmInit(advertise_address="10.213.0.11"),
    actions_pb2.SwarmInit(advertise_address="10.213.0.11:2377", listen_address="0.0.0.0:2377"),
    actions_pb2.SwarmInit(advertise_address="fd00::11"),
    actions_pb2.SwarmJoin(manager_address=MANAGER, join_token=WORKER_TOKEN),
    actions_pb2.SwarmJoin(
        manager_address="pi1.lan", join_token=WORKER_TOKEN, advertise_address="10.213.0.12"
    ),
    actions_pb2.SwarmLeave(),
    actions_pb2.SwarmLeave(force=True),
    actions_pb2.KubeadmInit(advertise_address="192.168.1.10", pod_network_cidr="10.244.0.0/16"),
    actions_pb2.KubeadmInit(advertise_address="192.168.1.10"),
    actions_pb2.KubeadmJoin(api_server="192.168.1.10:6443", token=KUBE_TOKEN, ca_cert_hash=CA_PIN),
    actions_pb2.KubeadmJoin(api_server="desktop", token=KUBE_TOKEN, ca_cert_hash=CA_PIN),
    actions_pb2.KubeadmReset(),
    actions_pb2.K3sServer(advertise_address="192.168.1.10"),
    actions_pb2.K3sAgent(server_url="https://192.168.1.10:6443", token="K10" + "a" * 64 + "::server:abc"),
    actions_pb2.K3sUninstall(),
]

CHECKS = {
    actions_pb2.SwarmInit: membership.check_swarm_init,
    actions_pb2.SwarmJoin: membership.check_swarm_join,
    actions_pb2.SwarmLeave: membership.check_swarm_leave,
    actions_pb2.KubeadmInit: membership.check_kubeadm_init,
    actions_pb2.KubeadmJoin: membership.check_kubeadm_join,
    actions_pb2.KubeadmReset: membership.check_kubeadm_reset,
    actions_pb2.K3sServer: membership.check_k3s_server,
    actions_pb2.K3sAgent: membership.check_k3s_agent,
    actions_pb2.K3sUninstall: membership.check_k3s_uninstall,
}


@pytest.mark.parametrize("request_message", GOOD, ids=lambda m: type(m).__name__)
def test_good_requests_pass(request_message: Message) -> None:
    assert CHECKS[type(request_message)](request_message) is None


BAD = [
    (actions_pb2.SwarmInit(), "advertise_address", "non-empty"),
    (actions_pb2.SwarmInit(advertise_address="eth0"), "advertise_address", "not an IP"),
    (actions_pb2.SwarmInit(advertise_address="--help"), "advertise_address", "starts with '-'"),
    (actions_pb2.SwarmInit(advertise_address="10.0.0.1;reboot"), "advertise_address", "';'"),
    (
        actions_pb2.SwarmInit(advertise_address="10.0.0.1", listen_address="0.0.0.0:70000"),
        "listen_address",
        "70000",
    ),
    (
        actions_pb2.SwarmJoin(manager_address=MANAGER, join_token="SWMTKN-1-bad"),
        "join_token",
        "Swarm join token",
    ),
    (
        actions_pb2.SwarmJoin(manager_address="10.0.0.1:2377; reboot", join_token=WORKER_TOKEN),
        "manager_address",
        "';'",
    ),
    (actions_pb2.SwarmJoin(manager_address="--help", join_token=WORKER_TOKEN), "manager_address", "'-'"),
    (
        actions_pb2.SwarmJoin(manager_address="10.0.0.1:0", join_token=WORKER_TOKEN),
        "manager_address",
        "port 0",
    ),
    (actions_pb2.SwarmJoin(manager_address="$(reboot)", join_token=WORKER_TOKEN), "manager_address", "'$'"),
    (
        actions_pb2.SwarmJoin(manager_address=MANAGER, join_token=WORKER_TOKEN, advertise_address="pi2"),
        "advertise_address",
        "not an IP",
    ),
    (actions_pb2.SwarmJoin(manager_address=MANAGER, join_token=WORKER_TOKEN + "\n"), "join_token", "Swarm"),
    (actions_pb2.KubeadmInit(advertise_address="10.0.0.300"), "advertise_address", "not an IP"),
    (
        actions_pb2.KubeadmInit(advertise_address="10.0.0.1", pod_network_cidr="10.244.0.1/16"),
        "pod_network_cidr",
        "CIDR",
    ),
    (
        actions_pb2.KubeadmJoin(api_server="1.2.3.4:6443", token="abcdef0123456789abcdef"),
        "token",
        "kubeadm token",
    ),
    (
        actions_pb2.KubeadmJoin(api_server="1.2.3.4:6443", token=KUBE_TOKEN, ca_cert_hash="abc"),
        "ca_cert_hash",
        "sha256",
    ),
    (actions_pb2.KubeadmJoin(api_server="-x", token=KUBE_TOKEN, ca_cert_hash=CA_PIN), "api_server", "'-'"),
    (actions_pb2.K3sServer(), "advertise_address", "non-empty"),
    (actions_pb2.K3sAgent(server_url="10.0.0.1:6443", token="K10" + "a" * 64), "server_url", "https://"),
    (actions_pb2.K3sAgent(server_url="https://10.0.0.1:6443", token="a b c d e f"), "token", "k3s token"),
    (actions_pb2.K3sAgent(server_url="https://10.0.0.1:6443", token="-" + "a" * 10), "token", "k3s token"),
]


@pytest.mark.parametrize(("request_message", "field_name", "says"), BAD)
def test_bad_requests_name_the_field(request_message: Message, field_name: str, says: str) -> None:
    with pytest.raises(FieldError) as caught:
        CHECKS[type(request_message)](request_message)
    assert caught.value.field == field_name
    assert says in str(caught.value)


def test_a_check_refuses_another_message_type() -> None:
    with pytest.raises(FieldError) as caught:
        membership.check_swarm_join(actions_pb2.SwarmInit(advertise_address="10.0.0.1"))  # type: ignore[arg-type]
    assert caught.value.field == "action"


@pytest.mark.parametrize(
    ("value", "default_port", "expected"),
    [
        ("10.0.0.1", None, "10.0.0.1"),
        ("10.0.0.1", 2377, "10.0.0.1:2377"),
        ("10.0.0.1:4000", 2377, "10.0.0.1:4000"),
        ("fd00::1", 2377, "[fd00::1]:2377"),
        ("0.0.0.0:2377", None, "0.0.0.0:2377"),
    ],
)
def test_ip_or_ip_port_normalises(value: str, default_port: int | None, expected: str) -> None:
    assert membership.ip_or_ip_port("f", value, default_port) == expected


# --- swarm: state and plans ----------------------------------------------------------

INACTIVE = swarm.swarm_state({"LocalNodeState": "inactive", "NodeID": "", "RemoteManagers": None})
MANAGER_INFO = {
    "LocalNodeState": "active",
    "NodeID": "n1",
    "NodeAddr": "10.213.0.11",
    "ControlAvailable": True,
    "RemoteManagers": [{"NodeID": "n1", "Addr": MANAGER}],
    "Cluster": {"ID": "c1"},
}
MANAGER_STATE = swarm.swarm_state(MANAGER_INFO)
WORKER_STATE = swarm.swarm_state(
    {
        "LocalNodeState": "active",
        "NodeID": "n2",
        "NodeAddr": "10.213.0.12",
        "ControlAvailable": False,
        "RemoteManagers": [{"NodeID": "n1", "Addr": MANAGER}],
    }
)


def test_swarm_state_from_engine_info() -> None:
    assert (
        swarm.SwarmState(
            local_state="active",
            node_id="n1",
            node_address="10.213.0.11",
            is_manager=True,
            managers=(MANAGER,),
            manager_ids=("n1",),
            cluster_id="c1",
        )
        == MANAGER_STATE
    )
    assert MANAGER_STATE.own_manager_address() == MANAGER
    assert swarm.swarm_state(None).local_state == "inactive"
    assert swarm.swarm_state({"LocalNodeState": "error", "Error": "boom"}).error == "boom"
    assert "worker" in WORKER_STATE.describe() and MANAGER in WORKER_STATE.describe()


def argv_of(calls: list[swarm.ApiCall]) -> list[list[str]]:
    return [list(call.argv) for call in calls]


@pytest.mark.parametrize(
    ("state", "expected"),
    [
        (
            INACTIVE,
            [
                [
                    "docker-api",
                    "swarm.init",
                    "--advertise-addr",
                    "10.213.0.11",
                    "--listen-addr",
                    "10.213.0.11:2377",
                ]
            ],
        ),
        (MANAGER_STATE, []),
    ],
)
def test_plan_swarm_init(state: swarm.SwarmState, expected: list[list[str]]) -> None:
    calls = swarm.plan_swarm_init(state, "10.213.0.11", "10.213.0.11:2377")
    assert argv_of(calls) == expected
    if calls:
        assert calls[0].method == "init_swarm"
        assert dict(calls[0].kwargs) == {"advertise_addr": "10.213.0.11", "listen_addr": "10.213.0.11:2377"}


@pytest.mark.parametrize(
    ("state", "says"),
    [
        (WORKER_STATE, "worker in a swarm"),
        (swarm.swarm_state({**MANAGER_INFO, "NodeAddr": "10.213.0.99"}), "advertising 10.213.0.99"),
        (swarm.swarm_state({"LocalNodeState": "pending"}), "pending"),
        (swarm.swarm_state({"LocalNodeState": "locked"}), "locked"),
        (swarm.swarm_state({"LocalNodeState": "error", "Error": "raft"}), "raft"),
    ],
)
def test_plan_swarm_init_refuses(state: swarm.SwarmState, says: str) -> None:
    with pytest.raises(ActionFailed, match=says):
        swarm.plan_swarm_init(state, "10.213.0.11", "10.213.0.11:2377")


def test_plan_swarm_join() -> None:
    calls = swarm.plan_swarm_join(INACTIVE, MANAGER, WORKER_TOKEN)
    assert argv_of(calls) == [["docker-api", "swarm.join", "--remote", MANAGER, "--token", WORKER_TOKEN]]
    assert dict(calls[0].kwargs) == {"remote_addrs": [MANAGER], "join_token": WORKER_TOKEN}
    with_address = swarm.plan_swarm_join(INACTIVE, MANAGER, WORKER_TOKEN, "10.213.0.12")
    assert with_address[0].argv[-2:] == ("--advertise-addr", "10.213.0.12")
    assert with_address[0].kwargs["advertise_addr"] == "10.213.0.12"
    # already in that swarm: as a worker, as the manager itself, or via a name resolving to it
    assert swarm.plan_swarm_join(WORKER_STATE, MANAGER, WORKER_TOKEN) == []
    assert swarm.plan_swarm_join(MANAGER_STATE, MANAGER, WORKER_TOKEN) == []
    assert swarm.plan_swarm_join(WORKER_STATE, "pi1:2377", WORKER_TOKEN, "", frozenset({MANAGER})) == []
    with pytest.raises(ActionFailed, match=r"another swarm.*swarm_leave first"):
        swarm.plan_swarm_join(WORKER_STATE, "10.213.0.99:2377", WORKER_TOKEN)
    with pytest.raises(ActionFailed, match="pending"):
        swarm.plan_swarm_join(swarm.swarm_state({"LocalNodeState": "pending"}), MANAGER, WORKER_TOKEN)


def test_plan_swarm_leave() -> None:
    assert swarm.plan_swarm_leave(INACTIVE, force=False) == []
    assert argv_of(swarm.plan_swarm_leave(WORKER_STATE, force=False)) == [["docker-api", "swarm.leave"]]
    assert argv_of(swarm.plan_swarm_leave(MANAGER_STATE, force=True)) == [
        ["docker-api", "swarm.leave", "--force"]
    ]
    with pytest.raises(ActionFailed, match=r"manager.*force"):
        swarm.plan_swarm_leave(MANAGER_STATE, force=False)
    # a pending join can be abandoned
    assert swarm.plan_swarm_leave(swarm.swarm_state({"LocalNodeState": "pending"}), force=True)


class FakeEngine:
    """Stands for the agent's DockerAPI in the recording helper: answers or raises."""

    def __init__(self, error: Exception | None = None) -> None:
        self.error = error
        self.timeout: float = 0
        self.calls: list[tuple[str, dict[str, Any]]] = []

    def join_swarm(self, **kwargs: Any) -> bool:
        self.calls.append(("join_swarm", kwargs))
        if self.error:
            raise self.error
        return True


def context(dry_run: bool) -> ActionContext:
    return ActionContext(dry_run=dry_run, deadline=time.monotonic() + 30, secrets=(WORKER_TOKEN,))


def test_api_calls_are_recorded_like_commands_with_secrets_redacted() -> None:
    call = swarm.plan_swarm_join(INACTIVE, MANAGER, WORKER_TOKEN)[0]
    ran = context(dry_run=False)
    engine = FakeEngine()
    swarm._call(ran, engine, call)
    assert engine.calls == [("join_swarm", {"remote_addrs": [MANAGER], "join_token": WORKER_TOKEN})]
    assert 0 < engine.timeout <= swarm.CHANGE_TIMEOUT
    [record] = ran.commands
    assert list(record.argv) == ["docker-api", "swarm.join", "--remote", MANAGER, "--token", REDACTED]
    assert record.ran and record.exit_code == 0

    planned = context(dry_run=True)
    idle = FakeEngine()
    assert swarm._call(planned, idle, call) is None
    assert idle.calls == [] and not planned.commands[0].ran


def test_a_refused_api_call_is_recorded_failed_with_its_error() -> None:
    call = swarm.plan_swarm_join(INACTIVE, MANAGER, WORKER_TOKEN)[0]
    failed = context(dry_run=False)
    error = RuntimeError(f"rpc error: invalid join token {WORKER_TOKEN}")
    with pytest.raises(ActionFailed, match=r"swarm.join failed: rpc error"):
        swarm._call(failed, FakeEngine(error), call)
    [record] = failed.commands
    assert record.ran and record.exit_code == 1
    assert "invalid join token" in record.output_tail and WORKER_TOKEN not in record.output_tail


def test_importing_the_executors_does_not_load_the_docker_sdk() -> None:
    """The SDK costs ~20 MiB of the agent's 40 MiB budget: no executor loads it (the Swarm
    executor speaks to dockerd through picoord.agent.docker_api)."""
    probe = (
        "import sys; import picoord.agent.actions.swarm, picoord.agent.actions.kubeadm, "
        "picoord.agent.actions.k3s; print('docker' in sys.modules, 'requests' in sys.modules)"
    )
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True)
    assert done.stdout.split() == ["False", "False"]


# --- kubeadm -------------------------------------------------------------------------


def test_plan_kubeadm_init() -> None:
    assert kubeadm.plan_kubeadm_init(True, "10.0.0.1", "10.244.0.0/16") == []
    assert kubeadm.plan_kubeadm_init(False, "10.0.0.1", "10.244.0.0/16") == [
        [
            "kubeadm",
            "init",
            "--apiserver-advertise-address",
            "10.0.0.1",
            "--pod-network-cidr",
            "10.244.0.0/16",
            "--skip-token-print",
        ]
    ]
    assert kubeadm.plan_kubeadm_init(False, "10.0.0.1", "") == [
        ["kubeadm", "init", "--apiserver-advertise-address", "10.0.0.1", "--skip-token-print"]
    ]


def test_plan_kubeadm_join_and_reset() -> None:
    join = ["kubeadm", "join", "--config", "/run/picoord-agent/kubeadm-join.yaml"]  # no token on argv
    assert kubeadm.plan_kubeadm_join(None, "10.0.0.1:6443") == [join]
    assert kubeadm.plan_kubeadm_join("10.0.0.1:6443", "10.0.0.1:6443") == []
    with pytest.raises(ActionFailed, match=r"10.0.0.9:6443.*kubeadm_reset"):
        kubeadm.plan_kubeadm_join("10.0.0.9:6443", "10.0.0.1:6443")


def test_join_configuration_says_what_the_seeds_join_line_says() -> None:
    import yaml

    config = yaml.safe_load(kubeadm.join_configuration("10.0.0.1:6443", KUBE_TOKEN, CA_PIN))
    assert config == {
        "apiVersion": "kubeadm.k8s.io/v1beta3",
        "kind": "JoinConfiguration",
        "discovery": {
            "bootstrapToken": {
                "apiServerEndpoint": "10.0.0.1:6443",
                "token": KUBE_TOKEN,
                "caCertHashes": [CA_PIN],
            }
        },
    }
    assert kubeadm.plan_kubeadm_reset(False, False) == []
    assert kubeadm.plan_kubeadm_reset(True, False) == kubeadm.plan_kubeadm_reset(False, True)
    assert kubeadm.plan_kubeadm_reset(False, True) == [["kubeadm", "reset", "--force"]]


NOW = datetime(2026, 1, 1, 12, 0, tzinfo=UTC)


def token_json(
    token: str, expires: str | None, usages: tuple[str, ...] = ("authentication", "signing")
) -> str:
    entry = {
        "kind": "BootstrapToken",
        "token": token,
        "usages": list(usages),
        "groups": [kubeadm.DEFAULT_NODE_TOKEN_GROUP],
    }
    if expires:
        entry["expires"] = expires
    return json.dumps(entry, indent=4)


@pytest.mark.parametrize(
    ("listing", "expected"),
    [
        ("", None),
        (token_json(KUBE_TOKEN, "2026-01-02T12:00:00Z"), KUBE_TOKEN),
        (token_json(KUBE_TOKEN, None), KUBE_TOKEN),  # never expires
        (token_json(KUBE_TOKEN, "2026-01-01T12:10:00Z"), None),  # expires before workers are done
        (token_json(KUBE_TOKEN, "2026-01-02T12:00:00Z", ("authentication",)), None),  # cannot sign discovery
        ("not json {", "error"),
        (
            token_json("aaaaaa.aaaaaaaaaaaaaaaa", "2026-01-01T18:00:00Z")
            + "\n"
            + token_json("bbbbbb.bbbbbbbbbbbbbbbb", "2026-01-02T06:00:00Z"),
            "bbbbbb.bbbbbbbbbbbbbbbb",  # the longer-lived of two
        ),
        (token_json("NOT-A-TOKEN", "2026-01-02T12:00:00Z"), None),
    ],
)
def test_usable_token(listing: str, expected: str | None) -> None:
    if expected == "error":
        with pytest.raises(ActionFailed, match="not JSON"):
            kubeadm.usable_token(listing, NOW)
    else:
        assert kubeadm.usable_token(listing, NOW) == expected


def test_parse_join_command() -> None:
    output = (
        "W0304 19:51:22.390054 configset.go:202] WARNING: kubeadm cannot validate component configs\n"
        f"kubeadm join 10.213.0.11:6443 --token {KUBE_TOKEN}     --discovery-token-ca-cert-hash {CA_PIN} \n"
    )
    assert kubeadm.parse_join_command(output) == kubeadm.JoinCommand("10.213.0.11:6443", KUBE_TOKEN, CA_PIN)
    with pytest.raises(ActionFailed, match="no join command"):
        kubeadm.parse_join_command("error: something\n")
    with pytest.raises(ActionFailed, match="cannot read"):
        kubeadm.parse_join_command("kubeadm join 10.0.0.1:6443 --token x --discovery-token-ca-cert-hash y")


def test_kubeconfig_server() -> None:
    text = "clusters:\n- cluster:\n    certificate-authority-data: eA==\n    server: https://10.0.0.1:6443\n"
    assert kubeadm.kubeconfig_server(text) == "10.0.0.1:6443"
    assert kubeadm.kubeconfig_server("server: https://cp.lan\n") == "cp.lan:6443"
    assert kubeadm.kubeconfig_server("kind: Config\n") is None


def test_ca_cert_hash_is_kubeadms_pin_as_openssl_computes_it() -> None:
    assert kubeadm.ca_cert_hash(CA_CERT.read_bytes()) == CA_PIN
    public = subprocess.run(
        ["openssl", "x509", "-in", str(CA_CERT), "-pubkey", "-noout"], capture_output=True, check=True
    ).stdout
    der = subprocess.run(
        ["openssl", "pkey", "-pubin", "-outform", "der"], input=public, capture_output=True, check=True
    ).stdout
    assert "sha256:" + hashlib.sha256(der).hexdigest() == CA_PIN


# --- k3s -----------------------------------------------------------------------------

AGENT_UNIT = k3s.unit_text("k3s agent", k3s.agent_exec("/usr/local/bin/k3s", "https://10.0.0.1:6443"))
SERVER_UNIT = k3s.unit_text("k3s server", k3s.server_exec("/usr/local/bin/k3s", "10.0.0.1"))
TOKEN = "K10" + "a" * 64 + "::server:" + "b" * 32


def test_units_hold_no_token_and_name_their_options() -> None:
    exec_start = "ExecStart=/usr/local/bin/k3s agent --server https://10.0.0.1:6443 --token-file "
    assert exec_start + "/etc/rancher/k3s/agent-token" in AGENT_UNIT.splitlines()
    assert k3s.unit_option(AGENT_UNIT, "--server") == "https://10.0.0.1:6443"
    assert k3s.unit_option(SERVER_UNIT, "--advertise-address") == "10.0.0.1"
    assert k3s.unit_option("[Service]\n", "--server") is None
    assert "Restart=always" in AGENT_UNIT and "Delegate=yes" in AGENT_UNIT
    assert "%%" in k3s.unit_text("x", ["/bin/k3s", "a%b"])  # systemd specifiers escaped


def state(
    unit: str | None = None, active: bool = False, token: str | None = None, systemd: bool = True
) -> Any:
    return k3s.ServiceState(systemd=systemd, unit=unit, active=active, token=token)


def steps(planned: list[k3s.Step]) -> list[list[str]]:
    return [list(step.argv) for step in planned]


@pytest.mark.parametrize(
    ("current", "expected"),
    [
        (
            state(),
            [
                ["write-file", "/etc/rancher/k3s/agent-token", "0600"],
                ["write-file", "/etc/systemd/system/k3s-agent.service", "0644"],
                ["systemctl", "daemon-reload"],
                ["systemctl", "enable", "--now", "k3s-agent.service"],
            ],
        ),
        (state(AGENT_UNIT, active=True, token=TOKEN), []),
        (
            state(AGENT_UNIT, active=False, token=TOKEN),
            [["systemctl", "enable", "--now", "k3s-agent.service"]],
        ),
        (
            state(AGENT_UNIT, active=True, token="K10" + "c" * 64),
            [
                ["write-file", "/etc/rancher/k3s/agent-token", "0600"],
                ["systemctl", "restart", "k3s-agent.service"],
            ],
        ),
        (
            state(AGENT_UNIT.replace("Restart=always", "Restart=no"), active=True, token=TOKEN),
            [
                ["write-file", "/etc/systemd/system/k3s-agent.service", "0644"],
                ["systemctl", "daemon-reload"],
                ["systemctl", "restart", "k3s-agent.service"],
            ],
        ),
    ],
)
def test_plan_k3s_agent(current: k3s.ServiceState, expected: list[list[str]]) -> None:
    planned = k3s.plan_k3s_agent(current, AGENT_UNIT, "https://10.0.0.1:6443", TOKEN)
    assert steps(planned) == expected
    for step in planned:
        assert TOKEN not in " ".join(step.argv)
    written = {step.argv[1]: step.content for step in planned if step.argv[0] == "write-file"}
    if "/etc/rancher/k3s/agent-token" in written:
        assert written["/etc/rancher/k3s/agent-token"] == TOKEN + "\n"


def test_plan_k3s_refusals() -> None:
    with pytest.raises(ActionFailed, match=r"needs systemd|systemd is not the init system"):
        k3s.plan_k3s_agent(state(systemd=False), AGENT_UNIT, "https://10.0.0.1:6443", TOKEN)
    with pytest.raises(ActionFailed, match="systemd"):
        k3s.plan_k3s_server(state(systemd=False), SERVER_UNIT, "10.0.0.1")
    with pytest.raises(ActionFailed, match=r"agent of https://10.0.0.1:6443.*k3s_uninstall"):
        k3s.plan_k3s_agent(state(AGENT_UNIT, True, TOKEN), AGENT_UNIT, "https://10.0.0.2:6443", TOKEN)
    with pytest.raises(ActionFailed, match=r"advertising 10.0.0.1.*k3s_uninstall"):
        k3s.plan_k3s_server(state(SERVER_UNIT, True), SERVER_UNIT, "10.0.0.2")
    assert k3s.plan_k3s_server(state(SERVER_UNIT, True), SERVER_UNIT, "10.0.0.1") == []


def test_plan_k3s_uninstall() -> None:
    assert k3s.plan_k3s_uninstall(True, [], [], []) == []
    assert steps(k3s.plan_k3s_uninstall(True, ["k3s.service"], [], ["/var/lib/rancher/k3s"])) == [
        ["systemctl", "disable", "--now", "k3s.service"],
        ["remove-file", "/etc/systemd/system/k3s.service"],
        ["systemctl", "daemon-reload"],
        ["remove-tree", "/var/lib/rancher/k3s"],
    ]
    assert steps(
        k3s.plan_k3s_uninstall(False, ["k3s-agent.service"], ["/etc/rancher/k3s/agent-token"], [])
    ) == [
        ["remove-file", "/etc/systemd/system/k3s-agent.service"],
        ["remove-file", "/etc/rancher/k3s/agent-token"],
    ]


def test_mounted_below() -> None:
    mountinfo = (
        "22 1 8:1 / / rw - ext4 /dev/sda1 rw\n"
        "90 22 0:50 / /var/lib/rancher/k3s/agent/containerd/x rw - overlay overlay rw\n"
        "91 22 0:51 / /var/lib/rancherx rw - tmpfs tmpfs rw\n"
    )
    assert k3s.mounted_below(mountinfo, "/var/lib/rancher/k3s") == ["/var/lib/rancher/k3s/agent/containerd/x"]
    assert k3s.mounted_below(mountinfo, "/etc/rancher/k3s") == []

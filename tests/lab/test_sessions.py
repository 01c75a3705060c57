"""Sessions: only a certified, unrevoked node gets one, under its own name; malformed
streams are cut without harming anyone else; restarts on either side recover by themselves
and lose nothing from the store."""

from __future__ import annotations

import sqlite3
import time
from collections.abc import Callable

import grpc
import pytest

from picoord.agent.channel import channel_options
from picoord.agent.state import AgentFiles
from picoord.lab.cluster import Lab
from picoord.v1 import admin_pb2, admin_pb2_grpc, agent_pb2, node_pb2
from tests.lab.helpers import enroll_address, hello, node_credentials, open_session, session_raw

FAST = {"heartbeat_timeout": 3.0, "down_timeout": 6.0}


def ca_only(lab: Lab) -> grpc.ChannelCredentials:
    return grpc.ssl_channel_credentials(
        root_certificates=(lab.agent_state_dir("pi1") / "ca.crt").read_bytes()
    )


def test_no_client_certificate_no_session(lab_factory: Callable[..., Lab]) -> None:
    lab = lab_factory(1)
    # on the agent port the TLS handshake itself demands a certificate
    with pytest.raises(grpc.RpcError) as raised:
        open_session(lab.coordinator_address, ca_only(lab), [hello("pi1")])
    assert raised.value.code() == grpc.StatusCode.UNAVAILABLE
    # on the enrollment port TLS lets the call in, and the coordinator refuses it
    with pytest.raises(grpc.RpcError) as raised:
        open_session(enroll_address(lab), ca_only(lab), [hello("pi1")])
    assert raised.value.code() == grpc.StatusCode.UNAUTHENTICATED
    assert "client certificate is required" in raised.value.details()
    assert lab.node_statuses() == {"pi1": "Ready"}


def test_a_certificate_from_another_cluster_is_refused(lab_factory: Callable[..., Lab]) -> None:
    """Two real clusters, the same node name: only the certificate of our own CA gets in, so
    the refusal is the CA's doing, not an accident of the test's set-up."""
    ours, theirs = lab_factory(1), lab_factory(1)

    def credentials_of(lab: Lab) -> grpc.ChannelCredentials:
        pair = AgentFiles(lab.agent_state_dir("pi1")).credentials()
        return grpc.ssl_channel_credentials(
            root_certificates=(ours.agent_state_dir("pi1") / "ca.crt").read_bytes(),
            private_key=pair.key_pem,
            certificate_chain=pair.certificate_pem,
        )

    assert (ours.agent_state_dir("pi1") / "ca.crt").read_bytes() != (
        theirs.agent_state_dir("pi1") / "ca.crt"
    ).read_bytes()
    with pytest.raises(grpc.RpcError) as raised:
        open_session(ours.coordinator_address, credentials_of(theirs), [hello("pi1")])
    assert raised.value.code() == grpc.StatusCode.UNAVAILABLE
    # the positive control: the same call with our cluster's certificate is welcomed
    replies = open_session(ours.coordinator_address, credentials_of(ours), [hello("pi1")])
    # A new session is also sent its (here empty) assignment on the controller's next tick,
    # which may come before this short session ends (controller/dispatcher.py).
    kinds = [reply.WhichOneof("body") for reply in replies]
    assert kinds[0] == "welcome" and set(kinds[1:]) <= {"assignment"}, kinds
    assert replies[0].welcome.node_name == "pi1"


def test_a_node_cannot_speak_for_another(lab_factory: Callable[..., Lab]) -> None:
    lab = lab_factory(2)
    with pytest.raises(grpc.RpcError) as raised:
        open_session(lab.coordinator_address, node_credentials(lab, "pi1"), [hello("pi2")])
    assert raised.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "name_mismatch" in raised.value.details()
    assert lab.node_statuses() == {"pi1": "Ready", "pi2": "Ready"}


@pytest.mark.parametrize(
    ("messages", "code"),
    [
        ([agent_pb2.AgentMessage(heartbeat=agent_pb2.Heartbeat(timestamp=1.0))], "hello_expected"),
        (
            [
                hello("pi1"),
                agent_pb2.AgentMessage(metrics=node_pb2.MetricsSample(timestamp=1.7e9, cpu_percent=900)),
            ],
            "malformed_message",
        ),
        ([hello("pi1"), hello("pi1")], "duplicate_hello"),
    ],
)
def test_malformed_messages_end_only_that_session(
    lab1: Lab, messages: list[agent_pb2.AgentMessage], code: str
) -> None:
    before = lab1.coordctl_json("node", "show", "pi1", "--samples", "100")["recent_metrics"]
    with pytest.raises(grpc.RpcError) as raised:
        open_session(lab1.coordinator_address, node_credentials(lab1, "pi1"), messages)
    assert raised.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert code in raised.value.details()
    after = lab1.coordctl_json("node", "show", "pi1", "--samples", "100")["recent_metrics"]
    assert all(sample.get("cpu_percent", 0) <= 100 for sample in after)  # nothing of it was kept
    assert len(after) >= min(len(before), 1)
    lab1.wait_ready()  # the real agent (replaced, then back) is Ready again


def test_bytes_that_are_no_message_are_refused(lab1: Lab) -> None:
    with pytest.raises(grpc.RpcError) as raised:
        session_raw(lab1.coordinator_address, node_credentials(lab1, "pi1"), [b"\xff\xff\xff\xff garbage"])
    assert raised.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "not an AgentMessage" in raised.value.details()
    assert lab1.is_running("coordinator")
    lab1.wait_ready()


def test_remove_revokes_the_certificate_and_closes_the_session(lab_factory: Callable[..., Lab]) -> None:
    lab = lab_factory(2, **FAST)
    done = lab.coordctl("node", "remove", "pi2", check=True)
    assert "node/pi2 removed" in done.stdout and "its session was closed" in done.stdout
    # the agent keeps retrying, and keeps being refused: pi2 never comes back
    time.sleep(4)
    assert lab.node_statuses() == {"pi1": "Ready"}
    assert "revoked" in lab.log_tail("pi2", lines=200)
    with pytest.raises(grpc.RpcError) as raised:
        open_session(lab.coordinator_address, node_credentials(lab, "pi2"), [hello("pi2")])
    assert raised.value.code() == grpc.StatusCode.PERMISSION_DENIED
    assert "revoked" in raised.value.details()
    removed = lab.coordctl("node", "show", "pi2")
    assert removed.returncode == 1 and "no node named 'pi2'" in removed.stderr


def test_a_removed_node_can_join_again(lab_factory: Callable[..., Lab]) -> None:
    lab = lab_factory(1, **FAST)
    lab.kill_agent("pi1")
    lab.coordctl("node", "remove", "pi1", check=True)
    token = lab.create_token()
    argv = lab.join_argv(
        token["ca_cert_hash"], "pi1", lab.agent_state_dir("pi1"), "--token", token["token"], "--force"
    )
    done = lab.exec_in("pi1", *argv)
    assert done.returncode == 0, done.stderr
    lab.start_agent("pi1")
    lab.wait_ready(timeout=20)


def store_rows(lab: Lab) -> dict[str, list[tuple]]:
    db = sqlite3.connect(f"file:{lab.coordinator_state_dir / 'state.db'}?mode=ro", uri=True)
    try:
        assert db.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
        return {
            table: db.execute(f"SELECT {columns} FROM {table} ORDER BY 1, 2").fetchall()
            for table, columns in (
                ("nodes", "name, enrolled_at"),
                ("labels", "node, key, value"),
                ("tokens", "token_id, uses"),
                ("certificates", "serial, node, revoked_at"),
            )
        }
    finally:
        db.close()


@pytest.mark.parametrize("graceful", [True, False], ids=["sigterm", "sigkill"])
def test_coordinator_restart_loses_nothing_and_agents_come_back(
    lab_factory: Callable[..., Lab], graceful: bool
) -> None:
    lab = lab_factory(3, **FAST)
    lab.coordctl("node", "label", "pi2", "role=storage", check=True)
    before = store_rows(lab)
    lab.stop_coordinator(graceful=graceful)
    time.sleep(3)  # agents are retrying with backoff meanwhile; none may exit
    assert all(lab.is_running(node) for node in lab.nodes)
    lab.start_coordinator()
    lab.wait_ready(timeout=60)
    assert store_rows(lab) == before
    assert lab.coordctl_json("nodes")[1]["labels"] == {"role": "storage"}


def test_agent_killed_and_restarted(lab_factory: Callable[..., Lab]) -> None:
    lab = lab_factory(2, **FAST)
    enrolled = lab.coordctl_json("node", "show", "pi1")["enrolled_at"]
    lab.kill_agent("pi1")  # SIGKILL: no goodbye
    lab.wait_for_status("NotReady", ["pi1"], timeout=10)
    lab.wait_for_status("Down", ["pi1"], timeout=15)
    assert lab.node_statuses()["pi2"] == "Ready"
    lab.start_agent("pi1")
    lab.wait_ready(timeout=20)
    assert lab.coordctl_json("node", "show", "pi1")["enrolled_at"] == enrolled
    assert [node["name"] for node in lab.coordctl_json("nodes")] == ["pi1", "pi2"]


@pytest.mark.parametrize(
    ("call", "request_message"),
    [
        ("ListNodes", admin_pb2.ListNodesRequest()),
        ("CreateToken", admin_pb2.CreateTokenRequest()),
        ("RemoveNode", admin_pb2.RemoveNodeRequest(name="pi1")),
    ],
)
def test_the_admin_api_is_not_for_nodes(lab1: Lab, call: str, request_message: object) -> None:
    """The admin service shares the gRPC server with the agent ports: a node's certificate
    (agent port) or no certificate (enrollment port) must not reach it."""
    before = lab1.coordctl_json("token", "list")
    for address, credentials in (
        (lab1.coordinator_address, node_credentials(lab1, "pi1")),
        (enroll_address(lab1), ca_only(lab1)),
    ):
        channel = grpc.secure_channel(address, credentials, options=channel_options())
        with channel, pytest.raises(grpc.RpcError) as raised:
            getattr(admin_pb2_grpc.AdminStub(channel), call)(request_message, timeout=10)
        assert raised.value.code() == grpc.StatusCode.PERMISSION_DENIED
        assert "only for operators" in raised.value.details()
    assert lab1.coordctl_json("token", "list") == before  # nothing was created
    assert lab1.node_statuses() == {"pi1": "Ready"}  # nor removed


def test_apply_is_not_for_nodes_either(lab1: Lab) -> None:
    request = admin_pb2.ApplyRequest(
        documents="kind: Mount\nname: m\ntype: tmpfs\ntarget: /mnt/x\nnodes: [pi1]\n"
    )
    with (
        grpc.secure_channel(
            lab1.coordinator_address, node_credentials(lab1, "pi1"), options=channel_options()
        ) as ch,
        pytest.raises(grpc.RpcError) as raised,
    ):
        list(admin_pb2_grpc.AdminStub(ch).Apply(request, timeout=10))
    assert raised.value.code() == grpc.StatusCode.PERMISSION_DENIED
    assert lab1.coordctl_json("actions") == []

"""Remote admin end to end: a real coordinator on loopback with its admin listener, and
coordctl run as the operator runs it, from another HOME (the MacBook) with a context.

Covers: issue on the coordinator's host, context add/use, `nodes` and `token create` over
mutual TLS; a node's certificate refused on the admin port and an admin's refused on the
agent port; revocation refusing the next call of an open connection; an expired and a
foreign bundle refused with messages that say so; issuing only over the admin socket."""

from __future__ import annotations

import datetime as dt
import json
import os
import pty
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from picoord.common.defaults import COORDINATOR_SERVER_NAME
from picoord.coordinator.ca import ClusterCA, certificate_pem, private_key_pem
from picoord.coordinator.ctl.client import tls_channel
from picoord.coordinator.ctl.contexts import Bundle, parse_bundle, render_bundle
from picoord.v1 import admin_pb2, admin_pb2_grpc, agent_pb2, agent_pb2_grpc
from tests.conftest import free_loopback_port

COORDCTL = str(Path(sys.executable).parent / "coordctl")
COORDINATOR = str(Path(sys.executable).parent / "picoord-coordinator")
MOUNT = "kind: Mount\nname: scratch\ntype: tmpfs\ntarget: /mnt/scratch\nnodes: [pi1]\n"


@dataclass
class Coordinator:
    root: Path
    admin_socket: Path
    admin_address: str
    agent_address: str
    ca_pem: bytes
    node_key_pem: bytes
    node_certificate_pem: bytes

    def coordctl(
        self, *args: str, home: Path | None = None, socket: bool = False, timeout: float = 30
    ) -> subprocess.CompletedProcess[str]:
        """coordctl as a user runs it: over the admin socket (socket=True), or from `home`
        with whatever contexts it holds."""
        env = {"PATH": os.environ["PATH"], "HOME": str(home or self.root / "nohome")}
        if socket:
            env["COORDCTL_ADMIN_SOCKET"] = str(self.admin_socket)
        return subprocess.run(
            [COORDCTL, *args], env=env, capture_output=True, text=True, timeout=timeout, check=False
        )

    def issue(self, name: str, *flags: str) -> Path:
        result = self.coordctl("admin", "issue", name, *flags, socket=True)
        assert result.returncode == 0, result.stderr
        path = self.root / f"{name}.bundle"
        path.write_text(result.stdout)
        path.chmod(0o600)
        return path


def _wait_until_serving(process: subprocess.Popen, admin_socket: Path, port: int) -> None:
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        assert process.poll() is None, "the coordinator exited at start-up"
        if admin_socket.exists():
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                return
            except OSError:
                pass
        time.sleep(0.2)
    raise AssertionError("the coordinator did not start serving within 30 s")


def _enroll_node(coordinator: Coordinator, enroll_address: str, token: str) -> tuple[bytes, bytes]:
    key = ec.generate_private_key(ec.SECP256R1())
    csr = (
        x509.CertificateSigningRequestBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "pi1")]))
        .sign(key, hashes.SHA256())
    )
    credentials = grpc.ssl_channel_credentials(root_certificates=coordinator.ca_pem)
    options = [("grpc.ssl_target_name_override", COORDINATOR_SERVER_NAME)]
    with grpc.secure_channel(enroll_address, credentials, options=options) as channel:
        reply = agent_pb2_grpc.EnrollmentStub(channel).Enroll(
            agent_pb2.EnrollRequest(
                token=token, node_name="pi1", csr_pem=csr.public_bytes(serialization.Encoding.PEM)
            ),
            timeout=20,
        )
    return private_key_pem(key), reply.certificate_pem


@pytest.fixture(scope="module")
def coordinator(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Coordinator]:
    root = tmp_path_factory.mktemp("remote-admin")
    (root / "coordinator.toml").write_text("handshake_timeout = 2.0\n")
    agent, enroll, admin, metrics = (free_loopback_port() for _ in range(4))
    admin_socket = root / "admin.sock"
    process = subprocess.Popen(
        [
            COORDINATOR,
            "--config",
            str(root / "coordinator.toml"),
            "--state-dir",
            str(root / "state"),
            "--listen",
            f"127.0.0.1:{agent}",
            "--enroll-listen",
            f"127.0.0.1:{enroll}",
            "--admin-socket",
            str(admin_socket),
            "--admin-listen",
            f"127.0.0.1:{admin}",
            "--metrics-listen",
            f"127.0.0.1:{metrics}",
            "--log-level",
            "warning",
        ],
        stdout=subprocess.DEVNULL,
        stderr=open(root / "coordinator.log", "wb"),  # noqa: SIM115
    )
    try:
        _wait_until_serving(process, admin_socket, admin)
        coordinator = Coordinator(
            root=root,
            admin_socket=admin_socket,
            admin_address=f"127.0.0.1:{admin}",
            agent_address=f"127.0.0.1:{agent}",
            ca_pem=(root / "state" / "ca.crt").read_bytes(),
            node_key_pem=b"",
            node_certificate_pem=b"",
        )
        token = json.loads(coordinator.coordctl("token", "create", "-o", "json", socket=True).stdout)["token"]
        coordinator.node_key_pem, coordinator.node_certificate_pem = _enroll_node(
            coordinator, f"127.0.0.1:{enroll}", token
        )
        yield coordinator
    finally:
        process.terminate()
        try:
            process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def _macbook(coordinator: Coordinator, name: str) -> Path:
    home = coordinator.root / f"home-{name}"
    home.mkdir()
    return home


def test_issue_then_every_verb_works_over_tls_from_another_home(coordinator: Coordinator) -> None:
    bundle_path = coordinator.issue("macbook")
    bundle = parse_bundle(bundle_path.read_bytes(), str(bundle_path))
    assert bundle.address == coordinator.admin_address and bundle.server_name == COORDINATOR_SERVER_NAME
    home = _macbook(coordinator, "macbook")

    added = coordinator.coordctl("context", "add", "home", "--bundle", str(bundle_path), home=home)
    assert added.returncode == 0, added.stderr
    used = coordinator.coordctl("context", "use", "home", home=home)
    assert used.returncode == 0, used.stderr
    directory = home / ".config" / "picoord"
    assert (directory.stat().st_mode & 0o777, (directory / "contexts").stat().st_mode & 0o777) == (
        0o700,
        0o700,
    )
    assert (directory / "contexts" / "home.yaml").stat().st_mode & 0o777 == 0o600

    nodes = coordinator.coordctl("nodes", "-o", "json", home=home)
    assert nodes.returncode == 0, nodes.stderr
    assert [node["name"] for node in json.loads(nodes.stdout)] == ["pi1"]
    token = coordinator.coordctl("token", "create", "-o", "json", home=home)
    assert token.returncode == 0, token.stderr
    assert json.loads(token.stdout)["join_command"].startswith("picoord-agent join")

    listed = json.loads(coordinator.coordctl("admin", "list", "-o", "json", home=home).stdout)
    assert {(admin["name"], admin["state"]) for admin in listed} >= {("macbook", "valid")}
    assert listed[0]["issued_by"].startswith("root (uid 0")
    expirations = json.loads(
        coordinator.coordctl("certs", "check-expiration", "-o", "json", home=home).stdout
    )
    assert {"name": "admin/macbook", "kind": "admin", "state": "valid"}.items() <= next(
        view for view in expirations if view["name"] == "admin/macbook"
    ).items()
    contexts = json.loads(coordinator.coordctl("context", "list", "-o", "json", home=home).stdout)
    assert [(c["name"], c["current"], c["admin"]) for c in contexts] == [("home", True, "macbook")]

    # The admin socket still wins when it is given, and names the caller by the kernel.
    local = coordinator.coordctl("nodes", "-o", "json", home=home, socket=True)
    assert local.returncode == 0, local.stderr


def test_remote_operator_is_named_in_the_history(coordinator: Coordinator) -> None:
    bundle_path = coordinator.issue("historian")
    bundle = parse_bundle(bundle_path.read_bytes(), "historian")
    spec = coordinator.root / "mount.yaml"
    spec.write_text(MOUNT)
    home = _macbook(coordinator, "historian")
    assert (
        coordinator.coordctl("context", "add", "h", "--bundle", str(bundle_path), home=home).returncode == 0
    )
    coordinator.coordctl("--context", "h", "apply", "-f", str(spec), home=home, timeout=60)
    actions = json.loads(coordinator.coordctl("actions", "-o", "json", socket=True).stdout)
    by = {action["requested_by"] for action in actions}
    assert any(
        entry.startswith(f"admin:historian (cert {bundle.serial}, from 127.0.0.1:") and entry.endswith(")")
        for entry in by
    ), by


def test_a_node_certificate_never_passes_as_an_admin(coordinator: Coordinator) -> None:
    credentials = grpc.ssl_channel_credentials(
        root_certificates=coordinator.ca_pem,
        private_key=coordinator.node_key_pem,
        certificate_chain=coordinator.node_certificate_pem,
    )
    options = [("grpc.ssl_target_name_override", COORDINATOR_SERVER_NAME)]
    with grpc.secure_channel(coordinator.admin_address, credentials, options=options) as channel:
        for call in (
            lambda: admin_pb2_grpc.AdminStub(channel).ListNodes(admin_pb2.ListNodesRequest(), timeout=10),
            lambda: admin_pb2_grpc.AdminStub(channel).CreateToken(admin_pb2.CreateTokenRequest(), timeout=10),
            lambda: admin_pb2_grpc.AdminCertificatesStub(channel).ListAdmins(
                admin_pb2.ListAdminsRequest(), timeout=10
            ),
        ):
            with pytest.raises(grpc.RpcError) as refused:
                call()
            assert refused.value.code() == grpc.StatusCode.PERMISSION_DENIED
            assert "is not an admin certificate" in refused.value.details()
        # The agent services are not on the admin port at all.
        with pytest.raises(grpc.RpcError) as absent:
            list(agent_pb2_grpc.AgentSessionStub(channel).Session(iter([]), timeout=10))
        assert absent.value.code() == grpc.StatusCode.UNIMPLEMENTED


def test_an_admin_certificate_opens_no_agent_session(coordinator: Coordinator) -> None:
    bundle = parse_bundle(coordinator.issue("sessionless").read_bytes(), "sessionless")
    credentials = grpc.ssl_channel_credentials(
        root_certificates=bundle.ca_certificate_pem,
        private_key=bundle.key_pem,
        certificate_chain=bundle.certificate_pem,
    )
    options = [("grpc.ssl_target_name_override", COORDINATOR_SERVER_NAME)]
    hello = agent_pb2.AgentMessage(hello=agent_pb2.Hello(node_name="pi1"))
    with grpc.secure_channel(coordinator.agent_address, credentials, options=options) as channel:
        with pytest.raises(grpc.RpcError) as refused:
            list(agent_pb2_grpc.AgentSessionStub(channel).Session(iter([hello]), timeout=10))
        assert refused.value.code() == grpc.StatusCode.UNAUTHENTICATED
        # Nor does it open the admin API on the agent port: the admin listener is its one door.
        with pytest.raises(grpc.RpcError) as refused:
            admin_pb2_grpc.AdminStub(channel).ListNodes(admin_pb2.ListNodesRequest(), timeout=10)
        assert refused.value.code() == grpc.StatusCode.PERMISSION_DENIED
        assert "only for operators" in refused.value.details()


def test_revocation_refuses_the_next_call_of_an_open_connection(coordinator: Coordinator) -> None:
    bundle_path = coordinator.issue("leaver")
    bundle = parse_bundle(bundle_path.read_bytes(), "leaver")
    home = _macbook(coordinator, "leaver")
    assert (
        coordinator.coordctl("context", "add", "lab", "--bundle", str(bundle_path), home=home).returncode == 0
    )
    with tls_channel(bundle) as channel:
        stub = admin_pb2_grpc.AdminStub(channel)
        assert [node.name for node in stub.ListNodes(admin_pb2.ListNodesRequest(), timeout=10).nodes] == [
            "pi1"
        ]
        revoked = coordinator.coordctl("admin", "revoke", "leaver", socket=True)
        assert revoked.returncode == 0 and bundle.serial in revoked.stdout, revoked.stderr
        with pytest.raises(grpc.RpcError) as refused:
            stub.ListNodes(admin_pb2.ListNodesRequest(), timeout=10)
        assert refused.value.code() == grpc.StatusCode.PERMISSION_DENIED
        assert "leaver" in refused.value.details() and "revoked" in refused.value.details()
    result = coordinator.coordctl("--context", "lab", "nodes", home=home)
    assert result.returncode == 1
    assert "context 'lab'" in result.stderr and "is revoked" in result.stderr
    assert "coordctl admin issue leaver" in result.stderr
    listed = json.loads(coordinator.coordctl("admin", "list", "-o", "json", socket=True).stdout)
    assert next(a for a in listed if a["name"] == "leaver")["state"] == "revoked"


def test_an_expired_admin_certificate_is_refused_saying_it_expired(coordinator: Coordinator) -> None:
    bundle_path = coordinator.issue("brief", "--validity", "5s")
    bundle = parse_bundle(bundle_path.read_bytes(), "brief")
    home = _macbook(coordinator, "brief")
    assert (
        coordinator.coordctl("context", "add", "brief", "--bundle", str(bundle_path), home=home).returncode
        == 0
    )
    time.sleep(max(0.0, bundle.not_after - time.time()) + 1)
    result = coordinator.coordctl("--context", "brief", "nodes", home=home)
    assert result.returncode == 1
    assert "context 'brief'" in result.stderr and "expired at" in result.stderr
    assert "coordctl admin issue brief" in result.stderr
    # The coordinator refuses it too (its TLS handshake): nothing gets through.
    with tls_channel(bundle) as channel, pytest.raises(grpc.RpcError) as refused:
        admin_pb2_grpc.AdminStub(channel).ListNodes(admin_pb2.ListNodesRequest(), timeout=10)
    assert refused.value.code() == grpc.StatusCode.UNAVAILABLE
    # An expired name may be issued again at once.
    coordinator.issue("brief")


def test_a_bundle_of_another_cluster_is_refused_naming_the_context(coordinator: Coordinator) -> None:
    other = ClusterCA.load_or_create(coordinator.root / "other-cluster", ["localhost"])
    key = ec.generate_private_key(ec.SECP256R1())
    certificate = other.sign_admin_key(key.public_key(), "macbook", dt.timedelta(days=1))
    foreign = render_bundle(
        Bundle(
            name="macbook",
            address=coordinator.admin_address,  # this cluster's address, the other cluster's CA
            server_name=COORDINATOR_SERVER_NAME,
            certificate_pem=certificate_pem(certificate),
            key_pem=private_key_pem(key),
            ca_certificate_pem=other.certificate_pem,
            serial=format(certificate.serial_number, "x"),
            not_after=time.time() + 86400,
        )
    )
    path = coordinator.root / "foreign.bundle"
    path.write_text(foreign)
    home = _macbook(coordinator, "foreign")
    assert coordinator.coordctl("context", "add", "away", "--bundle", str(path), home=home).returncode == 0
    result = coordinator.coordctl("--context", "away", "nodes", home=home)
    assert result.returncode == 1
    assert "context 'away'" in result.stderr and "not of this bundle's cluster" in result.stderr
    assert other.cert_hash in result.stderr


def test_issuing_is_for_the_coordinators_host_only(coordinator: Coordinator) -> None:
    bundle = parse_bundle(coordinator.issue("remote").read_bytes(), "remote")
    with tls_channel(bundle) as channel, pytest.raises(grpc.RpcError) as refused:
        admin_pb2_grpc.AdminCertificatesStub(channel).IssueAdmin(
            admin_pb2.IssueAdminRequest(name="sneaky"), timeout=10
        )
    assert refused.value.code() == grpc.StatusCode.PERMISSION_DENIED
    assert "only for the coordinator's host" in refused.value.details()
    flagged = coordinator.coordctl("--context", "x", "admin", "issue", "sneaky")
    assert flagged.returncode == 2 and "drop --context" in flagged.stderr
    again = coordinator.coordctl("admin", "issue", "remote", socket=True)
    assert again.returncode == 1 and "already holds certificate" in again.stderr
    assert "coordctl admin revoke remote" in again.stderr and again.stdout == ""


def test_issue_refuses_to_print_a_key_to_a_terminal(coordinator: Coordinator) -> None:
    controller, terminal = pty.openpty()
    try:
        env = {"PATH": os.environ["PATH"], "COORDCTL_ADMIN_SOCKET": str(coordinator.admin_socket)}
        result = subprocess.run(
            [COORDCTL, "admin", "issue", "onscreen"],
            env=env,
            stdout=terminal,
            stderr=subprocess.PIPE,
            text=True,
            timeout=30,
            check=False,
        )
    finally:
        os.close(terminal)
        os.close(controller)
    assert result.returncode == 1 and "holds a private key" in result.stderr and "--force" in result.stderr
    listed = json.loads(coordinator.coordctl("admin", "list", "-o", "json", socket=True).stdout)
    assert "onscreen" not in {admin["name"] for admin in listed}  # nothing was issued


def test_a_silent_connection_is_dropped_at_the_handshake_timeout(coordinator: Coordinator) -> None:
    host, port = coordinator.admin_address.rsplit(":", 1)
    started = time.monotonic()
    with socket.create_connection((host, int(port)), timeout=15) as silent:
        assert silent.recv(1) == b""  # the coordinator closed it: no TLS handshake within 2 s
    assert 1.0 <= time.monotonic() - started < 10

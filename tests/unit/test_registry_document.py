"""The Registry document: read, planned, checked; its certificate from the cluster CA; the
executors' files (against tmp_path, their paths repointed); and the coordinator's manifest
question over real TLS to a local HTTPS server holding that certificate.

The lab run (docker-registry and dockerd for real) is tests/lab/test_cluster_registry_lab.py."""

from __future__ import annotations

import http.server
import ssl
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from cryptography import x509

from picoord.agent.actions import container_registry as executor
from picoord.agent.actions.base import ActionContext
from picoord.agent.commands import CommandResult
from picoord.common.checks import check_action
from picoord.common.validation import FieldError
from picoord.coordinator.apply.action_planner import NodeView, PlanError, RegistryTls, plan
from picoord.coordinator.apply.cluster_spec import NodeSet, Registry, SpecError, parse_spec
from picoord.coordinator.apply.service import registries, registry_tls
from picoord.coordinator.ca import ClusterCA
from picoord.coordinator.registry_client import ImagePinner, RegistryUnreachable, resolve_digest
from picoord.v1 import actions_pb2, agent_pb2

INVENTORY = [
    NodeView("desktop", {}, "x86_64", "192.168.50.10"),
    NodeView("pi1", {"role": "compute"}, "aarch64", "192.168.50.11"),
    NodeView("pi2", {"role": "compute"}, "aarch64", "192.168.50.12"),
    NodeView("pi3", {}, "aarch64", ""),  # enrolled, not connected
]
DOC = """\
kind: Registry
name: cluster
server: desktop
nodes: {selector: {role: compute}}
"""
CERT = "-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----\n"
KEY = "-----BEGIN PRIVATE KEY-----\nMIIB\n-----END PRIVATE KEY-----\n"


def fake_tls(issued: list[tuple[str, list[str]]]):  # type: ignore[no-untyped-def]
    def issue(name: str, hosts: list[str]) -> RegistryTls:
        issued.append((name, hosts))
        return RegistryTls(CERT, KEY, CERT)

    return issue


# --- the document --------------------------------------------------------------------


def test_a_registry_reads_with_defaults() -> None:
    (doc,) = parse_spec(DOC)
    assert doc == Registry(
        name="cluster",
        server="desktop",
        nodes=NodeSet(selector=(("role", "compute"),)),
        port=5000,
        storage="/var/lib/docker-registry",
        names=(),
        address="",
    )


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (("server: desktop", "server: desktop\nport: 0"), "Registry/cluster.port: port 0 is outside 1-65535"),
        (("server: desktop", "server: desktop\nport: '5000'"), "Registry/cluster.port: '5000' is not a port"),
        (("server: desktop", "server: desktop\nstorage: data"), "storage: 'data' is not an absolute path"),
        (("server: desktop", "server: desktop\nnames: [a.lan, a.lan]"), "names: names one twice"),
        (("server: desktop", "server: desktop\nnames: ['bad name']"), "names[0]"),
        (("server: desktop", "server: desktop\naddress: desktop.lan"), "address: 'desktop.lan' is not an IP"),
        (("name: cluster", "name: Cluster_1"), "Registry/Cluster_1.name"),
        (("server: desktop\n", ""), "Registry/cluster.server: is required"),
        (("server: desktop", "server: desktop\ninsecure: true"), "insecure: unknown field"),
    ],
)
def test_bad_registries_name_the_field(change: tuple[str, str], message: str) -> None:
    with pytest.raises(SpecError) as raised:
        parse_spec(DOC.replace(*change))
    assert message in str(raised.value)


# --- the plan ------------------------------------------------------------------------


def test_the_server_serves_then_each_node_trusts_it_by_every_name() -> None:
    issued: list[tuple[str, list[str]]] = []
    text = (
        DOC.replace("nodes: {selector: {role: compute}}", "nodes: [desktop, pi1, pi2]")
        + "names: [desktop.lan]\n"
    )
    steps = plan(parse_spec(text), INVENTORY, fake_tls(issued))
    assert [(s.id, s.kind) for s in steps] == [
        ("Registry/cluster:serve@desktop", "registry_server"),
        ("Registry/cluster:trust@desktop", "registry_trust"),  # the desktop pushes through it too
        ("Registry/cluster:trust@pi1", "registry_trust"),
        ("Registry/cluster:trust@pi2", "registry_trust"),
    ]
    # the certificate covers the address the Pis reach, the node name and the extra names
    assert issued == [("cluster", ["192.168.50.10", "desktop", "desktop.lan"])]
    serve = steps[0].action.registry_server
    assert (serve.port, serve.storage, serve.certificate_pem, serve.key_pem) == (
        5000,
        "/var/lib/docker-registry",
        CERT,
        KEY,
    )
    trust = steps[1].action.registry_trust
    assert list(trust.addresses) == ["192.168.50.10:5000", "desktop:5000", "desktop.lan:5000"]
    assert all(s.after == (steps[0].id,) and not s.requires for s in steps[1:])
    assert registries(steps) == {"cluster": ["192.168.50.10:5000", "desktop:5000", "desktop.lan:5000"]}


@pytest.mark.parametrize(
    ("text", "message"),
    [
        (
            DOC.replace("server: desktop", "server: pi3"),
            "Registry/cluster.server: node 'pi3' is not connected",
        ),
        (DOC.replace("server: desktop", "server: laptop"), "unknown node 'laptop'"),
        (DOC.replace("role: compute", "role: gpu"), "selector role=gpu matches no node"),
        (
            DOC + "---\n" + DOC.replace("name: cluster", "name: other"),
            "both set the registry server of node desktop",
        ),
    ],
)
def test_registry_plan_errors(text: str, message: str) -> None:
    with pytest.raises(PlanError) as raised:
        plan(parse_spec(text), INVENTORY, fake_tls([]))
    assert message in str(raised.value)


def test_without_a_ca_to_issue_from_the_plan_is_refused() -> None:
    with pytest.raises(PlanError, match="cannot issue registry certificates"):
        plan(parse_spec(DOC), INVENTORY)


# --- the checks (both ends) ----------------------------------------------------------


@pytest.mark.parametrize(
    ("action", "message"),
    [
        (actions_pb2.RegistryServer(port=5000, storage="/srv/r", certificate_pem=CERT, key_pem=KEY), None),
        (
            actions_pb2.RegistryServer(storage="/srv/r", certificate_pem=CERT, key_pem=KEY),
            "registry_server.port",
        ),
        (actions_pb2.RegistryServer(port=5000, storage="srv", certificate_pem=CERT, key_pem=KEY), "storage"),
        (
            actions_pb2.RegistryServer(port=5000, storage="/srv/r", key_pem=KEY),
            "certificate_pem: is required",
        ),
        (
            actions_pb2.RegistryServer(port=5000, storage="/srv/r", certificate_pem=KEY, key_pem=KEY),
            "certificate_pem: is not PEM text starting with -----BEGIN CERTIFICATE-----",
        ),
        (
            actions_pb2.RegistryServer(port=5000, storage="/srv/r", certificate_pem=CERT * 400, key_pem=KEY),
            "is longer than 16384 characters",
        ),
        (actions_pb2.RegistryTrust(addresses=["10.0.0.1:5000", "desktop:5000"], ca_pem=CERT), None),
        (actions_pb2.RegistryTrust(addresses=[], ca_pem=CERT), "registry_trust.addresses: names no address"),
        (actions_pb2.RegistryTrust(addresses=["../../etc:5000"], ca_pem=CERT), "registry_trust.addresses[0]"),
        (actions_pb2.RegistryTrust(addresses=["10.0.0.1"], ca_pem=CERT), "registry_trust.addresses[0]"),
        (actions_pb2.RegistryTrust(addresses=["a:1"] * 2, ca_pem=CERT), "names one twice"),
        (actions_pb2.RegistryTrust(addresses=[f"h{i}:1" for i in range(9)], ca_pem=CERT), "more than 8"),
        (actions_pb2.RegistryTrust(addresses=["a:1"], ca_pem=""), "ca_pem: is required"),
    ],
)
def test_registry_action_checks(action: object, message: str | None) -> None:
    kind = "registry_server" if isinstance(action, actions_pb2.RegistryServer) else "registry_trust"
    wrapped = actions_pb2.Action(**{kind: action})
    if message is None:
        check_action(wrapped)
    else:
        with pytest.raises(FieldError, match=message.replace("[", r"\[").replace("]", r"\]")):
            check_action(wrapped)


# --- the executors -------------------------------------------------------------------


@pytest.fixture
def etc(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    conf = tmp_path / "registry"
    monkeypatch.setattr(executor, "CONFIG", conf / "picoord.yml")
    monkeypatch.setattr(executor, "CERTIFICATE", conf / "picoord-registry.crt")
    monkeypatch.setattr(executor, "KEY", conf / "picoord-registry.key")
    monkeypatch.setattr(executor, "DROP_IN", tmp_path / "unit.d" / "picoord.conf")
    monkeypatch.setattr(executor, "SYSTEMD_RUNNING", tmp_path / "no-systemd")
    monkeypatch.setattr(executor, "_owner", lambda: None)
    return tmp_path


def _context(dry_run: bool, ran: list[list[str]], active: str = "active\n") -> ActionContext:
    def run(argv, timeout):  # type: ignore[no-untyped-def]
        ran.append(list(argv))
        return CommandResult(tuple(argv), 0, active, "", False)

    return ActionContext(dry_run=dry_run, deadline=time.monotonic() + 30, run=run)


def _server(storage: Path) -> actions_pb2.RegistryServer:
    return actions_pb2.RegistryServer(port=5443, storage=str(storage), certificate_pem=CERT, key_pem=KEY)


def test_serving_dry_run_then_apply_then_unchanged_without_systemd(etc: Path) -> None:
    ran: list[list[str]] = []
    storage = etc / "images"
    planned = executor.registry_server(_server(storage), context := _context(True, ran))
    assert planned.outcome == agent_pb2.ACTION_OUTCOME_PLANNED
    assert [list(c.argv) for c in context.commands] == [
        ["mkdir", str(storage)],
        ["write", str(etc / "registry" / "picoord-registry.crt")],
        ["write", str(etc / "registry" / "picoord.yml")],
        ["write", str(etc / "registry" / "picoord-registry.key")],
    ]
    assert not (etc / "registry").exists() and not storage.exists()
    done = executor.registry_server(_server(storage), context := _context(False, ran))
    assert done.outcome == agent_pb2.ACTION_OUTCOME_SUCCEEDED
    assert "systemd does not run here" in done.message
    config = (etc / "registry" / "picoord.yml").read_text()
    assert f"rootdirectory: {storage}\n" in config and "addr: :5443\n" in config
    assert f"certificate: {etc / 'registry' / 'picoord-registry.crt'}\n" in config
    key = etc / "registry" / "picoord-registry.key"
    assert key.read_text() == KEY and key.stat().st_mode & 0o777 == 0o600
    assert KEY not in " ".join(" ".join(c.argv) + c.output_tail for c in context.commands)  # never recorded
    again = executor.registry_server(_server(storage), _context(False, ran))
    assert again.outcome == agent_pb2.ACTION_OUTCOME_UNCHANGED
    assert ran == []


def test_with_systemd_the_unit_is_pointed_at_picoords_config_and_started(
    etc: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (etc / "systemd").mkdir()
    monkeypatch.setattr(executor, "SYSTEMD_RUNNING", etc / "systemd")
    ran: list[list[str]] = []
    done = executor.registry_server(_server(etc / "images"), _context(False, ran, active="inactive\n"))
    assert done.outcome == agent_pb2.ACTION_OUTCOME_SUCCEEDED
    assert ran == [
        ["systemctl", "daemon-reload"],
        ["systemctl", "is-active", "docker-registry"],
        ["systemctl", "enable", "--now", "docker-registry"],
    ]
    assert (
        (etc / "unit.d" / "picoord.conf")
        .read_text()
        .endswith(
            f"ExecStart=\nExecStart=/usr/bin/docker-registry serve {etc / 'registry' / 'picoord.yml'}\n"
        )
    )
    ran.clear()
    changed = _server(etc / "images")
    changed.certificate_pem = CERT.replace("MIIB", "MIIC")  # a renewed certificate: restart
    executor.registry_server(changed, _context(False, ran))
    assert ran == [["systemctl", "is-active", "docker-registry"], ["systemctl", "restart", "docker-registry"]]


def test_trusting_writes_the_ca_for_each_name_once(tmp_path: Path) -> None:
    request = actions_pb2.RegistryTrust(addresses=["192.168.50.10:5000", "desktop:5000"], ca_pem=CERT)
    done = executor.registry_trust(request, _context(False, []), certs_dir=tmp_path)
    assert done.outcome == agent_pb2.ACTION_OUTCOME_SUCCEEDED
    assert sorted(str(p.relative_to(tmp_path)) for p in tmp_path.rglob("ca.crt")) == [
        "192.168.50.10:5000/ca.crt",
        "desktop:5000/ca.crt",
    ]
    assert (tmp_path / "desktop:5000" / "ca.crt").read_text() == CERT
    again = executor.registry_trust(request, _context(False, []), certs_dir=tmp_path)
    assert again.outcome == agent_pb2.ACTION_OUTCOME_UNCHANGED


# --- the certificate, and the manifest question over real TLS ---------------------------


def test_the_registry_certificate_covers_its_names_and_is_kept_until_they_change(tmp_path: Path) -> None:
    ca = ClusterCA.load_or_create(tmp_path)
    issue = registry_tls(ca)
    first = issue("cluster", ["192.168.50.10", "desktop"])
    certificate = x509.load_pem_x509_certificate(first.certificate_pem.encode())
    names = certificate.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert {str(n.value) for n in names} == {"192.168.50.10", "desktop"}
    assert certificate.issuer == ca.certificate.subject
    assert first.certificate_pem.endswith(ca.certificate_pem.decode())  # the chain
    assert first.ca_pem == ca.certificate_pem.decode()
    assert issue("cluster", ["192.168.50.10", "desktop"]) == first  # a second apply: unchanged
    moved = issue("cluster", ["192.168.50.20", "desktop"])
    assert moved.key_pem != first.key_pem


@pytest.fixture
def https_registry(tmp_path: Path) -> Iterator[tuple[ClusterCA, str, dict[str, str]]]:
    """A local HTTPS server answering manifest requests as docker-registry does, with a
    certificate issued like a Registry document's."""
    ca = ClusterCA.load_or_create(tmp_path)
    identity = registry_tls(ca)("cluster", ["127.0.0.1"])
    (tmp_path / "r.crt").write_text(identity.certificate_pem)
    (tmp_path / "r.key").write_text(identity.key_pem)
    tags = {"mcp": "sha256:" + "e" * 64}

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_HEAD(self) -> None:
            name = self.path.removeprefix("/v2/").split("/manifests/")[0]
            if name not in tags or "manifest.list.v2" not in self.headers.get("Accept", ""):
                self.send_response(404)
                self.end_headers()
                return
            self.send_response(200)
            self.send_header("Content-Type", "application/vnd.docker.distribution.manifest.list.v2+json")
            self.send_header("Docker-Content-Digest", tags[name])
            self.end_headers()

        def log_message(self, *args: object) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(tmp_path / "r.crt", tmp_path / "r.key")
    server.socket = context.wrap_socket(server.socket, server_side=True)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield ca, f"127.0.0.1:{server.server_address[1]}", tags
    finally:
        server.shutdown()
        server.server_close()


def test_a_tag_resolves_to_its_digest_over_tls_verified_by_the_cluster_ca(
    https_registry: tuple[ClusterCA, str, dict[str, str]], tmp_path: Path
) -> None:
    ca, address, tags = https_registry
    pinner = ImagePinner(lambda: [address], ca.certificate_pem.decode())
    assert pinner.digest_for(f"{address}/mcp:latest") == tags["mcp"]
    assert pinner.digest_for("postgres:15-alpine") == ""  # not the cluster's registry: by tag
    with pytest.raises(Exception, match="no such image"):
        pinner.digest_for(f"{address}/other:1")
    stranger = ClusterCA.load_or_create(tmp_path / "other")  # another CA: not trusted
    with pytest.raises(RegistryUnreachable, match="verified TLS"):
        resolve_digest(f"{address}/mcp:latest", stranger.certificate_pem.decode())


def test_a_registry_that_is_down_is_said_so(tmp_path: Path) -> None:
    ca = ClusterCA.load_or_create(tmp_path)
    with pytest.raises(
        RegistryUnreachable, match=r"127.0.0.1:9/mcp:1 .*did not answer over verified TLS: .*refused"
    ):
        resolve_digest("127.0.0.1:9/mcp:1", ca.certificate_pem.decode(), timeout=2)


def test_the_example_reads_and_plans() -> None:
    (doc,) = parse_spec((Path(__file__).parents[2] / "examples" / "registry.yaml").read_text())
    inventory = [
        NodeView("ubuntu-desktop", {}, "x86_64", "192.168.10.5"),
        NodeView("pi1", {}, "aarch64", "192.168.20.11"),
    ]
    steps = plan([doc], inventory, fake_tls([]))
    assert [s.id for s in steps] == ["Registry/cluster:serve@ubuntu-desktop", "Registry/cluster:trust@pi1"]
    assert list(steps[1].action.registry_trust.addresses) == [
        "192.168.10.5:5000",
        "ubuntu-desktop:5000",
        "desktop.lan:5000",
    ]

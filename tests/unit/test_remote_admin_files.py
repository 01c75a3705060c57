"""Admin bundles and coordctl contexts on disk, and the pure decisions of remote admin:
which connection a verb uses, which certificate may call, what a bundle names."""

from __future__ import annotations

import datetime as dt
from pathlib import Path

import pytest
import yaml
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec

from picoord.common.defaults import ADMIN_SOCKET, ADMIN_SOCKET_ENV, COORDINATOR_SERVER_NAME
from picoord.common.pki import certificate_not_after
from picoord.coordinator.ca import ClusterCA, certificate_pem, certificate_serial, private_key_pem
from picoord.coordinator.config import ConfigError, CoordinatorConfig
from picoord.coordinator.ctl.certs import newest_admin_listings
from picoord.coordinator.ctl.client import Connection, ConnectionChoiceError, choose_connection
from picoord.coordinator.ctl.contexts import (
    Bundle,
    BundleError,
    ContextStore,
    config_directory,
    expiry_refusal,
    foreign_server_message,
    mode_refusal,
    parse_bundle,
    render_bundle,
)
from picoord.coordinator.main import ADMIN_LISTENER_CONNECTIONS, admin_dial_address, admin_listener_options
from picoord.coordinator.servicers.admin_certificates import validity_refusal
from picoord.coordinator.servicers.peers import CertifiedPeer, admin_refusal, peer_address
from picoord.coordinator.store import AdminCertificateRecord, AdminNameTaken, Store
from picoord.v1 import admin_pb2


@pytest.fixture(scope="module")
def cluster_ca(tmp_path_factory: pytest.TempPathFactory) -> ClusterCA:
    return ClusterCA.load_or_create(tmp_path_factory.mktemp("ca"), ["localhost"])


@pytest.fixture(scope="module")
def other_ca(tmp_path_factory: pytest.TempPathFactory) -> ClusterCA:
    return ClusterCA.load_or_create(tmp_path_factory.mktemp("other"), ["localhost"])


def make_bundle(ca: ClusterCA, name: str = "macbook", days: float = 1) -> Bundle:
    key = ec.generate_private_key(ec.SECP256R1())
    certificate = ca.sign_admin_key(key.public_key(), name, dt.timedelta(days=days))
    return Bundle(
        name=name,
        address="desktop:7445",
        server_name=COORDINATOR_SERVER_NAME,
        certificate_pem=certificate_pem(certificate),
        key_pem=private_key_pem(key),
        ca_certificate_pem=ca.certificate_pem,
        serial=certificate_serial(certificate),
        not_after=certificate_not_after(certificate).timestamp(),
    )


def bundle_document(bundle: Bundle) -> dict:
    return yaml.safe_load(render_bundle(bundle))


def test_a_bundle_reads_back_as_written(cluster_ca: ClusterCA) -> None:
    bundle = make_bundle(cluster_ca)
    assert parse_bundle(render_bundle(bundle).encode(), "macbook.bundle") == bundle


def _node_certificate_pem(ca: ClusterCA) -> tuple[bytes, bytes]:
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    csr = (
        x509.CertificateSigningRequestBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "pi1")]))
        .sign(key, hashes.SHA256())
    )
    certificate = ca.sign_node_csr(csr.public_bytes(serialization.Encoding.PEM), "pi1")
    return certificate_pem(certificate), private_key_pem(key)


@pytest.mark.parametrize(
    ("damage", "message"),
    [
        (lambda d, o: "{not: [yaml", "not a readable YAML document"),
        (lambda d, o: "just text", "not a picoord admin bundle"),
        (lambda d, o: {**d, "kind": "kubeconfig"}, "not a picoord admin bundle"),
        (lambda d, o: {**d, "version": 2}, "bundle version 2 is not 1"),
        (lambda d, o: {k: v for k, v in d.items() if k != "key"}, "field 'key' is missing"),
        (lambda d, o: {k: v for k, v in d.items() if k != "address"}, "field 'address' is missing"),
        (lambda d, o: {**d, "address": "desktop"}, "expected HOST:PORT"),
        (lambda d, o: {**d, "name": "Mac Book"}, "invalid node name"),
        (
            lambda d, o: {**d, "certificate": "-----BEGIN CERTIFICATE-----\nAAAA\n"},
            "'certificate' is not a PEM",
        ),
        (lambda d, o: {**d, "ca_certificate": d["key"]}, "'ca_certificate' is not a PEM"),
        (lambda d, o: {**d, "key": d["certificate"]}, "'key' is not an unencrypted PEM private key"),
        (lambda d, o: {**d, "key": o["key"]}, "the key does not belong to the certificate"),
        (lambda d, o: {**d, "name": "laptop"}, "is not the admin certificate of 'laptop'"),
        (lambda d, o: {**d, "ca_certificate": o["ca_certificate"]}, "not signed by the bundle's CA"),
    ],
)
def test_a_damaged_bundle_is_refused_naming_the_file_and_field(
    cluster_ca: ClusterCA, other_ca: ClusterCA, damage, message: str
) -> None:
    document, foreign = bundle_document(make_bundle(cluster_ca)), bundle_document(make_bundle(other_ca))
    damaged = damage(document, foreign)
    text = damaged if isinstance(damaged, str) else yaml.safe_dump(damaged)
    with pytest.raises(BundleError) as refused:
        parse_bundle(text.encode(), "/tmp/mac.bundle")
    assert str(refused.value).startswith("/tmp/mac.bundle: ") and message in str(refused.value)


def test_a_node_certificate_is_no_admin_bundle(cluster_ca: ClusterCA) -> None:
    document = bundle_document(make_bundle(cluster_ca, "pi1"))
    document["certificate"], document["key"] = (pem.decode() for pem in _node_certificate_pem(cluster_ca))
    with pytest.raises(BundleError, match="is not the admin certificate of 'pi1'"):
        parse_bundle(yaml.safe_dump(document).encode(), "pi1.bundle")


def test_oversized_and_binary_bundles_are_refused(cluster_ca: ClusterCA) -> None:
    with pytest.raises(BundleError, match="larger than"):
        parse_bundle(b"x" * (70 * 1024), "big")
    with pytest.raises(BundleError, match="not a readable YAML document"):
        parse_bundle(b"\xff\xfe\x00garbage", "binary")


@pytest.mark.parametrize(
    ("mode", "owner", "directory", "fix"),
    [
        (0o600, 1000, False, None),
        (0o400, 1000, False, None),
        (0o700, 1000, True, None),
        (0o640, 1000, False, "chmod 600"),
        (0o604, 1000, False, "chmod 600"),
        (0o755, 1000, True, "chmod 700"),
        (0o710, 1000, True, "chmod 700"),
        (0o600, 0, False, "chown 1000"),
    ],
)
def test_mode_refusal(mode: int, owner: int, directory: bool, fix: str | None) -> None:
    path = Path("/home/op/.config/picoord/contexts/home.yaml")
    refusal = mode_refusal(path, mode, owner, 1000, directory)
    if fix is None:
        assert refusal is None
    else:
        assert refusal is not None and fix in refusal and str(path) in refusal


@pytest.mark.parametrize(
    ("environ", "expected"),
    [
        ({"HOME": "/home/op"}, "/home/op/.config/picoord"),
        ({"HOME": "/home/op", "XDG_CONFIG_HOME": "/xdg"}, "/xdg/picoord"),
        ({"HOME": "/home/op", "XDG_CONFIG_HOME": ""}, "/home/op/.config/picoord"),
    ],
)
def test_config_directory(environ: dict, expected: str) -> None:
    assert config_directory(environ) == Path(expected)


def test_context_add_stores_a_private_copy_and_refuses_to_overwrite(
    tmp_path: Path, cluster_ca: ClusterCA
) -> None:
    store = ContextStore(tmp_path / "picoord")
    text = render_bundle(make_bundle(cluster_ca)).encode()
    store.add("home", text, "mac.bundle", force=False)
    assert (store.directory.stat().st_mode & 0o777, store.contexts_directory.stat().st_mode & 0o777) == (
        0o700,
        0o700,
    )
    assert store.path("home").stat().st_mode & 0o777 == 0o600 and store.path("home").read_bytes() == text

    other = render_bundle(make_bundle(cluster_ca, "laptop")).encode()
    with pytest.raises(BundleError, match=r"context 'home' already exists .* --force"):
        store.add("home", other, "laptop.bundle", force=False)
    assert store.path("home").read_bytes() == text  # nothing overwritten
    store.add("home", other, "laptop.bundle", force=True)
    assert store.load("home").name == "laptop"


def test_context_add_refuses_a_bad_bundle_and_writes_nothing(tmp_path: Path) -> None:
    store = ContextStore(tmp_path / "picoord")
    with pytest.raises(BundleError, match=r"mac\.bundle: not a picoord admin bundle"):
        store.add("home", b"kind: other\n", "mac.bundle", force=False)
    assert store.names() == []


def test_use_and_current(tmp_path: Path, cluster_ca: ClusterCA) -> None:
    store = ContextStore(tmp_path / "picoord")
    assert store.current() is None
    store.add("home", render_bundle(make_bundle(cluster_ca)).encode(), "mac.bundle", force=False)
    store.use("home")
    assert store.current() == "home" and (store.directory / "current-context").stat().st_mode & 0o777 == 0o600
    with pytest.raises(BundleError, match=r"no context 'work' .* \(known: home\)"):
        store.use("work")
    assert store.current() == "home"


@pytest.mark.parametrize(
    ("target", "mode", "fix"),
    [
        ("file", 0o644, "chmod 600"),
        ("file", 0o660, "chmod 600"),
        ("contexts", 0o755, "chmod 700"),
        ("top", 0o750, "chmod 700"),
    ],
)
def test_a_context_others_can_read_is_never_used(
    tmp_path: Path, cluster_ca: ClusterCA, target: str, mode: int, fix: str
) -> None:
    store = ContextStore(tmp_path / "picoord")
    store.add("home", render_bundle(make_bundle(cluster_ca)).encode(), "mac.bundle", force=False)
    path = {"file": store.path("home"), "contexts": store.contexts_directory, "top": store.directory}[target]
    path.chmod(mode)
    with pytest.raises(BundleError) as refused:
        store.load("home")
    assert f"{fix} {path}" in str(refused.value) and f"mode {mode:04o}" in str(refused.value)


def test_a_corrupted_context_names_itself_and_the_fix(tmp_path: Path, cluster_ca: ClusterCA) -> None:
    store = ContextStore(tmp_path / "picoord")
    store.add("home", render_bundle(make_bundle(cluster_ca)).encode(), "mac.bundle", force=False)
    store.path("home").write_bytes(store.path("home").read_bytes()[:300])
    with pytest.raises(BundleError) as refused:
        store.load("home")
    text = str(refused.value)
    assert text.startswith(f"context 'home' ({store.path('home')}): ")
    assert "coordctl context add home --bundle FILE --force" in text


def test_expiry_refusal(cluster_ca: ClusterCA) -> None:
    bundle = make_bundle(cluster_ca)
    assert expiry_refusal(bundle, "home", bundle.not_after - 1) is None
    refusal = expiry_refusal(bundle, "home", bundle.not_after)
    assert refusal is not None and "context 'home'" in refusal and "expired at" in refusal
    assert "coordctl admin issue macbook" in refusal


def test_foreign_server_message(cluster_ca: ClusterCA, other_ca: ClusterCA) -> None:
    bundle = make_bundle(cluster_ca)
    ours = x509.load_pem_x509_certificate(cluster_ca.server_certificate_pem)
    theirs = x509.load_pem_x509_certificate(other_ca.server_certificate_pem)
    from cryptography.hazmat.primitives.serialization import Encoding

    assert foreign_server_message("home", bundle, ours.public_bytes(Encoding.DER)) is None
    message = foreign_server_message("home", bundle, theirs.public_bytes(Encoding.DER))
    assert message is not None and "context 'home'" in message and "not of this bundle's cluster" in message


SOCKET = Connection(socket_path=ADMIN_SOCKET)


@pytest.mark.parametrize(
    ("socket_flag", "environ", "context_flag", "current", "socket_only", "expected"),
    [
        (None, {}, None, None, False, SOCKET),
        (None, {}, None, "home", False, Connection(context="home")),
        (None, {}, "work", "home", False, Connection(context="work")),
        ("/s", {}, None, "home", False, Connection(socket_path=Path("/s"))),
        (None, {ADMIN_SOCKET_ENV: "/e"}, None, "home", False, Connection(socket_path=Path("/e"))),
        (None, {ADMIN_SOCKET_ENV: "/e"}, "work", None, False, Connection(context="work")),
        (None, {}, None, "home", True, SOCKET),  # admin issue: the coordinator's host only
        ("/s", {}, "work", None, False, "not both"),
        (None, {}, "work", None, True, "drop --context"),
    ],
)
def test_choose_connection(socket_flag, environ, context_flag, current, socket_only, expected) -> None:
    if isinstance(expected, str):
        with pytest.raises(ConnectionChoiceError, match=expected):
            choose_connection(socket_flag, environ, context_flag, current, socket_only)
    else:
        assert choose_connection(socket_flag, environ, context_flag, current, socket_only) == expected


ADMIN = CertifiedPeer("admin:macbook", "ab12", ("picoord:admins",))
RECORD = AdminCertificateRecord("ab12", "macbook", 100.0, 1000.0, None)


@pytest.mark.parametrize(
    ("peer", "record", "now", "refused"),
    [
        (ADMIN, RECORD, 500.0, None),
        (CertifiedPeer("pi1", "ab12", ()), RECORD, 500.0, "is not an admin certificate"),
        (CertifiedPeer("pi1", "ab12", ("picoord:admins",)), RECORD, 500.0, "is not an admin certificate"),
        (CertifiedPeer("admin:macbook", "ab12", ()), RECORD, 500.0, "is not an admin certificate"),
        (ADMIN, None, 500.0, "not on record"),
        (ADMIN, AdminCertificateRecord("ab12", "laptop", 100.0, 1000.0, None), 500.0, "not on record"),
        (ADMIN, AdminCertificateRecord("ab12", "macbook", 100.0, 1000.0, 400.0), 500.0, "is revoked"),
        (ADMIN, AdminCertificateRecord("ab12", "macbook", 100.0, 1000.0, 400.0), 2000.0, "is revoked"),
        (ADMIN, RECORD, 1000.0, "expired"),
    ],
)
def test_admin_refusal(peer, record, now: float, refused: str | None) -> None:
    refusal = admin_refusal(peer, record, now)
    assert refusal is None if refused is None else refused in (refusal or "")


@pytest.mark.parametrize(
    ("seconds", "refused"),
    [(0.0, False), (5.0, False), (90 * 86400.0, False), (4.0, True), (3651 * 86400.0, True), (-1.0, True)],
)
def test_validity_refusal(seconds: float, refused: bool) -> None:
    assert (validity_refusal(seconds) is not None) == refused


@pytest.mark.parametrize(
    ("listen", "advertise", "expected"),
    [
        ("", "desktop", ""),
        ("192.168.1.10:7445", "desktop", "192.168.1.10:7445"),
        ("0.0.0.0:7445", "desktop.lan", "desktop.lan:7445"),
        ("[::]:7445", "fd00::1", "[fd00::1]:7445"),
    ],
)
def test_admin_dial_address(listen: str, advertise: str, expected: str) -> None:
    assert admin_dial_address(listen, advertise) == expected


@pytest.mark.parametrize(
    ("peer", "address"),
    [
        ("ipv4:192.168.1.20:51234", "192.168.1.20:51234"),
        ("ipv6:[::1]:51234", "[::1]:51234"),
        ("ipv6:%5B::1%5D:51234", "[::1]:51234"),
        ("unix:/run/x", "unix:/run/x"),
    ],
)
def test_peer_address(peer: str, address: str) -> None:
    assert peer_address(peer) == address


def test_admin_certificates_in_the_store(tmp_path: Path) -> None:
    store = Store(tmp_path / "state.db")
    try:
        store.add_admin_certificate(
            AdminCertificateRecord("s1", "macbook", 10.0, 100.0, None, "root"), now=10.0
        )
        with pytest.raises(AdminNameTaken, match="already holds certificate s1"):
            store.add_admin_certificate(AdminCertificateRecord("s2", "macbook", 20.0, 200.0, None), now=20.0)
        # Expired: the name may be issued again, and the old one stays listed.
        store.add_admin_certificate(AdminCertificateRecord("s2", "macbook", 150.0, 300.0, None), now=150.0)
        assert [record.serial for record in store.list_admin_certificates()] == ["s1", "s2"]
        assert store.revoke_admin("macbook", now=160.0) == ["s1", "s2"]
        assert store.revoke_admin("macbook", now=170.0) == []
        assert store.admin_certificate("s2").revoked_at == 160.0
        assert store.certificate("s2") is None  # never a node certificate
    finally:
        store.close()


def test_check_expiration_lists_each_admins_newest_certificate() -> None:
    admins = [
        admin_pb2.AdminCertificate(name="macbook", serial="old", issued_at=1.0, not_after=2.0),
        admin_pb2.AdminCertificate(name="macbook", serial="new", issued_at=3.0, not_after=9.0),
        admin_pb2.AdminCertificate(name="laptop", serial="l", issued_at=2.0, not_after=5.0, revoked_at=4.0),
    ]
    listed = newest_admin_listings(admins)
    assert [(x.name, x.kind, x.serial, x.revoked_at) for x in listed] == [
        ("admin/laptop", "admin", "l", 4.0),
        ("admin/macbook", "admin", "new", 0.0),
    ]


@pytest.mark.parametrize("value", ["7445", "host", ":", "0.0.0.0:99999"])
def test_admin_listen_is_checked(value: str) -> None:
    config = CoordinatorConfig(admin_listen=value)
    with pytest.raises(ConfigError, match="admin_listen"):
        config.validate()


def test_admin_listen_is_off_by_default() -> None:
    config = CoordinatorConfig()
    config.validate()
    assert config.admin_listen == ""


@pytest.mark.parametrize(
    ("max_connections", "cap"), [(0, ADMIN_LISTENER_CONNECTIONS), (10, 10), (100_000, 64)]
)
def test_admin_listener_has_the_front_door_limits(max_connections: int, cap: int) -> None:
    options = dict(
        admin_listener_options(CoordinatorConfig(handshake_timeout=3.0, max_connections=max_connections))
    )
    assert options["grpc.server_handshake_timeout_ms"] == 3000
    assert options["grpc.max_allowed_incoming_connections"] == cap

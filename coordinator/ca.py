"""The cluster CA: created on first start, signs the coordinator's server certificate and
each enrolled node's client certificate.

Keys are ECDSA P-256: cheap to generate and verify on a Raspberry Pi. Private keys are
written 0600 from their first byte (common.files.write_atomically).

Node and server certificates rotate, as kubelet's do: at about two thirds of their life
(common.pki.rotation_deadline) a new key gets a new certificate; lifetimes are settings.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import ipaddress
import socket
import threading
from dataclasses import dataclass, field
from pathlib import Path

import structlog
from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from picoord.common.defaults import COORDINATOR_SERVER_NAME
from picoord.common.files import write_atomically
from picoord.common.names import validate_node_name
from picoord.common.pki import (
    ca_cert_hash,
    certificate_not_after,
    certificate_not_before,
    key_matches,
    rotation_deadline,
)
from picoord.common.vocabulary import CertificateState
from picoord.coordinator.store import CertificateRecord

log = structlog.get_logger("picoord.coordinator.ca")

ADMIN_ORGANIZATION = "picoord:admins"
ADMIN_PREFIX = "admin:"  # the common name of an admin certificate: admin:NAME
CA_VALIDITY = dt.timedelta(days=3650)
SERVER_VALIDITY = dt.timedelta(days=365)
NODE_VALIDITY = dt.timedelta(days=365)
MAX_BACKDATE = dt.timedelta(minutes=5)  # tolerance for Pis whose clock runs a little behind


class CAUnavailable(Exception):
    """The cluster CA on disk is half gone or damaged. Never replaced by a new one: that
    would lock out every node enrolled with it. The message names the file and the fix."""


def new_cluster_hint(state_dir: Path) -> str:
    return (
        f"to start a new cluster on purpose instead (every node must then join again), "
        f"move ca.key, ca.crt and state.db out of {state_dir}"
    )


class CsrRejected(ValueError):
    """A certificate signing request that the CA will not sign."""


def new_private_key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def private_key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def certificate_pem(certificate: x509.Certificate) -> bytes:
    return certificate.public_bytes(serialization.Encoding.PEM)


def certificate_serial(certificate: x509.Certificate) -> str:
    """How serials are written in the store, in logs and by coordctl: lower-case hex."""
    return format(certificate.serial_number, "x")


def _now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


def _load_ca(key_path: Path, cert_path: Path) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    """The CA key and certificate, if they are readable and belong together."""
    try:
        key = serialization.load_pem_private_key(key_path.read_bytes(), password=None)
    except (ValueError, TypeError, UnsupportedAlgorithm) as error:
        raise CAUnavailable(f"{key_path} is damaged ({error}): restore it from your backup") from None
    try:
        certificate = x509.load_pem_x509_certificate(cert_path.read_bytes())
    except ValueError as error:
        raise CAUnavailable(f"{cert_path} is damaged ({error}): restore it from your backup") from None
    if not isinstance(key, ec.EllipticCurvePrivateKey) or not key_matches(key, certificate):
        raise CAUnavailable(f"{key_path} is not the key of {cert_path}: restore the pair from one backup")
    return key, certificate


def _san_entries(names: list[str]) -> list[x509.GeneralName]:
    entries: list[x509.GeneralName] = []
    for name in dict.fromkeys(names):
        try:
            entries.append(x509.IPAddress(ipaddress.ip_address(name)))
        except ValueError:
            entries.append(x509.DNSName(name))
    return entries


def backdate(validity: dt.timedelta) -> dt.timedelta:
    """How far before now a certificate starts: clock-skew tolerance, but a small part of a
    short life, so its rotation point (a fraction of notBefore..notAfter) stays ahead."""
    return min(MAX_BACKDATE, validity / 10)


def certificate_state(not_after: float, revoked_at: float | None, now: float) -> CertificateState:
    """Revoked wins over expired: it is the operator's decision and says what to do."""
    if revoked_at is not None:
        return CertificateState.REVOKED
    return CertificateState.VALID if now < not_after else CertificateState.EXPIRED


def server_renewal_due(covers_names: bool, not_before: float, not_after: float, now: float) -> bool:
    """The server certificate is re-issued when it lacks a wanted name or has lived two thirds."""
    return not covers_names or now >= rotation_deadline(not_before, not_after)


@dataclass(frozen=True)
class ServerIdentity:
    """The coordinator's TLS key and certificate, replaced as a whole when it rotates."""

    key_pem: bytes
    certificate_pem: bytes
    not_before: float
    not_after: float
    serial: str


@dataclass
class ClusterCA:
    """The CA key and certificate plus the coordinator's server identity, kept in the state dir."""

    key: ec.EllipticCurvePrivateKey
    certificate: x509.Certificate
    state_dir: Path
    server_names: list[str]
    node_validity: dt.timedelta = NODE_VALIDITY
    server_validity: dt.timedelta = SERVER_VALIDITY
    server: ServerIdentity | None = None
    server_generation: int = 0  # bumped at every rotation: TLS credentials reload on a change
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    @property
    def certificate_pem(self) -> bytes:
        return certificate_pem(self.certificate)

    @property
    def cert_hash(self) -> str:
        return ca_cert_hash(self.certificate)

    @property
    def server_key_pem(self) -> bytes:
        assert self.server is not None
        return self.server.key_pem

    @property
    def server_certificate_pem(self) -> bytes:
        assert self.server is not None
        return self.server.certificate_pem

    @property
    def server_chain_pem(self) -> bytes:
        """Server certificate followed by the CA, so a joining agent can pin the CA by hash."""
        return self.server_certificate_pem + self.certificate_pem

    @classmethod
    def load_or_create(
        cls,
        state_dir: Path,
        server_names: list[str] | None = None,
        node_validity: dt.timedelta = NODE_VALIDITY,
        server_validity: dt.timedelta = SERVER_VALIDITY,
    ) -> ClusterCA:
        ca_key_path, ca_cert_path = state_dir / "ca.key", state_dir / "ca.crt"
        present = [path for path in (ca_key_path, ca_cert_path) if path.exists()]
        if len(present) == 2:
            key, certificate = _load_ca(ca_key_path, ca_cert_path)
        elif present:
            (missing,) = {ca_key_path, ca_cert_path} - set(present)
            raise CAUnavailable(
                f"the cluster CA is half gone: {missing} is missing while {present[0]} is there. "
                f"Restore {missing} from your backup of {state_dir} (a new CA would lock out every "
                f"enrolled node); {new_cluster_hint(state_dir)}"
            )
        else:
            key, certificate = _create_ca()
            write_atomically(ca_key_path, private_key_pem(key), 0o600)
            write_atomically(ca_cert_path, certificate_pem(certificate), 0o644)
        assert isinstance(key, ec.EllipticCurvePrivateKey)
        wanted = [COORDINATOR_SERVER_NAME, socket.gethostname(), "localhost", "127.0.0.1"]
        wanted += server_names or []
        ca = cls(key, certificate, state_dir, list(dict.fromkeys(wanted)), node_validity, server_validity)
        ca.server = ca._load_server()
        try:
            ca.renew_server_if_due()
        except OSError as error:
            # A full or read-only state disk: serve the current certificate while it lasts
            # (the rotation loop retries); without a usable one there is nothing to serve.
            if ca.server is None or ca.server.not_after <= _now().timestamp():
                raise
            log.error("cannot renew the server certificate; serving the current one", error=str(error))
        return ca

    def _load_server(self) -> ServerIdentity | None:
        """The server identity on disk, if its key and certificate belong together."""
        key_path, cert_path = self.state_dir / "server.key", self.state_dir / "server.crt"
        if not (key_path.exists() and cert_path.exists()):
            return None
        return server_identity(key_path.read_bytes(), cert_path.read_bytes())

    def renew_server_if_due(self, now: float | None = None) -> bool:
        """Re-issue the server certificate (new key) when due; True when it changed.

        Called at start-up and periodically; the TLS ports pick the new one up at their next
        handshake (see coordinator.main), so no restart is needed."""
        now = _now().timestamp() if now is None else now
        with self._lock:
            current = self.server
            if current is not None and not server_renewal_due(
                _covers(x509.load_pem_x509_certificate(current.certificate_pem), self.server_names),
                current.not_before,
                current.not_after,
                now,
            ):
                return False
            key = new_private_key()
            builder = (
                x509.CertificateBuilder()
                .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, COORDINATOR_SERVER_NAME)]))
                .add_extension(x509.SubjectAlternativeName(_san_entries(self.server_names)), critical=False)
                .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
            )
            certificate = self._sign(builder, key.public_key(), self.server_validity)
            identity = _server_identity(private_key_pem(key), certificate)
            # Two files, two renames: a crash between them leaves a pair that _load_server
            # refuses (key and certificate differ), and the next start issues a fresh one.
            write_atomically(self.state_dir / "server.key", identity.key_pem, 0o600)
            write_atomically(self.state_dir / "server.crt", identity.certificate_pem, 0o644)
            self.server = identity
            self.server_generation += 1
            return True

    def _sign(
        self, builder: x509.CertificateBuilder, public_key: object, validity: dt.timedelta
    ) -> x509.Certificate:
        now = _now()
        not_after = min(now + validity, certificate_not_after(self.certificate))  # never past the CA
        return (
            builder.issuer_name(self.certificate.subject)
            .public_key(public_key)  # type: ignore[arg-type]
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - backdate(validity))
            .not_valid_after(not_after)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_public_key(self.key.public_key()), critical=False
            )
            .sign(self.key, hashes.SHA256())
        )

    def registry_identity(self, name: str, names: list[str], now: float | None = None) -> ServerIdentity:
        """The TLS identity of the cluster registry `name` (a Registry document), valid for
        `names` (its address and host names): the one kept in the state dir while it
        covers them and is not due (so a second apply changes nothing), else a new one.
        Its certificate_pem is the chain (certificate, then the CA)."""
        validate_node_name(name)
        now = _now().timestamp() if now is None else now
        directory = self.state_dir / "registry"
        key_path, cert_path = directory / f"{name}.key", directory / f"{name}.crt"
        with self._lock:
            if key_path.exists() and cert_path.exists():
                current = server_identity(key_path.read_bytes(), cert_path.read_bytes())
                if current is not None and not server_renewal_due(
                    _covers(x509.load_pem_x509_certificate(current.certificate_pem), names),
                    current.not_before,
                    current.not_after,
                    now,
                ):
                    return self._chained(current)
            key = new_private_key()
            builder = (
                x509.CertificateBuilder()
                .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, f"registry {name}")]))
                .add_extension(x509.SubjectAlternativeName(_san_entries(names)), critical=False)
                .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
            )
            certificate = self._sign(builder, key.public_key(), self.server_validity)
            identity = _server_identity(private_key_pem(key), certificate)
            directory.mkdir(mode=0o700, exist_ok=True)
            write_atomically(key_path, identity.key_pem, 0o600)
            write_atomically(cert_path, identity.certificate_pem, 0o644)
            return self._chained(identity)

    def registry_certificates(self) -> list[tuple[str, ServerIdentity]]:
        """(registry name, identity) of every cluster registry certificate issued, for
        `coordctl certs check-expiration` (a re-apply of its document renews one)."""
        found = []
        for cert_path in sorted((self.state_dir / "registry").glob("*.crt")):
            key_path = cert_path.with_suffix(".key")
            if key_path.exists():
                identity = server_identity(key_path.read_bytes(), cert_path.read_bytes())
                if identity is not None:
                    found.append((cert_path.stem, identity))
        return found

    def _chained(self, identity: ServerIdentity) -> ServerIdentity:
        return dataclasses.replace(identity, certificate_pem=identity.certificate_pem + self.certificate_pem)

    def sign_node_csr(self, csr_pem: bytes, node_name: str) -> x509.Certificate:
        """Issue a client certificate whose only identity is `node_name`, whatever the CSR asks."""
        validate_node_name(node_name)
        try:
            csr = x509.load_pem_x509_csr(csr_pem)
        except (ValueError, x509.InvalidVersion) as error:
            raise CsrRejected(f"the CSR is not a PEM certificate request: {error}") from None
        try:
            # A damaged key or an unknown algorithm makes these raise rather than answer.
            signature_valid = csr.is_signature_valid
            public_key = csr.public_key()
        except (ValueError, UnsupportedAlgorithm) as error:
            raise CsrRejected(f"the CSR's key is unusable: {error}") from None
        if not signature_valid:
            raise CsrRejected("the CSR's signature does not verify")
        if not isinstance(public_key, ec.EllipticCurvePublicKey) or public_key.curve.key_size < 256:
            raise CsrRejected("the CSR must carry an ECDSA key of at least 256 bits")
        builder = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, node_name)]))
            .add_extension(x509.SubjectAlternativeName([x509.DNSName(node_name)]), critical=False)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
        )
        return self._sign(builder, public_key, self.node_validity)

    def sign_admin_key(
        self, public_key: ec.EllipticCurvePublicKey, name: str, validity: dt.timedelta
    ) -> x509.Certificate:
        """A remote operator's client certificate: admin:NAME in the admins group, a subject
        no node certificate can carry (node names are DNS labels, without a colon)."""
        validate_node_name(name)
        builder = (
            x509.CertificateBuilder()
            .subject_name(
                x509.Name(
                    [
                        x509.NameAttribute(NameOID.ORGANIZATION_NAME, ADMIN_ORGANIZATION),
                        x509.NameAttribute(NameOID.COMMON_NAME, f"{ADMIN_PREFIX}{name}"),
                    ]
                )
            )
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
        )
        return self._sign(builder, public_key, validity)


def check_ca_files(key_path: Path, cert_path: Path) -> str:
    """The pin (sha256:...) of the CA these files hold; CAUnavailable when they are
    damaged or not one pair (what a backup must never take nor restore)."""
    _, certificate = _load_ca(key_path, cert_path)
    return ca_cert_hash(certificate)


def server_identity(key_pem: bytes, cert_pem: bytes) -> ServerIdentity | None:
    """The server identity of a key and certificate in PEM, if they belong together (not
    after a crash, or a rotation, between the two writes)."""
    try:
        certificate = x509.load_pem_x509_certificate(cert_pem)
        key = serialization.load_pem_private_key(key_pem, password=None)
    except ValueError:
        return None
    if not key_matches(key, certificate):
        return None
    return _server_identity(key_pem, certificate)


def _server_identity(key_pem: bytes, certificate: x509.Certificate) -> ServerIdentity:
    return ServerIdentity(
        key_pem=key_pem,
        certificate_pem=certificate_pem(certificate),
        not_before=certificate_not_before(certificate).timestamp(),
        not_after=certificate_not_after(certificate).timestamp(),
        serial=certificate_serial(certificate),
    )


def _covers(certificate: x509.Certificate, names: list[str]) -> bool:
    try:
        san = certificate.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return False
    return set(_san_entries(names)) <= set(san)


def _create_ca() -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    key = new_private_key()
    name = x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "picoord"),
            x509.NameAttribute(NameOID.COMMON_NAME, f"picoord cluster CA {socket.gethostname()}"),
        ]
    )
    now = _now()
    certificate = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - MAX_BACKDATE)
        .not_valid_after(now + CA_VALIDITY)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                key_cert_sign=True,
                crl_sign=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )
    return key, certificate


def certificate_record(certificate: x509.Certificate, node: str, issued_at: float) -> CertificateRecord:
    """How the store keeps a node certificate the CA just signed (at enrollment or renewal)."""
    return CertificateRecord(
        serial=certificate_serial(certificate),
        node=node,
        issued_at=issued_at,
        not_after=certificate_not_after(certificate).timestamp(),
        revoked_at=None,
    )

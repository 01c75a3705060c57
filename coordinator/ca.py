"""The cluster CA: created on first start, signs the coordinator's server certificate and
each enrolled node's client certificate.

Keys are ECDSA P-256: cheap to generate and verify on a Raspberry Pi. Private keys are
written 0600 from their first byte (common.files.write_atomically).
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import socket
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from picoord.common.defaults import COORDINATOR_SERVER_NAME
from picoord.common.files import write_atomically
from picoord.common.names import validate_node_name
from picoord.common.pki import ca_cert_hash, certificate_not_after

ADMIN_ORGANIZATION = "picoord:admins"
CA_VALIDITY = dt.timedelta(days=3650)
SERVER_VALIDITY = dt.timedelta(days=365)
NODE_VALIDITY = dt.timedelta(days=365)


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


def _now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


def _san_entries(names: list[str]) -> list[x509.GeneralName]:
    entries: list[x509.GeneralName] = []
    for name in dict.fromkeys(names):
        try:
            entries.append(x509.IPAddress(ipaddress.ip_address(name)))
        except ValueError:
            entries.append(x509.DNSName(name))
    return entries


@dataclass
class ClusterCA:
    """The CA key and certificate plus the coordinator's server identity, kept in the state dir."""

    key: ec.EllipticCurvePrivateKey
    certificate: x509.Certificate
    server_key_pem: bytes
    server_certificate_pem: bytes

    @property
    def certificate_pem(self) -> bytes:
        return certificate_pem(self.certificate)

    @property
    def cert_hash(self) -> str:
        return ca_cert_hash(self.certificate)

    @property
    def server_chain_pem(self) -> bytes:
        """Server certificate followed by the CA, so a joining agent can pin the CA by hash."""
        return self.server_certificate_pem + self.certificate_pem

    @classmethod
    def load_or_create(cls, state_dir: Path, server_names: list[str] | None = None) -> ClusterCA:
        ca_key_path, ca_cert_path = state_dir / "ca.key", state_dir / "ca.crt"
        if ca_key_path.exists() and ca_cert_path.exists():
            key = serialization.load_pem_private_key(ca_key_path.read_bytes(), password=None)
            certificate = x509.load_pem_x509_certificate(ca_cert_path.read_bytes())
        else:
            key, certificate = _create_ca()
            write_atomically(ca_key_path, private_key_pem(key), 0o600)
            write_atomically(ca_cert_path, certificate_pem(certificate), 0o644)
        assert isinstance(key, ec.EllipticCurvePrivateKey)
        ca = cls(key, certificate, b"", b"")
        ca._load_or_create_server(state_dir, server_names or [])
        return ca

    def _load_or_create_server(self, state_dir: Path, extra_names: list[str]) -> None:
        key_path, cert_path = state_dir / "server.key", state_dir / "server.crt"
        wanted = [COORDINATOR_SERVER_NAME, socket.gethostname(), "localhost", "127.0.0.1", *extra_names]
        if key_path.exists() and cert_path.exists():
            existing = x509.load_pem_x509_certificate(cert_path.read_bytes())
            if _covers(existing, wanted) and certificate_not_after(existing) > _now() + dt.timedelta(days=30):
                self.server_key_pem = key_path.read_bytes()
                self.server_certificate_pem = cert_path.read_bytes()
                return
        key = new_private_key()
        builder = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, COORDINATOR_SERVER_NAME)]))
            .add_extension(x509.SubjectAlternativeName(_san_entries(wanted)), critical=False)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        )
        certificate = self._sign(builder, key.public_key(), SERVER_VALIDITY)
        self.server_key_pem = private_key_pem(key)
        self.server_certificate_pem = certificate_pem(certificate)
        write_atomically(key_path, self.server_key_pem, 0o600)
        write_atomically(cert_path, self.server_certificate_pem, 0o644)

    def _sign(
        self, builder: x509.CertificateBuilder, public_key: object, validity: dt.timedelta
    ) -> x509.Certificate:
        now = _now()
        return (
            builder.issuer_name(self.certificate.subject)
            .public_key(public_key)  # type: ignore[arg-type]
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(minutes=5))
            .not_valid_after(now + validity)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_public_key(self.key.public_key()), critical=False
            )
            .sign(self.key, hashes.SHA256())
        )

    def sign_node_csr(self, csr_pem: bytes, node_name: str) -> x509.Certificate:
        """Issue a client certificate whose only identity is `node_name`, whatever the CSR asks."""
        validate_node_name(node_name)
        try:
            csr = x509.load_pem_x509_csr(csr_pem)
        except ValueError as error:
            raise CsrRejected(f"the CSR is not a PEM certificate request: {error}") from None
        if not csr.is_signature_valid:
            raise CsrRejected("the CSR's signature does not verify")
        public_key = csr.public_key()
        if not isinstance(public_key, ec.EllipticCurvePublicKey) or public_key.curve.key_size < 256:
            raise CsrRejected("the CSR must carry an ECDSA key of at least 256 bits")
        builder = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, node_name)]))
            .add_extension(x509.SubjectAlternativeName([x509.DNSName(node_name)]), critical=False)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
        )
        return self._sign(builder, public_key, NODE_VALIDITY)


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
        .not_valid_before(now - dt.timedelta(minutes=5))
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

"""The cluster CA: what a CSR may and may not obtain, and when certificates rotate."""

from __future__ import annotations

import base64
import datetime as dt
from collections.abc import Callable
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from picoord.common.pki import certificate_not_after, certificate_not_before
from picoord.coordinator.ca import (
    CertificateState,
    ClusterCA,
    CsrRejected,
    backdate,
    certificate_state,
    server_renewal_due,
)


@pytest.fixture(scope="module")
def ca(tmp_path_factory: pytest.TempPathFactory) -> ClusterCA:
    return ClusterCA.load_or_create(tmp_path_factory.mktemp("ca"), node_validity=dt.timedelta(hours=2))


def csr(key: object, common_name: str = "pi1", sans: list[str] | None = None) -> bytes:
    builder = x509.CertificateSigningRequestBuilder().subject_name(
        x509.Name(
            [
                x509.NameAttribute(NameOID.COMMON_NAME, common_name),
                x509.NameAttribute(NameOID.ORGANIZATION_NAME, "picoord:admins"),
            ]
        )
    )
    if sans:
        builder = builder.add_extension(
            x509.SubjectAlternativeName([x509.DNSName(name) for name in sans]), critical=False
        )
    return builder.sign(key, hashes.SHA256()).public_bytes(serialization.Encoding.PEM)  # type: ignore[arg-type]


def with_damaged_key(part: str) -> bytes:
    """A CSR whose public key cannot be loaded (found by fuzzing: these raised past CsrRejected)."""
    key = p256()
    der = x509.load_pem_x509_csr(csr(key)).public_bytes(serialization.Encoding.DER)
    if part == "algorithm":  # id-ecPublicKey 1.2.840.10045.2.1 -> an unknown .2.2
        der = der.replace(bytes.fromhex("06072a8648ce3d0201"), bytes.fromhex("06072a8648ce3d0202"))
    else:  # the EC point's uncompressed-form marker
        point = key.public_key().public_bytes(
            serialization.Encoding.X962, serialization.PublicFormat.UncompressedPoint
        )
        der = der.replace(point, b"\x05" + point[1:])
    return x509.load_der_x509_csr(der).public_bytes(serialization.Encoding.PEM)


BAD_DER = b"-----BEGIN CERTIFICATE REQUEST-----\nAAAA\n-----END CERTIFICATE REQUEST-----\n"


def p256() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def with_bad_signature() -> bytes:
    pem = csr(p256()).decode()
    body = "".join(pem.splitlines()[1:-1])
    der = bytearray(base64.b64decode(body))
    der[-3] ^= 0xFF  # inside the signature
    encoded = base64.encodebytes(bytes(der)).decode()
    return f"-----BEGIN CERTIFICATE REQUEST-----\n{encoded}-----END CERTIFICATE REQUEST-----\n".encode()


@pytest.mark.parametrize(
    ("make_csr", "refusal"),
    [
        (lambda: b"", "not a PEM certificate request"),
        (
            lambda: b"-----BEGIN CERTIFICATE REQUEST-----\nAAAA\n-----END CERTIFICATE REQUEST-----\n",
            "not a PEM",
        ),
        (lambda: b"hello\x00\xff", "not a PEM certificate request"),
        (with_bad_signature, "signature does not verify"),
        (lambda: csr(rsa.generate_private_key(65537, 2048)), "ECDSA key of at least 256 bits"),
        (lambda: csr(ec.generate_private_key(ec.SECP224R1())), "ECDSA key of at least 256 bits"),
        (lambda: with_damaged_key("algorithm"), "key is unusable: Unknown key type"),
        (lambda: with_damaged_key("point"), "key is unusable: Invalid key"),
    ],
    ids=[
        "empty",
        "bad-base64-der",
        "garbage",
        "bad-signature",
        "rsa-key",
        "p224-key",
        "unknown-key-type",
        "bad-point",
    ],
)
def test_csrs_the_ca_refuses(ca: ClusterCA, make_csr: Callable[[], bytes], refusal: str) -> None:
    with pytest.raises(CsrRejected, match=refusal):
        ca.sign_node_csr(make_csr(), "pi1")


@pytest.mark.parametrize(
    ("common_name", "sans"),
    [
        ("pi1", None),
        ("picoord-coordinator", ["picoord-coordinator", "localhost"]),
        ("pi2", ["pi2", "*.example.com"]),
    ],
    ids=["own-name", "asks-for-the-server-name", "asks-for-another-node"],
)
def test_a_csr_gets_the_sessions_name_only(ca: ClusterCA, common_name: str, sans: list[str] | None) -> None:
    key = p256()
    issued = ca.sign_node_csr(csr(key, common_name, sans), "pi1")
    assert issued.subject == x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "pi1")])  # no organization
    san = issued.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert list(san) == [x509.DNSName("pi1")]
    usage = issued.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert list(usage) == [ExtendedKeyUsageOID.CLIENT_AUTH]
    assert issued.public_key() == key.public_key()
    life = certificate_not_after(issued) - certificate_not_before(issued)
    assert life == dt.timedelta(hours=2) + backdate(dt.timedelta(hours=2))


@pytest.mark.parametrize(
    ("validity", "expected"),
    [
        (dt.timedelta(seconds=30), dt.timedelta(seconds=3)),
        (dt.timedelta(minutes=10), dt.timedelta(minutes=1)),
        (dt.timedelta(days=365), dt.timedelta(minutes=5)),
    ],
)
def test_backdating_is_a_small_part_of_a_short_life(validity: dt.timedelta, expected: dt.timedelta) -> None:
    assert backdate(validity) == expected


@pytest.mark.parametrize(
    ("not_after", "revoked_at", "now", "expected"),
    [
        (100.0, None, 99.0, CertificateState.VALID),
        (100.0, None, 100.0, CertificateState.EXPIRED),
        (100.0, 50.0, 60.0, CertificateState.REVOKED),
        (100.0, 50.0, 200.0, CertificateState.REVOKED),
    ],
)
def test_certificate_state(
    not_after: float, revoked_at: float | None, now: float, expected: CertificateState
) -> None:
    assert certificate_state(not_after, revoked_at, now) == expected


@pytest.mark.parametrize(
    ("covers", "now", "due"),
    [
        (True, 0.0, False),
        (True, 65.0, False),
        (True, 67.0, True),  # two thirds of 0..100
        (True, 150.0, True),  # ended
        (False, 1.0, True),  # lacks a wanted name
    ],
)
def test_server_renewal_is_due_at_two_thirds(covers: bool, now: float, due: bool) -> None:
    assert server_renewal_due(covers, 0.0, 100.0, now) is due


def test_server_certificate_rotates_when_due_and_only_then(tmp_path: Path) -> None:
    ca = ClusterCA.load_or_create(tmp_path, server_validity=dt.timedelta(minutes=3))
    first = ca.server
    assert first is not None and ca.server_generation == 1
    assert first.not_after - first.not_before == pytest.approx(180 + 18)
    assert not ca.renew_server_if_due(first.not_before + 0.6 * 198)
    assert ca.renew_server_if_due(first.not_before + 0.7 * 198)
    second = ca.server
    assert second is not None and second.serial != first.serial and ca.server_generation == 2
    assert second.key_pem != first.key_pem  # a new key, not only a new certificate
    assert (tmp_path / "server.crt").read_bytes() == second.certificate_pem
    assert (tmp_path / "server.key").stat().st_mode & 0o777 == 0o600
    # a restart loads the current one rather than issuing another
    again = ClusterCA.load_or_create(tmp_path, server_validity=dt.timedelta(minutes=3))
    assert again.server == second


def test_a_server_key_that_does_not_match_its_certificate_is_replaced(tmp_path: Path) -> None:
    first = ClusterCA.load_or_create(tmp_path).server
    assert first is not None
    # a crash between the two renames: the key of a later rotation with the older certificate
    (tmp_path / "server.key").write_bytes(
        p256().private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
    )
    reloaded = ClusterCA.load_or_create(tmp_path).server
    assert reloaded is not None and reloaded.serial != first.serial
    key = serialization.load_pem_private_key(reloaded.key_pem, password=None)
    assert key.public_key() == x509.load_pem_x509_certificate(reloaded.certificate_pem).public_key()


def test_no_certificate_outlives_the_ca(tmp_path: Path) -> None:
    ca = ClusterCA.load_or_create(tmp_path, node_validity=dt.timedelta(days=3650 * 2))
    issued = ca.sign_node_csr(csr(p256()), "pi1")
    assert certificate_not_after(issued) == certificate_not_after(ca.certificate)

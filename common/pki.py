"""The CA pin shared by `coordctl token create` and `picoord-agent join`.

Like kubeadm's --discovery-token-ca-cert-hash, the pin is the SHA-256 of the CA
certificate's DER-encoded SubjectPublicKeyInfo, so it survives re-issuing the CA
certificate with the same key.
"""

from __future__ import annotations

import datetime
import hashlib
import re
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # the running agent parses pins but never loads cryptography (~10 MiB)
    from cryptography import x509

CA_HASH_PATTERN = re.compile(r"^sha256:[0-9a-f]{64}$")


class InvalidCaHash(ValueError):
    """The text is not a `sha256:<64 hex>` pin."""


def parse_ca_hash(text: str) -> str:
    value = text.strip().lower() if isinstance(text, str) else ""
    if not CA_HASH_PATTERN.fullmatch(value):
        raise InvalidCaHash("malformed --ca-cert-hash: expected sha256: followed by 64 hex digits")
    return value


def _spki(public_key: object) -> bytes:
    from cryptography.hazmat.primitives import serialization

    return public_key.public_bytes(  # type: ignore[attr-defined]
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )


def ca_cert_hash(certificate: x509.Certificate) -> str:
    return "sha256:" + hashlib.sha256(_spki(certificate.public_key())).hexdigest()


def key_matches(private_key: object, certificate: x509.Certificate) -> bool:
    """Whether `certificate` was issued for `private_key`, compared by their encoded public
    keys: Debian 12's python3-cryptography (38) has no equality on key objects, so `!=`
    there is identity and never matches."""
    return _spki(private_key.public_key()) == _spki(certificate.public_key())  # type: ignore[attr-defined]


def certificate_not_before(certificate: x509.Certificate) -> datetime.datetime:
    """Start as an aware UTC datetime (see certificate_not_after)."""
    if hasattr(certificate, "not_valid_before_utc"):
        return certificate.not_valid_before_utc
    return certificate.not_valid_before.replace(tzinfo=datetime.UTC)


def certificate_not_after(certificate: x509.Certificate) -> datetime.datetime:
    """Expiry as an aware UTC datetime (cryptography < 42, as in Debian 12, has no *_utc)."""
    if hasattr(certificate, "not_valid_after_utc"):
        return certificate.not_valid_after_utc
    return certificate.not_valid_after.replace(tzinfo=datetime.UTC)


class InvalidCertificate(ValueError):
    """Bytes that are no PEM X.509 certificate this module can read."""


# Certificate rotation, as kubelet does: renew at about two thirds of a certificate's life,
# each agent at a slightly different point so a cluster enrolled at once does not renew at once.
RENEWAL_FRACTION = 2 / 3
RENEWAL_JITTER = 0.05


def rotation_deadline(not_before: float, not_after: float, fraction: float = RENEWAL_FRACTION) -> float:
    """When a certificate valid from `not_before` to `not_after` (Unix times) is due for renewal."""
    return not_before + (not_after - not_before) * fraction


def jittered_fraction(uniform: float) -> float:
    """RENEWAL_FRACTION moved by up to RENEWAL_JITTER; `uniform` is a random number in [0, 1)."""
    return RENEWAL_FRACTION + RENEWAL_JITTER * (2 * uniform - 1)


def _tlv(data: bytes, offset: int) -> tuple[int, int, int]:
    """One DER element at `offset`: its tag, and where its content starts and ends."""
    if offset + 2 > len(data):
        raise InvalidCertificate("truncated DER")
    tag, length = data[offset], data[offset + 1]
    offset += 2
    if length & 0x80:
        size = length & 0x7F
        if not 0 < size <= 4 or offset + size > len(data):
            raise InvalidCertificate("bad DER length")
        length = int.from_bytes(data[offset : offset + size], "big")
        offset += size
    if offset + length > len(data):
        raise InvalidCertificate("truncated DER")
    return tag, offset, offset + length


def _der_time(tag: int, text: bytes) -> float:
    formats = {0x17: "%y%m%d%H%M%SZ", 0x18: "%Y%m%d%H%M%SZ"}  # UTCTime, GeneralizedTime
    if tag not in formats:
        raise InvalidCertificate("validity is not a UTCTime or GeneralizedTime")
    try:
        parsed = datetime.datetime.strptime(text.decode("ascii"), formats[tag])
    except (UnicodeDecodeError, ValueError):
        raise InvalidCertificate(f"unreadable certificate time {text!r}") from None
    return parsed.replace(tzinfo=datetime.UTC).timestamp()


def certificate_validity(pem: bytes) -> tuple[float, float]:
    """(notBefore, notAfter) of the first certificate in `pem`, as Unix times.

    A few lines of DER reading instead of cryptography: the running agent checks its own
    certificate's end before every dial and must stay light."""
    import ssl

    text = pem.decode("ascii", "replace")
    begin = text.find("-----BEGIN CERTIFICATE-----")
    end = text.find("-----END CERTIFICATE-----", begin)
    if begin < 0 or end < 0:
        raise InvalidCertificate("no PEM certificate found")
    try:
        der = ssl.PEM_cert_to_DER_cert(text[begin : end + len("-----END CERTIFICATE-----")])
    except ValueError as error:
        raise InvalidCertificate(f"bad PEM certificate: {error}") from None
    _, start, _ = _tlv(der, 0)  # Certificate
    tag, position, _ = _tlv(der, start)  # TBSCertificate
    if tag != 0x30:
        raise InvalidCertificate("not an X.509 certificate")
    tag, _, after = _tlv(der, position)
    if tag == 0xA0:  # [0] version
        position = after
    for _ in range(3):  # serialNumber, signature, issuer
        _, _, position = _tlv(der, position)
    tag, position, _ = _tlv(der, position)  # Validity
    if tag != 0x30:
        raise InvalidCertificate("certificate validity not found")
    first_tag, first_start, first_end = _tlv(der, position)
    second_tag, second_start, second_end = _tlv(der, first_end)
    return (
        _der_time(first_tag, der[first_start:first_end]),
        _der_time(second_tag, der[second_start:second_end]),
    )

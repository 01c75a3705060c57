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


def ca_cert_hash(certificate: x509.Certificate) -> str:
    from cryptography.hazmat.primitives import serialization

    spki = certificate.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return "sha256:" + hashlib.sha256(spki).hexdigest()


def certificate_not_after(certificate: x509.Certificate) -> datetime.datetime:
    """Expiry as an aware UTC datetime (cryptography < 42, as in Debian 12, has no *_utc)."""
    if hasattr(certificate, "not_valid_after_utc"):
        return certificate.not_valid_after_utc
    return certificate.not_valid_after.replace(tzinfo=datetime.UTC)

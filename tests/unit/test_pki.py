"""The light certificate reading the agent does without cryptography, and rotation timing."""

from __future__ import annotations

import datetime as dt

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from hypothesis import given, settings
from hypothesis import strategies as st

from picoord.common.durations import InvalidDuration, format_duration, iso_utc, parse_duration
from picoord.common.pki import (
    RENEWAL_JITTER,
    InvalidCertificate,
    certificate_validity,
    jittered_fraction,
    rotation_deadline,
)

UTC = dt.UTC


def certificate(not_before: dt.datetime, not_after: dt.datetime, version_3: bool = True) -> bytes:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "pi1")])
    builder = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(not_before)
        .not_valid_after(not_after)
    )
    if version_3:
        builder = builder.add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
    return builder.sign(key, hashes.SHA256()).public_bytes(serialization.Encoding.PEM)


@pytest.mark.parametrize(
    ("not_before", "not_after"),
    [
        (dt.datetime(2026, 11, 27, 10, 0, tzinfo=UTC), dt.datetime(2027, 11, 27, 10, 0, tzinfo=UTC)),
        (dt.datetime(1999, 12, 31, 23, 59, 59, tzinfo=UTC), dt.datetime(2000, 1, 1, tzinfo=UTC)),
        # from 2050 on X.509 writes GeneralizedTime instead of UTCTime
        (dt.datetime(2049, 6, 1, tzinfo=UTC), dt.datetime(2051, 6, 1, 12, 30, 5, tzinfo=UTC)),
    ],
    ids=["utctime", "century", "generalizedtime"],
)
def test_certificate_validity_reads_what_cryptography_wrote(
    not_before: dt.datetime, not_after: dt.datetime
) -> None:
    pem = certificate(not_before, not_after)
    assert certificate_validity(pem) == (not_before.timestamp(), not_after.timestamp())
    # the first certificate of a combined file (key blocks around it are skipped)
    assert certificate_validity(b"junk\n" + pem + pem)[1] == not_after.timestamp()


@pytest.mark.parametrize(
    "pem",
    [
        b"",
        b"-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n",
        b"-----BEGIN CERTIFICATE-----\nMAMCAQA=\n-----END CERTIFICATE-----\n",
        b"-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----\n",
    ],
    ids=["empty", "truncated", "not-a-certificate", "a-key"],
)
def test_certificate_validity_refuses_what_is_no_certificate(pem: bytes) -> None:
    with pytest.raises(InvalidCertificate):
        certificate_validity(pem)


@pytest.mark.parametrize(
    ("not_before", "not_after", "fraction", "deadline"),
    [(0.0, 90.0, 2 / 3, 60.0), (100.0, 400.0, 0.5, 250.0), (0.0, 365 * 86400.0, 2 / 3, 243.33 * 86400)],
)
def test_rotation_deadline(not_before: float, not_after: float, fraction: float, deadline: float) -> None:
    assert rotation_deadline(not_before, not_after, fraction) == pytest.approx(deadline, rel=1e-4)


@pytest.mark.parametrize("uniform", [0.0, 0.25, 0.5, 0.999])
def test_jitter_stays_near_two_thirds(uniform: float) -> None:
    assert abs(jittered_fraction(uniform) - 2 / 3) <= RENEWAL_JITTER + 1e-9
    assert 0.6 < jittered_fraction(uniform) < 0.72


@pytest.mark.parametrize(
    ("text", "seconds"),
    [("90s", 90), ("2m", 120), ("24h", 86400), ("365d", 365 * 86400), ("45", 45), ("1.5h", 5400)],
)
def test_parse_duration(text: str, seconds: float) -> None:
    assert parse_duration(text) == seconds


@pytest.mark.parametrize("text", ["", "0s", "-5m", "1w", "h", "1 d", "2m30s"])
def test_parse_duration_refuses(text: str) -> None:
    with pytest.raises(InvalidDuration, match="invalid duration"):
        parse_duration(text)


@pytest.mark.parametrize(
    ("seconds", "text"), [(0, "0s"), (59, "59s"), (60, "1m"), (7199, "1h"), (86400 * 364 + 5, "364d")]
)
def test_format_duration(seconds: float, text: str) -> None:
    assert format_duration(seconds) == text


def test_iso_utc_matches_coordctl() -> None:
    from picoord.coordinator.ctl.output import iso_time

    assert iso_utc(1795860000.4) == "2026-11-28T10:00:00Z" == iso_time(1795860000.4)


CERTIFICATE_PEM = certificate(
    dt.datetime(2026, 11, 27, 10, 0, tzinfo=UTC), dt.datetime(2027, 11, 27, 10, 0, tzinfo=UTC)
)


def _pem(der: bytes) -> bytes:
    import ssl

    return ssl.DER_cert_to_PEM_cert(der).encode()


@settings(max_examples=2000, deadline=None)
@given(st.data())
def test_certificate_validity_never_fails_otherwise_on_damaged_certificates(data: st.DataObject) -> None:
    """Mutated, truncated or random DER: a clear InvalidCertificate or the right answer, never
    another exception (the agent reads this file before every dial)."""
    import ssl

    der = bytearray(ssl.PEM_cert_to_DER_cert(CERTIFICATE_PEM.decode()))
    choice = data.draw(st.sampled_from(["flip", "truncate", "random"]))
    if choice == "flip":
        for _ in range(data.draw(st.integers(1, 4))):
            der[data.draw(st.integers(0, len(der) - 1))] = data.draw(st.integers(0, 255))
    elif choice == "truncate":
        der = der[: data.draw(st.integers(0, len(der) - 1))]
    else:
        der = bytearray(data.draw(st.binary(max_size=600)))
    try:
        not_before, not_after = certificate_validity(_pem(bytes(der)))
    except InvalidCertificate:
        return
    assert isinstance(not_before, float) and isinstance(not_after, float)

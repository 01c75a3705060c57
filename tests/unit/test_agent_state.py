"""The agent's key and certificate: one file, replaced as a whole, never a mismatched pair."""

from __future__ import annotations

import datetime as dt
import random
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from picoord.agent.enroll import new_key_and_csr
from picoord.agent.session import reconnect_delay, renewal_retry_delay
from picoord.agent.state import AgentFiles, BadCredentials, Enrollment, split_pem
from picoord.common.pki import certificate_not_after
from picoord.coordinator.ca import ClusterCA, certificate_pem


@pytest.fixture(scope="module")
def ca(tmp_path_factory: pytest.TempPathFactory) -> ClusterCA:
    return ClusterCA.load_or_create(tmp_path_factory.mktemp("ca"), node_validity=dt.timedelta(hours=1))


def issue(ca: ClusterCA) -> tuple[bytes, bytes]:
    key_pem, csr_pem = new_key_and_csr("pi1")
    return key_pem, certificate_pem(ca.sign_node_csr(csr_pem, "pi1"))


def enrolled(tmp_path: Path, ca: ClusterCA) -> tuple[AgentFiles, bytes, bytes]:
    files = AgentFiles(tmp_path / "state")
    key_pem, cert_pem = issue(ca)
    files.save(Enrollment("pi1", "10.0.0.1:7443", 1.0), key_pem, cert_pem, ca.certificate_pem)
    return files, key_pem, cert_pem


def test_join_writes_one_private_file_and_it_loads(tmp_path: Path, ca: ClusterCA) -> None:
    files, key_pem, cert_pem = enrolled(tmp_path, ca)
    assert files.credentials_path.stat().st_mode & 0o777 == 0o600
    assert files.load().node_name == "pi1"
    current = files.credentials()
    assert (current.key_pem, current.certificate_pem) == (key_pem, cert_pem)
    expected = certificate_not_after(x509.load_pem_x509_certificate(cert_pem)).timestamp()
    assert current.not_after == expected
    assert sorted(p.name for p in files.state_dir.iterdir()) == ["ca.crt", "enrollment.json", "node.pem"]


def test_a_renewal_replaces_key_and_certificate_together(tmp_path: Path, ca: ClusterCA) -> None:
    files, old_key, _ = enrolled(tmp_path, ca)
    new_key, new_cert = issue(ca)
    files.save_credentials(new_key, new_cert)
    assert files.credentials().key_pem == new_key and files.credentials().certificate_pem == new_cert
    assert new_key != old_key and not files.credentials_path.with_name("node.pem.new").exists()


def test_a_certificate_for_another_key_is_refused_and_changes_nothing(tmp_path: Path, ca: ClusterCA) -> None:
    files, _, _ = enrolled(tmp_path, ca)
    before = files.credentials_path.read_bytes()
    other_key, _ = new_key_and_csr("pi1")
    _, cert_for_another_key = issue(ca)
    with pytest.raises(BadCredentials, match="not issued for the new key"):
        files.save_credentials(other_key, cert_for_another_key)
    assert files.credentials_path.read_bytes() == before
    assert not files.credentials_path.with_name("node.pem.new").exists()


def test_a_damaged_pair_is_never_used(tmp_path: Path, ca: ClusterCA) -> None:
    files, _, _ = enrolled(tmp_path, ca)
    other_key, _ = new_key_and_csr("pi1")
    _, cert_pem = split_pem(files.credentials_path.read_bytes())
    files.credentials_path.write_bytes(cert_pem + other_key)
    with pytest.raises(BadCredentials, match="does not hold a key and the certificate issued for it"):
        files.credentials()


@pytest.mark.parametrize("matching", [True, False])
def test_enrollments_from_before_node_pem_are_read_only_as_a_matching_pair(
    tmp_path: Path, ca: ClusterCA, matching: bool
) -> None:
    files, key_pem, cert_pem = enrolled(tmp_path, ca)
    files.credentials_path.unlink()
    other_key, _ = new_key_and_csr("pi1")
    files.key.write_bytes(key_pem if matching else other_key)
    files.certificate.write_bytes(cert_pem)
    assert files.load().node_name == "pi1"
    if matching:
        assert files.credentials().key_pem == key_pem
        new_key, new_cert = issue(ca)
        files.save_credentials(new_key, new_cert)  # the first renewal moves to node.pem
        assert not files.key.exists() and not files.certificate.exists()
        assert files.credentials().key_pem == new_key
    else:
        with pytest.raises(BadCredentials, match="does not belong to"):
            files.credentials()


def test_split_pem_takes_the_key_and_the_certificate(ca: ClusterCA) -> None:
    key_pem, cert_pem = issue(ca)
    assert split_pem(cert_pem + key_pem) == (key_pem, cert_pem)
    assert split_pem(key_pem + cert_pem + cert_pem) == (key_pem, cert_pem)
    assert split_pem(b"nothing") == (b"", b"")
    serialization.load_pem_private_key(split_pem(cert_pem + key_pem)[0], password=None)


@pytest.mark.parametrize(
    ("remaining", "delay"), [(-10.0, 5.0), (20.0, 5.0), (600.0, 60.0), (121 * 86400.0, 3600.0)]
)
def test_renewal_retry_delay(remaining: float, delay: float) -> None:
    assert renewal_retry_delay(remaining) == delay


@pytest.mark.parametrize(
    ("attempt", "draw", "delay"),
    [
        (1, 0.0, 0.5),  # at least half the ceiling: no agent races ahead to long ceilings
        (1, 1.0, 1.0),
        (2, 0.5, 1.5),
        (4, 0.0, 4.0),
        (4, 1.0, 8.0),
        (5, 1.0, 16.0),
        (6, 1.0, 30.0),  # capped at the maximum
        (6, 0.0, 15.0),
        (60, 0.5, 22.5),  # no overflow however long the coordinator stays away
        (5000, 1.0, 30.0),  # a day of attempts: 2.0 ** 4999 would overflow a float
    ],
)
def test_reconnect_delay_is_drawn_over_the_upper_half_of_the_ceiling(
    attempt: int, draw: float, delay: float
) -> None:
    assert reconnect_delay(attempt, 1.0, 30.0, draw=lambda: draw) == pytest.approx(delay)


def test_reconnect_delays_spread_a_cluster_s_redials_instead_of_waves() -> None:
    """5,000 agents that lost their sessions together: their fourth redials (ceiling 8 s)
    spread evenly over 4 to 8 s, not in one second-wide wave."""
    draws = random.Random(7)
    waits = [reconnect_delay(4, 1.0, 30.0, draw=draws.random) for _ in range(5000)]
    per_second = [sum(1 for wait in waits if second <= wait < second + 1) for second in range(4, 8)]
    assert min(waits) >= 4.0 and max(waits) <= 8.0
    assert min(per_second) > 1000 and max(per_second) < 1500, per_second

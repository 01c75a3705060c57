"""What `picoord-agent join` leaves in the agent's state dir for `picoord-agent run`.

The node's key and certificate live together in one file, node.pem (0600 from its first
byte), as kubelet keeps kubelet-client-current.pem: a renewal replaces both with one
rename, so a full or read-only disk, or a crash, leaves the old pair or the new one, never
a key of one with the certificate of the other. The enrollment is recorded last, so a
join that fails half-way leaves no enrollment that `run` would try to use.

Enrollments made before node.pem existed have node.key and node.crt; they are still read
(only when they belong together) until the first renewal writes node.pem.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import ssl
from dataclasses import asdict, dataclass
from pathlib import Path

from picoord.common.files import sync_directory, write_atomically
from picoord.common.pki import InvalidCertificate, certificate_validity

ENROLLMENT_FILE = "enrollment.json"
# Written by the firewall guard and the workload supervisor; named here so that `run` can
# tell whether it needs those modules at all before it imports them.
FIREWALL_REVERT_FILE = "firewall-revert.json"
ASSIGNMENT_FILE = "assignment.pb"
_PEM_BLOCK = re.compile(rb"-----BEGIN ([A-Z ]+)-----\r?\n.*?-----END \1-----\r?\n?", re.DOTALL)


class NotEnrolled(RuntimeError):
    pass


class BadCredentials(ValueError):
    """The stored key and certificate are unusable (missing, damaged or not a pair)."""


@dataclass(frozen=True)
class Enrollment:
    node_name: str
    coordinator: str  # HOST:PORT of the mutual-TLS session endpoint
    enrolled_at: float


@dataclass(frozen=True)
class NodeCredentials:
    """A key and the certificate issued for it, read from one consistent source."""

    key_pem: bytes
    certificate_pem: bytes
    not_before: float
    not_after: float


def split_pem(data: bytes) -> tuple[bytes, bytes]:
    """(private key, certificate) PEM blocks of a combined file; empty when absent."""
    key, certificate = b"", b""
    for match in _PEM_BLOCK.finditer(data):
        kind = match.group(1)
        if kind.endswith(b"PRIVATE KEY") and not key:
            key = match.group(0)
        elif kind == b"CERTIFICATE" and not certificate:
            certificate = match.group(0)
    return key, certificate


def _pair_matches(certificate_file: str, key_file: str | None = None) -> bool:
    """OpenSSL's own check that the key belongs to the certificate (no cryptography import)."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    try:
        context.load_cert_chain(certificate_file, key_file)
    except (ssl.SSLError, OSError):
        return False
    return True


def _credentials(key_pem: bytes, certificate_pem: bytes) -> NodeCredentials:
    try:
        not_before, not_after = certificate_validity(certificate_pem)
    except InvalidCertificate as error:
        raise BadCredentials(f"unreadable certificate: {error}") from None
    return NodeCredentials(key_pem, certificate_pem, not_before, not_after)


@dataclass(frozen=True)
class AgentFiles:
    state_dir: Path

    @property
    def credentials_path(self) -> Path:
        return self.state_dir / "node.pem"

    @property
    def key(self) -> Path:  # before node.pem: read, never written
        return self.state_dir / "node.key"

    @property
    def certificate(self) -> Path:  # before node.pem: read, never written
        return self.state_dir / "node.crt"

    @property
    def ca(self) -> Path:
        return self.state_dir / "ca.crt"

    @property
    def enrollment_path(self) -> Path:
        return self.state_dir / ENROLLMENT_FILE

    def load(self) -> Enrollment:
        """The enrollment `join` recorded; NotEnrolled, saying which command fixes it, when
        there is none (never joined) or when part of it is gone (deleted, or a lost disk)."""
        credentials = [self.credentials_path] if self.credentials_path.exists() else []
        if not credentials and self.key.exists() and self.certificate.exists():
            credentials = [self.key, self.certificate]
        missing = [
            path.name
            for path, present in (
                (self.enrollment_path, self.enrollment_path.exists()),
                (self.ca, self.ca.exists()),
                (self.credentials_path, bool(credentials)),
            )
            if not present
        ]
        if len(missing) == 3:
            raise NotEnrolled(
                f"not joined (nothing in {self.state_dir}): run `picoord-agent join HOST:7443 --token ... "
                "--ca-cert-hash sha256:...`, the command `coordctl token create` prints on the coordinator "
                "(or put the file `coordctl token create --first-boot` prints on the boot partition)"
            )
        rejoin = (
            "remove the node on the coordinator (`coordctl node remove NAME`), then run the "
            "`picoord-agent join ...` command `coordctl token create` prints, with --force"
        )
        if missing:
            raise NotEnrolled(
                f"the enrollment in {self.state_dir} is incomplete ({', '.join(missing)} missing): "
                f"restore it from a backup, or {rejoin}"
            )
        try:
            return Enrollment(**json.loads(self.enrollment_path.read_text()))
        except (ValueError, TypeError) as error:
            raise NotEnrolled(f"{self.enrollment_path} is damaged ({error}): {rejoin}") from None

    def credentials(self) -> NodeCredentials:
        """The current key and certificate; never a key that does not match its certificate."""
        try:
            fd = os.open(self.credentials_path, os.O_RDONLY | os.O_NOFOLLOW)
        except FileNotFoundError:
            return self._legacy_credentials()
        with os.fdopen(fd, "rb") as handle:
            data = handle.read()
            # The same open file is checked as was read: a rename in between cannot mix two pairs.
            matches = _pair_matches(f"/proc/self/fd/{handle.fileno()}")
        key_pem, certificate_pem = split_pem(data)
        if not (key_pem and certificate_pem and matches):
            raise BadCredentials(
                f"{self.credentials_path} does not hold a key and the certificate issued for it: join again"
            )
        return _credentials(key_pem, certificate_pem)

    def _legacy_credentials(self) -> NodeCredentials:
        try:
            key_pem, certificate_pem = self.key.read_bytes(), self.certificate.read_bytes()
        except FileNotFoundError as error:
            raise BadCredentials(f"no key and certificate in {self.state_dir}: {error}") from None
        if not _pair_matches(str(self.certificate), str(self.key)):
            raise BadCredentials(f"{self.key} does not belong to {self.certificate}: join again")
        return _credentials(key_pem, certificate_pem)

    def save_credentials(self, key_pem: bytes, certificate_pem: bytes) -> NodeCredentials:
        """Replace the key and certificate as one: checked in a staging file, then renamed.

        On any error (a full or read-only disk, a certificate that is not for this key) the
        current pair stays in place and the error is raised."""
        staging = self.credentials_path.with_name("node.pem.new")
        try:
            write_atomically(staging, certificate_pem.strip() + b"\n" + key_pem.strip() + b"\n", 0o600)
            if not _pair_matches(str(staging)):
                raise BadCredentials("the new certificate was not issued for the new key")
            credentials = _credentials(*split_pem(staging.read_bytes()))
            os.replace(staging, self.credentials_path)
            sync_directory(self.state_dir)
        finally:
            with contextlib.suppress(OSError):
                staging.unlink()
        for legacy in (self.key, self.certificate):  # superseded; a failure here changes nothing
            with contextlib.suppress(OSError):
                legacy.unlink()
        return credentials

    def save(self, enrollment: Enrollment, key_pem: bytes, certificate_pem: bytes, ca_pem: bytes) -> None:
        self.state_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        self.save_credentials(key_pem, certificate_pem)
        write_atomically(self.ca, ca_pem, 0o644)
        write_atomically(self.enrollment_path, json.dumps(asdict(enrollment), indent=2).encode(), 0o644)

"""Admin bundles and coordctl contexts: how an operator's other machine reaches the coordinator.

A bundle is what `coordctl admin issue NAME` prints: one YAML document with an admin
certificate, its private key, the cluster CA, the address to dial and the name to verify.
`coordctl context add` checks it and stores it as a context under ~/.config/picoord
(or $XDG_CONFIG_HOME/picoord): 0600 files in 0700 directories, like ssh keeps its keys;
a context file others could read is refused, never used. Checks are pure functions over
bytes and modes; the few functions at the end touch the disk.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from picoord.common.addresses import InvalidAddress, split_host_port
from picoord.common.durations import iso_utc
from picoord.common.files import mode_refusal, write_atomically
from picoord.common.names import InvalidName, validate_node_name
from picoord.common.pki import ca_cert_hash, certificate_not_after, key_matches
from picoord.coordinator.ca import ADMIN_ORGANIZATION, ADMIN_PREFIX, certificate_serial

BUNDLE_KIND = "picoord-admin-bundle"
BUNDLE_VERSION = 1
MAX_BUNDLE_BYTES = 64 * 1024
CURRENT_FILE = "current-context"
PEM_FIELDS = ("certificate", "key", "ca_certificate")


class BundleError(ValueError):
    """A bundle or context file that cannot be used; the message names it and the fix."""


@dataclass(frozen=True)
class Bundle:
    name: str  # the admin's name: the certificate is admin:NAME
    address: str
    server_name: str
    certificate_pem: bytes
    key_pem: bytes
    ca_certificate_pem: bytes
    serial: str
    not_after: float

    @property
    def ca_hash(self) -> str:
        return ca_cert_hash(x509.load_pem_x509_certificate(self.ca_certificate_pem))


def render_bundle(bundle: Bundle) -> str:
    """The bundle as one YAML document (what `coordctl admin issue` prints)."""
    document = {
        "kind": BUNDLE_KIND,
        "version": BUNDLE_VERSION,
        "name": bundle.name,
        "address": bundle.address,
        "server_name": bundle.server_name,
        "serial": bundle.serial,
        "not_after": iso_utc(bundle.not_after),
        "certificate": bundle.certificate_pem.decode(),
        "key": bundle.key_pem.decode(),
        "ca_certificate": bundle.ca_certificate_pem.decode(),
    }
    return "# picoord admin bundle: it holds a private key; keep it mode 0600\n" + yaml.safe_dump(
        document, sort_keys=False
    )


def _field(document: Mapping[str, Any], name: str, where: str) -> str:
    value = document.get(name)
    if not isinstance(value, str) or not value.strip():
        raise BundleError(f"{where}: field {name!r} is missing or not text")
    return value


def _is_signed_by(certificate: x509.Certificate, ca: x509.Certificate) -> bool:
    """Whether `ca` issued `certificate` (name and ECDSA signature; works on old cryptography)."""
    if certificate.issuer != ca.subject:
        return False
    public_key = ca.public_key()
    hash_algorithm = certificate.signature_hash_algorithm
    if not isinstance(public_key, ec.EllipticCurvePublicKey) or hash_algorithm is None:
        return False
    try:
        public_key.verify(certificate.signature, certificate.tbs_certificate_bytes, ec.ECDSA(hash_algorithm))
    except InvalidSignature:
        return False
    return True


def parse_bundle(data: bytes, where: str) -> Bundle:
    """Check a bundle's text and return it; BundleError names `where` and what is wrong.

    Checked: one mapping of the right kind, every field, PEM that parses, a key that
    belongs to the certificate, an admin certificate, signed by the bundle's CA."""
    if len(data) > MAX_BUNDLE_BYTES:
        raise BundleError(f"{where}: larger than {MAX_BUNDLE_BYTES} bytes, not an admin bundle")
    try:
        document = yaml.safe_load(data.decode("utf-8"))
    except (UnicodeDecodeError, yaml.YAMLError) as error:
        raise BundleError(f"{where}: not a readable YAML document ({type(error).__name__})") from None
    if not isinstance(document, dict) or document.get("kind") != BUNDLE_KIND:
        raise BundleError(f"{where}: not a picoord admin bundle (kind must be {BUNDLE_KIND!r})")
    if document.get("version") != BUNDLE_VERSION:
        raise BundleError(f"{where}: bundle version {document.get('version')!r} is not {BUNDLE_VERSION}")
    name, address, server_name = (_field(document, key, where) for key in ("name", "address", "server_name"))
    try:
        validate_node_name(name)
        split_host_port(address, "address")
    except (InvalidName, InvalidAddress) as error:
        raise BundleError(f"{where}: {error}") from None
    pems = {key: _field(document, key, where).encode() for key in PEM_FIELDS}
    try:
        certificate = x509.load_pem_x509_certificate(pems["certificate"])
    except ValueError:
        raise BundleError(f"{where}: field 'certificate' is not a PEM certificate") from None
    try:
        ca = x509.load_pem_x509_certificate(pems["ca_certificate"])
    except ValueError:
        raise BundleError(f"{where}: field 'ca_certificate' is not a PEM certificate") from None
    try:
        key = serialization.load_pem_private_key(pems["key"], password=None)
    except (ValueError, TypeError):
        raise BundleError(f"{where}: field 'key' is not an unencrypted PEM private key") from None
    if not key_matches(key, certificate):
        raise BundleError(f"{where}: the key does not belong to the certificate")
    organizations = [a.value for a in certificate.subject.get_attributes_for_oid(NameOID.ORGANIZATION_NAME)]
    common_names = [a.value for a in certificate.subject.get_attributes_for_oid(NameOID.COMMON_NAME)]
    if ADMIN_ORGANIZATION not in organizations or common_names != [f"{ADMIN_PREFIX}{name}"]:
        raise BundleError(f"{where}: the certificate is not the admin certificate of {name!r}")
    if not _is_signed_by(certificate, ca):
        raise BundleError(f"{where}: the certificate is not signed by the bundle's CA certificate")
    return Bundle(
        name=name,
        address=address,
        server_name=server_name,
        certificate_pem=pems["certificate"],
        key_pem=pems["key"],
        ca_certificate_pem=pems["ca_certificate"],
        serial=certificate_serial(certificate),
        not_after=certificate_not_after(certificate).timestamp(),
    )


def expiry_refusal(bundle: Bundle, context: str, now: float) -> str | None:
    """Why a context's certificate can no longer be used (the coordinator's TLS handshake
    would refuse it without saying why), or None."""
    if now < bundle.not_after:
        return None
    return (
        f"context {context!r}: the admin certificate of {bundle.name!r} (serial {bundle.serial}) expired at "
        f"{iso_utc(bundle.not_after)}: on the coordinator's host run "
        f"`coordctl admin issue {bundle.name} > {bundle.name}.bundle`, then here "
        f"`coordctl context add {context} --bundle {bundle.name}.bundle --force`"
    )


def foreign_server_message(context: str, bundle: Bundle, server_certificate_der: bytes) -> str | None:
    """When the coordinator at the bundle's address is of another cluster (its certificate
    is not signed by the bundle's CA), the message saying so; None when it is this cluster's."""
    certificate = x509.load_der_x509_certificate(server_certificate_der)
    if _is_signed_by(certificate, x509.load_pem_x509_certificate(bundle.ca_certificate_pem)):
        return None
    return (
        f"context {context!r}: the coordinator at {bundle.address} is not of this bundle's cluster "
        f"(its certificate is not signed by the bundle's CA {bundle.ca_hash}): the bundle was issued by "
        f"another coordinator. Issue one on this coordinator's host (`coordctl admin issue NAME`) and "
        f"add it with `coordctl context add {context} --bundle FILE --force`"
    )


# ---------------------------------------------------------------- on disk


def config_directory(environ: Mapping[str, str]) -> Path:
    """$XDG_CONFIG_HOME/picoord, else ~/.config/picoord."""
    base = environ.get("XDG_CONFIG_HOME") or str(Path(environ.get("HOME") or Path.home()) / ".config")
    return Path(base) / "picoord"


@dataclass(frozen=True)
class ContextStore:
    """Contexts on disk: DIRECTORY/contexts/NAME.yaml (a bundle) and DIRECTORY/current-context."""

    directory: Path

    @property
    def contexts_directory(self) -> Path:
        return self.directory / "contexts"

    def path(self, name: str) -> Path:
        return self.contexts_directory / f"{name}.yaml"

    def _check(self, path: Path, directory: bool) -> None:
        info = path.stat()
        refusal = mode_refusal(path, info.st_mode, info.st_uid, os.geteuid(), directory)
        if refusal is not None:
            raise BundleError(refusal)

    def _make_directories(self) -> None:
        for directory in (self.directory, self.contexts_directory):
            directory.mkdir(mode=0o700, parents=True, exist_ok=True)
            self._check(directory, directory=True)

    def add(self, name: str, bundle_text: bytes, source: str, force: bool) -> Bundle:
        """Check the bundle and store it as context `name`; an existing one only with force."""
        validate_context_name(name)
        bundle = parse_bundle(bundle_text, source)
        self._make_directories()
        target = self.path(name)
        if target.exists() and not force:
            raise BundleError(
                f"context {name!r} already exists ({target}): choose another name, "
                "or pass --force to replace it"
            )
        write_atomically(target, bundle_text, 0o600)
        return bundle

    def names(self) -> list[str]:
        if not self.contexts_directory.is_dir():
            return []
        return sorted(path.stem for path in self.contexts_directory.glob("*.yaml"))

    def load(self, name: str) -> Bundle:
        """The context's bundle, after checking the modes of its file and directories."""
        validate_context_name(name)
        target = self.path(name)
        if not target.exists():
            known = ", ".join(self.names()) or "none"
            raise BundleError(
                f"no context {name!r} in {self.contexts_directory} (known: {known}): "
                f"add it with `coordctl context add {name} --bundle FILE`"
            )
        for directory in (self.directory, self.contexts_directory):
            self._check(directory, directory=True)
        self._check(target, directory=False)
        try:
            return parse_bundle(target.read_bytes(), f"context {name!r} ({target})")
        except BundleError as error:
            raise BundleError(
                f"{error}: add it again with `coordctl context add {name} --bundle FILE --force`"
            ) from None

    def use(self, name: str) -> Bundle:
        bundle = self.load(name)
        write_atomically(self.directory / CURRENT_FILE, f"{name}\n".encode(), 0o600)
        return bundle

    def current(self) -> str | None:
        """The context every verb uses unless told otherwise; None when none was chosen."""
        path = self.directory / CURRENT_FILE
        with contextlib.suppress(FileNotFoundError):
            text = path.read_text().strip()
            if text:
                return text
        return None


def validate_context_name(name: str) -> str:
    try:
        return validate_node_name(name)
    except InvalidName:
        raise BundleError(
            f"invalid context name {name!r}: use a DNS label (lowercase letters, digits and '-')"
        ) from None


def bundle_from_issue(reply: Any) -> Bundle:
    """The bundle of an IssueAdmin reply (picoord.v1.IssueAdminResponse)."""
    return Bundle(
        name=reply.name,
        address=reply.address,
        server_name=reply.server_name,
        certificate_pem=reply.certificate_pem,
        key_pem=reply.key_pem,
        ca_certificate_pem=reply.ca_certificate_pem,
        serial=reply.serial,
        not_after=reply.not_after,
    )

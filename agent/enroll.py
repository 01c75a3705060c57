"""`picoord-agent join`: pin the coordinator's CA by hash, prove the token, get a certificate.

Like kubeadm's discovery, nothing from the coordinator is trusted until the CA it presents
matches the --ca-cert-hash the operator copied from `coordctl token create`. Only then is
the token sent, over TLS verified against that CA.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import grpc
from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from picoord.agent.channel import channel_options
from picoord.agent.clock import JOIN_AGAIN, certificate_der, clock_message, presented_certificates
from picoord.agent.errors import JoinError
from picoord.agent.state import AgentFiles, BadCredentials, Enrollment
from picoord.common.addresses import InvalidAddress, join_host_port, split_host_port
from picoord.common.pki import ca_cert_hash, certificate_not_after, certificate_not_before
from picoord.common.tokens import BootstrapToken
from picoord.v1 import agent_pb2, agent_pb2_grpc

CONNECT_TIMEOUT = 10.0
ENROLL_TIMEOUT = 30.0


@dataclass(frozen=True)
class Endpoint:
    host: str
    port: int

    def __str__(self) -> str:
        return join_host_port(self.host, self.port)

    @classmethod
    def parse(cls, text: str) -> Endpoint:
        try:
            host, port = split_host_port(text, "coordinator address")
        except InvalidAddress as error:
            raise JoinError(str(error)) from None
        if port == 0:
            raise JoinError(f"invalid coordinator address {text!r}: port 0")
        return cls(host, port)


def fetch_pinned_ca(endpoint: Endpoint, ca_hash: str, timeout: float = CONNECT_TIMEOUT) -> bytes:
    """Return the CA certificate (PEM) the coordinator presents, if and only if it matches the pin."""
    try:  # nothing is trusted yet: the pin decides below
        chain = [
            x509.load_der_x509_certificate(certificate_der(certificate))
            for certificate in presented_certificates(endpoint.host, endpoint.port, timeout)
        ]
    except OSError as error:
        raise JoinError(
            f"cannot reach the coordinator's enrollment endpoint {endpoint}: {error}", transient=True
        ) from None
    if not chain:
        raise JoinError(f"{endpoint} presented no certificate")
    leaf, seen = chain[0], []
    for candidate in chain[1:]:
        digest = ca_cert_hash(candidate)
        seen.append(digest)
        if digest == ca_hash and _is_issuer_of(candidate, leaf):
            _check_clock(leaf, candidate)
            return candidate.public_bytes(serialization.Encoding.PEM)
    raise JoinError(
        f"CA certificate hash mismatch: expected {ca_hash}, the coordinator at {endpoint} presented "
        f"{', '.join(seen) or 'no CA'}. Refusing to send the token. Check --ca-cert-hash and the address."
    )


def _check_clock(*chain: x509.Certificate) -> None:
    """Before the token is sent: a clock outside the pinned chain's window would only fail the
    TLS handshake with "certificate is not yet valid"; name the clock instead."""
    not_before = max(certificate_not_before(certificate).timestamp() for certificate in chain)
    not_after = min(certificate_not_after(certificate).timestamp() for certificate in chain)
    message = clock_message(time.time(), not_before, not_after, JOIN_AGAIN)
    if message is not None:  # NTP sets it, usually within a minute of boot
        raise JoinError(message, transient=True)


def _is_issuer_of(ca: x509.Certificate, leaf: x509.Certificate) -> bool:
    try:
        constraints = ca.extensions.get_extension_for_class(x509.BasicConstraints).value
    except x509.ExtensionNotFound:
        return False
    public_key = ca.public_key()
    if not constraints.ca or not isinstance(public_key, ec.EllipticCurvePublicKey):
        return False
    assert leaf.signature_hash_algorithm is not None
    try:
        public_key.verify(leaf.signature, leaf.tbs_certificate_bytes, ec.ECDSA(leaf.signature_hash_algorithm))
    except InvalidSignature:
        return False
    return leaf.issuer == ca.subject


def new_key_and_csr(node_name: str) -> tuple[bytes, bytes]:
    key = ec.generate_private_key(ec.SECP256R1())
    csr = (
        x509.CertificateSigningRequestBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, node_name)]))
        .sign(key, hashes.SHA256())
    )
    key_pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    return key_pem, csr.public_bytes(serialization.Encoding.PEM)


# Answers that may change by themselves: the coordinator restarting or busy, the source
# address throttled after failures (rate_limit.py). Anything else is a refusal.
TRANSIENT_CODES = frozenset(
    {grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.RESOURCE_EXHAUSTED}
)
_REFUSALS = {
    grpc.StatusCode.UNAUTHENTICATED: "the coordinator refused the token",
    grpc.StatusCode.ALREADY_EXISTS: "the coordinator refused the node name",
    grpc.StatusCode.INVALID_ARGUMENT: "the coordinator rejected the request",
}


def join(
    files: AgentFiles,
    coordinator: Endpoint,
    enroll_endpoint: Endpoint,
    token: BootstrapToken,
    ca_hash: str,
    node_name: str,
    labels: dict[str, str],
) -> Enrollment:
    ca_pem = fetch_pinned_ca(enroll_endpoint, ca_hash)
    key_pem, csr_pem = new_key_and_csr(node_name)
    credentials = grpc.ssl_channel_credentials(root_certificates=ca_pem)
    with grpc.secure_channel(str(enroll_endpoint), credentials, options=channel_options()) as channel:
        try:
            reply = agent_pb2_grpc.EnrollmentStub(channel).Enroll(
                agent_pb2.EnrollRequest(
                    token=str(token), node_name=node_name, csr_pem=csr_pem, labels=labels
                ),
                timeout=ENROLL_TIMEOUT,
            )
        except grpc.RpcError as error:
            what = _REFUSALS.get(error.code(), f"enrollment failed ({error.code().name.lower()})")
            raise JoinError(f"{what}: {error.details()}", transient=error.code() in TRANSIENT_CODES) from None
    if reply.ca_certificate_pem.strip() != ca_pem.strip() or reply.node_name != node_name:
        raise JoinError("the coordinator's reply does not match the pinned CA or the requested name")
    enrollment = Enrollment(node_name=node_name, coordinator=str(coordinator), enrolled_at=time.time())
    try:
        files.save(enrollment, key_pem, reply.certificate_pem, ca_pem)
    except BadCredentials as error:
        raise JoinError(f"the coordinator's certificate is unusable: {error}") from None
    return enrollment

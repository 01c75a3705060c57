"""Checks of the cluster registry's actions (serving it, trusting it), one per message.

Run by the coordinator's planner on what it builds from a `Registry` document and by the
agent before its executor writes anything. The addresses become directory names under
/etc/docker/certs.d, so each must be a plain HOST:PORT.
"""

from __future__ import annotations

from picoord.common import limits
from picoord.common.validation import FieldError, absolute_path, host_port, port
from picoord.v1 import actions_pb2

MAX_PEM = limits.REGISTRY_PEM
MAX_ADDRESSES = limits.REGISTRY_ADDRESSES
CERTIFICATE = "-----BEGIN CERTIFICATE-----"


def pem(field: str, value: str, begins: str) -> str:
    """PEM text that starts as it should, bounded, with no NUL byte."""
    if not value:
        raise FieldError(field, "is required")
    if len(value) > MAX_PEM:
        raise FieldError(field, f"is longer than {MAX_PEM} characters")
    if "\x00" in value or not value.lstrip().startswith(begins):
        raise FieldError(field, f"is not PEM text starting with {begins}")
    return value


def addresses(field: str, values: list[str] | tuple[str, ...]) -> list[str]:
    """One to MAX_ADDRESSES HOST:PORT names, normalised, none twice."""
    if not values:
        raise FieldError(field, "names no address")
    if len(values) > MAX_ADDRESSES:
        raise FieldError(field, f"has more than {MAX_ADDRESSES} entries")
    normalised = [host_port(f"{field}[{i}]", value) for i, value in enumerate(values)]
    if len(set(normalised)) != len(normalised):
        raise FieldError(field, "names one twice")
    return normalised


def check_registry_server(request: actions_pb2.RegistryServer) -> None:
    port("registry_server.port", request.port)
    absolute_path("registry_server.storage", request.storage)
    pem("registry_server.certificate_pem", request.certificate_pem, CERTIFICATE)
    pem("registry_server.key_pem", request.key_pem, "-----BEGIN ")


def check_registry_trust(request: actions_pb2.RegistryTrust) -> None:
    addresses("registry_trust.addresses", list(request.addresses))
    pem("registry_trust.ca_pem", request.ca_pem, CERTIFICATE)

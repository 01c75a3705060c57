"""The coordinator's one question to a cluster registry: which digest does this tag name now?

The thin shell around common/images.py: one HEAD (a GET when the registry leaves out
Docker-Content-Digest) on /v2/NAME/manifests/TAG over TLS verified with the cluster CA,
since the cluster registry's certificate is issued by it. Blocking: callers run it in a
thread, off the event loop.
"""

from __future__ import annotations

import http.client
import ssl
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from picoord.common.images import (
    ACCEPT_HEADER,
    ManifestError,
    manifest_digest,
    manifest_url,
    needs_resolving,
    parse_image,
)

RESOLVE_TIMEOUT = 10.0
MAX_MANIFEST = 4 * 1024 * 1024  # a manifest list of many platforms is still a few KiB


class RegistryUnreachable(ManifestError):
    """The registry did not answer (down, refused, TLS not verified by the cluster CA)."""


def _ask(host: str, port: int, path: str, method: str, context: ssl.SSLContext, timeout: float):
    connection = http.client.HTTPSConnection(host, port, context=context, timeout=timeout)
    try:
        connection.request(method, path, headers={"Accept": ACCEPT_HEADER})
        reply = connection.getresponse()
        body = reply.read(MAX_MANIFEST + 1) if method == "GET" else None
        if body is not None and len(body) > MAX_MANIFEST:
            raise ManifestError(f"the manifest at {path} is larger than {MAX_MANIFEST} bytes")
        return reply.status, dict(reply.getheaders()), body
    finally:
        connection.close()


def resolve_digest(image: str, ca_pem: str, timeout: float = RESOLVE_TIMEOUT) -> str:
    """sha256:... that `image`'s tag names on its registry now; ManifestError (or
    RegistryUnreachable) saying why not."""
    name = parse_image(image)
    host, _, port_text = name.registry.rpartition(":")
    if not host or not port_text.isdigit():
        host, port_text = name.registry, "443"
    host = host.strip("[]")
    context = ssl.create_default_context(cadata=ca_pem)
    path = manifest_url(name)
    what = f"{image} ({name.registry})"
    try:
        for method in ("HEAD", "GET"):
            status, headers, body = _ask(host, int(port_text), path, method, context, timeout)
            digest = manifest_digest(status, headers, body, what)
            if digest:
                return digest
    except (OSError, http.client.HTTPException, ssl.SSLError) as error:
        raise RegistryUnreachable(f"{what}: the registry did not answer over verified TLS: {error}") from None
    raise ManifestError(f"{what}: the registry named no digest")


@dataclass
class ImagePinner:
    """What a rollout asks: the digest to pin for an image, or "" when it comes from a
    registry that is not the cluster's (it then runs by tag). `registries` reads the
    cluster registries' HOST:PORT names as applied (the store); `resolve` is the HTTP call."""

    registries: Callable[[], Iterable[str]]
    ca_pem: str
    resolve: Callable[[str, str], str] = resolve_digest

    def digest_for(self, image: str) -> str:
        if not needs_resolving(image, self.registries()):
            return ""
        return self.resolve(image, self.ca_pem)

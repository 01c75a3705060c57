"""Image references and registry manifests, as plain data: what digest pinning decides.

At rollout the coordinator asks the image's registry once which manifest its tag names
(registry v2 API: HEAD /v2/NAME/manifests/TAG) and every replica then runs NAME@DIGEST,
as Swarm does: a re-pushed `:latest` is a new digest, a new revision, and every node runs
the same bytes. The HTTP call is coordinator/registry_client.py; what to ask, what the
answer means, and how a pinned reference reads are here, table-tested.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from picoord.common.validation import FieldError, image_reference

DOCKER_HUB = "docker.io"
DIGEST = re.compile(r"^sha256:[a-f0-9]{64}$")

# What a manifest request accepts, most wanted first: a multi-arch list (each node's
# dockerd then takes its own architecture's manifest from the pinned list), then a
# single-architecture manifest. Docker's own media types and their OCI equivalents.
MANIFEST_LIST = "application/vnd.docker.distribution.manifest.list.v2+json"
OCI_INDEX = "application/vnd.oci.image.index.v1+json"
MANIFEST_V2 = "application/vnd.docker.distribution.manifest.v2+json"
OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
ACCEPTED_MANIFESTS = (MANIFEST_LIST, OCI_INDEX, MANIFEST_V2, OCI_MANIFEST)
ACCEPT_HEADER = ", ".join(ACCEPTED_MANIFESTS)


class ManifestError(ValueError):
    """The registry's answer names no manifest this cluster can pin."""


@dataclass(frozen=True)
class ImageName:
    """A parsed reference: `registry` is Docker Hub's name when the reference has none."""

    registry: str
    repository: str  # the path inside the registry, e.g. "mcp" or "library/postgres"
    tag: str  # "latest" when none was written and no digest either
    digest: str = ""

    @property
    def name(self) -> str:
        """The reference without tag or digest, as it was written (no docker.io added)."""
        return self.repository if self.registry == DOCKER_HUB else f"{self.registry}/{self.repository}"

    def pinned(self, digest: str) -> str:
        """NAME@DIGEST: what a replica runs once the tag was resolved (the tag is dropped,
        as Docker ignores it beside a digest)."""
        if not DIGEST.fullmatch(digest):
            raise FieldError("image_digest", f"{digest!r} is not sha256:<64 hex digits>")
        return f"{self.name}@{digest}"


def registry_of(image: str) -> str:
    """The registry an image reference pulls from (Docker's rule: a first component with a
    dot or a port, or `localhost`, names a registry; anything else is Docker Hub)."""
    first, slash, _ = image.partition("/")
    if slash and ("." in first or ":" in first or first == "localhost" or first.startswith("[")):
        return first
    return DOCKER_HUB


def parse_image(image: str, field: str = "image") -> ImageName:
    """A validated reference split into its parts; FieldError naming `field` otherwise."""
    full = image_reference(field, image)  # adds :latest when neither tag nor digest is given
    registry = registry_of(full)
    rest = full[len(registry) + 1 :] if registry != DOCKER_HUB else full
    rest, _, digest = rest.partition("@")
    repository, tag = rest, ""
    last_slash = rest.rfind("/")
    colon = rest.rfind(":")
    if colon > last_slash:
        repository, tag = rest[:colon], rest[colon + 1 :]
    if registry == DOCKER_HUB and "/" not in repository:
        repository = f"library/{repository}"  # Docker Hub's official images
    return ImageName(registry=registry, repository=repository, tag=tag, digest=digest)


def pinned_reference(image: str, digest: str) -> str:
    """What a replica runs: `image` itself without a digest, NAME@DIGEST with one."""
    if not digest:
        return image
    return parse_image(image).pinned(digest)


def needs_resolving(image: str, registries: Iterable[str]) -> bool:
    """Whether the coordinator pins this image: it comes from one of the cluster's own
    registries (their HOST:PORT names) and was not already written with a digest.
    Images from elsewhere run by tag, as before (docs/images.md says why)."""
    name = parse_image(image)
    return not name.digest and name.registry in set(registries)


def manifest_url(name: ImageName) -> str:
    """The registry v2 path of the manifest `name` refers to (its digest, else its tag)."""
    return f"/v2/{name.repository}/manifests/{name.digest or name.tag}"


def _header(headers: Mapping[str, str], wanted: str) -> str:
    for key, value in headers.items():
        if key.lower() == wanted.lower():
            return value
    return ""


def manifest_digest(status: int, headers: Mapping[str, str], body: bytes | None, what: str) -> str:
    """The digest to pin, from the registry's answer to a manifest request for `what`.

    The registry's Docker-Content-Digest is taken when it names a sha256 digest; without it
    (a GET's body is there) the digest is the body's sha256, which is how the registry names
    manifests. A type that is not a list or a v2/OCI manifest (schema 1) cannot be pinned."""
    if status == 404:
        raise ManifestError(f"{what}: the registry has no such image (HTTP 404)")
    if status in (401, 403):
        raise ManifestError(f"{what}: the registry refused the request (HTTP {status})")
    if status != 200:
        raise ManifestError(f"{what}: the registry answered HTTP {status}")
    media_type = _header(headers, "Content-Type").split(";", 1)[0].strip()
    if media_type not in ACCEPTED_MANIFESTS:
        raise ManifestError(
            f"{what}: the registry answered a {media_type or 'untyped'} manifest; "
            "push it again with a current docker (manifest v2 or OCI)"
        )
    digest = _header(headers, "Docker-Content-Digest").strip()
    if digest:
        if not DIGEST.fullmatch(digest):
            raise ManifestError(f"{what}: the registry named the digest {digest[:80]!r}, not a sha256 one")
        if body is not None and hashlib.sha256(body).hexdigest() != digest.removeprefix("sha256:"):
            raise ManifestError(f"{what}: the manifest does not match the digest the registry named")
        return digest
    if body is None:
        return ""  # a HEAD without the header: ask again with GET
    return "sha256:" + hashlib.sha256(body).hexdigest()

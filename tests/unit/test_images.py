"""Image references, pinned references and registry manifest answers (common/images.py),
and the engine's pull arguments for a pinned reference."""

from __future__ import annotations

import hashlib

import pytest

from picoord.agent.runtime.engine import pull_arguments
from picoord.common.images import (
    ImageName,
    ManifestError,
    manifest_digest,
    manifest_url,
    needs_resolving,
    parse_image,
    pinned_reference,
)
from picoord.common.validation import FieldError

D = "sha256:" + "ab" * 32
BODY = b'{"schemaVersion":2}'
BODY_DIGEST = "sha256:" + hashlib.sha256(BODY).hexdigest()
LIST = "application/vnd.docker.distribution.manifest.list.v2+json"
V2 = "application/vnd.docker.distribution.manifest.v2+json"


@pytest.mark.parametrize(
    ("image", "parsed"),
    [
        ("mcp", ImageName("docker.io", "library/mcp", "latest")),
        ("postgres:15-alpine", ImageName("docker.io", "library/postgres", "15-alpine")),
        ("me/app:v1", ImageName("docker.io", "me/app", "v1")),
        ("10.0.0.1:5000/mcp", ImageName("10.0.0.1:5000", "mcp", "latest")),
        ("desktop.lan:5000/team/mcp:2", ImageName("desktop.lan:5000", "team/mcp", "2")),
        ("localhost/x:1", ImageName("localhost", "x", "1")),
        (f"reg.lan/a@{D}", ImageName("reg.lan", "a", "", D)),
        (f"reg.lan/a:1@{D}", ImageName("reg.lan", "a", "1", D)),
    ],
)
def test_references_parse_as_docker_reads_them(image: str, parsed: ImageName) -> None:
    assert parse_image(image) == parsed


@pytest.mark.parametrize("image", ["", "Mcp:1", "a b", "reg:5000/x@sha256:short"])
def test_bad_references_are_refused_naming_the_field(image: str) -> None:
    with pytest.raises(FieldError, match=r"^spec\.image"):
        parse_image(image, "spec.image")


@pytest.mark.parametrize(
    ("image", "digest", "pinned"),
    [
        ("10.0.0.1:5000/mcp:latest", D, f"10.0.0.1:5000/mcp@{D}"),
        ("10.0.0.1:5000/mcp", D, f"10.0.0.1:5000/mcp@{D}"),
        ("postgres:15", D, f"library/postgres@{D}"),
        ("10.0.0.1:5000/mcp:latest", "", "10.0.0.1:5000/mcp:latest"),  # unpinned: as written
    ],
)
def test_pinned_references_drop_the_tag_for_the_digest(image: str, digest: str, pinned: str) -> None:
    assert pinned_reference(image, digest) == pinned


def test_a_pin_must_be_a_sha256_digest() -> None:
    with pytest.raises(FieldError, match="image_digest"):
        pinned_reference("reg.lan/a:1", "sha256:abc")


@pytest.mark.parametrize(
    ("image", "registries", "wanted"),
    [
        ("10.0.0.1:5000/mcp:1", ["10.0.0.1:5000"], True),
        ("desktop:5000/mcp", ["10.0.0.1:5000", "desktop:5000"], True),
        ("10.0.0.2:5000/mcp:1", ["10.0.0.1:5000"], False),  # another registry: by tag
        ("postgres:15-alpine", ["10.0.0.1:5000"], False),  # Docker Hub
        (f"10.0.0.1:5000/mcp@{D}", ["10.0.0.1:5000"], False),  # already pinned by its author
    ],
)
def test_only_cluster_registry_tags_are_resolved(image: str, registries: list[str], wanted: bool) -> None:
    assert needs_resolving(image, registries) is wanted


def test_the_manifest_path_names_the_tag_or_the_digest() -> None:
    assert manifest_url(parse_image("r:5000/team/mcp:2")) == "/v2/team/mcp/manifests/2"
    assert manifest_url(parse_image(f"r:5000/mcp@{D}")) == f"/v2/mcp/manifests/{D}"


@pytest.mark.parametrize(
    ("status", "headers", "body", "digest"),
    [
        (200, {"Content-Type": LIST, "Docker-Content-Digest": D}, None, D),  # HEAD of a list
        (200, {"content-type": V2, "docker-content-digest": D}, None, D),  # header case
        (
            200,
            {"Content-Type": "application/vnd.oci.image.index.v1+json", "Docker-Content-Digest": D},
            None,
            D,
        ),
        (200, {"Content-Type": V2}, None, ""),  # HEAD without the digest: ask with GET
        (200, {"Content-Type": V2}, BODY, BODY_DIGEST),  # GET: the body's sha256
        (200, {"Content-Type": V2, "Docker-Content-Digest": BODY_DIGEST}, BODY, BODY_DIGEST),
    ],
)
def test_the_digest_to_pin(status: int, headers: dict[str, str], body: bytes | None, digest: str) -> None:
    assert manifest_digest(status, headers, body, "mcp:1") == digest


@pytest.mark.parametrize(
    ("status", "headers", "body", "message"),
    [
        (404, {}, None, "no such image"),
        (401, {}, None, "refused"),
        (500, {}, None, "HTTP 500"),
        (
            200,
            {"Content-Type": "application/vnd.docker.distribution.manifest.v1+prettyjws"},
            None,
            "push it again",
        ),
        (200, {"Content-Type": V2, "Docker-Content-Digest": "md5:abc"}, None, "not a sha256"),
        (200, {"Content-Type": V2, "Docker-Content-Digest": D}, BODY, "does not match"),
    ],
)
def test_answers_that_cannot_be_pinned(
    status: int, headers: dict[str, str], body: bytes | None, message: str
) -> None:
    with pytest.raises(ManifestError, match=message):
        manifest_digest(status, headers, body, "mcp:1")


@pytest.mark.parametrize(
    ("image", "arguments"),
    [
        ("mcp", ("mcp", "latest")),
        ("10.0.0.1:5000/mcp:2", ("10.0.0.1:5000/mcp", "2")),
        ("10.0.0.1:5000/mcp", ("10.0.0.1:5000/mcp", "latest")),
        (f"10.0.0.1:5000/mcp@{D}", ("10.0.0.1:5000/mcp", D)),
    ],
)
def test_a_pinned_reference_is_pulled_by_digest(image: str, arguments: tuple[str, str]) -> None:
    assert pull_arguments(image) == arguments

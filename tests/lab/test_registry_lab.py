"""The lab registry and stand-in images, for real: Debian's docker-registry on the lab
bridge, images pushed over the registry API, pulled and run by a lab Pi's own dockerd."""

from __future__ import annotations

import io
import json
import tarfile
import time
import urllib.error
import urllib.request

import pytest

from picoord.lab.images import (
    BUSYBOX,
    MCP_PORT,
    POSTGRES_PORT,
    build_image,
    docker_archive,
    lab_images,
    stand_ins,
)
from picoord.lab.registry import Registry
from picoord.lab.sandbox import PiRack

pytestmark = pytest.mark.lab
RegistryRack = tuple[PiRack, Registry]


def test_images_are_reproducible_and_named_by_architecture() -> None:
    busybox = BUSYBOX.read_bytes()
    mcp1 = stand_ins()[0]
    first, again = build_image(mcp1, busybox, "amd64"), build_image(mcp1, busybox, "amd64")
    assert first.manifest == again.manifest
    arm = build_image(mcp1, busybox, "arm64")
    assert json.loads(arm.config.data)["architecture"] == "arm64"
    assert arm.config.digest != first.config.digest
    # The busybox layer is shared: pushed once, whatever the number of images.
    assert len({image.layers[0].digest for image in lab_images(busybox, "amd64")}) == 1


def test_docker_archive_is_what_docker_load_reads() -> None:
    """manifest.json names the image's config and its layers, each stored under that name
    with the blob's bytes (the booted install test `docker load`s it for real)."""
    image = build_image(stand_ins()[0], BUSYBOX.read_bytes(), "amd64")
    with tarfile.open(fileobj=io.BytesIO(docker_archive(image))) as archive:
        files = {member.name: archive.extractfile(member).read() for member in archive if member.isfile()}
    (entry,) = json.loads(files["manifest.json"])
    assert entry["RepoTags"] == [image.reference]
    assert files[entry["Config"]] == image.config.data
    assert [files[name] for name in entry["Layers"]] == [layer.data for layer in image.layers]
    assert docker_archive(image) == docker_archive(image)  # reproducible, like the image


def _docker(rack: PiRack, *argv: str, timeout: float = 120) -> str:
    done = rack.sandbox("pi1").run(["docker", *argv], timeout=timeout)
    assert done.returncode == 0, f"docker {' '.join(argv)}: {done.stderr}"
    return done.stdout.strip()


def _get(url: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=5) as reply:
            return reply.status, reply.read().decode()
    except urllib.error.HTTPError as error:
        return error.code, ""


def _wait_http(url: str) -> tuple[int, str]:
    deadline = time.monotonic() + 20
    while True:
        try:
            return _get(url)
        except (urllib.error.URLError, OSError):
            if time.monotonic() > deadline:
                raise
            time.sleep(0.2)


def test_registry_lists_every_stand_in(registry_rack: RegistryRack) -> None:
    _, registry = registry_rack
    assert sorted(registry.tags("mcp")) == ["1", "2", "3", "4"]  # 4: the demo's image that exits at start
    assert registry.tags("postgres") == ["15-alpine"]
    assert registry.tags("library/mcp-modules-rust") == ["latest"]


@pytest.mark.parametrize(
    ("tag", "host_port", "version", "health"),
    [("1", 18081, "mcp 1", 200), ("2", 18082, "mcp 2", 200), ("3", 18083, "mcp 3", 404)],
)
def test_a_pi_pulls_and_runs_mcp(
    registry_rack: RegistryRack, tag: str, host_port: int, version: str, health: int
) -> None:
    rack, registry = registry_rack
    name = f"mcp{tag}"
    _docker(rack, "pull", f"{registry.address}/mcp:{tag}")
    _docker(
        rack, "run", "-d", "--name", name, "-p", f"{host_port}:{MCP_PORT}", f"{registry.address}/mcp:{tag}"
    )
    try:
        address = rack.address("pi1")
        assert _wait_http(f"http://{address}:{host_port}/version") == (200, version + "\n")
        assert _get(f"http://{address}:{host_port}/health")[0] == health
    finally:
        _docker(rack, "rm", "-f", name)


def test_seed_names_resolve_through_the_mirror(registry_rack: RegistryRack) -> None:
    rack, _ = registry_rack
    _docker(rack, "pull", "postgres:15-alpine")
    _docker(rack, "run", "-d", "--name", "pg", "-p", f"15432:{POSTGRES_PORT}", "postgres:15-alpine")
    try:
        assert _wait_http(f"http://{rack.address('pi1')}:15432/health")[0] == 200
    finally:
        _docker(rack, "rm", "-f", "pg")

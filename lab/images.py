"""Stand-in container images for the lab, built without a Docker daemon.

No public registry is reachable here, so the lab makes its own small images from a static
busybox: `mcp:1` and `mcp:2` serve `/version` and `/health` over HTTP on 8080 (they differ
in what `/version` says), and mcp:1 to mcp:3 `/cgi-bin/db` (whether DATABASE_URL's host
and port answer); `mcp:3` serves `/version` but has no `/health` (its HTTP health check
fails), `mcp:4` exits at start (broken without any health check), and a `postgres`
stand-in accepts TCP on 5432. The seed's own image names
(`mcp-modules-rust:latest`, `postgres:15-alpine`) are the same images under those names.

Images are plain data here (layers, config, manifest: the Docker image manifest v2,
schema 2), built reproducibly (fixed mtimes and owners, so the same inputs give the same
digests) for any architecture whose busybox-static binary is given. That also sets the
image's architecture right, which `docker import --platform` on docker 20.10 does not.
lab/registry.py pushes them to Debian's docker-registry.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import platform
import tarfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

MANIFEST_TYPE = "application/vnd.docker.distribution.manifest.v2+json"
MANIFEST_LIST_TYPE = "application/vnd.docker.distribution.manifest.list.v2+json"
CONFIG_TYPE = "application/vnd.docker.container.image.v1+json"
LAYER_TYPE = "application/vnd.docker.image.rootfs.diff.tar.gzip"
BUSYBOX = Path("/bin/busybox")  # Debian's busybox-static: one static binary
APPLETS = (
    "sh",
    "httpd",
    "nc",
    "wget",
    "sleep",
    "cat",
    "echo",
    "env",
    "ls",
    "true",
    "false",
    "kill",
    "hostname",
)
MCP_PORT = 8080
POSTGRES_PORT = 5432


@dataclass(frozen=True)
class Blob:
    media_type: str
    data: bytes

    @property
    def digest(self) -> str:
        return "sha256:" + hashlib.sha256(self.data).hexdigest()

    def descriptor(self) -> dict[str, object]:
        return {"mediaType": self.media_type, "size": len(self.data), "digest": self.digest}


@dataclass(frozen=True)
class Image:
    """One image: its layers and config blob, and the manifest that names them."""

    repository: str
    tag: str
    layers: tuple[Blob, ...]
    config: Blob

    @property
    def manifest(self) -> bytes:
        document = {
            "schemaVersion": 2,
            "mediaType": MANIFEST_TYPE,
            "config": self.config.descriptor(),
            "layers": [layer.descriptor() for layer in self.layers],
        }
        return json.dumps(document, sort_keys=True, separators=(",", ":")).encode()

    @property
    def reference(self) -> str:
        return f"{self.repository}:{self.tag}"

    @property
    def architecture(self) -> str:
        return str(json.loads(self.config.data)["architecture"])

    @property
    def manifest_digest(self) -> str:
        return "sha256:" + hashlib.sha256(self.manifest).hexdigest()


@dataclass(frozen=True)
class ImageList:
    """One tag for several architectures: a manifest list naming each image's manifest, so
    a pulling engine takes the one for its own platform (or the one it is asked for)."""

    repository: str
    tag: str
    images: tuple[Image, ...]

    @property
    def manifest(self) -> bytes:
        document = {
            "schemaVersion": 2,
            "mediaType": MANIFEST_LIST_TYPE,
            "manifests": [
                {
                    "mediaType": MANIFEST_TYPE,
                    "size": len(image.manifest),
                    "digest": image.manifest_digest,
                    "platform": {"architecture": image.architecture, "os": "linux"},
                }
                for image in self.images
            ],
        }
        return json.dumps(document, sort_keys=True, separators=(",", ":")).encode()

    @property
    def reference(self) -> str:
        return f"{self.repository}:{self.tag}"


@dataclass(frozen=True)
class StandIn:
    """What one stand-in image holds and runs."""

    repository: str
    tag: str
    files: Mapping[str, bytes]  # path inside the image -> content
    cmd: Sequence[str]
    port: int
    env: Sequence[str] = ()


def _tar(entries: Sequence[tuple[str, bytes | str, int]]) -> bytes:
    """A reproducible tar: (path, content or symlink target, mode) in the given order."""
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w", format=tarfile.PAX_FORMAT) as archive:
        directories: set[str] = set()
        for path, content, mode in entries:
            parts = path.split("/")[:-1]
            for depth in range(1, len(parts) + 1):
                directory = "/".join(parts[:depth])
                if directory not in directories:
                    directories.add(directory)
                    info = tarfile.TarInfo(directory)
                    info.type, info.mode = tarfile.DIRTYPE, 0o755
                    archive.addfile(info)
            info = tarfile.TarInfo(path)
            info.mode = mode
            if isinstance(content, str):
                info.type, info.linkname = tarfile.SYMTYPE, content
                archive.addfile(info)
            else:
                info.size = len(content)
                archive.addfile(info, io.BytesIO(content))
    return buffer.getvalue()


def _layer(tar: bytes) -> tuple[Blob, str]:
    """The gzipped layer blob and the digest of its uncompressed tar (the config's diff_id)."""
    compressed = gzip.compress(tar, mtime=0)
    return Blob(LAYER_TYPE, compressed), "sha256:" + hashlib.sha256(tar).hexdigest()


def busybox_layer(busybox: bytes) -> tuple[Blob, str]:
    """bin/busybox and its applets as links: shared by every stand-in image."""
    entries: list[tuple[str, bytes | str, int]] = [("bin/busybox", busybox, 0o755)]
    entries += [(f"bin/{applet}", "busybox", 0o777) for applet in APPLETS]
    entries.append(("tmp/.keep", b"", 0o644))
    return _layer(_tar(entries))


def build_image(stand_in: StandIn, busybox: bytes, architecture: str) -> Image:
    base, base_id = busybox_layer(busybox)
    files = sorted(stand_in.files.items())
    app, app_id = _layer(
        _tar([(path, content, 0o755 if "/cgi-bin/" in path else 0o644) for path, content in files])
    )
    config = {
        "architecture": architecture,
        "os": "linux",
        "config": {
            "Cmd": list(stand_in.cmd),
            "Env": ["PATH=/bin", *stand_in.env],
            "ExposedPorts": {f"{stand_in.port}/tcp": {}},
            "Labels": {"org.picoord.lab.stand-in": stand_in.repository},
        },
        "rootfs": {"type": "layers", "diff_ids": [base_id, app_id]},
        "history": [{"created_by": "picoord lab: busybox-static"}, {"created_by": "picoord lab: files"}],
    }
    config_blob = Blob(CONFIG_TYPE, json.dumps(config, sort_keys=True, separators=(",", ":")).encode())
    return Image(stand_in.repository, stand_in.tag, (base, app), config_blob)


def docker_archive(image: Image) -> bytes:
    """The image as `docker save` writes it (manifest.json, config, layers), for
    `docker load` where no registry is reachable (the package install test's booted root
    has no network). Layers stay gzipped: docker load decompresses them itself."""
    config = image.config.digest.removeprefix("sha256:") + ".json"
    layers = [layer.digest.removeprefix("sha256:") + "/layer.tar" for layer in image.layers]
    manifest = [{"Config": config, "RepoTags": [image.reference], "Layers": layers}]
    entries: list[tuple[str, bytes | str, int]] = [(config, image.config.data, 0o644)]
    entries += [(name, layer.data, 0o644) for name, layer in zip(layers, image.layers, strict=True)]
    entries.append(("manifest.json", json.dumps(manifest).encode(), 0o644))
    return _tar(entries)


# GET /db: can this replica reach its database? Opens DATABASE_URL's host and port (busybox
# nc: exit 0 once connected, -e runs `true` on the connection) and says so, with the
# replica's host name, so a client sees which replica answered. httpd runs it as CGI with
# the container's environment.
DB_CGI = b"""#!/bin/sh
printf 'Content-Type: text/plain\\r\\n\\r\\n'
if [ -z "$DATABASE_URL" ]; then
  echo "db: DATABASE_URL is not set on $(hostname)"
  exit 0
fi
rest="${DATABASE_URL#*://}"
rest="${rest#*@}"
where="${rest%%/*}"
host="${where%:*}"
port="${where##*:}"
[ "$port" = "$where" ] && port=5432
if nc -w 3 "$host" "$port" -e /bin/true 2>/dev/null; then
  echo "db: reached $host:$port from $(hostname)"
else
  echo "db: cannot reach $host:$port from $(hostname)"
fi
"""


def _mcp(version: int, healthy: bool) -> StandIn:
    files = {
        "www/version": f"mcp {version}\n".encode(),
        "www/index.html": b"mcp stand-in\n",
        "www/cgi-bin/db": DB_CGI,
    }
    if healthy:
        files["www/health"] = b"ok\n"
    return StandIn(
        "mcp",
        str(version),
        files,
        # -v: a line per request on stderr, so `coordctl logs` has output to show
        ("/bin/httpd", "-f", "-v", "-p", str(MCP_PORT), "-h", "/www"),
        MCP_PORT,
        (f"MCP_VERSION={version}",),
    )


def _mcp_exiting(version: int) -> StandIn:
    """A build that dies at start (as a binary missing a library would): broken even for a
    service without a health check, such as the seed's own mcp-server."""
    return StandIn(
        "mcp",
        str(version),
        {"www/version": f"mcp {version}\n".encode()},
        ("/bin/sh", "-c", f"echo 'mcp {version}: cannot start' >&2; exit 3"),
        MCP_PORT,
        (f"MCP_VERSION={version}",),
    )


def stand_ins() -> list[StandIn]:
    """mcp:1, mcp:2, mcp:3 (no /health: fails an HTTP health check), mcp:4 (exits at
    start), and the postgres stand-in."""
    postgres = StandIn(
        "postgres",
        "15-alpine",
        {"www/health": b"ok\n"},
        # Accepts TCP on 5432 (and answers HTTP there): enough for a tcp health check and
        # for a client to see that the name resolves and the port is open.
        ("/bin/httpd", "-f", "-p", str(POSTGRES_PORT), "-h", "/www"),
        POSTGRES_PORT,
    )
    return [_mcp(1, True), _mcp(2, True), _mcp(3, False), _mcp_exiting(4), postgres]


# Docker Hub names, pulled through the lab registry as a mirror: the seed's own image names,
# and the stand-ins' short names (`mcp:2`), so a spec reads the same in every lab.
SEED_ALIASES = {
    ("library/mcp-modules-rust", "latest"): ("mcp", "1"),
    ("library/postgres", "15-alpine"): ("postgres", "15-alpine"),
}


def host_architecture() -> str:
    """This machine's architecture in Docker's words (amd64, arm64): what its busybox is."""
    machine = platform.machine()
    return {"x86_64": "amd64", "aarch64": "arm64", "armv7l": "arm"}.get(machine, machine)


def lab_images(busybox: bytes, architecture: str) -> list[Image]:
    """Every image the lab registry holds, the seed's aliases included."""
    images = [build_image(stand_in, busybox, architecture) for stand_in in stand_ins()]
    by_reference = {(image.repository, image.tag): image for image in images}
    aliases = dict(SEED_ALIASES)
    for image in list(images):
        aliases[(f"library/{image.repository}", image.tag)] = (image.repository, image.tag)
    for (repository, tag), target in aliases.items():
        source = by_reference[target]
        images.append(Image(repository, tag, source.layers, source.config))
    return images


def multi_arch_images(busyboxes: Mapping[str, bytes]) -> list[ImageList]:
    """Every lab image as a manifest list over the architectures given (architecture ->
    that architecture's static busybox), e.g. {"amd64": ..., "arm64": ...}."""
    if not busyboxes:
        raise ValueError("multi_arch_images needs at least one architecture's busybox")
    per_arch = [lab_images(binary, architecture) for architecture, binary in sorted(busyboxes.items())]
    return [ImageList(same[0].repository, same[0].tag, tuple(same)) for same in zip(*per_arch, strict=True)]
